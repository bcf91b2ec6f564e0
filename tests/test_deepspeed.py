"""DeepSpeed ZeRO-3 (``train.deepspeed``) through the Trainer on CPU with two gloo processes, on
the tiny random LLaVA-MoLE (float32): 1 step (``train.stop_after_steps``), ``--resume``, 1 more step;
the losses and the exported adapter (gathered in full) equal one process without DeepSpeed with
the same global batch. MoLEFFN must be a ZeRO-3 leaf module: without it, it fails loudly."""
from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers import run_group  # noqa: E402
from training import checkpoint as ck  # noqa: E402
from training.config import load_config  # noqa: E402

pytest.importorskip("deepspeed")  # optional at run time; requirements.txt installs it for this test

CACHE = str(ROOT / ".cache" / "mole_ext")
TIMEOUT = 300
TOL = 2e-5  # float32, sums split differently over two ranks (see tests/test_fsdp.py)
WTOL = 1e-4


def _run(cmd, log: Path) -> None:
    run_group(cmd, log, TIMEOUT)


def _torchrun(cfgf: Path, out: Path, *extra: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
          "-m", "training.train", "--config", str(cfgf), f"train.output_dir={out}", "train.per_device_batch_size=2",
          *extra], out.parent / f"{out.name}-{len(list(out.parent.glob(out.name + '-*.log')))}.log")


def _losses(run: Path) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return {r["global_step"]: r["loss"] for r in rows if "loss" in r}


def test_zero3_two_gloo_processes_resume_equal_one_process(tmp_path):
    from training.trainer import run_training

    ds = tmp_path / "z3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": "auto",
                              "train_batch_size": "auto", "gradient_accumulation_steps": "auto",
                              "gradient_clipping": "auto", "bf16": {"enabled": "auto"}}))
    cfgf = tmp_path / "c.json"
    cfgf.write_text(json.dumps({
        "model": {"source": "tiny", "cache_dir": CACHE, "dropout": 0.0},
        "data": {"builtin_dir": str(tmp_path / "data"), "builtin_per_domain": 8, "samples_per_epoch": 8},
        "train": {"max_steps": 2, "save_steps": 1, "lr": 1e-2, "warmup_ratio": 0, "device": "cpu",
                  "report_to": "none", "logging_steps": 1}}))
    one = tmp_path / "one"
    run_training(load_config(cfgf, [f"train.output_dir={one}", "train.per_device_batch_size=4"]))
    z3 = tmp_path / "z3"
    _torchrun(cfgf, z3, f"train.deepspeed={ds}", "train.stop_after_steps=1")
    assert (z3 / "checkpoint-1" / "info.json").is_file() and not (z3 / "checkpoint-2").exists()
    _torchrun(cfgf, z3, f"train.deepspeed={ds}", "--resume")
    la, lb = _losses(one), _losses(z3)
    assert sorted(lb) == [1, 2]
    for k in (1, 2):
        assert abs(la[k] - lb[k]) < TOL, (k, la, lb)
    # the exported adapter is gathered in full from the ZeRO-3 partitions
    _, a = ck.read_adapter(one / "adapter")
    _, b = ck.read_adapter(z3 / "adapter")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel() > 0, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=WTOL, msg=k)
    moved = [k for k in a if "lora_B" in k]
    assert moved and all(float(b[k].abs().max()) > 0 for k in moved)  # trained, not the zero init


def test_zero3_partitioned_mole_params_fail_loudly_and_config_checks(tmp_path):
    from mole_ext import MoLEFFN
    from training.distributed import deepspeed_config

    m = MoLEFFN(8, 16, 2, 2, 4.0)
    m.router.weight.data = torch.empty(0)  # what ZeRO-3 leaves when no hook gathered it
    with pytest.raises(RuntimeError, match="set_z3_leaf_modules"):
        m(torch.randn(3, 8))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="remove its 'optimizer'"):
        deepspeed_config(str(bad), {"bf16": False, "fp16": False})
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}))
    with pytest.raises(ValueError, match="bf16.enabled=True but the run has train.bf16=False"):
        deepspeed_config(str(bad), {"bf16": False, "fp16": False})
    with pytest.raises(ValueError, match="cannot read the DeepSpeed JSON"):
        deepspeed_config(str(tmp_path / "nope.json"), {"bf16": False, "fp16": False})
