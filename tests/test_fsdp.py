"""FSDP2 (``train.fsdp``) on CPU with two gloo processes, on the tiny random LLaVA-MoLE (float32).

One worker run per configuration (``tests/_fsdp_worker.py``, which calls ``run_training`` as
``python -m training.train`` does): 2 ranks x batch 2 with FSDP, 1 process x batch 4 without,
an FSDP run stopped at step 2 then resumed, and its step-2 checkpoint resumed under DDP. The worker routes image tokens to expert 2 and text
tokens elsewhere, so a rank whose micro-batch is text-only sends no token to expert 2 (and never
runs the vision tower) while the other rank does; the tests check that this happened and that
nothing hung (every subprocess has a timeout and is killed with its children when it runs over).
"""
from __future__ import annotations

import json
import shutil
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

CACHE = str(ROOT / ".cache" / "mole_ext")
WORKER = str(ROOT / "tests" / "_fsdp_worker.py")
TIMEOUT = 240  # one launch takes ~20 s on 2 cores; a hang fails the test instead of stalling CI

# Float32 tolerance for 2 ranks vs 1 process. Both compute the same global-batch loss, but the
# sums are split differently (per-rank cross-entropy sums all-reduced; gradients reduce-scattered
# as (g0 + g1) / 2 instead of one batched sum), so results differ by float32 rounding: observed
# ~1e-6 on losses of ~10.7 (an ulp there is 9.5e-7). 2e-5 allows ~20 ulps over 4 AdamW steps;
# a real error (e.g. a per-rank instead of a global mean) moves the loss by ~1e-2.
TOL = 2e-5
# Weights after 4 AdamW steps (lr 1e-2): AdamW scales every update to ~lr, so where a gradient is
# near zero a rounding-level difference in it moves the weight by more than rounding (observed
# 6e-6). 1e-4 is 1% of one step's size.
WTOL = 1e-4


def _run(cmd, log: Path) -> None:
    run_group(cmd, log, TIMEOUT)


def _torchrun(cfgf: Path, out: Path, *extra: str, fsdp: str = "full_shard") -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
          WORKER, "--config", str(cfgf), f"train.output_dir={out}", "train.per_device_batch_size=2",
          f"train.fsdp={fsdp}", *extra], out.with_suffix(".log"))


def _rows(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from training.data import make_builtin

    tmp = tmp_path_factory.mktemp("fsdp")
    specs = make_builtin(tmp / "data", per_domain=8, seed=0, size=64)["instruct"]  # shapes, charts, text
    weights = {"shapes": 1.0, "charts": 1.0, "text": 2.0}  # text-heavy: some rank gets a text-only batch
    cfgf = tmp / "c.json"
    cfgf.write_text(json.dumps({
        "model": {"source": "tiny", "cache_dir": CACHE, "dropout": 0.0},
        "data": {"builtin": None, "samples_per_epoch": 16,
                 "datasets": [{"path": s.path, "domain": s.domain, "weight": weights[s.domain]} for s in specs]},
        "train": {"max_steps": 4, "save_steps": 2, "save_total_limit": None, "lr": 1e-2, "projector_lr": 1e-2,
                  "warmup_ratio": 0, "device": "cpu"}}))
    one = tmp / "one"
    _run([sys.executable, WORKER, "--config", str(cfgf), f"train.output_dir={one}", "train.per_device_batch_size=4"],
         tmp / "one.log")
    two = tmp / "two"
    _torchrun(cfgf, two)
    part = tmp / "part"
    _torchrun(cfgf, part, "train.stop_after_steps=2")
    assert sorted(p.name for p in part.glob("checkpoint-*")) == ["checkpoint-2"]
    shutil.copytree(part / "checkpoint-2", tmp / "ddp" / "checkpoint-2")  # before part resumes past it
    _torchrun(cfgf, part, "--resume")
    return one, two, part


def test_fsdp_checkpoint_resumes_under_ddp(runs, tmp_path):
    """The checkpoint is not tied to sharding: an FSDP run's checkpoint-2, resumed by the same two
    ranks with DDP instead (e.g. after moving to GPUs that fit the model), continues to the same
    losses and weights as the uninterrupted FSDP run, to float32 rounding."""
    _, two, part = runs
    ddp = part.parent / "ddp"
    _torchrun(part.parent / "c.json", ddp, "--resume", fsdp="")
    w = json.loads((ddp / "worker_0.json").read_text())
    assert w["sharded"] == 0  # DDP really ran: no parameter is a DTensor shard
    ra, rb = _rows(two), _rows(ddp)
    assert [r["global_step"] for r in rb] == [3, 4]
    for a, b in zip(ra[2:], rb):
        for k in ("loss", "grad_norm"):
            assert abs(a[k] - b[k]) < TOL, (k, a, b)
    ta, tb = ck.load_trainable(two / "checkpoint-4"), ck.load_trainable(ddp / "checkpoint-4")
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=WTOL, msg=k)


def test_fsdp_two_gloo_processes_equal_one_process(runs):
    """2 FSDP ranks x batch 2 == 1 process x batch 4: losses, gradient norms, the checkpoint's
    trainable weights and AdamW moments (gathered from the shards) agree to float32 rounding."""
    one, two, _ = runs
    w = [json.loads((two / f"worker_{r}.json").read_text()) for r in (0, 1)]
    assert w[0]["sharded"] == w[0]["params"] > 0  # every parameter is a DTensor shard: FSDP really ran
    assert json.loads((one / "worker_0.json").read_text())["sharded"] == 0
    # some micro-step had one rank route no token at all to an expert (a text-only batch: expert 2
    # and the vision tower unused) while the other rank used it, and the run still finished
    c0, c1 = (torch.tensor(x["expert_counts"]) for x in w)  # [forward, layer, expert]
    assert c0.shape == c1.shape and c0.shape[0] == 4
    assert (((c0 == 0) & (c1 > 0)) | ((c1 == 0) & (c0 > 0)))[:, :, 2].any(), (c0, c1)

    r1, r2 = _rows(one), _rows(two)
    assert [r["global_step"] for r in r1] == [r["global_step"] for r in r2] == [1, 2, 3, 4]
    for a, b in zip(r1, r2):
        for k in ("loss", "lm_loss", "balance_loss", "grad_norm"):
            assert abs(a[k] - b[k]) < TOL, (k, a, b)

    ta, tb = ck.load_trainable(one / "checkpoint-4"), ck.load_trainable(two / "checkpoint-4")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape
        torch.testing.assert_close(tb[k], ta[k], rtol=0, atol=WTOL, msg=k)
    oa, ob = ck.load_optimizer(one / "checkpoint-4"), ck.load_optimizer(two / "checkpoint-4")
    assert oa["param_groups"] == ob["param_groups"]
    for i, st in oa["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(ob["state"][i][k], v, rtol=1e-4, atol=TOL, msg=f"{i}.{k}")
    # FSDP2 reduce-scatters zeros for a parameter no rank used (CLIP's last layer, which LLaVA's
    # penultimate-layer features never reach), so AdamW keeps an all-zero state for it where one
    # process keeps none; with zero moments the update is zero (see training/README.md)
    for i in set(ob["state"]) - set(oa["state"]):
        assert not ob["state"][i]["exp_avg"].any() and not ob["state"][i]["exp_avg_sq"].any(), i


def test_fsdp_resume_equals_uninterrupted(runs):
    """FSDP: 2 steps + --resume + 2 steps == 4 steps (losses and weights, exactly): the checkpoint
    holds the gathered trainable weights and AdamW state, and resume re-shards both."""
    _, two, part = runs
    ra, rb = _rows(two), _rows(part)
    assert [r["global_step"] for r in rb] == [1, 2, 3, 4]
    for a, b in zip(ra, rb):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-6, (a, b)
    ck.verify(part / "checkpoint-2")
    ta, tb = ck.load_trainable(two / "checkpoint-4"), ck.load_trainable(part / "checkpoint-4")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    oa, ob = ck.load_optimizer(two / "checkpoint-4"), ck.load_optimizer(part / "checkpoint-4")
    assert oa["state"].keys() == ob["state"].keys()
    assert all(torch.equal(oa["state"][i][k], ob["state"][i][k]) for i in oa["state"] for k in oa["state"][i])


def test_fsdp_adapter_is_full_and_loads(runs):
    """The adapter exported under FSDP holds full (unsharded) tensors: it loads strictly onto a
    fresh base and matches the one-process adapter and the final checkpoint."""
    from training.model import build_model

    one, two, _ = runs
    _, t2 = ck.read_adapter(two / "adapter")
    _, t1 = ck.read_adapter(one / "adapter")
    assert t1.keys() == t2.keys()
    fresh = build_model(load_config(None, ["model.source=tiny", f"model.cache_dir={CACHE}"]).model, stage=2).model
    shapes = {n: p.shape for n, p in fresh.named_parameters()}
    for k, v in t2.items():
        assert v.shape == shapes[k], k
        torch.testing.assert_close(v, t1[k], rtol=0, atol=WTOL, msg=k)
    last = ck.load_trainable(two / "checkpoint-4")
    assert all(torch.equal(t2[k], v) for k, v in last.items())
    assert len(ck.load_adapter_into(fresh, two / "adapter", strict=True)) == len(t2)


def test_fsdp_config_checks(monkeypatch):
    from training.trainer import training_args

    with pytest.raises(ValueError, match="train.fsdp must be"):
        training_args(load_config(None, ["train.fsdp=zero3", "train.device=cpu"]))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="2 or more processes"):
        training_args(load_config(None, ["train.fsdp=full_shard", "train.device=cpu"]))
