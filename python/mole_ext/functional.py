"""The MoLE FFN as functions over the ops: route, dispatch (permute), grouped projections,
combine (unpermute). ``mole_ext.nn.MoLEFFN`` is a thin module over ``mole_ffn``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import ops
from .reference import Projection, acc_dtype

__all__ = ["Routing", "Projection", "route", "gate_values", "mole_projection", "mole_ffn",
           "GATE_MODES", "ROUTINGS"]

GATE_MODES = ("prob", "none", "straight_through")
ROUTINGS = ("top1", "dense")


class Routing(NamedTuple):
    """One forward's routing: probs [N, K] float32 (with grad), expert [N] int32."""
    probs: torch.Tensor
    expert: torch.Tensor


def route(x: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor]) -> Routing:
    """Router logits in float32 (float64 for float64 x), softmax and top-1.

    Args:
        x: [N, d]; router_weight: [K, d]; router_bias: [K] or None.
    """
    return Routing(*ops.router_top1(_router_logits(x, router_weight, router_bias)))


def _router_logits(x, router_weight, router_bias):
    acc = acc_dtype(x.dtype)
    # Autocast would run this linear in bf16/fp16; routing decisions are made in float32.
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(acc), router_weight.to(acc), None if router_bias is None else router_bias.to(acc))


class _RouteAndPermute(torch.autograd.Function):
    """``route`` and one ``permute`` of x as a single autograd node that keeps x only in expert
    order. The router weight's gradient is a sum over tokens, so it is taken on the sorted rows
    with the logits' gradient permuted the same way: x in token order (or its float32 copy) is
    not saved next to x_sorted, which the projections save anyway.

    forward(x [N, d], router_weight [K, d], router_bias [K] or None, num_experts) ->
    (probs [N, K], expert [N], x_sorted [N, d], sorted_token [N], offsets [K+1]).
    """

    @staticmethod
    def forward(ctx, x, router_weight, router_bias, num_experts):
        probs, expert = ops.router_top1(_router_logits(x, router_weight, router_bias))
        xs, sorted_token, offsets = ops.permute(x, expert, num_experts)
        ctx.save_for_backward(xs, probs, sorted_token, router_weight)
        ctx.bias_dtype = None if router_bias is None else router_bias.dtype
        ctx.mark_non_differentiable(expert, sorted_token, offsets)
        ctx.set_materialize_grads(False)  # unused probs (gate_mode="none", no balance loss): no router work
        return probs, expert, xs, sorted_token, offsets

    @staticmethod
    def backward(ctx, grad_probs, _expert, grad_xs, _sorted_token, _offsets):
        xs, probs, sorted_token, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = probs.dtype
        grad_logits = (torch.ops.mole_ext.router_top1_backward(grad_probs, probs)  # [N, K], acc dtype
                       if grad_probs is not None else None)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = ops.unpermute(grad_xs, sorted_token) if grad_xs is not None else torch.zeros_like(xs)
            if grad_logits is not None:  # + dlogits W, summed in the accumulation dtype, rounded once
                grad_x = grad_x.to(acc).addmm_(grad_logits, weight.to(acc)).to(xs.dtype)
        if grad_logits is not None and need_w:
            grad_w = ops.permute_rows(grad_logits, sorted_token).t().mm(xs.to(acc)).to(weight.dtype)
        if grad_logits is not None and need_b and ctx.bias_dtype is not None:
            grad_b = grad_logits.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b, None


def gate_values(routing: Routing, gate_mode: str) -> Optional[torch.Tensor]:
    """Per-token multiplier g of the LoRA delta ([N] float, or None for g = 1).

    "prob": the top-1 probability (task loss trains the router); "none": 1 (only the balance
    loss trains the router, as in the released code); "straight_through": value 1, gradient of
    the top-1 probability.
    """
    if gate_mode == "none":
        return None
    p_top = routing.probs.gather(1, routing.expert.long().unsqueeze(1)).squeeze(1)
    if gate_mode == "prob":
        return p_top
    if gate_mode == "straight_through":
        return p_top / p_top.detach()
    raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")


def mole_projection(z: torch.Tensor, proj: Projection, offsets: torch.Tensor, scaling: float,
                    row_scale: Optional[torch.Tensor], dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Base projection plus grouped LoRA on expert-sorted rows.

    One ``lora_linear`` op: the base GEMM with the LoRA delta accumulated into its output.
    Without LoRA dropout the backward also accumulates the LoRA's dX onto the base GEMM's dX,
    and z is the only [N, in] activation kept. With dropout in training the LoRA runs on
    drop(z), which is kept instead (in the compute dtype), and its dX returns through the
    dropout.

    Args:
        z: [N, in] rows sorted by expert; offsets: [K+1] segment boundaries; row_scale: [N] or None.
    Returns:
        [N, out] = z W^T + b + scaling * row_scale * B_e (A_e drop(z)), in the compute dtype
        (the autocast dtype under autocast, else z's).
    """
    weight, bias, a, b = _compute_operands(z, proj)
    z_lora = F.dropout(z, dropout, True).to(weight.dtype) if (dropout > 0 and training) else None
    return ops.lora_linear(z, weight, bias, a, b, offsets, scaling, row_scale, z_lora)


def _compute_operands(z, proj: Projection):
    """The projection's tensors in the compute dtype: under autocast the autocast dtype (what
    F.linear would run in; the float32 master weights receive float32 gradients through the
    cast; float64 stays float64, as autocast leaves it), else their own dtype, which must then be z's."""
    if torch.is_autocast_enabled(z.device.type) and z.dtype in (torch.float32, torch.bfloat16, torch.float16):
        dtype = torch.get_autocast_dtype(z.device.type)
    else:
        dtype = proj.weight.dtype
        if z.dtype != dtype:
            raise RuntimeError(f"z ({z.dtype}) and the projection weight ({dtype}) must have the same dtype "
                               "outside autocast")
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(proj.weight), cast(proj.bias), cast(proj.lora_a), cast(proj.lora_b)


def _dense_projection(z, proj: Projection, probs, scaling, dropout, training):
    """Every expert on every row, weighted by probs[:, k]: the K experts run as K segments of a
    K-times replicated input through the same grouped kernel."""
    n, k = z.shape[0], proj.lora_a.shape[0]
    weight, bias, a, b = _compute_operands(z, proj)
    base = F.linear(z.to(weight.dtype), weight, bias)
    z_rep = z.repeat(k, 1)
    if dropout > 0:
        z_rep = F.dropout(z_rep, dropout, training)
    offsets = torch.arange(k + 1, dtype=torch.int32, device=z.device) * n  # (a step of n fails for n = 0)
    z_rep = z_rep.to(weight.dtype)
    delta = ops.grouped_lora(z_rep, a, b, offsets, scaling, probs.t().reshape(-1))
    return base + delta.view(k, n, delta.shape[-1]).sum(0)


def mole_ffn(x: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor],
             gate: Projection, up: Projection, down: Projection, scaling: float,
             act: Callable[[torch.Tensor], torch.Tensor] = F.silu, gate_mode: str = "prob",
             routing: str = "top1", dropout: float = 0.0, training: bool = False):
    """Sparse MoLE SwiGLU FFN: ``y = down'(act(gate'(x)) * up'(x))`` with one top-1 routing
    decision per token shared by the three projections.

    top1: route and permute x once (one autograd node that saves x in expert order only), run
    all three projections (``lora_linear``: base GEMM with the grouped LoRA accumulated into it)
    in expert order, unpermute once. Saved for the backward: what a single-LoRA FFN saves plus
    O(N K) routing state. dense: every expert weighted by its probability (gate_mode
    does not apply).

    Args:
        x: [..., d]; router_weight: [K, d]; router_bias: [K] or None.
        gate, up: Projection with weight [m, d], lora_a [K, r, d], lora_b [K, m, r].
        down: Projection with weight [d, m], lora_a [K, r, m], lora_b [K, d, r].
    Returns:
        (y [..., d], Routing(probs [N, K], expert [N])).
    """
    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if routing == "dense":
        r = route(x2, router_weight, router_bias)
        h = act(_dense_projection(x2, gate, r.probs, scaling, dropout, training)) * \
            _dense_projection(x2, up, r.probs, scaling, dropout, training)
        y = _dense_projection(h, down, r.probs, scaling, dropout, training)
        return y.reshape(shape), r
    probs, expert, xs, sorted_token, offsets = _RouteAndPermute.apply(x2, router_weight, router_bias,
                                                                     router_weight.shape[0])
    r = Routing(probs, expert)
    g = gate_values(r, gate_mode)
    gs = None if g is None else ops.permute_rows(g.unsqueeze(1), sorted_token).squeeze(1)
    h = act(mole_projection(xs, gate, offsets, scaling, gs, dropout, training)) * \
        mole_projection(xs, up, offsets, scaling, gs, dropout, training)
    ys = mole_projection(h, down, offsets, scaling, gs, dropout, training)
    return ops.unpermute(ys, sorted_token).reshape(shape), r
