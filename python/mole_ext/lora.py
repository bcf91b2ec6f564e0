"""``LoRALinear``: a plain LoRA around a frozen ``nn.Linear`` (the attention projections of a
MoLE model), computed exactly as PEFT's ``lora.Linear`` computes it.

State-dict keys stay those of the base layer (``weight``, ``bias``) plus ``lora_A`` / ``lora_B``,
so base checkpoints still load into a model that carries it; ``mole_ext.adapter`` maps them to
PEFT's names (``base_layer.weight``, ``lora_A.<adapter>.weight``) on export.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["LoRALinear"]


class LoRALinear(nn.Module):
    """``y = W x + b + B (A drop(x)) * scaling`` around a frozen ``nn.Linear``, ``scaling = alpha / rank``.

    The base layer's parameters are reused (not copied) and frozen. ``lora_A`` [r, in] is
    initialised like PEFT (Kaiming-uniform, a = sqrt(5)) and ``lora_B`` [out, r] is zero, so a
    fresh layer equals the base. ``adapter_dtype`` (default: the base weight's) is the dtype of
    ``lora_A``/``lora_B``; as in PEFT, the input is cast to it for the LoRA branch and the sum is
    returned in the base output's dtype, so float32 adapters on a bfloat16 base train in float32.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        kw = {"dtype": adapter_dtype or base.weight.dtype, "device": base.weight.device}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same operations in the same order as peft.tuners.lora.Linear.forward, so a PEFT
        # model loaded from our export gives bit-identical outputs.
        result = nn.functional.linear(x, self.weight, self.bias)
        result_dtype = result.dtype
        if x.dtype != self.lora_A.dtype:
            x = x.to(self.lora_A.dtype)
        result = result + nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A),
                                               self.lora_B) * self.scaling
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """``B A * scaling`` [out, in] in the adapter dtype (what merging adds to ``weight``)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the LoRA merged into its weight (in the base dtype)."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        dtype=self.weight.dtype, device=self.weight.device)
        with torch.no_grad():
            lin.weight.copy_((self.weight.to(self.lora_A.dtype) + self.delta_weight()).to(self.weight.dtype))
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}, "
                f"adapter_dtype={str(self.lora_A.dtype).replace('torch.', '')}")
