"""mole_ext: sparse Mixture of LoRA Experts (LLaVA-MoLE) for PyTorch.

``MoLEFFN`` (the module), ``load_balance_loss``; ``mole_ext.ops`` (one wrapper per op),
``mole_ext.functional`` (the FFN as functions), ``mole_ext.reference`` (pure-PyTorch oracle);
``MoLEConfig`` / ``get_mole_model`` / ``save_pretrained`` / ``from_pretrained`` (``mole_ext.adapter``)
put MoLE on a transformers model PEFT style.
"""

from . import ops  # noqa: F401  (registers the ops' fake kernels and autograd)
from . import functional, reference  # noqa: F401
from .adapter import MoLEConfig, from_pretrained, get_mole_model, merge_attention_lora, mole_state_dict, save_pretrained
from .lora import LoRALinear
from .nn import MoLEFFN, MoLELinear
from .ops import load_balance_loss

__version__ = "0.1.0"
__all__ = ["MoLEFFN", "MoLELinear", "LoRALinear", "load_balance_loss", "ops", "functional", "reference",
           "MoLEConfig", "get_mole_model", "save_pretrained", "from_pretrained", "mole_state_dict",
           "merge_attention_lora"]
