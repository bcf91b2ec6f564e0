"""Training with transformers' ``Trainer``: the MoLE loss, weighted domain mixing or epochs,
per-domain validation loss, windowed routing metrics for the tracker, mixed precision over fp32
adapters, and pickle-free atomic checkpoints. The run itself (build, data, train, export) is
``training.run.run_training``; the balance loss is ``training.balance``, the FSDP/DeepSpeed
specifics ``training.distributed``."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from . import checkpoint as ck
from .analytics import RoutingStats
from .balance import balance_loss, balance_losses, world  # noqa: F401  (re-exported)
from .config import RunConfig
from .data import SKIP_REASONS, EpochSampler, LlavaData, MixtureSampler
from .distributed import (fsdp_on_cpu, fsdp_same_collectives, load_fsdp_optimizer, unwrap_opt,
                          zero3_check)
from .export import adapter_names, adapter_tensors, export, load_run_model  # noqa: F401  (moved there)
from .model import Built, mole_modules, param_groups

log = logging.getLogger(__name__)

_world = world  # the old private name


class CompactProgressCallback(ProgressCallback):
    """transformers' progress bar, printing each log row without the per-layer routing scalars
    (four per MoLE layer: 120 numbers a step for a 30-layer model). They still reach the tracker
    and ``metrics.jsonl``; the console keeps the losses, the learning rate and the dead-expert
    count."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if not k.startswith("routing/layer")}
        return super().on_log(args, state, control, logs=logs, **kwargs)


class MoLETrainer(Trainer):
    """``Trainer`` with the LLaVA-MoLE loss ``LM + balance_weight * mean_l balance_l``."""

    def __init__(self, *args, run_cfg: RunConfig, built: Built, dataset: LlavaData, **kw):
        super().__init__(*args, **kw)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(CompactProgressCallback)
        self.run_cfg = run_cfg
        self.built = built
        self.domains = dataset.domains
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-micro-batch mean
        self.moles = [m for _, m in mole_modules(built.model)]
        self.image_token_id = built.model.config.image_token_id
        K = self.moles[0].num_experts if self.moles else 1
        self.routing = RoutingStats([n for n, _ in mole_modules(built.model)], K, dataset.domains)
        self._acc = torch.zeros(2)  # lm, balance since the last log (already / grad_accum)
        self._log_steps = 1  # optimizer steps since the last log (set before each log)
        self._window = self.routing.snapshot()  # routing counts at the last log: windowed metrics
        self._snap = self.routing.snapshot()  # at the last routing.jsonl snapshot
        self._warned: set = set()  # (layer, expert) pairs currently reported as collapsed
        self.collapse_events: list[dict] = []
        self.skipped_at_load: dict[int, str] = {}  # dataset index -> reason (this rank's loader)
        self.best: dict | None = None  # {"eval_loss", "step", "checkpoint"}
        self._sig = ck.signature(self._trainable())
        self.metrics_path = Path(self.args.output_dir) / "metrics.jsonl"
        self._fsdp_ready = False

    # -- FSDP on CPU ----------------------------------------------------------------------------
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            fsdp_on_cpu(self)
        if self.is_deepspeed_enabled:
            zero3_check(self)

    # -- data --------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        d, t = self.run_cfg.data, self.run_cfg.train
        group = None
        if d.group_by_modality_length:
            bs = self.args.per_device_train_batch_size
            mega = bs * self.args.world_size * self.args.gradient_accumulation_steps
            group = ([ds.length(i) for i in range(len(ds))], [r.image is not None for r in ds.records], bs, mega)
        if sampling_mode(self.run_cfg) == "once":
            return EpochSampler(len(ds), seed=t.seed, group=group)
        n = d.samples_per_epoch or len(ds)
        return MixtureSampler(ds.by_domain, ds.weights, n, seed=t.seed, group=group)

    def _get_eval_sampler(self, eval_dataset):
        return None  # in order; under several ranks accelerate shards the batches

    # -- optimizer: projector and routers at their own learning rates ---------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            t = self.run_cfg.train
            groups = param_groups(self.model, t.lr, t.projector_lr, t.weight_decay, router_lr=t.router_lr)
            if t.optim not in OPTIMIZERS:
                raise ValueError(f"train.optim must be one of {OPTIMIZERS}, got {t.optim!r}")
            fused = {"fused": True} if t.optim == "adamw_torch_fused" else {}
            self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8, **fused)
        return self.optimizer

    # -- loss ----------------------------------------------------------------------------------
    def _lm_loss(self, out, labels):
        """Summed answer-token cross entropy and the number of answer tokens (this rank)."""
        logits = out.logits[:, :-1].float()
        target = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                             reduction="none").view(target.shape)
        return ce, (target != -100)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.is_fsdp_enabled and not self._fsdp_ready:
            fsdp_same_collectives(model)
            self._fsdp_ready = True
        inputs = dict(inputs)
        domain = inputs.pop("domain")
        labels = inputs.pop("labels")
        skipped = inputs.pop("skipped", None)
        if skipped is not None and skipped.numel() and model.training:
            for i, code in skipped.tolist():
                self.skipped_at_load.setdefault(int(i), SKIP_REASONS[code])
        out = model(**inputs, use_cache=False)
        ce_tok, answer = self._lm_loss(out, labels)
        ce = ce_tok.sum()
        W = world()
        n = answer.sum().to(ce.dtype)
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
        else:
            self._eval_parts = (ce_tok.detach(), answer, domain, bal.detach())
        return (loss, out) if return_outputs else loss

    # -- evaluation: answer-token loss per domain ------------------------------------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """Token-weighted answer loss over the eval set, per domain (``eval_loss_<domain>``) and
        overall (``eval_loss``), plus the mean balance loss; summed over every rank. Tracks the
        best ``eval_loss`` for ``train.load_best_at_end``."""
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            return {}
        loader = self.get_eval_dataloader(ds)
        model = self.model_wrapped if self.is_deepspeed_enabled or self.is_fsdp_enabled else self.model
        was_training = model.training
        model.eval()
        D = len(ds.domains)
        dev = self.args.device
        sums = torch.zeros(2 * D + 2, dtype=torch.float64, device=dev)  # ce per domain, tokens per domain, bal, batches
        with torch.no_grad():
            for batch in loader:
                batch = self._prepare_inputs(batch)
                with self.compute_loss_context_manager():
                    self.compute_loss(model, batch)
                ce_tok, answer, domain, bal = self._eval_parts
                row_ce = (ce_tok * answer).sum(1).double()
                row_n = answer.sum(1).double()
                sums[:D].index_add_(0, domain, row_ce)
                sums[D:2 * D].index_add_(0, domain, row_n)
                sums[2 * D] += bal.double()
                sums[2 * D + 1] += 1
        if world() > 1:
            dist.all_reduce(sums)
        if was_training:
            model.train()
        sums = sums.cpu()
        ce, n = sums[:D], sums[D:2 * D]
        metrics = {f"{metric_key_prefix}_loss": float(ce.sum() / n.sum().clamp_min(1))}
        for d, name in enumerate(ds.domains):
            if n[d] > 0:
                metrics[f"{metric_key_prefix}_loss_{name}"] = float(ce[d] / n[d])
        if self.moles:
            metrics[f"{metric_key_prefix}_balance_loss"] = float(sums[2 * D] / sums[2 * D + 1].clamp_min(1))
        key = f"{metric_key_prefix}_loss"
        if self.best is None or metrics[key] < self.best["eval_loss"]:
            self.best = {"eval_loss": metrics[key], "step": self.state.global_step, "checkpoint": None}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- logs ----------------------------------------------------------------------------------
    def _maybe_log_save_evaluate(self, tr_loss, *args, **kw):
        # the optimizer steps since the last log, also right after a resume (the Trainer resets
        # its own counter to the resumed step)
        self._log_steps = max(1, self.state.global_step - self._globalstep_last_logged)
        return super()._maybe_log_save_evaluate(tr_loss, *args, **kw)

    def _routing_window(self) -> dict:
        """Routing since the last logging step, all ranks: per-layer load entropy, smallest expert
        share and dead experts (< ``train.collapse_fraction``), as tracker scalars; a collapse is
        logged as a warning when it starts."""
        win = self.routing.since(self._window, all_reduce=True)
        self._window = self.routing.snapshot()
        s = win.summary(min_fraction=self.run_cfg.train.collapse_fraction)
        out, dead_now = {}, set()
        for row in s["layer_loads"]:
            li = row["layer"]
            out[f"routing/layer{li}/load_entropy"] = round(row["load_entropy"], 5)
            out[f"routing/layer{li}/min_share"] = round(min(row["fractions"]), 5)
            out[f"routing/layer{li}/token_entropy"] = round(row["mean_token_entropy"], 5)
            out[f"routing/layer{li}/dead_experts"] = len(row["dead"])
            dead_now |= {(li, k) for k in row["dead"]}
        if s["layer_loads"]:
            out["routing/dead_experts"] = len(dead_now)
        for li, k in sorted(dead_now - self._warned):
            msg = (f"routing collapse at step {self.state.global_step}: layer {self.routing.layer_names[li]} expert {k} "
                   f"got < {100 * self.run_cfg.train.collapse_fraction:g}% of tokens over the last {self._log_steps} steps")
            log.warning(msg)
            self.collapse_events.append({"step": self.state.global_step, "layer": li, "expert": k})
        self._warned = dead_now
        return out

    def log(self, logs, start_time=None):
        if "loss" in logs:
            acc = self._acc.clone()
            if world() > 1:
                dist.all_reduce(acc)
            acc = acc.cpu()
            steps = self._log_steps
            logs["lm_loss"] = round(float(acc[0]) / steps, 6)
            if self.moles:
                logs["balance_loss"] = round(float(acc[1]) / steps, 6)
                logs.update(self._routing_window())
            self._acc.zero_()
        super().log(logs, start_time)
        if self.is_world_process_zero():
            row = {"stage": self.run_cfg.train.stage, "global_step": self.state.global_step, **logs}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        every = self.run_cfg.train.routing_log_steps
        if self.moles and every and "loss" in logs and self.state.global_step % every == 0:
            # the routing of the last `every` steps (all ranks), not diluted by earlier steps
            win = self.routing.since(self._snap, all_reduce=True)
            self._snap = self.routing.snapshot()
            if self.is_world_process_zero():
                snap = {"global_step": self.state.global_step, "window_steps": every,
                        **win.summary(self.run_cfg.train.collapse_fraction)}
                with open(Path(self.args.output_dir) / "routing.jsonl", "a") as f:
                    f.write(json.dumps(snap) + "\n")

    # -- checkpoints: safetensors + JSON, atomic ------------------------------------------------
    def _trainable(self):
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def gather_params(self, names) -> dict[str, torch.Tensor]:
        """The named parameters as full CPU tensors. Under FSDP each is all-gathered from its shards
        and under DeepSpeed ZeRO-3 gathered from its partitions (collectives: every rank must call
        this, and every rank gets the tensors); only the named ones are gathered, never the
        frozen base."""
        from torch.distributed.tensor import DTensor

        names = set(names)
        params = [(n, p) for n, p in self.model.named_parameters() if n in names]
        out = {}
        if self.is_deepspeed_enabled and any(hasattr(p, "ds_id") for _, p in params):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
                for n, p in params:
                    out[n] = p.detach().clone().cpu()
            return out
        for n, p in params:
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

        sd = get_optimizer_state_dict(self.model, unwrap_opt(self.optimizer),
                                      options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_world_process_zero():
            return {}
        ids, groups = {}, []
        for g in sd["param_groups"]:
            groups.append({**g, "params": [ids.setdefault(fqn, len(ids)) for fqn in g["params"]]})
        return {"state": {ids[fqn]: st for fqn, st in sd["state"].items()}, "param_groups": groups}

    def _save_checkpoint(self, model, trial):
        from transformers.trainer_callback import ExportableState

        final = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        zero = (torch.zeros_like(self.routing.counts), torch.zeros_like(self.routing.entropy))
        self._routing_total = self.routing.since(zero, all_reduce=True)  # all ranks: a collective
        if self.is_deepspeed_enabled:  # DeepSpeed's own format (ZeRO partitions), see training/README.md
            from .distributed import save_deepspeed_checkpoint

            save_deepspeed_checkpoint(self, final, self._run_info())
            return
        trainable = self.gather_params(self._sig)
        opt_sd = self._optimizer_state()

        tmp = final.with_name(final.name + ".tmp")
        if self.is_world_process_zero():
            ck.begin(final)
        self.accelerator.wait_for_everyone()
        ck.write_rng(tmp, self.args.process_index)
        self.accelerator.wait_for_everyone()
        if self.is_world_process_zero():
            for cb in [c for c in self.callback_handler.callbacks + [self.control] if isinstance(c, ExportableState)]:
                self.state.stateful_callbacks[cb.__class__.__name__] = cb.state()
            if self.best is not None and self.best["step"] == self.state.global_step:
                self.best["checkpoint"] = final.name
            sched = self.lr_scheduler.state_dict()
            scaler = getattr(self.accelerator, "scaler", None)
            info = self._run_info()
            if scaler is not None:  # fp16 loss scaling: the scale and its growth tracker
                info["grad_scaler"] = {k: (float(v) if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()}
            ck.write_main(tmp, trainable, opt_sd, sched, info)
            self.state.save_to_json(str(tmp / "trainer_state.json"))
            ck.finish(tmp, final, self._sig)
            self._rotate()
        self.accelerator.wait_for_everyone()

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Only the trainable weights (gathered in full under ZeRO-3 / FSDP), never the frozen base:
        ``trainable.safetensors`` (used by transformers' DeepSpeed checkpoint path)."""
        out = Path(output_dir or self.args.output_dir)
        trainable = self.gather_params(self._sig)
        if self.is_world_process_zero():
            out.mkdir(parents=True, exist_ok=True)
            ck._save_tensors(out / "trainable.safetensors", trainable)

    def _run_info(self) -> dict:
        return {"run_config": self.run_cfg.to_dict(), "world_size": self.args.world_size, "best": self.best,
                "skipped_at_load": {str(k): v for k, v in sorted(self.skipped_at_load.items())},
                "collapse_events": self.collapse_events,
                "routing": {"counts": self._routing_total.counts.cpu().tolist(),
                            "entropy": self._routing_total.entropy.cpu().tolist()}}

    def _rotate(self):
        """Keep the newest ``save_total_limit`` finished checkpoints (and the best one)."""
        import shutil

        limit = self.args.save_total_limit
        if not limit:
            return
        ckpts = [p for p in Path(self.args.output_dir).glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
        keep_best = self.best["checkpoint"] if self.best else None
        for p in sorted(ckpts, key=lambda p: int(p.name.split("-", 1)[1]))[:-limit]:
            if p.name != keep_best:
                shutil.rmtree(p)

    def _check_run_config(self, ckpt: Path) -> dict:
        """Refuse a checkpoint whose run changed what the weights mean or what data come next:
        any model setting but local paths, the data mixture, the seed and the batch geometry.
        Returns the checkpoint's info."""
        saved = json.loads((ckpt / "info.json").read_text())
        old, new = saved["run_config"], self.run_cfg.to_dict()
        paths = {"llava_path", "vision_path", "lm_path", "cache_dir"}
        diffs = [f"model.{k}" for k in new["model"] if k not in paths and old["model"].get(k, new["model"][k]) != new["model"][k]]
        data_keys = ("datasets", "builtin", "builtin_per_domain", "template", "max_length", "samples_per_epoch",
                     "sampling", "group_by_modality_length")
        diffs += [f"data.{k}" for k in data_keys if old["data"].get(k, new["data"][k]) != new["data"][k]]
        diffs += [f"train.{k}" for k in ("stage", "seed", "per_device_batch_size", "grad_accum")
                  if old["train"].get(k) != new["train"][k]]
        if saved.get("world_size") != self.args.world_size:
            diffs.append(f"world size ({saved.get('world_size')} -> {self.args.world_size})")
        if diffs:
            raise ck.CheckpointError(
                f"{ckpt} was written by a run with different settings: {', '.join(diffs)}; "
                "resume with the same configuration (or start a new run with train.init_adapter)"
            )
        return saved

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        ckpt = Path(resume_from_checkpoint)
        if self.is_deepspeed_enabled:
            from .distributed import check_deepspeed_checkpoint

            check_deepspeed_checkpoint(ckpt)
            saved = self._check_run_config(ckpt)
            self._restore_info(saved)
            if self.deepspeed is not None:  # an initialised engine: its own partitioned state
                return super()._load_from_checkpoint(resume_from_checkpoint, model)
            # no engine yet (a finished run, only exporting): the gathered trainable weights
            params = dict((model or self.model).named_parameters())
            with torch.no_grad():
                for k, v in ck.load_trainable(ckpt).items():
                    params[k].copy_(v)
            return
        ck.verify(ckpt, self._sig)
        saved = self._check_run_config(ckpt)
        self._restore_info(saved)
        tensors = ck.load_trainable(ckpt)
        model = model or self.model
        if self.is_fsdp_enabled:  # every rank holds the full tensors and keeps its own shards
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
            return
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in tensors.items():
                params[k].copy_(v)

    def _restore_info(self, saved: dict) -> None:
        self.best = saved.get("best")
        self.skipped_at_load = {int(k): v for k, v in saved.get("skipped_at_load", {}).items()}
        self.collapse_events = list(saved.get("collapse_events", []))
        r = saved.get("routing")
        if r is not None and self.is_world_process_zero():  # the global counts so far, once (rank 0)
            dev = self.routing.counts.device
            self.routing.counts = torch.tensor(r["counts"], dtype=torch.float64, device=dev).view_as(self.routing.counts)
            self.routing.entropy = torch.tensor(r["entropy"], dtype=torch.float64, device=dev).view_as(self.routing.entropy)
        self._window = self.routing.snapshot()
        self._snap = self.routing.snapshot()

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is None:
            return
        if self.is_deepspeed_enabled:
            return super()._load_optimizer_and_scheduler(checkpoint)
        opt = ck.load_optimizer(Path(checkpoint))
        sched = ck.load_scheduler(Path(checkpoint))
        if opt is None or sched is None:
            raise ck.CheckpointError(f"{checkpoint}: no optimizer/scheduler state; cannot resume")
        if self.is_fsdp_enabled:
            load_fsdp_optimizer(self.model, unwrap_opt(self.optimizer), opt)
        else:
            self.optimizer.load_state_dict(opt)
        self.lr_scheduler.load_state_dict(sched)

    def _load_scaler(self, checkpoint):
        scaler = getattr(self.accelerator, "scaler", None)
        if checkpoint is None or scaler is None:
            return
        st = json.loads((Path(checkpoint) / "info.json").read_text()).get("grad_scaler")
        if st is None:
            log.warning("%s has no grad-scaler state; fp16 loss scaling restarts from its initial scale", checkpoint)
            return
        scaler.load_state_dict(st)

    def _load_rng_state(self, checkpoint):
        if checkpoint is not None and not ck.load_rng(Path(checkpoint), self.args.process_index):
            log.warning("%s has no RNG state for process %d; dropout will differ from the original run",
                        checkpoint, self.args.process_index)

    def skip_counts(self) -> dict[str, int]:
        """Records that failed at load on any rank (a collective under several ranks), by reason."""
        items = dict(self.skipped_at_load)
        if world() > 1:
            parts = [None] * world()
            dist.all_gather_object(parts, items)
            for p in parts:
                items.update(p)
        return dict(Counter(items.values()))


OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")


class StopAfter(TrainerCallback):
    """Stop (and save) after a given step: an interrupted run, for resume tests and staged jobs."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
        return control


def sampling_mode(cfg: RunConfig) -> str:
    s = cfg.data.sampling
    if s is None:
        return "once" if cfg.train.num_epochs else "weighted"
    if s not in ("weighted", "once"):
        raise ValueError(f"data.sampling must be 'weighted', 'once' or null, got {s!r}")
    return s


def _checkpointing_args(on: bool) -> dict:
    """Activation checkpointing for ``TrainingArguments``: ``activation_checkpointing`` in the
    transformers we pin, ``gradient_checkpointing`` in releases before the rename (the GPU image
    has 5.17), so that training runs on either."""
    name = "activation" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ else "gradient"
    return {f"{name}_checkpointing": on, f"{name}_checkpointing_kwargs": {"use_reentrant": False} if on else None}


def precision(cfg: RunConfig, on_gpu: bool) -> dict:
    """``bf16`` / ``fp16`` / ``tf32`` for ``TrainingArguments`` from the base dtype and the train
    options. A 16-bit base with fp32 adapters computes under autocast in the base's dtype: bf16
    by default over a bfloat16 base (and on GPUs), fp16 with loss scaling over a float16 base."""
    t, m = cfg.train, cfg.model
    if m.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.dtype must be float32, bfloat16 or float16, got {m.dtype!r}")
    if m.adapter_dtype not in ("float32", "base"):
        raise ValueError(f"model.adapter_dtype must be 'float32' or 'base', got {m.adapter_dtype!r}")
    if t.fp16 and t.bf16:
        raise ValueError("train.fp16 and train.bf16 are both true; choose one autocast dtype")
    if t.fp16:
        bf16, fp16 = False, True
    elif m.dtype == "float16":
        bf16 = bool(t.bf16)
        fp16 = not bf16
    else:
        bf16 = t.bf16 if t.bf16 is not None else (on_gpu or m.dtype == "bfloat16")
        fp16 = False
    if m.dtype != "float32" and m.adapter_dtype == "float32" and not (bf16 or fp16):
        raise ValueError(f"model.dtype={m.dtype} with float32 adapters (model.adapter_dtype) computes under "
                         "autocast: set train.bf16=true (or train.fp16=true), or model.adapter_dtype=base")
    if fp16 and not on_gpu:
        raise ValueError("train.fp16 (fp16 autocast with loss scaling) needs a CUDA GPU: accelerate runs no fp16 "
                         "autocast on the CPU; use train.bf16=true or model.dtype=bfloat16 there")
    tf32 = t.tf32
    if tf32 is None:
        tf32 = True if (on_gpu and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8) else None
    elif tf32 and not on_gpu:
        raise ValueError("train.tf32=true applies to CUDA matmuls (Ampere or newer); this run is on the CPU")
    return {"bf16": bf16, "fp16": fp16, "tf32": tf32}


def report_to(value) -> list[str] | str:
    """``train.report_to`` as TrainingArguments wants it; the trackers stay optional packages."""
    if value == "auto":
        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else "none"
    names = [value] if isinstance(value, str) else list(value)
    if names in (["none"], []):
        return "none"
    for n in names:
        if n not in ("tensorboard", "wandb"):
            raise ValueError(f"train.report_to must be 'auto', 'none', 'tensorboard', 'wandb' or a list of those, got {value!r}")
        if importlib.util.find_spec(n) is None:
            raise ValueError(f"train.report_to={n} needs the {n} package (pip install {n}); it is optional and not installed")
    return names


def training_args(cfg: RunConfig) -> TrainingArguments:
    t = cfg.train
    if t.device not in ("auto", "cpu"):
        raise ValueError(f"train.device must be 'auto' or 'cpu', got {t.device!r}")
    on_gpu = torch.cuda.is_available() and t.device == "auto"
    prec = precision(cfg, on_gpu)
    epochs = t.num_epochs is not None
    if epochs and not t.num_epochs > 0:
        raise ValueError(f"train.num_epochs must be positive, got {t.num_epochs}")
    if not epochs and not (isinstance(t.max_steps, int) and t.max_steps > 0):
        raise ValueError(f"train.max_steps must be a positive int (or set train.num_epochs), got {t.max_steps!r}")
    if t.optim not in OPTIMIZERS:
        raise ValueError(f"train.optim must be one of {OPTIMIZERS}, got {t.optim!r}")
    kw = {}
    if t.fsdp and t.deepspeed:
        raise ValueError("train.fsdp and train.deepspeed are both set; choose one")
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
    if t.deepspeed:
        from .distributed import deepspeed_config

        kw["deepspeed"] = deepspeed_config(t.deepspeed, prec)
    has_eval = bool(cfg.data.eval_datasets)
    if t.eval_steps and not has_eval:
        raise ValueError("train.eval_steps needs data.eval_datasets (a validation set)")
    if t.load_best_at_end:
        if not (has_eval and t.eval_steps):
            raise ValueError("train.load_best_at_end needs data.eval_datasets and train.eval_steps")
        if not t.save_steps or t.save_steps % t.eval_steps:
            raise ValueError(f"train.load_best_at_end needs train.save_steps to be a multiple of train.eval_steps "
                             f"({t.eval_steps}), got {t.save_steps}")
    if epochs:
        length = {"max_steps": -1, "num_train_epochs": t.num_epochs, "warmup_steps": t.warmup_ratio,
                  "save_strategy": "steps" if t.save_steps else "epoch", "save_steps": t.save_steps or 500}
    else:
        length = {"max_steps": t.max_steps, "warmup_steps": int(round(t.warmup_ratio * t.max_steps)),
                  "save_strategy": "steps", "save_steps": t.save_steps or t.max_steps}
    workers = t.dataloader_workers if t.dataloader_workers is not None else (4 if on_gpu else 0)
    return TrainingArguments(
        output_dir=t.output_dir,
        **length,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler_type,
        max_grad_norm=t.max_grad_norm,
        **prec,
        logging_steps=t.logging_steps,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps or None,
        save_total_limit=t.save_total_limit,  # applied by MoLETrainer._rotate
        seed=t.seed,
        data_seed=t.seed,
        **_checkpointing_args(t.gradient_checkpointing),
        remove_unused_columns=False,
        dataloader_num_workers=workers,
        dataloader_persistent_workers=workers > 0,
        report_to=report_to(t.report_to),
        torch_compile=t.torch_compile,
        ddp_backend="gloo" if (not on_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1) else None,
        ddp_find_unused_parameters=True,  # a rank whose micro-batch is text-only leaves the vision side unused
        disable_tqdm=False,
        use_cpu=not on_gpu,
        **kw,
    )


def __getattr__(name):
    if name == "run_training":  # lives in training.run (which imports this module)
        from .run import run_training

        return run_training
    raise AttributeError(name)
