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
    acc = acc_dtype(x.dtype)
    # Autocast would run this linear in bf16/fp16; routing decisions are made in float32.
    with torch.autocast(x.device.type, enabled=False):
        logits = F.linear(x.to(acc), router_weight.to(acc), None if router_bias is None else router_bias.to(acc))
    return Routing(*ops.router_top1(logits))


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

    Args:
        z: [N, in] rows sorted by expert; offsets: [K+1] segment boundaries; row_scale: [N] or None.
    Returns:
        [N, out] = z W^T + b + scaling * row_scale * B_e (A_e drop(z)).
    """
    base = F.linear(z, proj.weight, proj.bias)
    z_lora = F.dropout(z, dropout, training) if dropout > 0 else z
    a, b, z_lora = _lora_operands(base.dtype, proj, z_lora)
    if not _records_autograd(z, proj, row_scale):
        # Inference: the delta accumulates straight into the base output (no [N, out] temporary).
        return ops.grouped_lora_add_out(base, z_lora, a, b, offsets, scaling, row_scale)
    # In place: neither linear's nor add's backward needs this output, so no extra [N, out] buffer.
    return base.add_(ops.grouped_lora(z_lora, a, b, offsets, scaling, row_scale))


def _records_autograd(z, proj: Projection, row_scale) -> bool:
    if not torch.is_grad_enabled():
        return False
    ts = (z, proj.weight, proj.bias, proj.lora_a, proj.lora_b, row_scale)
    return any(t is not None and t.requires_grad for t in ts)


def _lora_operands(dtype, proj: Projection, z):
    """The LoRA operands in the dtype the base projection produced. Without autocast that is
    already their dtype (no copy); under autocast the base linear runs in bf16/fp16, and the
    LoRA branch follows it (the float32 master weights receive float32 gradients)."""
    return proj.lora_a.to(dtype), proj.lora_b.to(dtype), z.to(dtype)


def _dense_projection(z, proj: Projection, probs, scaling, dropout, training):
    """Every expert on every row, weighted by probs[:, k]: the K experts run as K segments of a
    K-times replicated input through the same grouped kernel."""
    n, k = z.shape[0], proj.lora_a.shape[0]
    base = F.linear(z, proj.weight, proj.bias)
    z_rep = z.repeat(k, 1)
    if dropout > 0:
        z_rep = F.dropout(z_rep, dropout, training)
    offsets = torch.arange(0, (k + 1) * n, n, dtype=torch.int32, device=z.device)
    a, b, z_rep = _lora_operands(base.dtype, proj, z_rep)
    delta = ops.grouped_lora(z_rep, a, b, offsets, scaling, probs.t().reshape(-1))
    return base + delta.view(k, n, -1).sum(0)


def mole_ffn(x: torch.Tensor, router_weight: torch.Tensor, router_bias: Optional[torch.Tensor],
             gate: Projection, up: Projection, down: Projection, scaling: float,
             act: Callable[[torch.Tensor], torch.Tensor] = F.silu, gate_mode: str = "prob",
             routing: str = "top1", dropout: float = 0.0, training: bool = False):
    """Sparse MoLE SwiGLU FFN: ``y = down'(act(gate'(x)) * up'(x))`` with one top-1 routing
    decision per token shared by the three projections.

    top1: route, permute x once, run all three projections (base GEMMs + grouped LoRA) in
    expert order, unpermute once. dense: every expert weighted by its probability (gate_mode
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
    r = route(x2, router_weight, router_bias)
    if routing == "dense":
        h = act(_dense_projection(x2, gate, r.probs, scaling, dropout, training)) * \
            _dense_projection(x2, up, r.probs, scaling, dropout, training)
        y = _dense_projection(h, down, r.probs, scaling, dropout, training)
        return y.reshape(shape), r
    g = gate_values(r, gate_mode)
    xs, sorted_token, offsets = ops.permute(x2, r.expert, router_weight.shape[0])
    gs = None if g is None else ops.permute_rows(g.unsqueeze(1), sorted_token).squeeze(1)
    h = act(mole_projection(xs, gate, offsets, scaling, gs, dropout, training)) * \
        mole_projection(xs, up, offsets, scaling, gs, dropout, training)
    ys = mole_projection(h, down, offsets, scaling, gs, dropout, training)
    return ops.unpermute(ys, sorted_token).reshape(shape), r
