"""A tiny trained run (random LLaMA + CLIP, SmolLM2's tokenizer, the demo data, 3 steps) shared by
the evaluation, chat and web-demo tests: made once per pytest session under its base temp dir."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the training package lives at the repository root
    sys.path.insert(0, str(ROOT))
CACHE = str(ROOT / ".cache" / "mole_ext")


def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(run directory, generated data directory) of the shared tiny run."""
    from training.config import load_config
    from training.data.demo_data import make_builtin

    base = tmp_path_factory.getbasetemp() / "tiny_run"
    data = base / "data"
    specs = make_builtin(data, per_domain=8, seed=0, size=64)
    run = base / "run"
    if not (run / "adapter" / "adapter_config.json").is_file():
        from training.trainer import run_training

        cfg = load_config(None, [
            "model.source=tiny", f"model.cache_dir={CACHE}", "data.builtin_per_domain=8", f"data.builtin_dir={data}",
            "train.per_device_batch_size=4", "train.max_steps=3", "train.lr=2e-2", "train.projector_lr=2e-2",
            "train.warmup_ratio=0", "train.device=cpu", "model.dropout=0.0", f"train.output_dir={run}"])
        run_training(cfg)
    return run, Path(specs["instruct"][0].path).parent
