"""MoLE for any transformers model with SwiGLU MLPs, PEFT style.

    from mole_ext import MoLEConfig, get_mole_model, save_pretrained, from_pretrained

    model = get_mole_model(model, MoLEConfig(num_experts=4, rank=8, alpha=16))
    ...                                   # train: only the adapter's parameters require grad
    save_pretrained(model, "my-adapter")  # mole_adapter_config.json + mole_adapter.safetensors
    model = from_pretrained(base_model, "my-adapter")

``get_mole_model`` replaces each targeted MLP (``gate_proj``/``up_proj``/``down_proj`` Linears and
``act_fn``: LLaMA, Mistral, Qwen2, the language model inside ``LlavaForConditionalGeneration``)
by a ``MoLEFFN`` that reuses its frozen weights, puts a ``LoRALinear`` on the attention
projections named in ``attn_lora_targets``, and leaves only the adapter (and
``modules_to_save``) trainable. Targets are searched inside ``model.get_decoder()`` when the
model has one (so a LLaVA model's vision tower is never touched), else in the whole model.
The model is changed in place and returned; it stays the same class (its state-dict keys are the
base model's plus the adapter's), so ``transformers.Trainer`` and friends take it as it is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import nn

from .lora import LoRALinear
from .nn import MoLEFFN

__all__ = ["MoLEConfig", "get_mole_model", "save_pretrained", "from_pretrained", "mole_state_dict",
           "merge_attention_lora", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT", "FORMAT_VERSION"]

CONFIG_NAME = "mole_adapter_config.json"
WEIGHTS_NAME = "mole_adapter.safetensors"
FORMAT = "mole_ext-adapter"
FORMAT_VERSION = 1  # bump when the file layout or a field's meaning changes; readers refuse newer

Target = Union[str, list, tuple, Callable[[str, nn.Module], bool], None]
_ATTN_DEFAULT = ("q_proj", "k_proj", "v_proj", "o_proj")
_SWIGLU = ("gate_proj", "up_proj", "down_proj")


@dataclass
class MoLEConfig:
    """What ``get_mole_model`` puts on a model.

    Matching (as PEFT's ``target_modules``): a list of names matches a module whose full name
    equals one of them or ends with ``"." + name``; a single string is a regular expression that
    must match the full name; a callable is called as ``predicate(full_name, module)``.

    Attributes:
        num_experts, rank, alpha, dropout: the MoLE experts (LoRA scaling ``alpha / rank``); the
            attention LoRA uses the same rank, alpha and dropout.
        gate_mode: "prob", "none" or "straight_through" (see ``MoLEFFN``).
        routing: "top1" (sparse) or "dense".
        target_modules: the MLPs to turn into ``MoLEFFN`` (default: every ``mlp``).
        layers: decoder-layer indices whose MLPs become MoLE (None: all). A module's layer index
            is the number after ``layers_pattern`` in its name (``...layers.3.mlp`` is layer 3).
        layers_pattern: see ``layers``.
        attn_lora_targets: Linears that get a plain LoRA (default q/k/v/o_proj; None or [] for none).
        attn_lora_layers: decoder-layer indices for the attention LoRA (None: all).
        modules_to_save: modules trained and saved in full (e.g. ["multi_modal_projector"]),
            matched in the whole model.
        adapter_dtype: dtype of the trainable adapter tensors. "float32" (default, like PEFT's
            ``autocast_adapter_dtype``): float32 on a float16/bfloat16 base, the base's dtype
            otherwise; another dtype name forces that dtype; None follows the base.
    """

    num_experts: int = 3
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    gate_mode: str = "prob"
    routing: str = "top1"
    target_modules: Target = ("mlp",)
    layers: Optional[list] = None
    layers_pattern: str = "layers"
    attn_lora_targets: Target = _ATTN_DEFAULT
    attn_lora_layers: Optional[list] = None
    modules_to_save: Optional[list] = None
    adapter_dtype: Optional[str] = "float32"

    def __post_init__(self):
        from .functional import GATE_MODES, ROUTINGS

        for name in ("num_experts", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MoLEConfig.{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool):
            raise ValueError(f"MoLEConfig.alpha must be a number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MoLEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"MoLEConfig.gate_mode must be one of {GATE_MODES}, got {self.gate_mode!r}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"MoLEConfig.routing must be one of {ROUTINGS}, got {self.routing!r}")
        for name in ("layers", "attn_lora_layers"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, int) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                    raise ValueError(f"MoLEConfig.{name} must be a list of layer indices or None, got {v!r}")
                setattr(self, name, list(v))
        for name in ("target_modules", "attn_lora_targets"):
            _check_target(f"MoLEConfig.{name}", getattr(self, name))
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise ValueError(f"MoLEConfig.modules_to_save must be a list of module names, got {self.modules_to_save!r}")
            self.modules_to_save = list(self.modules_to_save)
        if self.adapter_dtype is not None:
            if not isinstance(getattr(torch, str(self.adapter_dtype), None), torch.dtype) or \
                    not getattr(torch, self.adapter_dtype).is_floating_point:
                raise ValueError(f"MoLEConfig.adapter_dtype must be a floating dtype name such as 'float32' "
                                 f"or None, got {self.adapter_dtype!r}")

    def resolve_adapter_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        if self.adapter_dtype is None:
            return base_dtype
        want = getattr(torch, self.adapter_dtype)
        if want == torch.float32:
            return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype
        return want

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in ("target_modules", "attn_lora_targets"):
            v = d[name]
            if callable(v):
                d[name] = None  # a predicate is not serialisable; the saved module lists stand in for it
            elif isinstance(v, tuple):
                d[name] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MoLEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown MoLEConfig fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def _check_target(where: str, t) -> None:
    if t is None or callable(t):
        return
    if isinstance(t, str):
        try:
            re.compile(t)
        except re.error as e:
            raise ValueError(f"{where}: {t!r} is not a valid regular expression ({e})") from e
        return
    if isinstance(t, (list, tuple)) and all(isinstance(x, str) for x in t):
        return
    raise ValueError(f"{where} must be a list of module names, a regular expression, a callable "
                     f"(name, module) -> bool, or None; got {t!r}")


def _matches(target, name: str, module: nn.Module) -> bool:
    if target is None:
        return False
    if callable(target):
        return bool(target(name, module))
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def _layer_index(name: str, pattern: str) -> Optional[int]:
    m = re.search(rf"(?:^|\.){re.escape(pattern)}\.(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _scope(model: nn.Module) -> tuple[str, nn.Module]:
    """(name prefix, module) of the part of the model that targets are searched in: the decoder
    (the language model) when the model exposes one."""
    get = getattr(model, "get_decoder", None)
    dec = None
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError, TypeError):
            dec = None
    if dec is None or dec is model:
        return "", model
    for name, m in model.named_modules():
        if m is dec:
            return name, dec
    return "", model


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _is_swiglu(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Linear) for p in _SWIGLU) and hasattr(m, "act_fn")


def _plan(model: nn.Module, config: MoLEConfig) -> tuple[list[str], list[str]]:
    """The full names of the MLPs to turn into MoLE and of the Linears to get an attention LoRA."""
    prefix, scope = _scope(model)
    mlps, attn, seen_layers = [], [], set()
    for rel, m in scope.named_modules():
        if not rel:
            continue
        name = f"{prefix}.{rel}" if prefix else rel
        idx = _layer_index(name, config.layers_pattern)
        if idx is not None:
            seen_layers.add(idx)
        if not isinstance(m, (MoLEFFN, LoRALinear)) and _matches(config.target_modules, name, m):
            if config.layers is None or idx in config.layers:
                if not _is_swiglu(m):
                    raise TypeError(f"MoLEConfig.target_modules matched {name} ({type(m).__name__}), which is not "
                                    "a SwiGLU MLP (gate_proj, up_proj, down_proj Linears and act_fn)")
                mlps.append(name)
    for name in mlps:
        if any(o != name and o.startswith(name + ".") for o in mlps):
            raise ValueError(f"MoLEConfig.target_modules matched both {name} and a module inside it")
    for rel, m in scope.named_modules():
        name = f"{prefix}.{rel}" if prefix else rel
        if not rel or type(m) is not nn.Linear or any(name.startswith(p + ".") for p in mlps):
            continue
        if _matches(config.attn_lora_targets, name, m):
            idx = _layer_index(name, config.layers_pattern)
            if config.attn_lora_layers is None or idx in config.attn_lora_layers:
                attn.append(name)
    for what, wanted in (("layers", config.layers), ("attn_lora_layers", config.attn_lora_layers)):
        missing = sorted(set(wanted or ()) - seen_layers)
        if missing:
            have = f"layers {min(seen_layers)}..{max(seen_layers)}" if seen_layers else \
                f"no '{config.layers_pattern}.<i>' modules"
            raise ValueError(f"MoLEConfig.{what} has {missing}, but the model has {have}")
    return mlps, attn


def get_mole_model(model: nn.Module, config: MoLEConfig, *, _mlps=None, _attn=None) -> nn.Module:
    """Inject MoLE into ``model`` (in place) and return it with only the adapter trainable.

    Every targeted MLP becomes a ``MoLEFFN`` (its frozen base weights reused, not copied), every
    attention target a ``LoRALinear``. All other parameters are frozen except those of
    ``config.modules_to_save``. The names injected are kept on the model (``model.mole_config``,
    ``model.mole_modules``, ``model.mole_attn_lora_modules``) for ``save_pretrained``.
    """
    if not isinstance(config, MoLEConfig):
        raise TypeError(f"config must be a MoLEConfig, got {type(config).__name__}")
    if getattr(model, "mole_config", None) is not None:
        raise ValueError("this model already carries a MoLE adapter (model.mole_config is set)")
    if _mlps is None:
        mlps, attn = _plan(model, config)
        if not mlps and not attn:
            raise ValueError("MoLEConfig matched no module: target_modules found no SwiGLU MLP and "
                             "attn_lora_targets no Linear (check the names and layers)")
    else:
        mlps, attn = list(_mlps), list(_attn)
        have = dict(model.named_modules())
        absent = [n for n in mlps + attn if n not in have]
        if absent:
            raise ValueError(f"the adapter does not fit this model: it has no module {absent[0]} "
                             f"({len(absent)} of the adapter's modules are absent)")
    for name in mlps:
        mlp = model.get_submodule(name)
        if not _is_swiglu(mlp):
            raise TypeError(f"{name} ({type(mlp).__name__}) is not a SwiGLU MLP")
        dt = config.resolve_adapter_dtype(mlp.gate_proj.weight.dtype)
        _set_module(model, name, MoLEFFN.from_mlp(mlp, config.num_experts, config.rank, config.alpha,
                                                  dropout=config.dropout, gate_mode=config.gate_mode,
                                                  routing=config.routing, adapter_dtype=dt))
    for name in attn:
        lin = model.get_submodule(name)
        if type(lin) is not nn.Linear:
            raise TypeError(f"{name} ({type(lin).__name__}) is not an nn.Linear")
        dt = config.resolve_adapter_dtype(lin.weight.dtype)
        _set_module(model, name, LoRALinear(lin, config.rank, config.alpha, config.dropout, adapter_dtype=dt))
    save = _modules_to_save(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for n, p in model.named_parameters():
        if n in _adapter_param_names(model, mlps, attn, save):
            p.requires_grad_(True)
    model.mole_config = config
    model.mole_modules = mlps
    model.mole_attn_lora_modules = attn
    model.mole_modules_to_save = save
    return model


def _modules_to_save(model: nn.Module, config: MoLEConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [n for n, m in model.named_modules() if n and _matches(list(config.modules_to_save), n, m)]
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]  # outermost only
    if not names:
        raise ValueError(f"MoLEConfig.modules_to_save {config.modules_to_save} matched no module")
    return names


def _adapter_param_names(model, mlps, attn, save) -> set[str]:
    out = set()
    for name in mlps:
        for p in ("gate_proj", "up_proj", "down_proj"):
            out |= {f"{name}.{p}.lora_A", f"{name}.{p}.lora_B"}
        out |= {f"{name}.router.weight", f"{name}.router.bias"}
    for name in attn:
        out |= {f"{name}.lora_A", f"{name}.lora_B"}
    for name in save:
        out |= {f"{name}.{n}" for n, _ in model.get_submodule(name).named_parameters()}
    return out


def _injected(model) -> tuple[MoLEConfig, list[str], list[str], list[str]]:
    config = getattr(model, "mole_config", None)
    if config is None:
        raise ValueError("this model carries no MoLE adapter (call get_mole_model or from_pretrained first)")
    return config, model.mole_modules, model.mole_attn_lora_modules, model.mole_modules_to_save


def mole_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (MoLE experts and routers, attention LoRA, modules_to_save), keyed by
    their names in ``model``."""
    _, mlps, attn, save = _injected(model)
    wanted = _adapter_param_names(model, mlps, attn, save)
    params = dict(model.named_parameters())
    missing = sorted(wanted - set(params))
    if missing:
        raise RuntimeError(f"adapter parameters missing from the model: {missing[:3]}")
    return {n: params[n].detach() for n in sorted(wanted)}


def _safetensors():
    try:
        import safetensors.torch
    except ImportError as e:  # not a dependency of the light install; transformers brings it
        raise ImportError("saving and loading a MoLE adapter needs safetensors: pip install safetensors "
                          "(transformers and the [train] extra include it)") from e
    return safetensors.torch


def save_pretrained(model: nn.Module, save_directory: Union[str, os.PathLike], *,
                    extra: Optional[dict] = None) -> Path:
    """Write ``mole_adapter_config.json`` (format, version, config, the injected module names and
    the tensor signature; ``extra`` is stored under "extra") and ``mole_adapter.safetensors``."""
    save_file = _safetensors().save_file
    from . import __version__

    config, mlps, attn, save = _injected(model)
    tensors = mole_state_dict(model)
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "mole_ext_version": __version__,
        "config": config.to_dict(),
        "mole_modules": list(mlps),
        "attn_lora_modules": list(attn),
        "modules_to_save": list(save),
        "tensors": {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in tensors.items()},
    }
    if extra:
        meta["extra"] = extra
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=1) + "\n")
    return out


def read_config(directory: Union[str, os.PathLike]) -> tuple[MoLEConfig, dict]:
    """The ``MoLEConfig`` and the whole metadata of a saved adapter (checks format and version)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}: not a mole_ext adapter directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    v = meta.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {v!r}; this mole_ext reads versions up to {FORMAT_VERSION} "
                         "(upgrade mole_ext)")
    return MoLEConfig.from_dict(meta["config"]), meta


def from_pretrained(model: nn.Module, directory: Union[str, os.PathLike], *, is_trainable: bool = False) -> nn.Module:
    """Inject the adapter saved in ``directory`` into ``model`` (the base it was trained on) and
    load its tensors. The same modules as at save time are injected (by name, so a predicate in
    the original config is not needed). ``is_trainable=False`` (default, as in PEFT) freezes the
    adapter too and puts the model in eval mode."""
    load_file = _safetensors().load_file
    config, meta = read_config(directory)
    model = get_mole_model(model, config, _mlps=meta["mole_modules"], _attn=meta["attn_lora_modules"])
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    params = dict(model.named_parameters())
    wanted = set(mole_state_dict(model))
    missing, unexpected = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unexpected:
        raise ValueError(f"{directory}: the adapter does not fit this model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if params[k].shape != v.shape:
                raise ValueError(f"{directory}: {k} has shape {list(v.shape)}, the model {list(params[k].shape)}")
            params[k].copy_(v)
    if not is_trainable:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
    return model


def merge_attention_lora(model: nn.Module) -> list[str]:
    """Replace every ``LoRALinear`` by a plain ``nn.Linear`` with the LoRA merged into its weight
    (MoLE experts are token-routed and cannot be merged). Returns the merged module names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for n in names:
        _set_module(model, n, model.get_submodule(n).merged())
    if getattr(model, "mole_config", None) is not None:
        model.mole_attn_lora_modules = []
    return names
