"""``python -m training.train --config FILE [section.key=value ...] [--resume | --resume-from CHECKPOINT_DIR]``

Trains either stage (``train.stage``). Under ``torchrun`` it runs DDP (gloo on CPU, NCCL on GPU).
Prints the run directory last.
"""
from __future__ import annotations

import argparse
import logging
import sys

from .config import load_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON config file (sections model, data, train); defaults if omitted")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint-N in train.output_dir")
    ap.add_argument("--resume-from", metavar="CHECKPOINT_DIR", help="continue from this checkpoint directory")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.max_steps=50 model.num_experts=4")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    from .trainer import run_training

    summary = run_training(cfg, resume=args.resume_from or (True if args.resume else None))
    trainer = summary.pop("trainer")
    if trainer.is_world_process_zero():
        loss = summary["train_loss"]
        print(f"global_step={summary['global_step']} train_loss={'-' if loss is None else f'{loss:.4f}'} "
              f"skipped_records={summary['skipped_records']}")
        print(cfg.train.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
