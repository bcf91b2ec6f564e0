"""``MoLEFFN``: a LLaMA MLP whose three projections carry K LoRA experts behind a top-1 router."""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional
from .functional import GATE_MODES, ROUTINGS, Projection, Routing

__all__ = ["MoLEFFN", "MoLELinear"]

_ACTS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
         "gelu_pytorch_tanh": lambda t: F.gelu(t, approximate="tanh")}


class MoLELinear(nn.Module):
    """A frozen base Linear (``weight`` [out, in], optional ``bias``) plus K LoRA experts
    (``lora_A`` [K, r, in], ``lora_B`` [K, out, r]). Routing is shared across the FFN, so this
    module holds parameters; ``MoLEFFN`` runs it."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, bias: bool = False,
                 weight: Optional[nn.Parameter] = None, bias_param: Optional[nn.Parameter] = None,
                 dtype=None, device=None, adapter_dtype=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        if weight is None:
            weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
            nn.init.kaiming_uniform_(weight, a=math.sqrt(5))  # nn.Linear's init
            if bias:
                bias_param = nn.Parameter(torch.zeros(out_features, **kw))
        weight.requires_grad_(False)
        self.weight = weight
        if bias_param is not None:
            bias_param.requires_grad_(False)
        self.bias = bias_param
        # The LoRA stacks follow the base weight unless adapter_dtype says otherwise (float32
        # adapters on a bfloat16 base: the ops cast them to the compute dtype, the gradients
        # come back in float32).
        kw = {"dtype": adapter_dtype or weight.dtype, "device": weight.device}
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, rank, **kw))
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        """PEFT's init per expert: A Kaiming-uniform (a = sqrt(5), fan_in = in), B zeros."""
        with torch.no_grad():
            for k in range(self.lora_A.shape[0]):
                nn.init.kaiming_uniform_(self.lora_A[k], a=math.sqrt(5))
            self.lora_B.zero_()

    def projection(self) -> Projection:
        return Projection(self.weight, self.bias, self.lora_A, self.lora_B)

    def extra_repr(self):
        k, r, _ = self.lora_A.shape
        return f"in={self.in_features}, out={self.out_features}, experts={k}, rank={r}, bias={self.bias is not None}"


class MoLEFFN(nn.Module):
    """Sparse Mixture of LoRA Experts on a LLaMA SwiGLU MLP (LLaVA-MoLE).

    ``y = down'(act(gate'(x)) * up'(x))`` with ``P'(z)_t = W_P z_t + g_t * s * B_P[e_t] A_P[e_t] drop(z_t)``,
    ``e_t`` the router's top-1 expert for token t, shared by the three projections, and
    ``s = alpha / rank``. ``gate_mode`` sets g ("prob", "none", "straight_through");
    ``routing="dense"`` mixes all experts by their probabilities. ``adapter_dtype`` (default: the
    base weights' dtype) is the dtype of the trainable tensors (LoRA stacks, router).

    After each forward, ``last_routing.probs`` [N, K] (with grad) and ``last_routing.expert`` [N]
    hold the routing of that call's N = x.numel() / d tokens, for ``load_balance_loss``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, rank: int, alpha: float,
                 dropout: float = 0.0, hidden_act: Union[str, Callable] = "silu", gate_mode: str = "prob",
                 routing: str = "top1", dtype=None, device=None, *, bias: bool = False, adapter_dtype=None,
                 _base=None):
        super().__init__()
        for name, value, lo in (("hidden_size", hidden_size, 1), ("intermediate_size", intermediate_size, 1),
                                ("num_experts", num_experts, 1), ("rank", rank, 1)):
            if not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
        if gate_mode not in GATE_MODES:
            raise ValueError(f"gate_mode must be one of {GATE_MODES}, got {gate_mode!r}")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if isinstance(hidden_act, str):
            if hidden_act not in _ACTS:
                raise ValueError(f"hidden_act must be one of {sorted(_ACTS)} or a callable, got {hidden_act!r}")
            self.act_fn = _ACTS[hidden_act]
        else:
            self.act_fn = hidden_act
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.rank, self.alpha = num_experts, rank, alpha
        self.scaling = alpha / rank
        self.dropout, self.gate_mode, self.routing = dropout, gate_mode, routing
        base = _base or {}
        kw = {"dtype": dtype, "device": device}
        if "gate_proj" in base:  # from_mlp: follow the base weights' dtype and device
            kw = {"dtype": base["gate_proj"][0].dtype, "device": base["gate_proj"][0].device}
        d, m = hidden_size, intermediate_size

        def make(name, i, o):
            w, b = base.get(name, (None, None))
            return MoLELinear(i, o, num_experts, rank, bias=bias, weight=w, bias_param=b,
                              adapter_dtype=adapter_dtype, **kw)

        self.gate_proj = make("gate_proj", d, m)
        self.up_proj = make("up_proj", d, m)
        self.down_proj = make("down_proj", m, d)
        self.router = nn.Linear(d, num_experts, bias=True,
                                **{**kw, "dtype": adapter_dtype or self.gate_proj.weight.dtype})
        self.last_routing: Optional[Routing] = None

    @classmethod
    def from_mlp(cls, mlp: nn.Module, num_experts: int, rank: int, alpha: float, **kw) -> "MoLEFFN":
        """Wraps a transformers ``LlamaMLP`` (or any module with ``gate_proj``, ``up_proj``,
        ``down_proj`` Linears and ``act_fn``), reusing and freezing its weights (no copy)."""
        for name in ("gate_proj", "up_proj", "down_proj"):
            if not isinstance(getattr(mlp, name, None), nn.Linear):
                raise TypeError(f"from_mlp needs mlp.{name} to be an nn.Linear, got {type(getattr(mlp, name, None))}")
        if "hidden_act" not in kw:
            if not hasattr(mlp, "act_fn"):
                raise TypeError("from_mlp needs mlp.act_fn (or pass hidden_act=...)")
            kw["hidden_act"] = mlp.act_fn
        d, m = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        if (mlp.up_proj.in_features, mlp.up_proj.out_features, mlp.down_proj.in_features,
                mlp.down_proj.out_features) != (d, m, m, d):
            raise ValueError("from_mlp: gate_proj/up_proj must be [m, d] and down_proj [d, m]")
        base = {n: (getattr(mlp, n).weight, getattr(mlp, n).bias) for n in ("gate_proj", "up_proj", "down_proj")}
        kw.pop("dtype", None)
        kw.pop("device", None)
        return cls(d, m, num_experts, rank, alpha, bias=mlp.gate_proj.bias is not None, _base=base, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [..., hidden_size={self.hidden_size}], got shape {tuple(x.shape)}")
        if self.router.weight.numel() == 0 or self.gate_proj.lora_A.numel() == 0:
            # DeepSpeed ZeRO-3 leaves partitioned parameters empty until a hook gathers them; this
            # forward reads its submodules' parameters directly, so no submodule hook runs.
            raise RuntimeError("MoLEFFN: its parameters are partitioned (empty), e.g. by DeepSpeed ZeRO-3; make "
                               "MoLEFFN a ZeRO-3 leaf module: deepspeed.utils.set_z3_leaf_modules(model, [MoLEFFN])")
        y, routing = functional.mole_ffn(
            x, self.router.weight, self.router.bias, self.gate_proj.projection(), self.up_proj.projection(),
            self.down_proj.projection(), self.scaling, self.act_fn, self.gate_mode, self.routing,
            self.dropout, self.training)
        self.last_routing = routing
        return y

    def extra_repr(self):
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"num_experts={self.num_experts}, rank={self.rank}, alpha={self.alpha}, dropout={self.dropout}, "
                f"gate_mode={self.gate_mode!r}, routing={self.routing!r}")
