"""mole_ext: sparse Mixture of LoRA Experts (LLaVA-MoLE) for PyTorch.

``MoLEFFN`` (the module), ``load_balance_loss``; ``mole_ext.ops`` (one wrapper per op),
``mole_ext.functional`` (the FFN as functions), ``mole_ext.reference`` (pure-PyTorch oracle).
"""

from . import ops  # noqa: F401  (registers the ops' fake kernels and autograd)
from . import functional, reference  # noqa: F401
from .nn import MoLEFFN, MoLELinear
from .ops import load_balance_loss

__version__ = "0.1.0"
__all__ = ["MoLEFFN", "MoLELinear", "load_balance_loss", "ops", "functional", "reference"]
