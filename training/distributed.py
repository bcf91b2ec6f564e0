"""FSDP2 and DeepSpeed specifics of ``MoLETrainer``: FSDP2 on CPU/gloo, the same collectives on
every rank, full-tensor optimizer state for FSDP checkpoints, and the DeepSpeed ZeRO checks."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Trainer

from . import checkpoint as ck


def fsdp_on_cpu(trainer: Trainer) -> None:
    """Turn accelerate's FSDP2 path on for a CPU (gloo) run.

    accelerate 1.15 enables FSDP only for accelerator devices: ``AcceleratorState`` sets
    ``DistributedType.FSDP`` inside its MULTI_GPU/NPU/XPU/... branch, and a CPU run is MULTI_CPU,
    so ``fsdp`` in ``TrainingArguments`` would silently give DDP. ``fully_shard`` itself supports a
    CPU device mesh over gloo (torch/distributed/fsdp/_fully_shard/_fsdp_init.py), so we set the
    state that accelerate sets on GPUs; from here on the Trainer and accelerate take exactly the
    FSDP2 code path of a GPU run (prepare, clipping, state dicts).
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    st = trainer.accelerator.state
    if st.distributed_type != DistributedType.MULTI_CPU:
        raise ValueError(f"train.fsdp needs torchrun with 2 or more processes (accelerate: {st.distributed_type})")
    plugin = FullyShardedDataParallelPlugin(**trainer.args.fsdp_plugin_args)
    if st.mixed_precision != "no":
        plugin.set_mixed_precision(st.mixed_precision)
    st.fsdp_plugin = plugin
    st.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True


def fsdp_same_collectives(model) -> None:
    """Make every rank issue the same FSDP2 collectives in the same order whatever its micro-batch.

    A text-only micro-batch differs from one with an image in two ways that FSDP2 would turn into
    mismatched collectives (seen as a gloo size mismatch, or a hang on NCCL):
    - the vision tower and projector get no gradient. They live in the root unit, so every rank
      all-gathers them, but the root's reduce-scatter must also hold the same tensors on every
      rank: ``set_reduce_scatter_unused_params`` makes FSDP2 send zeros for a trainable parameter
      without a gradient. (Each expert stack is one parameter, so an expert that got no tokens
      already has a zero gradient slice, not a missing gradient.)
    - the input of the first decoder layer does not require grad (the embeddings are frozen and
      no projector output is merged in). FSDP2 runs a unit's post-backward reduce-scatter from
      autograd when its input requires grad and at the very end otherwise, so that rank would
      reduce-scatter the first layer after the root while the others do it before (and in stage
      1, with nothing trainable in the language model, it would skip the layers' backward
      all-gathers). The language model's ``inputs_embeds`` are therefore made to require grad.
    """
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        model.set_reduce_scatter_unused_params(True)

    def require_grad(module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is not None and torch.is_grad_enabled() and not x.requires_grad:
            kwargs["inputs_embeds"] = x.detach().requires_grad_()
            return args, kwargs
        return None

    model.model.language_model.register_forward_pre_hook(require_grad, with_kwargs=True)


def unwrap_opt(opt):
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer  # accelerate's AcceleratedOptimizer
    return opt


def load_fsdp_optimizer(model, optimizer, sd: dict) -> None:
    """Load a single-process-layout optimizer state (full tensors) into an FSDP optimizer: ids are
    mapped to parameter names in ``param_groups`` order, and each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    n_saved = sum(len(g["params"]) for g in sd["param_groups"])
    if n_saved != len(fqns):
        raise ck.CheckpointError(f"optimizer state has {n_saved} parameters, this optimizer {len(fqns)}")
    groups = [{**g, "params": [fqns[i] for i in g["params"]]} for g in sd["param_groups"]]
    state = {fqns[int(i)]: st for i, st in sd["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups},
                             options=StateDictOptions(full_state_dict=True))




# -- DeepSpeed ------------------------------------------------------------------------------------
def deepspeed_config(path: str, prec: dict) -> dict:
    """Read a DeepSpeed JSON config for ``TrainingArguments(deepspeed=...)``: ZeRO stage 0-3, and
    bf16/fp16 sections that agree with the run's precision (``"auto"`` is filled in by transformers
    from ``train.bf16`` / ``train.fp16``)."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("train.deepspeed needs the deepspeed package (pip install deepspeed); it is optional")
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"train.deepspeed={path}: cannot read the DeepSpeed JSON config: {e}") from e
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"train.deepspeed={path}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key, want in (("bf16", prec["bf16"]), ("fp16", prec["fp16"])):
        enabled = cfg.get(key, {}).get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != bool(want):
            raise ValueError(f"train.deepspeed={path}: {key}.enabled={enabled} but the run has train.{key}={want}; "
                             f"set it to \"auto\"")
    if "optimizer" in cfg or "scheduler" in cfg:
        raise ValueError(f"train.deepspeed={path}: remove its 'optimizer'/'scheduler' sections: the run builds "
                         "AdamW with the projector/router learning rates and the train.lr_scheduler_type schedule")
    return cfg


def zero3_check(trainer) -> None:
    """Under ZeRO-3, make every ``MoLEFFN`` a leaf module: its forward reads the router's and the
    ``MoLELinear``s' parameters without calling those submodules, so ZeRO-3's per-submodule gather
    hooks would never fetch them (``MoLEFFN.forward`` refuses partitioned parameters)."""
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    if plugin is None or plugin.zero_stage != 3:
        return
    from deepspeed.utils import set_z3_leaf_modules
    from mole_ext import MoLEFFN

    set_z3_leaf_modules(trainer.model, [MoLEFFN])


def save_deepspeed_checkpoint(trainer, final: Path, info: dict) -> None:
    """A DeepSpeed run's checkpoint: transformers' DeepSpeed path (the engine's ZeRO-partitioned
    optimizer and module state, scheduler, RNG, ``trainer_state.json``), the trainable weights
    gathered in full (``MoLETrainer.save_model``) and our ``info.json`` (run config, for the
    resume checks). DeepSpeed's files are torch pickles: resume only from checkpoints you wrote."""
    Trainer._save_checkpoint(trainer, trainer.model_wrapped, None)
    if trainer.is_world_process_zero():
        (final / "info.json").write_text(json.dumps(info, indent=1))
    trainer.accelerator.wait_for_everyone()


def check_deepspeed_checkpoint(ckpt: Path) -> None:
    if not (ckpt / "info.json").is_file():
        raise ck.CheckpointError(f"{ckpt}: no info.json: not a checkpoint of a train.deepspeed run")


class without_zero_init:
    """Build the model with full tensors under a ZeRO-3 config: transformers would construct it
    inside ``deepspeed.zero.Init`` (partitioned at birth), which our build code (MoLE injection
    reusing the MLP weights, loading the SmolLM2 state dict) does not support. DeepSpeed
    partitions the model when the Trainer initialises the engine instead; every rank holds the
    full frozen base on the CPU until then."""

    def __enter__(self):
        from transformers.integrations import deepspeed as hfds

        ref = hfds._hf_deepspeed_config_weak_ref
        self.obj = ref() if ref is not None else None
        hfds.unset_hf_deepspeed_config()
        return self

    def __exit__(self, *exc):
        from transformers.integrations import deepspeed as hfds

        if self.obj is not None:
            hfds.set_hf_deepspeed_config(self.obj)
        return False
