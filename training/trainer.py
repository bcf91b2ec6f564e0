"""Training with transformers' ``Trainer``: the MoLE loss, weighted domain mixing, JSONL logs,
routing analytics and pickle-free atomic checkpoints."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from . import checkpoint as ck
from .analytics import RoutingStats
from .config import RunConfig
from .data import Collator, LlavaData, MixtureSampler, resolve_specs
from .export import adapter_names, adapter_tensors, export, load_run_model  # noqa: F401  (moved there)
from .model import Built, build_model, mole_modules, param_groups

log = logging.getLogger(__name__)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def balance_losses(routings: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> torch.Tensor:
    """The Switch balance loss of each MoLE layer on non-padding tokens, over the *global* batch:
    ``routings`` holds each layer's ``(probs, expert)``; returns a ``[L]`` tensor.

    One process: the core op ``mole_ext.load_balance_loss`` per layer. Under DDP each rank sees
    part of the batch; every layer's ``f_k`` (no gradient) and the token count go through *one*
    all-reduce for all layers, and the local ``P_k`` share is scaled by the world size, so that
    DDP's gradient averaging and the mean of the logged values both equal the single-process loss
    on the whole batch. Nothing here waits for the device.
    """
    from mole_ext import load_balance_loss

    W = _world()
    if W == 1:
        return torch.stack([load_balance_loss(p, e, mask) for p, e in routings])
    stats, local = [], []
    for probs, expert in routings:
        K = probs.shape[-1]
        m = mask.to(probs.dtype)
        counts = torch.zeros(K, dtype=probs.dtype, device=probs.device).index_add_(0, expert.long(), m)
        stats.append(torch.cat([counts, m.sum().view(1)]).detach())
        local.append((probs * m[:, None]).sum(0))
    flat = torch.cat(stats)  # layers may differ in K only in principle; keep them flat
    dist.all_reduce(flat)
    out, at = [], 0
    for P_sum, probs in zip(local, (p for p, _ in routings)):
        K = probs.shape[-1]
        s = flat[at:at + K + 1]
        at += K + 1
        M = s[K].clamp_min(1)
        out.append(K * (s[:K] / M * (P_sum / M)).sum() * W)
    return torch.stack(out)


def balance_loss(probs: torch.Tensor, expert: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One layer's :func:`balance_losses`."""
    return balance_losses([(probs, expert)], mask)[0]


class MoLETrainer(Trainer):
    """``Trainer`` with the LLaVA-MoLE loss ``LM + balance_weight * mean_l balance_l``."""

    def __init__(self, *args, run_cfg: RunConfig, built: Built, dataset: LlavaData, **kw):
        super().__init__(*args, **kw)
        self.run_cfg = run_cfg
        self.built = built
        self.domains = dataset.domains
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self.moles = [m for _, m in mole_modules(built.model)]
        self.image_token_id = built.model.config.image_token_id
        K = self.moles[0].num_experts if self.moles else 1
        self.routing = RoutingStats([n for n, _ in mole_modules(built.model)], K, dataset.domains)
        self._acc = torch.zeros(2)  # lm, balance since the last log (already / grad_accum)
        self._sig = ck.signature(self._trainable())
        self.metrics_path = Path(self.args.output_dir) / "metrics.jsonl"
        self._fsdp_ready = False

    # -- FSDP on CPU ----------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            _fsdp_on_cpu(self)

    # -- data --------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        n = self.run_cfg.data.samples_per_epoch or len(ds)
        return MixtureSampler(ds.by_domain, ds.weights, n, seed=self.run_cfg.train.seed)

    # -- optimizer: projector at its own learning rate ----------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            t = self.run_cfg.train
            self.optimizer = torch.optim.AdamW(
                param_groups(self.model, t.lr, t.projector_lr, t.weight_decay), betas=(0.9, 0.999), eps=1e-8
            )
        return self.optimizer

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.is_fsdp_enabled and not self._fsdp_ready:
            _fsdp_same_collectives(model)
            self._fsdp_ready = True
        inputs = dict(inputs)
        domain = inputs.pop("domain")
        labels = inputs.pop("labels")
        out = model(**inputs, use_cache=False)
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        W = _world()
        n = (target != -100).sum().to(ce.dtype)
        if W > 1:  # mean over the answer tokens of the global micro-batch (see balance_loss)
            n = n.detach().clone()
            dist.all_reduce(n)
        lm = ce / n.clamp_min(1) * W
        loss = lm
        bal = torch.zeros((), device=lm.device)
        if self.moles:
            mask = inputs["attention_mask"].bool().reshape(-1)
            tok_dom = domain[:, None].expand_as(inputs["input_ids"]).reshape(-1)
            is_img = (inputs["input_ids"] == self.image_token_id).reshape(-1)
            routings = [(m.last_routing.probs, m.last_routing.expert) for m in self.moles]
            if model.training:
                for li, (p, e) in enumerate(routings):
                    self.routing.update(li, p, e, tok_dom, is_img, mask)
            bal = balance_losses(routings, mask).mean()
            loss = lm + self.run_cfg.train.balance_weight * bal
        if model.training:
            ga = self.current_gradient_accumulation_steps if hasattr(self, "current_gradient_accumulation_steps") else 1
            if self._acc.device != lm.device:  # kept on the model's device: no host sync per step
                self._acc = self._acc.to(lm.device)
            self._acc += torch.stack([lm.detach().float(), bal.detach().float()]) / W / ga
        return (loss, out) if return_outputs else loss

    # -- logs ----------------------------------------------------------------------------------
    def log(self, logs, start_time=None):
        if "loss" in logs:
            acc = self._acc.clone()
            if _world() > 1:
                dist.all_reduce(acc)
            acc = acc.cpu()
            steps = max(1, self.state.global_step - getattr(self, "_last_logged_step", 0))
            logs["lm_loss"] = round(float(acc[0]) / steps, 6)
            if self.moles:
                logs["balance_loss"] = round(float(acc[1]) / steps, 6)
            self._acc.zero_()
            self._last_logged_step = self.state.global_step
        super().log(logs, start_time)
        if self.is_world_process_zero():
            row = {"stage": self.run_cfg.train.stage, "global_step": self.state.global_step, **logs}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            every = self.run_cfg.train.routing_log_steps
            if self.moles and every and "loss" in logs and self.state.global_step % every == 0:
                # cumulative since the start of the run, this process's tokens only
                snap = {"global_step": self.state.global_step, **self.routing.summary()}
                with open(Path(self.args.output_dir) / "routing.jsonl", "a") as f:
                    f.write(json.dumps(snap) + "\n")

    # -- checkpoints: safetensors + JSON, atomic ------------------------------------------------
    def _trainable(self):
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def gather_params(self, names) -> dict[str, torch.Tensor]:
        """The named parameters as full CPU tensors. Under FSDP each is all-gathered from its shards
        (a collective: every rank must call this, and every rank gets the tensors); only the named
        ones are gathered, never the frozen base."""
        from torch.distributed.tensor import DTensor

        names = set(names)
        out = {}
        for n, p in self.model.named_parameters():
            if n in names:
                t = p.detach()
                out[n] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
        return out

    def _optimizer_state(self) -> dict:
        """The optimizer's state dict in torch's single-process layout (integer parameter ids in
        ``param_groups`` order). Under FSDP the sharded AdamW moments are gathered to full tensors
        (a collective; rank 0 gets them), so FSDP and non-FSDP checkpoints have the same files."""
        if not self.is_fsdp_enabled:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        sd = get_optimizer_state_dict(self.model, _unwrap_opt(self.optimizer),
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_world_process_zero():
            return {}
        ids, groups = {}, []
        for g in sd["param_groups"]:
            groups.append({**g, "params": [ids.setdefault(fqn, len(ids)) for fqn in g["params"]]})
        return {"state": {ids[fqn]: st for fqn, st in sd["state"].items()}, "param_groups": groups}

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_callback import ExportableState

        trainable = self.gather_params(self._sig)
        opt_sd = self._optimizer_state()

        final = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.is_world_process_zero():
            ck.begin(final)
        self.accelerator.wait_for_everyone()
        ck.write_rng(tmp, self.args.process_index)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            ck.write_main(
                tmp,
                trainable,
                opt_sd,
                self.lr_scheduler.state_dict(),
                {"run_config": self.run_cfg.to_dict(), "world_size": self.args.world_size},
            )
            self.state.save_to_json(str(tmp / "trainer_state.json"))
            ck.finish(tmp, final, self._sig)
            self._rotate()
        self.accelerator.wait_for_everyone()

    def _rotate(self):
        """Keep the newest ``save_total_limit`` finished checkpoints."""
        import shutil

        limit = self.args.save_total_limit
        if not limit:
            return
        ckpts = [p for p in Path(self.args.output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
        for p in sorted(ckpts, key=lambda p: int(p.name.split("-", 1)[1]))[:-limit]:
            shutil.rmtree(p)

    def _check_run_config(self, ckpt: Path) -> None:
        """Refuse a checkpoint whose run changed what the weights mean or what data come next:
        any model setting but local paths, the data mixture, the seed and the batch geometry."""
        import json as _json

        saved = _json.loads((ckpt / "info.json").read_text())
        old, new = saved["run_config"], self.run_cfg.to_dict()
        paths = {"llava_path", "vision_path", "lm_path", "cache_dir"}
        diffs = [f"model.{k}" for k in new["model"] if k not in paths and old["model"].get(k) != new["model"][k]]
        data_keys = ("datasets", "builtin", "builtin_per_domain", "template", "max_length", "samples_per_epoch")
        diffs += [f"data.{k}" for k in data_keys if old["data"].get(k) != new["data"][k]]
        diffs += [f"train.{k}" for k in ("stage", "seed", "per_device_batch_size", "grad_accum")
                  if old["train"].get(k) != new["train"][k]]
        if saved.get("world_size") != self.args.world_size:
            diffs.append(f"world size ({saved.get('world_size')} -> {self.args.world_size})")
        if diffs:
            raise ck.CheckpointError(
                f"{ckpt} was written by a run with different settings: {', '.join(diffs)}; "
                "resume with the same configuration (or start a new run with train.init_adapter)"
            )

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        ck.verify(Path(resume_from_checkpoint), self._sig)
        self._check_run_config(Path(resume_from_checkpoint))
        tensors = ck.load_trainable(Path(resume_from_checkpoint))
        model = model or self.model
        if self.is_fsdp_enabled:  # every rank holds the full tensors and keeps its own shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        opt = ck.load_optimizer(Path(checkpoint))
        sched = ck.load_scheduler(Path(checkpoint))
        if opt is None or sched is None:
            raise ck.CheckpointError(f"{checkpoint}: no optimizer/scheduler state; cannot resume")
        if self.is_fsdp_enabled:
            _load_fsdp_optimizer(self.model, _unwrap_opt(self.optimizer), opt)
        else:
            self.optimizer.load_state_dict(opt)
        self.lr_scheduler.load_state_dict(sched)

    def _load_rng_state(self, checkpoint):
        if checkpoint is not None and not ck.load_rng(Path(checkpoint), self.args.process_index):
            log.warning("%s has no RNG state for process %d; dropout will differ from the original run",
                        checkpoint, self.args.process_index)


def _fsdp_on_cpu(trainer: Trainer) -> None:
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


def _fsdp_same_collectives(model) -> None:
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


def _unwrap_opt(opt):
    while hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer  # accelerate's AcceleratedOptimizer
    return opt


def _load_fsdp_optimizer(model, optimizer, sd: dict) -> None:
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


class StopAfter(TrainerCallback):
    """Stop (and save) after a given step: an interrupted run, for resume tests and staged jobs."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def _checkpointing_args(on: bool) -> dict:
    """Activation checkpointing for ``TrainingArguments``: ``activation_checkpointing`` in the
    transformers we pin, ``gradient_checkpointing`` in releases before the rename (the GPU image
    has 5.17), so that training runs on either."""
    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": on, f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def training_args(cfg: RunConfig) -> TrainingArguments:
    t = cfg.train
    if t.device not in ("auto", "cpu"):
        raise ValueError(f"train.device must be 'auto' or 'cpu', got {t.device!r}")
    on_gpu = torch.cuda.is_available() and t.device == "auto"
    bf16 = on_gpu if t.bf16 is None else t.bf16
    save_steps = t.save_steps or t.max_steps
    kw = {}
    if t.fsdp:  # FSDP2; on CPU too (gloo), see MoLETrainer.create_accelerator_and_postprocess
        if t.fsdp not in ("full_shard", "shard_grad_op"):
            raise ValueError(f"train.fsdp must be '', 'full_shard' or 'shard_grad_op', got {t.fsdp!r}")
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ValueError("train.fsdp needs torchrun with 2 or more processes (one process has nothing to shard)")
        kw["fsdp"] = True
        kw["fsdp_config"] = {
            "version": 2,
            "reshard_after_forward": t.fsdp == "full_shard",
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            # Decoder layers only. The vision tower stays in the root unit, which every rank gathers
            # for every micro-batch: wrapping CLIPEncoderLayer would make a rank with a text-only
            # micro-batch skip those all-gathers while the others run them (a hang).
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
        }
    return TrainingArguments(
        output_dir=t.output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type="cosine",
        warmup_steps=int(round(t.warmup_ratio * t.max_steps)),
        max_grad_norm=t.max_grad_norm,
        bf16=bf16,
        logging_steps=t.logging_steps,
        save_strategy="steps",
        save_steps=save_steps,
        save_total_limit=t.save_total_limit,  # applied by MoLETrainer._rotate
        seed=t.seed,
        data_seed=t.seed,
        **_checkpointing_args(t.gradient_checkpointing),
        remove_unused_columns=False,
        dataloader_num_workers=t.dataloader_workers,
        report_to=["tensorboard"] if _has_tensorboard() else [],
        ddp_backend="gloo" if (not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1) else None,
        ddp_find_unused_parameters=True,  # a rank whose micro-batch is text-only leaves the vision side unused
        disable_tqdm=False,
        use_cpu=not on_gpu,
        **kw,
    )


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def run_training(cfg: RunConfig, resume: str | bool | None = None, built: Built | None = None) -> dict:
    """Build (or take) the model and data, train, save the last checkpoint, export the adapter and
    write routing analytics. Returns a summary dict."""
    from transformers import set_seed

    t = cfg.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(t.seed)
    if built is None:
        built = build_model(cfg.model, stage=t.stage)
    if t.init_adapter:
        loaded = ck.load_adapter_into(built.model, t.init_adapter, strict=False)
        log.info("loaded %d tensors from %s", len(loaded), t.init_adapter)
    specs = resolve_specs(cfg.data, seed=t.seed, image_size=built.model.config.vision_config.image_size)
    data = LlavaData(cfg.data, built.tokenizer, built.image_processor, built.num_image_tokens, specs)
    if torch.distributed.is_available() and int(os.environ.get("RANK", "0")) == 0:
        cfg.save(out / "config.json")
    callbacks = [StopAfter(t.stop_after_steps)] if t.stop_after_steps else []
    trainer = MoLETrainer(
        model=built.model,
        args=training_args(cfg),
        train_dataset=data,
        data_collator=Collator(built.tokenizer.pad_token_id),
        run_cfg=cfg,
        built=built,
        dataset=data,
        callbacks=callbacks,
    )
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out))
        if resume is None:
            raise ck.CheckpointError(f"--resume: no checkpoint-N directory in {out}")
    result = trainer.train(resume_from_checkpoint=resume or None)
    trainer.routing.all_reduce()
    full = trainer.gather_params(adapter_names(built, cfg))  # a collective under FSDP
    summary = {"global_step": trainer.state.global_step, "train_loss": result.training_loss,
               "skipped_records": data.skipped, "domains": data.domains}
    if trainer.is_world_process_zero():
        if trainer.moles:
            summary["routing"] = trainer.routing.write(out, "routing")
        export(built, cfg, out / "adapter", full)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "routing"}, indent=1))
    trainer.accelerator.wait_for_everyone()
    summary["trainer"] = trainer
    return summary
