"""Routing-side benchmark: router_top1, permute, unpermute and load_balance_loss, mole_ext
against the PyTorch reference (mole_ext.reference: softmax + argmax; argsort + index_select;
index_copy; bincount + sums), forward and backward, with the effective bandwidth of each call
next to a same-size ``copy_`` measured in the same run.

    python bench/routing.py                 # CUDA when present, else the CPU kernels at small sizes
    python bench/routing.py --quick --json /tmp/routing.json

Columns: median / p20 / p80 microseconds per call, GB/s (bytes the op must read and write,
divided by the median), copy GB/s (a uint8 copy_ moving the same bytes), the op's fraction of
that copy, speed-up over the reference, and on CUDA the issue's target (permute / unpermute at
>= 80% of copy bandwidth for N >= 16384; router and loss under 10 us plus the copy time at
N = 16384). Providers are timed round-robin (bench/harness.py). Rows are appended to
bench/results/routing.jsonl with the device, versions, git commit and date; the table goes to
bench/results/routing-<cuda|cpu>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import mole_ext  # noqa: E402
from mole_ext import reference as ref  # noqa: E402

OPS = ("router", "permute", "unpermute", "loss")


@dataclass(frozen=True)
class Config:
    op: str
    n: int      # tokens
    k: int      # experts
    d: int      # feature size of the rows permute / unpermute move
    dtype: str  # logits and rows


def cuda_configs() -> List[Config]:
    return [Config(op, n, k, 4096, "bfloat16") for op in OPS for n in (4096, 16384, 65536) for k in (2, 4, 8)]


def cpu_configs() -> List[Config]:
    return [Config(op, n, k, 256, "bfloat16") for op in OPS for n in (1024, 4096) for k in (2, 8)]


@dataclass
class Case:
    mode: str                 # fwd / bwd / fwd+bwd
    provider: str             # mole_ext / reference
    fn: Callable[[], object]
    bytes: int                # bytes the op must move (reads + writes)


def _elt(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def build_cases(cfg: Config, device: torch.device) -> List[Case]:
    dt = getattr(torch, cfg.dtype)
    n, k, d = cfg.n, cfg.k, cfg.d
    # drawn on the device (seeded): a CPU draw of [65536, 4096] rows takes seconds per tensor
    g = torch.Generator(device=device).manual_seed(0)
    expert = torch.randint(0, k, (n,), generator=g, dtype=torch.int32, device=device)
    cases: List[Case] = []
    if cfg.op == "router":
        logits = torch.randn(n, k, generator=g, device=device).to(dt)
        probs, _ = mole_ext.ops.router_top1(logits)
        gp = torch.randn(n, k, device=device)
        fwd_bytes = n * k * _elt(dt) + n * k * 4 + n * 4
        bwd_bytes = 3 * n * k * 4
        leaf = logits.clone().requires_grad_(True)

        def fb(fn):
            def run():
                leaf.grad = None  # else autograd accumulates into it: traffic the bytes do not count
                p, _ = fn(leaf)
                p.backward(gp)
            return run

        for prov, fwd, bwd in (("mole_ext", mole_ext.ops.router_top1, torch.ops.mole_ext.router_top1_backward),
                               ("reference", ref.router_top1, ref.router_top1_backward)):
            cases += [Case("fwd", prov, lambda f=fwd: f(logits), fwd_bytes),
                      Case("bwd", prov, lambda f=bwd: f(gp, probs), bwd_bytes),
                      Case("fwd+bwd", prov, fb(fwd), fwd_bytes + bwd_bytes + n * k * _elt(dt))]
    elif cfg.op == "permute":
        x = torch.randn(n, d, generator=g, device=device, dtype=dt)
        _, st, _ = mole_ext.ops.permute(x, expert, k)
        gy = torch.randn(n, d, generator=g, device=device, dtype=dt)
        row_bytes = 2 * n * d * _elt(dt)
        leaf = x.clone().requires_grad_(True)

        def fb(fn):
            def run():
                leaf.grad = None
                xs = fn(leaf, expert, k)[0]
                xs.backward(gy)
            return run

        for prov, fwd, bwd in (("mole_ext", mole_ext.ops.permute, torch.ops.mole_ext.unpermute),
                               ("reference", ref.permute, ref.unpermute)):
            cases += [Case("fwd", prov, lambda f=fwd: f(x, expert, k), row_bytes + 2 * n * 4),
                      Case("bwd", prov, lambda f=bwd: f(gy, st), row_bytes + n * 4),
                      Case("fwd+bwd", prov, fb(fwd), 2 * row_bytes + 3 * n * 4)]
    elif cfg.op == "unpermute":
        y = torch.randn(n, d, generator=g, device=device, dtype=dt)
        _, st, _ = mole_ext.ops.permute(y, expert, k)
        row_bytes = 2 * n * d * _elt(dt)
        for prov, fwd, bwd in (("mole_ext", torch.ops.mole_ext.unpermute, torch.ops.mole_ext.permute_rows),
                               ("reference", ref.unpermute, ref.permute_rows)):
            cases += [Case("fwd", prov, lambda f=fwd: f(y, st), row_bytes + n * 4),
                      Case("bwd", prov, lambda f=bwd: f(y, st), row_bytes + n * 4)]
    elif cfg.op == "loss":
        probs = torch.softmax(torch.randn(n, k, generator=g, device=device), -1)
        mask = torch.rand(n, generator=g, device=device) < 0.9
        gl = torch.tensor(1.0, device=device)
        fwd_bytes = n * k * 4 + n * 4 + n
        bwd_bytes = n * k * 4 + n * 4 + n
        for prov, fwd, bwd in (("mole_ext", mole_ext.ops.load_balance_loss,
                                torch.ops.mole_ext.load_balance_loss_backward),
                               ("reference", ref.load_balance_loss, ref.load_balance_loss_backward)):
            cases += [Case("fwd", prov, lambda f=fwd: f(probs, expert, mask), fwd_bytes),
                      Case("bwd", prov, lambda f=bwd: f(gl, probs, expert, mask), bwd_bytes)]
    else:
        raise ValueError(cfg.op)
    return cases


@dataclass
class Stats:
    """Seconds per call."""
    median: float
    p20: float
    p80: float


def _stats(samples) -> Stats:
    q = harness.quantiles(samples)
    return Stats(q["median"], q["p20"], q["p80"])


def _flusher(device: torch.device):
    """Writes a buffer twice the size of L2 before each timed call (CUDA), so calls start cold."""
    if device.type != "cuda":
        return None
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (64 << 20)
    buf = torch.empty(2 * l2, dtype=torch.uint8, device=device)
    return buf.zero_


def target_check(cfg: Config, mode: str, st: Stats, copy: Stats) -> Optional[str]:
    """The issue's H200 targets (meaningful on CUDA only)."""
    if cfg.op in ("permute", "unpermute") and mode in ("fwd", "bwd") and cfg.n >= 16384:
        return "ok" if copy.median / st.median >= 0.8 else "MISS"
    if cfg.op in ("router", "loss") and mode in ("fwd", "bwd") and cfg.n == 16384:
        return "ok" if st.median <= 10e-6 + copy.median else "MISS"
    return None


def run(configs: List[Config], device: torch.device, reps: int, warmup: int) -> List[dict]:
    rows = []
    flush = _flusher(device)
    dev = device.type
    for cfg in configs:
        cases = build_cases(cfg, device)
        # one same-size copy_ per distinct byte count, timed in the same round-robin
        copies = {}
        for c in cases:
            half = max(1, c.bytes // 2)
            if half not in copies:
                src = torch.empty(half, dtype=torch.uint8, device=device).random_(0, 255)
                dst = torch.empty_like(src)
                copies[half] = (lambda s=src, d=dst: d.copy_(s))
        fns = {f"{c.mode}/{c.provider}": c.fn for c in cases}
        fns.update({f"copy/{h}": f for h, f in copies.items()})
        times = harness.time_interleaved(fns, dev, warmup=warmup, reps=reps, flush=flush)
        ref_median = {c.mode: _stats(times[f"{c.mode}/reference"]).median for c in cases if c.provider == "reference"}
        for c in cases:
            st = _stats(times[f"{c.mode}/{c.provider}"])
            cp = _stats(times[f"copy/{max(1, c.bytes // 2)}"])
            row = dict(asdict(cfg), mode=c.mode, provider=c.provider, median_us=st.median * 1e6,
                       p20_us=st.p20 * 1e6, p80_us=st.p80 * 1e6, reps=reps, bytes=c.bytes,
                       gbps=c.bytes / st.median / 1e9, copy_us=cp.median * 1e6,
                       copy_gbps=c.bytes / cp.median / 1e9, frac_of_copy=cp.median / st.median)
            if c.provider == "mole_ext" and c.mode in ref_median:
                row["speedup_vs_reference"] = ref_median[c.mode] / st.median
                if dev == "cuda":
                    row["target"] = target_check(cfg, c.mode, st, cp)
            rows.append(row)
        print(f"  done {cfg}", file=sys.stderr, flush=True)
    return rows


COLUMNS = ["op", "mode", "provider", "n", "k", "d", "median_us", "p20_us", "p80_us", "gbps", "copy_gbps",
           "frac_of_copy", "speedup_vs_reference", "target"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated subset of " + ",".join(OPS))
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--json", default=None, help="also write all rows and the environment to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ops = [o for o in args.ops.split(",") if o]
    if device.type == "cuda":
        configs = [c for c in cuda_configs() if c.op in ops]
        reps, warmup = (15, 3) if args.quick else (40, 5)
        print(f"mole_ext routing benchmark on {torch.cuda.get_device_name(device)}")
        backend = mole_ext.ops.cuda_backend()
        fallback = [op for op, how in backend.items() if how != "kernel" and "grouped" not in op]
        if fallback:
            print(f"WARNING: no CUDA kernel compiled for {fallback}: 'mole_ext' rows time the reference fallback")
    else:
        configs = [c for c in cpu_configs() if c.op in ops]
        reps, warmup = (3, 1) if args.quick else (7, 2)
        print("No CUDA device: running the CPU kernels at small sizes (N in {1024, 4096}, d = 256). "
              "These numbers say nothing about the GPU targets of the issue.")
    env = harness.environment(device.type)
    env["mole_ext_cuda_backend"] = {op: how for op, how in mole_ext.ops.cuda_backend().items()}
    rows = run(configs, device, reps, warmup)
    for r in rows:
        r["bench"] = "routing"
    harness.print_table(rows, COLUMNS)
    md = (f"bench/routing.py on {env['device']}, torch {env['torch']}, commit {env['git_commit']}, {env['date']}"
          f" (`python bench/routing.py{' --quick' if args.quick else ''}`)\n\n" + harness.markdown_table(rows, COLUMNS))
    path = harness.write_results("routing", env, rows, md)
    print(f"\n{len(rows)} rows appended to bench/results/routing.jsonl; table in {path}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1, default=str)
    misses = [r for r in rows if r.get("target") == "MISS"]
    if misses:
        print(f"{len(misses)} rows miss the issue's H200 targets (see the 'target' column)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
