"""Runs killed with SIGKILL (mid-run while writing a checkpoint, with steps logged past the last
finished one; after the last checkpoint but before export) and resumed end at exactly max_steps with the uninterrupted
run's weights, adapter and metrics rows (each step once). Tiny model, CPU; about a minute."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training import checkpoint as ck  # noqa: E402

CACHE = str(ROOT / ".cache" / "mole_ext")


def _args(tmp, out):
    return ["model.source=tiny", f"model.cache_dir={CACHE}", "data.builtin_per_domain=8",
            f"data.builtin_dir={tmp}/data", f"train.output_dir={out}", "train.per_device_batch_size=4",
            "train.max_steps=6", "train.save_steps=2", "train.save_total_limit=2", "train.logging_steps=1",
            "train.warmup_ratio=0", "train.lr=1e-2", "train.lr_scheduler_type=constant", "model.dropout=0.1",
            "data.samples_per_epoch=12", "train.device=cpu", "train.report_to=none", "train.routing_log_steps=2"]


def _run(tmp, out, kill_at, resume=False):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "python"), str(ROOT)])}
    cmd = [sys.executable, str(ROOT / "tests" / "_kill_runner.py"), kill_at, "--", *_args(tmp, out)]
    if resume:
        cmd.append("--resume")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _rows(out, name="metrics.jsonl"):
    return [json.loads(x) for x in (Path(out) / name).read_text().splitlines() if x.strip()]


def test_sigkill_at_any_point_then_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = _run(tmp_path, a, "none")
    assert r.returncode == 0, r.stderr[-3000:]
    # killed while writing checkpoint-4 (checkpoint-2 is the last finished one)
    r = _run(tmp_path, b, "finish:2")
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (b / "checkpoint-2").is_dir() and (b / "checkpoint-4.tmp").is_dir() and not (b / "checkpoint-4").exists()
    assert max(x["global_step"] for x in _rows(b) if "loss" in x) == 4  # rows 3, 4 logged past checkpoint-2
    # resumed from checkpoint-2, killed after the last checkpoint but before the adapter export
    r = _run(tmp_path, b, "export", resume=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (b / "checkpoint-6" / "manifest.json").is_file() and not (b / "adapter").exists()
    # resumed from the final checkpoint: no step past max_steps, only the export is left
    r = _run(tmp_path, b, "none", resume=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-2].startswith("global_step=6 ")

    for run in (a, b):
        assert json.loads((run / "summary.json").read_text())["global_step"] == 6
        assert json.loads((run / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
        assert not (run / "checkpoint-7").exists()
    ta, tb = ck.load_trainable(a / "checkpoint-6"), ck.load_trainable(b / "checkpoint-6")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    _, ea = ck.read_adapter(a / "adapter")
    _, eb = ck.read_adapter(b / "adapter")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # every step once in metrics.jsonl, with the uninterrupted run's values (lm_loss and
    # balance_loss of the first step after each resume included)
    ra = {x["global_step"]: x for x in _rows(a) if "loss" in x}
    rb_list = [x for x in _rows(b) if "loss" in x]
    assert [x["global_step"] for x in rb_list] == [1, 2, 3, 4, 5, 6]
    for x in rb_list:
        for key in ("loss", "lm_loss", "balance_loss", "learning_rate", "grad_norm"):
            assert x[key] == ra[x["global_step"]][key], (key, x, ra[x["global_step"]])
    assert [x["global_step"] for x in _rows(b, "routing.jsonl")] == [2, 4, 6]
    assert _rows(a, "routing.jsonl") == _rows(b, "routing.jsonl")
    assert json.loads((a / "routing.json").read_text()) == json.loads((b / "routing.json").read_text())
