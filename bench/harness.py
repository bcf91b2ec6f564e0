"""Benchmark plumbing shared by bench/*.py: timing, the environment record, result files."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from typing import Callable, Dict, List, Sequence

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def environment(device: str) -> dict:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                         stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "git_commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(fns: Dict[str, Callable[[], object]], device: str, warmup: int, reps: int,
                     flush: Callable[[], None] = None) -> Dict[str, List[float]]:
    """Times each provider `reps` times, round-robin (provider A, B, C, A, B, C, ...) so that a
    machine that speeds up or slows down during the run affects every provider alike. Returns
    seconds per call.

    On CUDA the time is the device's, between two events around the call. So that the host's
    launch overhead (Python, dispatch, autograd) is not counted, a sleep kernel is queued before
    the start event, long enough for the host to enqueue the whole call behind it (1.5x the host
    time the warm-up measured); the GPU then runs the call's kernels back to back, as in a
    training step where the host runs ahead."""
    host_s = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        host_s[name] = time.perf_counter() - t0  # enqueue time on CUDA (nothing waits for it)
    _sync(device)
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if flush is not None:
                flush()
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                # ~2 GHz SM clock; at least 50 us, at most 50 ms
                torch.cuda._sleep(int(min(max(1.5 * host_s[name], 50e-6), 50e-3) * 2e9))
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times[name].append(start.elapsed_time(end) / 1e3)
            else:
                _sync(device)
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return times


def quantiles(samples: Sequence[float]) -> dict:
    s = sorted(samples)
    q = statistics.quantiles(s, n=5, method="inclusive") if len(s) >= 2 else [s[0]] * 4
    return {"median": statistics.median(s), "p20": q[0], "p80": q[3]}


def print_table(rows: List[dict], columns: List[str]):
    width = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.rjust(width[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).rjust(width[c]) for c in columns))


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 0.01 else f"{v:.2e}"
    return str(v)


def write_results(name: str, env: dict, rows: List[dict], markdown: str) -> str:
    """Appends one JSON line per row to bench/results/<name>.jsonl and writes the latest table
    to bench/results/<name>-<device kind>.md; returns the Markdown path."""
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{name}.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps({**env, **r}) + "\n")
    kind = "cuda" if env.get("device", "").startswith(("NVIDIA", "Tesla")) else "cpu"
    path = os.path.join(RESULTS, f"{name}-{kind}.md")
    with open(path, "w") as f:
        f.write(markdown)
    return path


def markdown_table(rows: List[dict], columns: List[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(out) + "\n"


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large copy_ (read + write), measured now: what the device reaches in practice,
    the yardstick of every bandwidth fraction (never a datasheet's number)."""
    n = 1 << 28 if device == "cuda" else 1 << 25
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = quantiles(time_interleaved({"copy": lambda: dst.copy_(src)}, device, 2, 5)["copy"])
    return 2 * n / t["median"]
