"""A run's adapter: written at the end of training, loaded back, and exported for other tools.

    python -m training.export --run DIR --out DIR [--merge] [--base PATH]

Without ``--merge`` OUT holds
- ``adapter_config.json`` + ``adapter_model.safetensors``: a PEFT LoRA adapter with the attention
  LoRA and, as PEFT ``modules_to_save``, the projector (and a vision tower the run trained);
  ``peft.PeftModel.from_pretrained(base, OUT)`` loads it onto the base model;
- ``mole_adapter_config.json`` + ``mole_adapter.safetensors``: the MoLE experts and routers
  (``mole_ext.from_pretrained(peft_model.get_base_model(), OUT)``), which PEFT cannot express;
- the tokenizer and image processor.

With ``--merge`` OUT is a complete transformers model directory (attention LoRA merged into the
weights, trained projector and vision tower; ``LlavaForConditionalGeneration.from_pretrained(OUT)``)
with the MoLE adapter beside it: token-routed experts cannot be merged.

``--base PATH`` loads the run against a base model at another path than the one it was trained
with (source "llava": the LLaVA directory; source "separate": the language model, with
``--vision-base`` for the vision tower).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
from pathlib import Path

import torch
from torch import nn

from . import checkpoint as ck
from .config import ModelConfig, RunConfig
from .model import Built, build_model

# -- the run adapter (written by training.trainer.run_training) ------------------------------------


def adapter_names(built: Built, cfg: RunConfig) -> list[str]:
    """What a run adds to the base: every trainable weight, the projector, and a random vision tower."""
    return [n for n, p in built.model.named_parameters()
            if p.requires_grad or "multi_modal_projector" in n
            or (cfg.model.source in ("tiny", "smollm2") and "vision_tower" in n)]


def adapter_tensors(built: Built, cfg: RunConfig, full: dict | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors (``adapter_names``). ``full``: unsharded parameters (from
    ``MoLETrainer.gather_params`` under FSDP), else read from the model."""
    params = dict(built.model.named_parameters())
    return {n: full[n] if full is not None else params[n].detach() for n in adapter_names(built, cfg)}


def export(built: Built, cfg: RunConfig, out_dir, full: dict | None = None) -> Path:
    return ck.export_adapter(out_dir, adapter_tensors(built, cfg, full), {"run_config": cfg.to_dict()})


def set_base(mc: ModelConfig, base: str | None, vision_base: str | None = None) -> None:
    """Point a run's model config at a base model in another place (``--base``)."""
    if base is None and vision_base is None:
        return
    if mc.source == "llava":
        if vision_base is not None:
            raise ValueError("--vision-base applies to model.source 'separate', this run's source is 'llava'")
        mc.llava_path = str(base)
    elif mc.source == "separate":
        if base is not None:
            mc.lm_path = str(base)
        if vision_base is not None:
            mc.vision_path = str(vision_base)
    else:
        raise ValueError(f"--base: this run's model.source is {mc.source!r}, whose base is built from the "
                         "installed packages (no path to change); --base applies to sources 'llava' and 'separate'")


def check_base_paths(mc: ModelConfig) -> None:
    """A missing local base directory is named as such (transformers would take it for a hub id)."""
    paths = {"llava": [("model.llava_path", mc.llava_path)],
             "separate": [("model.lm_path", mc.lm_path), ("model.vision_path", mc.vision_path)]}.get(mc.source, [])
    for key, p in paths:
        if p is None or not Path(p).is_dir():
            raise FileNotFoundError(
                f"the run's base model ({key}={p!r}) is not a local directory here; pass the base's "
                f"path with --base PATH (load_run_model(..., base=PATH)){' and --vision-base' if mc.source == 'separate' else ''}")


def load_run_model(adapter_dir, device: str | None = None, base: str | None = None,
                   vision_base: str | None = None) -> tuple[Built, RunConfig]:
    """A fresh base model with an exported adapter on it (for generation and evaluation), on
    ``device`` (default: CUDA when available). ``base`` / ``vision_base``: the base model's
    directory when it is no longer where the run found it (see ``set_base``)."""
    meta, _ = ck.read_adapter(adapter_dir)
    cfg = RunConfig.from_dict(meta["config"]["run_config"])
    set_base(cfg.model, base, vision_base)
    check_base_paths(cfg.model)
    built = build_model(cfg.model, stage=cfg.train.stage)
    ck.load_adapter_into(built.model, adapter_dir, strict=True)
    built.model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return built, cfg


def find_adapter(run) -> Path:
    """The adapter of a train run (RUN/adapter), a demo run (RUN/stage2/adapter), or RUN itself."""
    run = Path(run)
    for c in (run / "adapter", run / "stage2" / "adapter", run):
        if ck.adapter_meta_path(c) is not None:
            return c
    raise FileNotFoundError(f"{run}: no run adapter in it, in {run}/adapter or in {run}/stage2/adapter "
                            f"(looked for {ck.ADAPTER_META})")


# -- export for other tools ------------------------------------------------------------------------
SAVED_MODULES = ("multi_modal_projector", "vision_tower")


def _modules_to_save(model: nn.Module, tensor_names) -> list[str]:
    """The outer modules (projector, vision tower) that hold the run's non-LoRA adapter tensors."""
    from mole_ext import LoRALinear, MoLEFFN

    adapter_owned = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, MoLEFFN))]
    out = []
    for t in tensor_names:
        if any(t.startswith(o + ".") for o in adapter_owned):
            continue
        owner = next((n for n, _ in model.named_modules() if n.split(".")[-1] in SAVED_MODULES and t.startswith(n + ".")), None)
        if owner is None:
            raise ValueError(f"cannot export {t}: the PEFT export holds LoRA layers, the MoLE adapter and the "
                             f"modules {SAVED_MODULES}; this tensor is in none of them")
        if owner not in out:
            out.append(owner)
    return out


def _attention_regex(names: list[str], all_names: list[str]) -> str:
    """A PEFT ``target_modules`` regular expression (PEFT full-matches it against module names)
    that matches exactly ``names`` among ``all_names``: layer numbers generalised when that stays
    exact, else the names themselves."""
    general = "|".join(sorted({re.sub(r"\\\.\d+\\\.", r"\\.\\d+\\.", re.escape(n)) for n in names}))
    general = f"(?:{general})"
    if {n for n in all_names if re.fullmatch(general, n)} == set(names):
        return general
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _plain_linear(lora) -> nn.Linear:
    lin = nn.Linear(lora.in_features, lora.out_features, bias=lora.bias is not None, device="meta")
    lin.weight = lora.weight
    lin.bias = lora.bias
    return lin


def _save_mole_part(model: nn.Module, out: Path, extra: dict) -> None:
    """The MoLE experts and routers only (PEFT or the merged weights hold the rest)."""
    import mole_ext

    if getattr(model, "mole_config", None) is None or not model.mole_modules:
        return
    model.mole_config = dataclasses.replace(model.mole_config, attn_lora_targets=None, modules_to_save=None)
    model.mole_attn_lora_modules = []
    model.mole_modules_to_save = []
    mole_ext.save_pretrained(model, out, extra=extra)


def export_run(run, out, merge: bool = False, base: str | None = None, vision_base: str | None = None) -> Path:
    """Export a run (see the module docstring). Returns OUT."""
    from mole_ext import LoRALinear

    adapter = find_adapter(run)
    built, cfg = load_run_model(adapter, device="cpu", base=base, vision_base=vision_base)
    model = built.model
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _, tensors = ck.read_adapter(adapter)
    save = _modules_to_save(model, tensors)
    attn = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    info = {"run_config": cfg.to_dict(), "run_adapter": str(Path(adapter).resolve()),
            "layout": "merged" if merge else "peft"}
    _save_mole_part(model, out, info)
    built.tokenizer.save_pretrained(out)
    built.image_processor.save_pretrained(out)
    if merge:
        import mole_ext

        mole_ext.merge_attention_lora(model)
        _save_merged(model, out)
        return out
    if not attn:
        raise ValueError("this run has no attention LoRA (model.attn_lora=false or a stage-1 run): the PEFT "
                         "export has nothing to hold; use --merge for a complete model directory")
    from peft import LoraConfig, get_peft_model

    lora = {n: model.get_submodule(n) for n in attn}
    first = next(iter(lora.values()))
    for n in attn:  # the base again, for PEFT to wrap (sharing the frozen weights)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent), child, _plain_linear(lora[n]))
    all_names = [n for n, _ in model.named_modules()]
    pcfg = LoraConfig(r=first.rank, lora_alpha=first.alpha, lora_dropout=cfg.model.dropout,
                      target_modules=_attention_regex(attn, all_names), modules_to_save=[n.split(".")[-1] for n in save],
                      bias="none")
    model = _strip_mole_attrs(model)
    pm = get_peft_model(model, pcfg)
    with torch.no_grad():
        for n, src in lora.items():
            layer = pm.base_model.model.get_submodule(n)
            layer.lora_A["default"].weight.copy_(src.lora_A)
            layer.lora_B["default"].weight.copy_(src.lora_B)
    pm.peft_config["default"].base_model_name_or_path = cfg.model.llava_path if cfg.model.source == "llava" else None
    pm.save_pretrained(out, save_embedding_layers=False)
    return out


def _strip_mole_attrs(model):
    for a in ("mole_config", "mole_modules", "mole_attn_lora_modules", "mole_modules_to_save"):
        if hasattr(model, a):
            delattr(model, a)
    return model


def _save_merged(model: nn.Module, out: Path) -> None:
    """The base model's own class and keys: MoLEFFN keeps the MLP's weights under the MLP's key
    names, so dropping the experts and routers leaves exactly the base's state dict."""
    from mole_ext import MoLEFFN

    moles = [n for n, m in model.named_modules() if isinstance(m, MoLEFFN)]
    sd = {k: v for k, v in model.state_dict().items()
          if not any(k.startswith(m + ".") and (".lora_" in k or k.startswith(m + ".router.")) for m in moles)}
    with torch.device("meta"):
        clean = type(model)(copy.deepcopy(model.config))
    missing, unexpected = clean.load_state_dict(sd, strict=False, assign=True)
    if unexpected or [k for k in missing if k not in _tied_keys(clean)]:
        raise RuntimeError(f"merged model does not match {type(model).__name__}: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if hasattr(clean, "tie_weights"):
        clean.tie_weights()
    clean.save_pretrained(out)


def _tied_keys(model) -> set[str]:
    keys = getattr(model, "_tied_weights_keys", None) or {}
    return set(keys) if not isinstance(keys, dict) else set(keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory (RUN/adapter, RUN/stage2/adapter) or a run adapter directory")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--merge", action="store_true",
                    help="merge the attention LoRA and save a complete transformers model (MoLE adapter beside it)")
    ap.add_argument("--base", default=None, help="the base model's path, if it moved (source llava: the LLaVA dir; "
                    "separate: the language model)")
    ap.add_argument("--vision-base", default=None, help="source separate: the vision tower's path, if it moved")
    args = ap.parse_args(argv)
    try:
        out = export_run(args.run, args.out, merge=args.merge, base=args.base, vision_base=args.vision_base)
    except (FileNotFoundError, ValueError, ck.CheckpointError) as e:
        print(f"training.export: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
