"""The attention LoRA now lives in the library (``mole_ext.lora``); this name stays for old imports."""
from mole_ext.lora import LoRALinear

__all__ = ["LoRALinear"]
