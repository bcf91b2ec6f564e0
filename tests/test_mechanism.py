"""training.experiments.mechanism: the synthetic task, the oracle routing module, the adapters of
each arm, the analysis and prediction checks on constructed results, and one tiny end-to-end run
(results written, every cached run reused on a second invocation)."""
from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from training.experiments import mechanism as mech  # noqa: E402

TINY = mech.MechConfig(hidden=16, intermediate=32, heads=2, pretrain_steps=2, steps=2, batch=8, test_per_domain=64)


def test_task_conflict_set_and_answers():
    cfg = dataclasses.replace(TINY, rho=0.25, values=8, domains=3)
    task = mech.Task(cfg, seed=3)
    assert int(task.in_conflict.sum()) == 2  # round(0.25 * 8) values of a
    a, b = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    ans = torch.stack([task.answers(torch.full_like(a, d), a, b) for d in range(3)])  # [D, 64]
    conf = task.in_conflict[a]
    assert torch.equal(ans[:, ~conf], ((a + b) % 8)[~conf].expand(3, -1))  # shared mapping off the set
    c = ans[:, conf]
    assert (c != ((a + b) % 8)[conf]).all()  # every domain contradicts f on the set ...
    assert (c[0] != c[1]).all() and (c[0] != c[2]).all() and (c[1] != c[2]).all()  # ... and each other
    # the domain is visible in the image only: its projection on the domain direction is the cue
    g = torch.Generator().manual_seed(0)
    img = task.images(torch.full((4000,), 1), g)
    proj = (img * task.directions[1]).sum(-1).mean()
    assert proj.item() == pytest.approx(cfg.cue, abs=0.1)
    assert mech.Task(dataclasses.replace(cfg, rho=0.0), 3).in_conflict.sum() == 0
    with pytest.raises(ValueError, match="rho must be in"):
        dataclasses.replace(cfg, rho=1.5).validate()
    with pytest.raises(ValueError, match="values must exceed domains"):
        dataclasses.replace(cfg, values=3).validate()


def test_oracle_routing_runs_the_forced_expert():
    """OracleMoLEFFN on expert e equals the SwiGLU FFN with expert e's LoRA deltas added (gate 1)."""
    from mole_ext import MoLEFFN

    torch.manual_seed(0)
    ffn = MoLEFFN(8, 12, num_experts=3, rank=2, alpha=4.0, gate_mode="prob")
    with torch.no_grad():
        for lin in (ffn.gate_proj, ffn.up_proj, ffn.down_proj):
            lin.lora_B.normal_()
    oracle = mech.OracleMoLEFFN(ffn)
    x = torch.randn(3, 5, 8)
    oracle.forced = torch.tensor([2, 0, 1])
    y = oracle(x)

    def proj(lin, z, e):
        return z @ lin.weight.t() + ffn.scaling * (z @ lin.lora_A[e].t()) @ lin.lora_B[e].t()

    for i, e in enumerate([2, 0, 1]):
        h = torch.nn.functional.silu(proj(ffn.gate_proj, x[i], e)) * proj(ffn.up_proj, x[i], e)
        torch.testing.assert_close(y[i], proj(ffn.down_proj, h, e))
    assert oracle.last_routing.expert.tolist() == [2] * 5 + [0] * 5 + [1] * 5
    y.sum().backward()  # gradients reach the forced experts only
    assert ffn.gate_proj.lora_B.grad.abs().sum() > 0
    oracle.forced = None
    with pytest.raises(RuntimeError, match="needs .forced set"):
        oracle(x)


def test_arms_train_only_their_adapters():
    cfg = TINY
    base = mech.build_base(cfg, 0)
    for p in base.parameters():
        p.requires_grad_(False)
    task = mech.Task(cfg, 0)
    batch = task.test[1]
    ref = mech.forward_logits(base, cfg, batch)
    for arm in mech.ARMS:
        model, ffns = mech.attach_adapters(base, cfg, arm, cfg.rank, seed=0)
        mech._set_forced(ffns, batch["domain"])
        torch.testing.assert_close(mech.forward_logits(model, cfg, batch), ref)  # B = 0: equals the base
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        assert names and all("lora_" in n or ".router." in n for n in names), arm
        has_router = any(".router." in n for n in names)
        assert has_router == (arm == "mole"), arm  # hash and oracle keep the router frozen
        inner = [f.ffn if isinstance(f, mech.OracleMoLEFFN) else f for f in ffns]
        k = cfg.experts if arm in mech.MOLE_ARMS else 1
        r = cfg.rank * cfg.experts if arm == "mix_Kr" else cfg.rank
        assert all(f.num_experts == k and f.rank == r for f in inner), arm
    assert all(not p.requires_grad for p in base.parameters())  # the base itself stays untouched


def _fake(acc_by_domain: list[float], experts_by_domain: list[int] | None, n: int = 20) -> dict:
    """A cached result whose accuracy per domain is given (conflict records are the first half)."""
    ev = {}
    for d, acc in enumerate(acc_by_domain):
        k = round(acc * n)
        rec = {"correct": [1] * k + [0] * (n - k), "conflict": [1] * (n // 2) + [0] * (n - n // 2)}
        if experts_by_domain is not None:
            rec["expert"] = [[experts_by_domain[d]] * n, [experts_by_domain[d]] * n]
        ev[str(d)] = rec
    base = {str(d): {"correct": [0] * (n // 2) + [1] * (n - n // 2), "conflict": [1] * (n // 2) + [0] * (n - n // 2)}
            for d in range(len(acc_by_domain))}
    return {"eval": ev, "base": {"eval": base}}


def test_analysis_and_predictions_on_constructed_results():
    """rho=0: no conflict; rho=0.25: single 0.9, mix 0.6 (conflict 0.3), oracle 0.9, hash 0.6, MoLE
    0.85 in the seeds where it separates domains, else 0.6. Each verdict follows from the numbers."""
    cells = [mech.Cell("rho", "rho=0.0", mech.ARMS, {"rho": 0.0}), mech.Cell("rho", "rho=0.25", mech.ARMS, {"rho": 0.25})]
    jitter = [0.0, 0.05, -0.05, 0.05, 0.0]
    results = {"rho=0.0": {}, "rho=0.25": {}}
    for s, j in enumerate(jitter):
        for arm in mech.ARMS:
            results["rho=0.0"].setdefault(arm, {})[s] = _fake([0.9 + j] * 3, [0, 1, 2] if arm in mech.MOLE_ARMS else None)
        # MoLE separates two domains in odd seeds (MI > 0) and gains there only
        acc = {"single": 0.9, "mix": 0.6, "mix_Kr": 0.6, "mole": 0.85 if s % 2 else 0.6, "oracle": 0.9, "hash": 0.6}
        routes = {"mole": [0, 0, 1] if s % 2 else [0, 0, 0], "oracle": [0, 1, 2], "hash": [1, 1, 1]}
        for arm in mech.ARMS:
            results["rho=0.25"].setdefault(arm, {})[s] = _fake([acc[arm] + j] * 3, routes.get(arm))
    summary = mech.analyse(mech.MechConfig(), cells, results, "rho=0.25")
    c = summary["cells"]["rho=0.25"]
    assert c["arms"]["single"]["acc"]["mean"] == pytest.approx(0.9 + sum(jitter) / 5)
    assert c["contrasts"]["single-mix"]["mean"] == pytest.approx(0.3)
    assert c["contrasts"]["single-mix"]["holm_reject"]
    assert c["arms"]["oracle"]["mi"]["mean"] == pytest.approx(math.log2(3))
    assert c["arms"]["hash"]["mi"]["mean"] == pytest.approx(0.0)
    assert summary["base_clean"]["acc"]["mean"] == pytest.approx(1.0)
    assert len(summary["contrasts"]) == 2 * len(mech.CONTRASTS)
    preds = {p["id"]: p["status"] for p in mech.check_predictions(summary, "rho=0.25")}
    assert preds["P1"] == "held" and preds["P2"] == "held" and preds["P4"] == "held" and preds["P6"] == "held"
    assert preds["P3"] == "not testable"
    assert preds["P5"] == "held"  # gain rises with MI
    md = mech.tables(summary)
    assert "| rho=0.25 | 5 |" in md and "+0.300 [" in md


def test_tiny_end_to_end_and_reuse(tmp_path, capsys):
    out = tmp_path / "mech"
    args = ["--quick", "--out", str(out), "--seeds", "2", "--set", "hidden=16", "intermediate=32", "heads=2",
            "pretrain_steps=2", "steps=2", "batch=8", "test_per_domain=16"]
    assert mech.main(args) == 0
    printed = capsys.readouterr().out
    assert "P1:" in printed and "### Paired differences" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["finished"] == res["planned"] == 2 * 2 * len(mech.ARMS)
    assert {p["id"] for p in res["predictions"]} == {p for p, _ in mech.PREDICTIONS}
    assert (out / "figures" / "accuracy_vs_rho.png").exists()
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == res["planned"]
    stamp = {p: p.stat().st_mtime_ns for p in runs}
    assert mech.main(args) == 0  # everything cached: nothing retrains
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "runs").glob("*.json"))} == stamp
    with pytest.raises(ValueError, match="unknown MechConfig field 'nope'"):
        mech.main(["--quick", "--out", str(out), "--set", "nope=1"])


def test_work_order_main_cell_first_then_each_sweep_on_five_seeds(monkeypatch):
    calls = []
    monkeypatch.setattr(mech, "run_arm", lambda c, arm, s, out: calls.append((c, arm, s)) or {})
    cfg = mech.MechConfig()
    cells = mech.plan(cfg)
    mech.work(cfg, cells, list(range(10)), None, log=lambda *a, **k: None)
    planned = sum(len(c.arms) for c in cells) * 10
    assert len(calls) == planned and len({(dataclasses.astuple(c), a, s) for c, a, s in calls}) == planned
    first_main = [(c.rho, s) for c, a, s in calls[: 10 * len(mech.ARMS)]]
    assert set(first_main) == {(0.25, s) for s in range(10)}  # the main cell, every seed, first
    late = [i for i, (c, a, s) in enumerate(calls) if s >= mech.FIRST_PASS_SEEDS and c.rho != 0.25 and c.rho != 0.5]
    early = [i for i, (c, a, s) in enumerate(calls) if c.rho == 0.125 and s < mech.FIRST_PASS_SEEDS]
    assert max(early) < min(late)  # every sweep reaches 5 seeds before any sweep gets more


def test_p5_fails_when_gain_does_not_follow_routing():
    cells = [mech.Cell("rho", "rho=0.25", mech.ARMS, {"rho": 0.25})]
    results = {"rho=0.25": {}}
    for s in range(6):
        acc = {"single": 0.9, "mix": 0.6, "mix_Kr": 0.6, "mole": 0.8 if s % 2 else 0.6, "oracle": 0.9, "hash": 0.6}
        routes = {"mole": [0, 0, 1] if s % 2 == 0 else [0, 0, 0], "oracle": [0, 1, 2], "hash": [1, 1, 1]}
        for arm in mech.ARMS:
            results["rho=0.25"].setdefault(arm, {})[s] = _fake([acc[arm]] * 3, routes.get(arm))
    summary = mech.analyse(mech.MechConfig(), cells, results, "rho=0.25")
    preds = {p["id"]: p for p in mech.check_predictions(summary, "rho=0.25")}
    assert preds["P5"]["status"] == "did not hold" and "Spearman(MI, mole-mix) = -1.00" in preds["P5"]["evidence"]
