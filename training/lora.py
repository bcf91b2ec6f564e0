"""A plain LoRA linear layer for the attention projections (what PEFT's ``lora.Linear`` does).

Kept local so that state-dict keys stay those of the base model plus ``lora_A`` / ``lora_B``,
and so that the MoLE layers and the attention LoRA share one freezing and export story.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``y = W x + b + scaling * B (A drop(x))`` around a frozen ``nn.Linear``.

    The base layer is reused (not copied) and frozen. ``lora_A`` [r, in] is initialised like PEFT
    (Kaiming-uniform, a = sqrt(5)) and ``lora_B`` [out, r] is zero, so a fresh layer equals the base.
    The base weight keeps its key name (``weight``/``bias``) so base checkpoints still load.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.linear(x, self.weight, self.bias)
        lora = nn.functional.linear(nn.functional.linear(self.dropout(x), self.lora_A), self.lora_B)
        return y + self.scaling * lora

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scaling={self.scaling}"
