"""One training run (``python -m training.train``): build the model (fp32 adapters over the base,
adapters initialised from ``train.seed``), check the data once, train with ``MoLETrainer``
(resuming with exact bookkeeping), evaluate, export the adapter, write routing analytics and the
run summary."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from . import checkpoint as ck
from .config import RunConfig
from .data import Collator, LlavaData, resolve_specs
from .distributed import without_zero_init
from .model import Built, build_model, reset_adapters, upcast_trainable
from .export import adapter_names, export
from .trainer import MoLETrainer, StopAfter, sampling_mode, training_args

log = logging.getLogger(__name__)


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def truncate_logs(out: Path, stage: int, step: int) -> None:
    """Drop the rows a killed run logged after the checkpoint it is resumed from, so that every
    step appears once in ``metrics.jsonl`` / ``routing.jsonl`` (with the values of the resumed run)."""
    for name, key in (("metrics.jsonl", "global_step"), ("routing.jsonl", "global_step")):
        p = out / name
        if not p.is_file():
            continue
        keep = []
        for line in p.read_text().splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a row cut by the kill
                continue
            if row.get("stage", stage) != stage or row.get(key, 0) <= step:
                keep.append(line)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, p)


def _checkpoint_step(ckpt: Path) -> int:
    try:
        return int(json.loads((ckpt / "trainer_state.json").read_text())["global_step"])
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ck.CheckpointError(f"{ckpt}: no readable trainer_state.json ({e})") from e


def run_training(cfg: RunConfig, resume: str | bool | None = None, built: Built | None = None) -> dict:
    """Build (or take) the model and data, train, save the last checkpoint, export the adapter and
    write routing analytics. Returns a summary dict (``trainer``: the MoLETrainer)."""
    from transformers import set_seed
    from transformers.trainer_callback import TrainerState

    t = cfg.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = training_args(cfg)  # validates the options and sets up the distributed state first
    set_seed(t.seed)
    if built is None:
        with without_zero_init():
            built = build_model(cfg.model, stage=t.stage)
        reset_adapters(built.model, t.seed)  # train.seed also draws the adapter/router init
    if cfg.model.adapter_dtype == "float32":
        cast = upcast_trainable(built.model)
        if cast:
            log.info("trainable parameters in float32 over a %s base: %d tensors", cfg.model.dtype, len(cast))
    if t.init_adapter:
        loaded = ck.load_adapter_into(built.model, t.init_adapter, strict=False)
        log.info("loaded %d tensors from %s", len(loaded), t.init_adapter)
    specs = resolve_specs(cfg.data, seed=t.seed, image_size=built.model.config.vision_config.image_size)
    mk = (lambda sp, name: LlavaData(cfg.data, built.tokenizer, built.image_processor, built.num_image_tokens, sp,
                                     check_cache=out / name))
    with args.main_process_first(local=False, desc="data check"):  # rank 0 checks; the others reuse its result
        data = mk(specs, "data_check.json")
        eval_data = mk(cfg.data.eval_datasets, "data_check_eval.json") if cfg.data.eval_datasets else None
    sampling_mode(cfg)
    if _rank() == 0:
        cfg.save(out / "config.json")
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(out))
        if resume is None:
            raise ck.CheckpointError(f"--resume: no checkpoint-N directory in {out}")
    ckpt_step = _checkpoint_step(Path(resume)) if resume else None
    if resume and _rank() == 0:
        truncate_logs(out, t.stage, ckpt_step)
    callbacks = [StopAfter(t.stop_after_steps)] if t.stop_after_steps else []
    trainer = MoLETrainer(
        model=built.model,
        args=args,
        train_dataset=data,
        eval_dataset=eval_data,
        data_collator=Collator(built.tokenizer.pad_token_id, report_skips=True),
        run_cfg=cfg,
        built=built,
        dataset=data,
        callbacks=callbacks,
    )
    finished = resume and t.num_epochs is None and ckpt_step >= t.max_steps
    if finished:  # killed after its last checkpoint: nothing left to train (the Trainer would do one more step)
        log.info("%s is at step %d of max_steps=%d: not training further", resume, ckpt_step, t.max_steps)
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
        train_loss = None
    else:
        if resume and trainer.is_deepspeed_enabled:  # transformers' DeepSpeed resume skips _load_from_checkpoint
            trainer._restore_info(trainer._check_run_config(Path(resume)))
        train_loss = trainer.train(resume_from_checkpoint=resume or None).training_loss
    summary = {"global_step": trainer.state.global_step, "train_loss": train_loss, "domains": data.domains}
    if eval_data is not None:
        summary["eval"] = trainer.evaluate()
    if t.load_best_at_end and trainer.best and trainer.best.get("checkpoint"):
        best = out / trainer.best["checkpoint"]
        log.info("loading the best checkpoint %s (eval_loss %.4f)", best, trainer.best["eval_loss"])
        trainer._load_from_checkpoint(best)
        summary["best"] = trainer.best
    skips = dict(data.skip_reasons)
    for reason, n in trainer.skip_counts().items():  # a collective under several ranks
        skips[reason] = skips.get(reason, 0) + n
    summary["skipped_records"] = sum(skips.values())
    summary["skipped_by_reason"] = skips
    if skips:
        log.warning("data: %d records skipped: %s", summary["skipped_records"], skips)
    summary["collapse_events"] = trainer.collapse_events
    trainer.routing.all_reduce()
    full = trainer.gather_params(adapter_names(built, cfg))  # a collective under FSDP / ZeRO-3
    if trainer.is_world_process_zero():
        if trainer.moles:
            summary["routing"] = trainer.routing.write(out, "routing")
        export(built, cfg, out / "adapter", full)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "routing"}, indent=1))
    trainer.accelerator.wait_for_everyone()
    summary["trainer"] = trainer
    return summary
