"""One thin wrapper per ``torch.ops.mole_ext`` op, with its fake (meta) kernel and autograd.

Backends: the C++ CPU kernels always; CUDA kernels when the extension was built with them
(``mole_ext.info``). An op without a compiled CUDA kernel runs on CUDA tensors through its
``mole_ext.reference`` implementation, registered below for the CUDA dispatch key: correct,
but not fast. ``cuda_backend()`` says which path each op takes.

Shapes: N tokens, K experts, d / in / out features, r LoRA rank. Integer outputs are int32;
integer inputs accept int32 or int64.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (loads the operator library)
from . import reference as _ref

__all__ = [
    "router_top1", "permute", "permute_rows", "unpermute", "grouped_lora", "grouped_lora_add_out",
    "grouped_lora_backward_add_out", "lora_linear", "load_balance_loss",
    "cuda_backend", "cuda_check_errors", "set_cuda_validate", "cuda_validate",
]

_OPS = ("router_top1", "router_top1_backward", "permute", "permute_rows", "unpermute",
        "grouped_lora", "grouped_lora_h", "grouped_lora_add_out", "grouped_lora_backward",
        "grouped_lora_backward_add_out", "lora_linear", "lora_linear_h", "load_balance_loss",
        "load_balance_loss_backward")

_lib = torch.library.Library("mole_ext", "IMPL")  # noqa: TOR901 (fallback kernels only)
_CUDA_FALLBACK = []
for _name in _OPS:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"mole_ext::{_name}", "CUDA"):
        _lib.impl(_name, getattr(_ref, _name), "CUDA")
        _CUDA_FALLBACK.append(_name)


def cuda_backend() -> dict:
    """Which implementation each op uses for CUDA tensors: "kernel" or "reference"."""
    return {n: ("reference" if n in _CUDA_FALLBACK else "kernel") for n in _OPS}


def cuda_check_errors(synchronize: bool = True) -> None:
    """Raises the error a mole_ext CUDA kernel reported (expert id out of range, ``sorted_token``
    not a permutation), if any.

    CPU kernels raise in the failing call. CUDA kernels never read or write out of bounds on bad
    ids (such rows are set aside, see ``permute``), but to avoid a host synchronisation per op
    they report the error asynchronously: the next mole_ext CUDA op on that device raises it, or
    this function does. Validate mode (``set_cuda_validate(True)`` or the environment variable
    ``MOLE_EXT_CUDA_VALIDATE=1``) synchronises and raises in the failing call instead.
    """
    _C.cuda_check_errors(synchronize)


def set_cuda_validate(on: bool) -> None:
    """Turns CUDA validate mode on or off (see ``cuda_check_errors``)."""
    _C.set_cuda_validate(bool(on))


def cuda_validate() -> bool:
    """Whether CUDA validate mode is on."""
    return bool(_C.cuda_validate())


# ---------------------------------------------------------------------------------------------
# router_top1

def router_top1(logits: torch.Tensor):
    """Softmax over experts and top-1 expert per token.

    Args:
        logits: [N, K] float32 / bfloat16 / float16 / float64.
    Returns:
        probs: [N, K] float32 (float64 for float64 logits), differentiable.
        expert: [N] int32, arg-max of probs, ties to the lowest index.
    """
    return torch.ops.mole_ext.router_top1(logits)


@torch.library.register_fake("mole_ext::router_top1")
def _(logits):
    acc = _ref.acc_dtype(logits.dtype)
    return (logits.new_empty(logits.shape, dtype=acc),
            logits.new_empty(logits.shape[:1], dtype=torch.int32))


@torch.library.register_fake("mole_ext::router_top1_backward")
def _(grad_probs, probs):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def _router_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0])
    ctx.logits_dtype = inputs[0].dtype


def _router_backward(ctx, grad_probs, grad_expert):
    (probs,) = ctx.saved_tensors
    if grad_probs is None:
        return None
    grad = torch.ops.mole_ext.router_top1_backward(grad_probs, probs)
    return grad.to(ctx.logits_dtype)


torch.library.register_autograd("mole_ext::router_top1", _router_backward, setup_context=_router_setup)


# ---------------------------------------------------------------------------------------------
# permute / permute_rows / unpermute: each other's adjoints

def permute(x: torch.Tensor, expert: torch.Tensor, num_experts: int):
    """Groups rows by expert, stable within an expert.

    Args:
        x: [N, d] any dtype.
        expert: [N] int32/int64 in [0, num_experts). On CPU an id outside raises here; on CUDA
            such rows go after all valid rows (offsets[K] then counts only valid rows) and the
            error is raised asynchronously (see ``cuda_check_errors``).
        num_experts: K >= 1.
    Returns:
        x_sorted: [N, d], rows of x in expert order (differentiable in x).
        sorted_token: [N] int32, original row of each sorted row.
        offsets: [K+1] int32, expert k owns sorted rows offsets[k]:offsets[k+1].
    """
    return torch.ops.mole_ext.permute(x, expert, num_experts)


@torch.library.register_fake("mole_ext::permute")
def _(x, expert, num_experts):
    n = x.shape[0]
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((n,), dtype=torch.int32), x.new_empty((num_experts + 1,), dtype=torch.int32))


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _permute_backward(ctx, grad_sorted, grad_token, grad_offsets):
    (sorted_token,) = ctx.saved_tensors
    return (None if grad_sorted is None else torch.ops.mole_ext.unpermute(grad_sorted, sorted_token)), None, None


torch.library.register_autograd("mole_ext::permute", _permute_backward, setup_context=_permute_setup)


def permute_rows(x: torch.Tensor, sorted_token: torch.Tensor) -> torch.Tensor:
    """Applies a permutation from ``permute`` to other rows: out[i] = x[sorted_token[i]].

    Args:
        x: [N, d]; sorted_token: [N] int32/int64, a permutation of [0, N).
    Returns:
        [N, d], differentiable in x.
    """
    return torch.ops.mole_ext.permute_rows(x, sorted_token)


def unpermute(y_sorted: torch.Tensor, sorted_token: torch.Tensor) -> torch.Tensor:
    """Back to token order: y[sorted_token[i]] = y_sorted[i].

    Args:
        y_sorted: [N, d]; sorted_token: [N] int32/int64, a permutation of [0, N).
    Returns:
        [N, d], differentiable in y_sorted.
    """
    return torch.ops.mole_ext.unpermute(y_sorted, sorted_token)


for _name in ("permute_rows", "unpermute"):
    torch.library.register_fake(f"mole_ext::{_name}")(
        lambda x, sorted_token: torch.empty_like(x, memory_format=torch.contiguous_format))


def _rows_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _permute_rows_backward(ctx, grad):
    (sorted_token,) = ctx.saved_tensors
    return torch.ops.mole_ext.unpermute(grad, sorted_token), None


def _unpermute_backward(ctx, grad):
    (sorted_token,) = ctx.saved_tensors
    return torch.ops.mole_ext.permute_rows(grad, sorted_token), None


torch.library.register_autograd("mole_ext::permute_rows", _permute_rows_backward, setup_context=_rows_setup)
torch.library.register_autograd("mole_ext::unpermute", _unpermute_backward, setup_context=_rows_setup)


# ---------------------------------------------------------------------------------------------
# grouped_lora

def grouped_lora(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, offsets: torch.Tensor,
                 scaling: float, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Grouped LoRA over expert segments of expert-sorted rows.

    For row i in segment k (offsets[k] <= i < offsets[k+1]):
    ``y[i] = scaling * row_scale[i] * lora_b[k] @ (lora_a[k] @ x[i])``, accumulated in float32
    (float64 for float64). The CUDA kernels round the scaled rank-r intermediate
    ``scaling * row_scale[i] * (lora_a[k] @ x[i])`` to x's dtype once before the second product
    (as PyTorch's bf16 / fp16 LoRA rounds ``lora_a @ x``); the CPU kernel keeps it in float32.

    Args:
        x: [N, in] float32 / bfloat16 / float16 / float64.
        lora_a: [K, r, in], same dtype as x.
        lora_b: [K, out, r], same dtype as x.
        offsets: [K+1] int32/int64, 0 = offsets[0] <= ... <= offsets[K] = N.
        scaling: LoRA scale (alpha / r).
        row_scale: optional [N] float per-row gate.
    Returns:
        [N, out] in x's dtype; differentiable in x, lora_a, lora_b, row_scale.

    When autograd records the call, it runs ``mole_ext::grouped_lora_h``, which also returns the
    rank-r shrink ``lora_a[k] @ x[i]`` (float32, [N, r]: small next to x) for the backward to take
    instead of recomputing it from x: the same gradients bit for bit, one read of x fewer.
    """
    if _records_grad(x, lora_a, lora_b, row_scale):
        return torch.ops.mole_ext.grouped_lora_h(x, lora_a, lora_b, offsets, float(scaling), row_scale)[0]
    return torch.ops.mole_ext.grouped_lora(x, lora_a, lora_b, offsets, float(scaling), row_scale)


def _records_grad(*tensors) -> bool:
    """Whether autograd will record an op on these inputs (then the ``*_h`` op's shrink is saved)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


@torch.library.register_fake("mole_ext::grouped_lora")
def _(x, lora_a, lora_b, offsets, scaling, row_scale):
    return x.new_empty((x.shape[0], lora_b.shape[1]))


@torch.library.register_fake("mole_ext::grouped_lora_h")
def _(x, lora_a, lora_b, offsets, scaling, row_scale):
    return (x.new_empty((x.shape[0], lora_b.shape[1])),
            x.new_empty((x.shape[0], lora_a.shape[1]), dtype=_ref.acc_dtype(x.dtype)))


def grouped_lora_add_out(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         offsets: torch.Tensor, scaling: float, row_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place ``out += grouped_lora(x, lora_a, lora_b, offsets, scaling, row_scale)``: the LoRA
    delta lands on an existing output (the base GEMM's) without a second [N, out] tensor. The sum
    is formed in the accumulation dtype and rounded once to out's dtype.

    Not differentiable (it mutates ``out``); ``mole_ext.functional`` uses it where autograd does
    not record.

    Args:
        out: [N, out] with x's dtype and device, updated in place (any strides).
        x, lora_a, lora_b, offsets, scaling, row_scale: as for ``grouped_lora``.
    Returns:
        out.
    """
    torch.ops.mole_ext.grouped_lora_add_out(out, x, lora_a, lora_b, offsets, float(scaling), row_scale)
    return out


@torch.library.register_fake("mole_ext::grouped_lora_add_out")
def _(out, x, lora_a, lora_b, offsets, scaling, row_scale):
    return None


@torch.library.register_fake("mole_ext::grouped_lora_backward")
def _(grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h=None):
    grad_rs = (row_scale.new_empty(row_scale.shape) if row_scale is not None else x.new_empty((0,)))
    c = torch.contiguous_format  # the kernels return contiguous gradients whatever the inputs' strides
    return (torch.empty_like(x, memory_format=c), torch.empty_like(lora_a, memory_format=c),
            torch.empty_like(lora_b, memory_format=c), grad_rs)


def _grouped_setup(ctx, inputs, output):
    x, lora_a, lora_b, offsets, scaling, row_scale = inputs
    ctx.scaling = scaling
    ctx.has_row_scale = row_scale is not None
    # grouped_lora_h: its shrink h (not differentiable) replaces the backward's recomputation
    h = output[1] if isinstance(output, (tuple, list)) else None
    if h is not None:
        ctx.mark_non_differentiable(h)
    ctx.has_h = h is not None
    ctx.save_for_backward(x, lora_a, lora_b, offsets, row_scale, h)


def _grouped_backward(ctx, grad_y, grad_h=None):
    x, lora_a, lora_b, offsets, row_scale, h = ctx.saved_tensors
    gx, ga, gb, grs = torch.ops.mole_ext.grouped_lora_backward(
        grad_y, x, lora_a, lora_b, offsets, ctx.scaling, row_scale if ctx.has_row_scale else None,
        h if ctx.has_h else None)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, ga if need[1] else None, gb if need[2] else None, None, None,
            grs if (ctx.has_row_scale and need[5]) else None)


torch.library.register_autograd("mole_ext::grouped_lora", _grouped_backward, setup_context=_grouped_setup)
torch.library.register_autograd("mole_ext::grouped_lora_h", _grouped_backward, setup_context=_grouped_setup)


def grouped_lora_backward_add_out(grad_x: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor,
                                  lora_b: torch.Tensor, offsets: torch.Tensor, scaling: float,
                                  row_scale: Optional[torch.Tensor] = None, h: Optional[torch.Tensor] = None):
    """The gradients of ``grouped_lora`` with the input gradient accumulated in place onto
    ``grad_x`` (the base projection's dX), summed in the accumulation dtype and rounded once, so
    the LoRA's dX never exists as a second [N, in] tensor.

    Args:
        grad_x: [N, in] with x's dtype and device, updated in place (any strides).
        grad_y: [N, out] float; x, lora_a, lora_b, offsets, scaling, row_scale: as for ``grouped_lora``.
        h: the forward's rank-r shrink (second output of ``mole_ext::grouped_lora_h`` /
            ``lora_linear_h``) or None: then it is recomputed from x (same results, bit for bit).
    Returns:
        grad_a [K, r, in], grad_b [K, out, r] (x's dtype; exactly zero for an empty expert), and
        grad_row_scale [N] in row_scale's dtype (empty [0] without row_scale).
    """
    return torch.ops.mole_ext.grouped_lora_backward_add_out(grad_x, grad_y, x, lora_a, lora_b, offsets,
                                                           float(scaling), row_scale, h)


@torch.library.register_fake("mole_ext::grouped_lora_backward_add_out")
def _(grad_x, grad_y, x, lora_a, lora_b, offsets, scaling, row_scale, h=None):
    grad_rs = (row_scale.new_empty(row_scale.shape) if row_scale is not None else x.new_empty((0,)))
    c = torch.contiguous_format
    return torch.empty_like(lora_a, memory_format=c), torch.empty_like(lora_b, memory_format=c), grad_rs


# ---------------------------------------------------------------------------------------------
# lora_linear: a whole MoLE projection (base GEMM + grouped LoRA) as one op

def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_a: torch.Tensor,
                lora_b: torch.Tensor, offsets: torch.Tensor, scaling: float, row_scale: Optional[torch.Tensor] = None,
                lora_x: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b + grouped_lora(lora_x, lora_a, lora_b, offsets, scaling, row_scale)`` on
    expert-sorted rows, with the LoRA delta accumulated into the base GEMM's output (no second
    [N, out] tensor); ``lora_x`` defaults to x. Without ``lora_x`` the backward adds the LoRA's dX
    onto the base GEMM's dX in place as well, and x is the only [N, in] activation saved.

    x and lora_x are cast to weight's dtype (the compute dtype) inside the op, so under autocast
    the caller passes x as it is and the cast copy is neither kept nor saved for the backward.

    Args:
        x: [N, in] float (any float dtype); weight: [out, in]; bias: [out] or None.
        lora_a: [K, r, in], lora_b: [K, out, r] in weight's dtype; offsets, scaling, row_scale:
            as for ``grouped_lora``.
        lora_x: [N, in] float or None, the LoRA's input when it differs from x (LoRA dropout).
    Returns:
        [N, out] in weight's dtype; differentiable in every tensor argument but offsets.

    When autograd records the call, it runs ``mole_ext::lora_linear_h``, which also returns the
    LoRA's rank-r shrink (float32 [N, r]) for the backward, as ``grouped_lora`` does.
    """
    if _records_grad(x, weight, bias, lora_a, lora_b, row_scale, lora_x):
        return torch.ops.mole_ext.lora_linear_h(x, weight, bias, lora_a, lora_b, offsets, float(scaling), row_scale,
                                                lora_x)[0]
    return torch.ops.mole_ext.lora_linear(x, weight, bias, lora_a, lora_b, offsets, float(scaling), row_scale, lora_x)


@torch.library.register_fake("mole_ext::lora_linear")
def _(x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x=None):
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype)


@torch.library.register_fake("mole_ext::lora_linear_h")
def _(x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x=None):
    return (x.new_empty((x.shape[0], weight.shape[0]), dtype=weight.dtype),
            x.new_empty((x.shape[0], lora_a.shape[1]), dtype=_ref.acc_dtype(weight.dtype)))


def _lora_linear_setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x = inputs
    ctx.scaling = scaling
    ctx.has_bias = bias is not None
    ctx.has_row_scale = row_scale is not None
    ctx.has_lora_x = lora_x is not None
    ctx.x_dtype = x.dtype
    # One [N, in] activation: x as the caller passed it (not the compute-dtype copy), or lora_x
    # instead when the LoRA runs on that and the (frozen) weight needs no gradient.
    keep_x = lora_x is None or weight.requires_grad
    # lora_linear_h: its shrink h (not differentiable) replaces the backward's recomputation
    h = output[1] if isinstance(output, (tuple, list)) else None
    if h is not None:
        ctx.mark_non_differentiable(h)
    ctx.save_for_backward(x if keep_x else None, weight, lora_a, lora_b, offsets, row_scale, lora_x, h)


def _lora_linear_backward(ctx, grad_y, grad_h=None):
    x, weight, lora_a, lora_b, offsets, row_scale, lora_x, h = ctx.saved_tensors
    if torch.is_grad_enabled():  # create_graph=True: the in-place dX accumulation is not recorded
        raise RuntimeError("mole_ext::lora_linear is not twice differentiable (double backward through mole_ext "
                           "ops is not supported)")
    need = ctx.needs_input_grad  # x, weight, bias, lora_a, lora_b, offsets, scaling, row_scale, lora_x
    rs = row_scale if ctx.has_row_scale else None
    grad_y = grad_y.to(weight.dtype)
    need_lora = need[3] or need[4] or (ctx.has_row_scale and need[7])
    grad_x = grad_lora_x = ga = gb = grs = None
    if not ctx.has_lora_x:
        xc = x.to(weight.dtype)
        if need[0]:
            grad_x = grad_y.mm(weight)  # the base GEMM's dX; the LoRA's lands on it in place
            ga, gb, grs = torch.ops.mole_ext.grouped_lora_backward_add_out(grad_x, grad_y, xc, lora_a, lora_b, offsets,
                                                                          ctx.scaling, rs, h)
            grad_x = grad_x.to(ctx.x_dtype)
        elif need_lora:
            _, ga, gb, grs = torch.ops.mole_ext.grouped_lora_backward(grad_y, xc, lora_a, lora_b, offsets, ctx.scaling,
                                                                      rs, h)
    else:  # the LoRA's input is another tensor: its dX goes there
        if need[0]:
            grad_x = grad_y.mm(weight).to(ctx.x_dtype)
        if need[8] or need_lora:
            glx, ga, gb, grs = torch.ops.mole_ext.grouped_lora_backward(grad_y, lora_x.to(weight.dtype), lora_a,
                                                                        lora_b, offsets, ctx.scaling, rs, h)
            grad_lora_x = glx.to(lora_x.dtype) if need[8] else None
    grad_w = grad_y.t().mm(x.to(weight.dtype)) if need[1] else None
    grad_bias = grad_y.sum(0) if (ctx.has_bias and need[2]) else None
    return (grad_x, grad_w, grad_bias, ga if need[3] else None, gb if need[4] else None, None, None,
            grs if (ctx.has_row_scale and need[7]) else None, grad_lora_x)


torch.library.register_autograd("mole_ext::lora_linear", _lora_linear_backward, setup_context=_lora_linear_setup)
torch.library.register_autograd("mole_ext::lora_linear_h", _lora_linear_backward, setup_context=_lora_linear_setup)


# ---------------------------------------------------------------------------------------------
# load_balance_loss

def load_balance_loss(probs: torch.Tensor, expert: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch-style balance loss over the tokens where ``mask`` is True.

    ``f_k`` = share of counted tokens routed to k, ``P_k`` = mean router probability of k over
    counted tokens; returns ``K * sum_k f_k P_k`` (1.0 at perfect balance, K when all tokens go
    to one expert with probability 1; the released LLaVA-MoLE code reports this divided by K).
    0 when no token counts. Gradient flows to probs only.

    Args:
        probs: [N, K] float (router probabilities).
        expert: [N] int32/int64 top-1 expert.
        mask: optional [N] bool, True for real (non-padding) tokens.
    Returns:
        scalar, float32 (float64 for float64 probs).
    """
    return torch.ops.mole_ext.load_balance_loss(probs, expert, mask)


@torch.library.register_fake("mole_ext::load_balance_loss")
def _(probs, expert, mask):
    return probs.new_empty((), dtype=_ref.acc_dtype(probs.dtype))


@torch.library.register_fake("mole_ext::load_balance_loss_backward")
def _(grad_loss, probs, expert, mask):
    return torch.empty_like(probs, memory_format=torch.contiguous_format)


def _lb_setup(ctx, inputs, output):
    probs, expert, mask = inputs
    ctx.has_mask = mask is not None
    ctx.save_for_backward(probs, expert, mask)


def _lb_backward(ctx, grad):
    probs, expert, mask = ctx.saved_tensors
    g = torch.ops.mole_ext.load_balance_loss_backward(grad, probs, expert, mask if ctx.has_mask else None)
    return g, None, None


torch.library.register_autograd("mole_ext::load_balance_loss", _lb_backward, setup_context=_lb_setup)


# ---------------------------------------------------------------------------------------------
# The backward ops have no derivative of their own: differentiating through them (double
# backward) raises instead of silently returning zeros.

def _no_double_backward(name):
    def backward(ctx, *grads):
        raise RuntimeError(f"mole_ext::{name} is not differentiable (double backward through mole_ext ops "
                           "is not supported)")

    return backward


for _name in ("router_top1_backward", "grouped_lora_backward", "load_balance_loss_backward"):
    torch.library.register_autograd(f"mole_ext::{_name}", _no_double_backward(_name),
                                    setup_context=lambda ctx, inputs, output: None)
