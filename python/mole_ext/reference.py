"""Readable pure-PyTorch versions of every mole_ext op and of the MoLE FFN.

These are the test oracle and the benchmark baseline. They are also the documented fallback for
CUDA tensors while an op has no CUDA kernel compiled in (see ``mole_ext.ops``). The MoLE FFN
here loops over experts in Python, like the released LLaVA-MoLE code; the product path is
``mole_ext.functional``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

__all__ = [
    "acc_dtype", "router_top1", "router_top1_backward", "permute", "permute_rows", "unpermute",
    "grouped_lora", "grouped_lora_h", "grouped_lora_add_out", "grouped_lora_backward", "grouped_lora_backward_add_out",
    "lora_linear", "lora_linear_h",
    "load_balance_loss", "load_balance_loss_backward",
    "Projection", "mole_ffn", "base_ffn",
]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_experts(expert: torch.Tensor, num_experts: int, what: str = "num_experts") -> None:
    if expert.numel() and (int(expert.min()) < 0 or int(expert.max()) >= num_experts):
        bad = int(expert.min()) if int(expert.min()) < 0 else int(expert.max())
        raise RuntimeError(f"expert ids must be in [0, {what} = {num_experts}), got {bad}")


def router_top1(logits: torch.Tensor):
    """logits [N, K] -> probs [N, K] (float32, float64 for float64), expert [N] int32 (ties: lowest)."""
    probs = torch.softmax(logits.to(acc_dtype(logits.dtype)), dim=-1)
    expert = torch.argmax(probs, dim=-1).to(torch.int32)
    return probs, expert


def router_top1_backward(grad_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Softmax Jacobian-vector product in probs' dtype."""
    g = grad_probs.to(probs.dtype)
    return probs * (g - (g * probs).sum(dim=-1, keepdim=True))


def permute(x: torch.Tensor, expert: torch.Tensor, num_experts: int):
    """Stable grouping of rows by expert -> (x_sorted [N, d], sorted_token [N] int32, offsets [K+1] int32)."""
    _check_experts(expert, num_experts)
    expert = expert.long()
    order = torch.argsort(expert, stable=True)
    counts = torch.bincount(expert, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return x[order], order.to(torch.int32), offsets


def permute_rows(x: torch.Tensor, sorted_token: torch.Tensor) -> torch.Tensor:
    """out[i] = x[sorted_token[i]]."""
    return x[sorted_token.long()]


def unpermute(y_sorted: torch.Tensor, sorted_token: torch.Tensor) -> torch.Tensor:
    """y[sorted_token[i]] = y_sorted[i]."""
    return torch.zeros_like(y_sorted).index_copy(0, sorted_token.long(), y_sorted)


def grouped_lora(x, lora_a, lora_b, offsets, scaling, row_scale=None):
    """y[i] = scaling * row_scale[i] * lora_b[k] @ (lora_a[k] @ x[i]) for i in segment k, in the accumulation dtype."""
    return _grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale).to(x.dtype)


def grouped_lora_h(x, lora_a, lora_b, offsets, scaling, row_scale=None):
    """(grouped_lora(x, ...), h): h [N, r] = lora_a[k] @ x[i] unscaled, in the accumulation dtype."""
    return grouped_lora(x, lora_a, lora_b, offsets, scaling, row_scale), _shrink(x, lora_a, offsets)


def _shrink(x, lora_a, offsets):
    acc = acc_dtype(x.dtype)
    bounds = [int(v) for v in offsets.tolist()]
    return torch.cat([x[s:e].to(acc) @ lora_a[k].to(acc).T for k, (s, e) in enumerate(zip(bounds, bounds[1:]))])


def grouped_lora_add_out(out, x, lora_a, lora_b, offsets, scaling, row_scale=None):
    """out += grouped_lora(x, ...) in place: the sum is taken in the accumulation dtype and rounded once."""
    if out.shape != (x.shape[0], lora_b.shape[1]) or out.dtype != x.dtype:
        raise RuntimeError(f"out must be [{x.shape[0]}, {lora_b.shape[1]}] of dtype {x.dtype}, got "
                           f"{tuple(out.shape)} {out.dtype}")
    delta = _grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale)
    out.copy_((out.to(delta.dtype) + delta).to(out.dtype))


def _grouped_lora_acc(x, lora_a, lora_b, offsets, scaling, row_scale=None):
    acc = acc_dtype(x.dtype)
    bounds = [int(v) for v in offsets.tolist()]
    if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(b > e for b, e in zip(bounds, bounds[1:])):
        raise RuntimeError(f"offsets must be non-decreasing from 0 to N = {x.shape[0]}, got {bounds}")
    pieces = []
    for k in range(lora_a.shape[0]):
        s, e = bounds[k], bounds[k + 1]
        y = (x[s:e].to(acc) @ lora_a[k].to(acc).T) @ lora_b[k].to(acc).T * scaling
        if row_scale is not None:
            y = y * row_scale[s:e].to(acc)[:, None]
        pieces.append(y)
    return torch.cat(pieces)  # K >= 1 pieces, empty segments included


def grouped_lora_backward(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale=None, h=None):
    """(grad_x, grad_a, grad_b, grad_row_scale) of grouped_lora; grad_row_scale is empty [0] without row_scale.
    h: grouped_lora_h's saved shrink, or None (recomputed from x)."""
    grad_x, grad_a, grad_b, grad_rs = _grouped_lora_backward_acc(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale,
                                                                 h)
    rs_dtype = row_scale.dtype if row_scale is not None else x.dtype
    return grad_x.to(x.dtype), grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_rs.to(rs_dtype)


def grouped_lora_backward_add_out(grad_x, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale=None, h=None):
    """grad_x += the grad_x of grouped_lora_backward in place (summed in the accumulation dtype,
    rounded once) -> (grad_a, grad_b, grad_row_scale)."""
    if grad_x.shape != x.shape or grad_x.dtype != x.dtype:
        raise RuntimeError(f"grad_x must be {tuple(x.shape)} of dtype {x.dtype}, got {tuple(grad_x.shape)} "
                           f"{grad_x.dtype}")
    gx, grad_a, grad_b, grad_rs = _grouped_lora_backward_acc(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h)
    grad_x.copy_((grad_x.to(gx.dtype) + gx).to(grad_x.dtype))
    rs_dtype = row_scale.dtype if row_scale is not None else x.dtype
    return grad_a.to(lora_a.dtype), grad_b.to(lora_b.dtype), grad_rs.to(rs_dtype)


def lora_linear(x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale=None, lora_x=None):
    """x W^T + b + grouped_lora(lora_x or x, ...), inputs cast to weight's dtype, the delta added in
    the accumulation dtype and rounded once."""
    xc = x.to(weight.dtype)
    out = F.linear(xc, weight, bias)
    grouped_lora_add_out(out, xc if lora_x is None else lora_x.to(weight.dtype), lora_a, lora_b, offsets, scaling,
                         row_scale)
    return out


def lora_linear_h(x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale=None, lora_x=None):
    """(lora_linear(...), h): h the LoRA's unscaled shrink of (lora_x or x) in weight's dtype, as grouped_lora_h."""
    y = lora_linear(x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x)
    return y, _shrink((x if lora_x is None else lora_x).to(weight.dtype), lora_a, offsets)


def _grouped_lora_backward_acc(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale=None, h=None):
    acc = acc_dtype(x.dtype)
    bounds = [int(v) for v in offsets.tolist()]
    gy, xa = grad_y.to(acc), x.to(acc)
    a, b = lora_a.to(acc), lora_b.to(acc)
    grad_x, grad_a, grad_b = torch.zeros_like(xa), torch.zeros_like(a), torch.zeros_like(b)
    grad_rs = torch.zeros(x.shape[0] if row_scale is not None else 0, dtype=acc, device=x.device)
    for k in range(a.shape[0]):
        s, e = bounds[k], bounds[k + 1]
        if s == e:
            continue
        h_k = xa[s:e] @ a[k].T if h is None else h[s:e].to(acc)
        gb = gy[s:e] @ b[k]
        mult = scaling * (row_scale[s:e].to(acc)[:, None] if row_scale is not None else 1.0)
        if row_scale is not None:
            grad_rs[s:e] = scaling * (gb * h_k).sum(1)
        dh = gb * mult
        grad_b[k] = gy[s:e].T @ (h_k * mult)
        grad_a[k] = dh.T @ xa[s:e]
        grad_x[s:e] = dh @ a[k]
    return grad_x, grad_a, grad_b, grad_rs


def load_balance_loss(probs, expert, mask=None):
    """Switch balance loss K * sum_k f_k P_k over tokens where mask is True; 0 when no token counts."""
    num_experts = probs.shape[1]
    _check_experts(expert, num_experts, "K")
    acc = acc_dtype(probs.dtype)
    if mask is not None:
        probs, expert = probs[mask], expert[mask]
    m = probs.shape[0]
    if m == 0:
        return probs.new_zeros((), dtype=acc)
    f = torch.bincount(expert.long(), minlength=num_experts).to(acc) / m
    p = probs.to(acc).sum(0) / m
    return num_experts * (f * p).sum()


def load_balance_loss_backward(grad_loss, probs, expert, mask=None):
    """d load_balance_loss / d probs, in probs' dtype."""
    num_experts = probs.shape[1]
    keep = mask if mask is not None else torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
    m = int(keep.sum())
    if m == 0:
        return torch.zeros_like(probs)
    counts = torch.bincount(expert[keep].long(), minlength=num_experts).to(torch.float64)
    col = grad_loss.to(torch.float64) * num_experts * counts / (m * m)
    return (keep[:, None].to(torch.float64) * col[None, :]).to(probs.dtype)


class Projection(NamedTuple):
    """One MoLE projection: frozen base weight [out, in] (+ bias) and expert stacks A [K, r, in], B [K, out, r]."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor


def base_ffn(x, gate_w, up_w, down_w, act: Callable = F.silu, gate_b=None, up_b=None, down_b=None):
    """The frozen LLaMA SwiGLU MLP: down(act(gate(x)) * up(x))."""
    return F.linear(act(F.linear(x, gate_w, gate_b)) * F.linear(x, up_w, up_b), down_w, down_b)


def mole_ffn(x, router_weight, router_bias, gate: Projection, up: Projection, down: Projection,
             scaling: float, act: Callable = F.silu, gate_mode: str = "prob", routing: str = "top1",
             dropout: float = 0.0, training: bool = False):
    """MoLE FFN in the released code's style: original token order, a Python loop over experts.

    Returns (y [..., d], probs [N, K], expert [N] int32).
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    acc = acc_dtype(x.dtype)
    logits = F.linear(x2.to(acc), router_weight.to(acc), None if router_bias is None else router_bias.to(acc))
    probs, expert = router_top1(logits)
    p_top = probs.gather(1, expert.long()[:, None]).squeeze(1)
    gate_value = {"prob": p_top, "none": torch.ones_like(p_top),
                  "straight_through": p_top / p_top.detach()}[gate_mode]
    num_experts = probs.shape[1]

    def lora(z, a, b):
        return (F.dropout(z, dropout, training).to(acc) @ a.to(acc).T) @ b.to(acc).T * scaling

    def proj(z, p: Projection):
        out = F.linear(z, p.weight, p.bias)
        delta = torch.zeros(z.shape[0], p.weight.shape[0], dtype=acc, device=z.device)
        for k in range(num_experts):
            if routing == "dense":
                delta = delta + probs[:, k:k + 1] * lora(z, p.lora_a[k], p.lora_b[k])
                continue
            idx = (expert == k).nonzero().squeeze(1)
            if idx.numel():
                delta = delta.index_add(0, idx, gate_value[idx, None] * lora(z[idx], p.lora_a[k], p.lora_b[k]))
        return out + delta.to(out.dtype)

    h = act(proj(x2, gate)) * proj(x2, up)
    y = proj(h, down)
    return y.reshape(shape), probs, expert
