"""Shared test helpers: devices, per-dtype tolerances, a readable mismatch report."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

# CUDA cases are collected everywhere and skipped with a reason where there is no GPU; nothing
# here touches CUDA at import time beyond the availability query.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]

# (rtol, atol) for results that went through a float32 accumulation and one final rounding.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


def mismatch_report(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> str:
    """Max abs/rel error, where, and how many elements are out of tolerance."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        return f"shape mismatch: actual {tuple(a.shape)} vs expected {tuple(e.shape)}"
    if a.numel() == 0:
        return "both empty"
    diff = (a - e).abs()
    rel = diff / e.abs().clamp_min(1e-30)
    bad = ~(diff <= atol + rtol * e.abs()) | (a.isnan() != e.isnan())
    where = tuple(int(i) for i in torch.unravel_index(diff.nan_to_num(float("inf")).argmax(), diff.shape))
    return (f"{int(bad.sum())}/{a.numel()} elements out of tolerance (rtol={rtol}, atol={atol}); "
            f"max abs err {diff.max().item():.3e} at {where} (actual {a[where].item():.6g}, "
            f"expected {e[where].item():.6g}); max rel err {rel.max().item():.3e}")


def assert_close(actual, expected, dtype=None, rtol=None, atol=None, msg=""):
    """torch.testing-style closeness with the per-dtype tolerance table and a mismatch report."""
    dtype = dtype or expected.dtype
    r, a = TOL.get(dtype, TOL[torch.float32])
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    assert actual.shape == expected.shape, f"{msg} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ok = torch.allclose(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol, atol=atol,
                        equal_nan=True)
    assert ok, f"{msg} {mismatch_report(actual, expected, rtol, atol)}"


def assert_equal(actual, expected, msg=""):
    """Exact equality (integer outputs, row moves), with a report of the first differences."""
    a, e = actual.cpu(), expected.cpu()
    assert a.shape == e.shape, f"{msg} shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert a.dtype == e.dtype, f"{msg} dtype {a.dtype} != {e.dtype}"
    neq = (a != e) if not a.is_floating_point() else ~((a == e) | (a.isnan() & e.isnan()))
    if neq.any():
        idx = neq.nonzero()[:5].tolist()
        raise AssertionError(f"{msg} {int(neq.sum())} elements differ; first at {idx}")


def routing_for(n: int, k: int, kind: str, generator=None) -> torch.Tensor:
    """Expert ids [n] int32: "uniform" random, "one" (all on the last expert), "skewed" (99% on
    expert 0, the rest spread), "missing" (expert 1 never used when k > 2)."""
    g = generator or torch.Generator().manual_seed(n * 31 + k)
    if kind == "uniform":
        return torch.randint(0, k, (n,), generator=g, dtype=torch.int32)
    if kind == "one":
        return torch.full((n,), k - 1, dtype=torch.int32)
    if kind == "skewed":
        e = torch.zeros(n, dtype=torch.int32)
        spread = torch.rand(n, generator=g) < 0.01
        e[spread] = torch.randint(0, k, (int(spread.sum()),), generator=g, dtype=torch.int32)
        return e
    if kind == "missing":
        e = torch.randint(0, k, (n,), generator=g, dtype=torch.int32)
        if k > 2:
            e[e == 1] = 0
        return e
    raise ValueError(kind)


def load_balance_inputs(n: int, k: int, dtype, mask_kind: str, seed: int, skew: float | None = None):
    """Inputs of load_balance_loss: probs [n, k] (a float64 softmax cast to dtype), expert [n]
    int64, mask [n] bool or None. mask_kind: "none", "random" (about 70% kept) or "all_false";
    skew: the share of tokens moved to expert 0 (None: uniform routing)."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=gen, dtype=torch.float64), -1).to(dtype)
    expert = torch.randint(0, k, (n,), generator=gen)
    if skew is not None:
        expert = torch.where(torch.rand(n, generator=gen) < skew, torch.zeros_like(expert), expert)
    mask = {"none": None, "random": torch.rand(n, generator=gen) < 0.7,
            "all_false": torch.zeros(n, dtype=torch.bool)}[mask_kind]
    return probs, expert, mask


def run_group(cmd, log: Path, timeout: float) -> None:
    """Run ``cmd`` from the repository root in its own process group with its output in ``log``;
    on timeout kill the whole group (torchrun's and DeepSpeed's workers too) and fail with the
    log's tail, so a hang fails the test instead of stalling CI."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "python"), str(root)]), "OMP_NUM_THREADS": "1"}
    with open(log, "w") as out:
        p = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            pytest.fail(f"{' '.join(map(str, cmd[:6]))}... ran over {timeout} s (a hang?); log: {log.read_text()[-3000:]}")
    assert rc == 0, log.read_text()[-4000:]
