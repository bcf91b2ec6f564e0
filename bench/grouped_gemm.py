"""Grouped LoRA GEMM (shrink + expand over expert segments), forward and backward, against the
baselines side by side in one process, with a DRAM traffic model of the kernels beside each case.

Providers:
  mole_ext     torch.ops.mole_ext.grouped_lora / grouped_lora_backward (segment map on the device)
  mole_ext_scalar  the same kernels with element instead of 16-byte global accesses
               (mole_ext._C.set_grouped_lora_vectorized(False)): the A/B of that choice; CUDA only
  mole_ext_unpipelined  16-byte accesses, but the plain main loop (load, barrier, multiply)
               instead of the cp.async pipeline (mole_ext._C.set_grouped_lora_pipelined(False)); CUDA only
  mole_ext_two_pass  the backward's G = dY B and dB = dY^T Hs in two passes over dY instead of the
               fused one (mole_ext._C.set_grouped_lora_fused_dy(False); the fused pass serves bf16 /
               fp16 at r < 128 by default, in rank chunks of 32 above r = 32); CUDA only
  mole_ext_fused_any_rank  the backward with the fused pass at every rank
               (mole_ext._C.set_grouped_lora_fused_dy_any_rank(True)): the A/B of the r < 128 rule at
               r >= 128 (its fwd is mole_ext's and is not timed again); CUDA only
  grouped_mm   torch.nn.functional.grouped_mm (PyTorch's CUTLASS grouped GEMM; CUDA, bf16 only)
  loop         a Python loop over experts (host-synchronising offsets.tolist(), one GEMM pair each)
  mask         all experts then mask: one GEMM against the K stacked LoRA matrices, the rows'
               other experts zeroed, one GEMM back (K times the FLOPs, no host sync)
Beside every case, the traffic model of bench/traffic.py (the kernels' tiling, csrc/cuda/grouped_lora.cu):
the bytes the op must move at minimum (min_MB), the bytes the current kernels move (impl_MB), the
best fraction of the copy bandwidth they can reach (pred_frac = min / impl), the time they take
at the bandwidth of a large copy_ measured in the same run (pred_us), and on a GPU mole_ext's
measured time as a fraction of that prediction (of_pred; 1.0 = the kernels run at copy speed).
Forward and backward are validated and reported separately: a provider that fails one still
runs the other.

Columns: median (p20-p80) microseconds per call, GB/s of the minimum bytes, of_copy (the fraction
of the copy bandwidth that GB/s is), speed-up of mole_ext over each provider. L2 is flushed (a
256 MiB write) before every timed call.

  python bench/grouped_gemm.py           # CUDA: bf16, N in {8192, 16384, 65536}, in = 4096,
                                         # out = 11008, r in {16, 32, 64, 128}, K in {2, 4, 8},
                                         # uniform and skewed (99% on one expert) routings
  python bench/grouped_gemm.py --quick   # CUDA: N = 16384, r in {16, 32, 64, 128}, 4096 -> 11008 and
                                         # 11008 -> 4096, K = 4, and a skewed K = 8 case / CPU: tiny shapes
  python bench/grouped_gemm.py --profile # where mole_ext's time goes, kernel by kernel (torch.profiler),
                                         # at N = 16384, r = 32, K = 8 (CUDA) / a small CPU shape
On a machine without CUDA the CPU kernels run at small float32 sizes, and the script says so; the
traffic model of the CUDA kernels at the GPU configurations is printed too (predictions only).
Rows are appended to bench/results/grouped_gemm.jsonl; the table goes to
bench/results/grouped_gemm-<cuda|cpu>.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import traffic  # noqa: E402

import mole_ext  # noqa: E402,F401
from mole_ext import ops  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Config:
    n: int
    d_in: int
    d_out: int
    r: int
    k: int
    routing: str  # uniform / skewed
    dtype: str


def cuda_configs(quick: bool) -> List[Config]:
    if quick:  # the GPU check's: every rank of the targets, both FFN shapes, one skewed routing
        return ([Config(16384, 4096, 11008, r, 4, "uniform", "bfloat16") for r in (16, 32, 64, 128)] +
                [Config(16384, 11008, 4096, r, 4, "uniform", "bfloat16") for r in (32, 128)] +
                [Config(16384, 4096, 11008, 32, 8, "skewed", "bfloat16")])
    return [Config(n, 4096, 11008, r, k, rt, "bfloat16") for n in (8192, 16384, 65536) for r in (16, 32, 64, 128)
            for k in (2, 4, 8) for rt in ("uniform", "skewed")]


def cpu_configs(quick: bool) -> List[Config]:
    if quick:
        return [Config(256, 128, 344, 8, k, rt, "float32") for k in (2, 4) for rt in ("uniform", "skewed")]
    return [Config(n, 512, 1376, r, k, rt, "float32") for n in (1024, 4096) for r in (16, 64) for k in (2, 8)
            for rt in ("uniform", "skewed")]


def make_inputs(cfg: Config, device: str):
    """Random inputs drawn on the device itself (seeded): at N = 65536 a CPU draw of x and dY
    (a billion elements) would take longer than timing every provider."""
    dt = getattr(torch, cfg.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    kw = {"generator": g, "device": device}
    if cfg.routing == "uniform":
        expert = torch.randint(0, cfg.k, (cfg.n,), **kw)
    else:  # 99% of the tokens on expert 0
        expert = torch.where(torch.rand(cfg.n, **kw) < 0.99, torch.zeros(cfg.n, dtype=torch.long, device=device),
                             torch.randint(0, cfg.k, (cfg.n,), **kw))
    expert = expert.sort().values
    counts = torch.bincount(expert, minlength=cfg.k)
    off = torch.cat([torch.zeros(1, dtype=torch.long, device=device), counts.cumsum(0)]).to(torch.int32)
    x = torch.randn(cfg.n, cfg.d_in, dtype=dt, **kw)
    a = (torch.randn(cfg.k, cfg.r, cfg.d_in, **kw) * cfg.d_in ** -0.5).to(dt)
    b = (torch.randn(cfg.k, cfg.d_out, cfg.r, **kw) * cfg.r ** -0.5).to(dt)
    rs = torch.rand(cfg.n, **kw)
    gy = torch.randn(cfg.n, cfg.d_out, dtype=dt, **kw)
    return x, a, b, off, rs, gy, expert


def model(cfg: Config, mode: str, sms: int = traffic.DEFAULT_SMS, l2: int = traffic.DEFAULT_L2) -> traffic.Traffic:
    """The traffic model of mole_ext's CUDA kernels for this case (bench/traffic.py)."""
    e = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    return traffic.grouped_lora(traffic.Shape(cfg.n, cfg.d_in, cfg.d_out, cfg.r, cfg.k, elem=e, sms=sms, l2=l2), mode)


def bytes_moved(cfg: Config, mode: str) -> int:
    """The bytes the op must move at minimum (inputs read once, outputs written once)."""
    return model(cfg, mode).minimum


# ---- providers: each returns (fwd, bwd) callables ----------------------------------------------

def mole_ext_provider(x, a, b, off, rs, gy, expert, scaling):
    # What autograd runs in training: the forward that keeps the rank-r shrink h (grouped_lora_h),
    # and the backward given it (x read once); the traffic model's default (saved_h=True).
    h = torch.ops.mole_ext.grouped_lora_h(x, a, b, off, scaling, rs)[1]
    return (lambda: torch.ops.mole_ext.grouped_lora_h(x, a, b, off, scaling, rs)[0],
            lambda: torch.ops.mole_ext.grouped_lora_backward(gy, x, a, b, off, scaling, rs, h))


def _mole_ext_with_switch(switch: str, name: str, value: bool = False):
    """mole_ext with one of the CUDA kernels' A/B switches (mole_ext._C.set_grouped_lora_<switch>)
    set to `value` during each call (off by default) and back to its default after."""
    def provider(x, a, b, off, rs, gy, expert, scaling):
        if x.device.type != "cuda":
            raise NotImplementedError(f"{name}: the {switch} switch exists for the CUDA kernels only")
        from mole_ext import _C
        put = getattr(_C, f"set_grouped_lora_{switch}")

        def switched_during(fn):
            def run():
                put(value)
                try:
                    return fn()
                finally:
                    put(not value)
            return run

        fwd, bwd = mole_ext_provider(x, a, b, off, rs, gy, expert, scaling)
        return switched_during(fwd), switched_during(bwd)
    return provider


mole_ext_scalar_provider = _mole_ext_with_switch("vectorized", "mole_ext_scalar")
mole_ext_unpipelined_provider = _mole_ext_with_switch("pipelined", "mole_ext_unpipelined")
mole_ext_two_pass_provider = _mole_ext_with_switch("fused_dy", "mole_ext_two_pass")
_fused_any_rank = _mole_ext_with_switch("fused_dy_any_rank", "mole_ext_fused_any_rank", value=True)


def mole_ext_fused_any_rank_provider(x, a, b, off, rs, gy, expert, scaling):
    """The fused dY pass at every rank: differs from mole_ext only in the backward at r >= 128."""
    if a.shape[1] < 128 or x.dtype not in (torch.bfloat16, torch.float16):
        raise NotImplementedError("mole_ext_fused_any_rank: the same kernels as mole_ext here (16-bit, r >= 128 only)")
    _, bwd = _fused_any_rank(x, a, b, off, rs, gy, expert, scaling)

    def fwd():
        raise NotImplementedError("mole_ext_fused_any_rank: the switch changes the backward only (fwd = mole_ext)")
    return fwd, bwd


def grouped_mm_provider(x, a, b, off, rs, gy, expert, scaling):
    ends = off[1:].contiguous()
    m = (scaling * rs).to(x.dtype)[:, None]
    at, bt = a.transpose(-2, -1), b.transpose(-2, -1)

    def fwd():
        h = F.grouped_mm(x, at, offs=ends) * m
        return F.grouped_mm(h, bt, offs=ends)

    def bwd():
        h = F.grouped_mm(x, at, offs=ends)
        gh = F.grouped_mm(gy, b, offs=ends)
        grs = scaling * (gh.float() * h.float()).sum(1)
        dh, hs = gh * m, h * m
        gx = F.grouped_mm(dh, a, offs=ends)
        ga = F.grouped_mm(dh.t(), x, offs=ends)
        gb = F.grouped_mm(gy.t(), hs, offs=ends)
        return gx, ga, gb, grs

    return fwd, bwd


def loop_provider(x, a, b, off, rs, gy, expert, scaling):
    m = (scaling * rs).to(x.dtype)[:, None]

    def fwd():
        bounds = off.tolist()  # the host sync of a per-expert loop
        y = torch.empty(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
        for e in range(a.shape[0]):
            s, t = bounds[e], bounds[e + 1]
            if t > s:
                torch.mm((x[s:t] @ a[e].T) * m[s:t], b[e].T, out=y[s:t])
        return y

    def bwd():
        bounds = off.tolist()
        gx, ga, gb = torch.empty_like(x), torch.zeros_like(a), torch.zeros_like(b)
        grs = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        for e in range(a.shape[0]):
            s, t = bounds[e], bounds[e + 1]
            if t == s:
                continue
            h = x[s:t] @ a[e].T
            gh = gy[s:t] @ b[e]
            grs[s:t] = scaling * (gh.float() * h.float()).sum(1)
            dh = gh * m[s:t]
            torch.mm(dh, a[e], out=gx[s:t])
            torch.mm(dh.T, x[s:t], out=ga[e])
            torch.mm(gy[s:t].T, h * m[s:t], out=gb[e])
        return gx, ga, gb, grs

    return fwd, bwd


def mask_provider(x, a, b, off, rs, gy, expert, scaling):
    k, r = a.shape[0], a.shape[1]
    a_all = a.reshape(k * r, -1)                        # [K r, in]
    b_all = b.permute(1, 0, 2).reshape(b.shape[1], -1)  # [out, K r]
    onehot = F.one_hot(expert, k).to(x.dtype)           # [N, K]
    m = (scaling * rs).to(x.dtype)[:, None]
    mask = (onehot * m).repeat_interleave(r, dim=1)     # [N, K r]: the row's expert, scaled

    def fwd():
        return (x @ a_all.T * mask) @ b_all.T

    def bwd():
        h = x @ a_all.T
        gh = gy @ b_all
        grs = scaling * (gh.float() * h.float() * onehot.repeat_interleave(r, dim=1)).sum(1)
        dh = gh * mask
        return dh @ a_all, (dh.T @ x).view(k, r, -1), (gy.T @ (h * mask)).view(-1, k, r).permute(1, 0, 2), grs

    return fwd, bwd


PROVIDERS: Dict[str, Callable] = {"mole_ext": mole_ext_provider, "mole_ext_scalar": mole_ext_scalar_provider,
                                  "mole_ext_unpipelined": mole_ext_unpipelined_provider,
                                  "mole_ext_two_pass": mole_ext_two_pass_provider,
                                  "mole_ext_fused_any_rank": mole_ext_fused_any_rank_provider,
                                  "grouped_mm": grouped_mm_provider,
                                  "loop": loop_provider, "mask": mask_provider}


def model_table(configs: List[Config], bandwidth: float, sms: int, l2: int) -> List[dict]:
    """Rows of the traffic model (predictions) for each case and mode."""
    rows = []
    for cfg in configs:
        for mode in ("fwd", "bwd"):
            t = model(cfg, mode, sms, l2)
            rows.append({"mode": mode, "N": cfg.n, "in": cfg.d_in, "out": cfg.d_out, "r": cfg.r, "K": cfg.k,
                         "routing": cfg.routing, "min_MB": t.minimum / 1e6, "impl_MB": t.implementation / 1e6,
                         "pred_frac": t.fraction, "pred_us": t.predicted_s(bandwidth) * 1e6})
    return rows


def profile_kernels(device: str, reps: int = 5) -> None:
    """Prints, per mole_ext call (forward, forward accumulating into an output, backward), the
    kernels it launches and their share of its time: what to tune first."""
    from torch.profiler import ProfilerActivity, profile

    cfg = (Config(16384, 4096, 11008, 32, 8, "uniform", "bfloat16") if device == "cuda"
           else Config(1024, 512, 1376, 16, 8, "uniform", "float32"))
    x, a, b, off, rs, gy, expert = make_inputs(cfg, device)
    fwd, bwd = mole_ext_provider(x, a, b, off, rs, gy, expert, 2.0)
    y = torch.zeros(cfg.n, cfg.d_out, dtype=x.dtype, device=device)
    calls = {"forward": fwd, "forward into an output (add_out)": lambda: ops.grouped_lora_add_out(y, x, a, b, off, 2.0,
                                                                                                   rs),
             "backward": bwd}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(f"profile of mole_ext at N={cfg.n}, in={cfg.d_in}, out={cfg.d_out}, r={cfg.r}, K={cfg.k}, {cfg.dtype}, "
          f"{reps} calls each")
    for name, fn in calls.items():
        fn()
        harness._sync(device)
        with profile(activities=activities) as prof:
            for _ in range(reps):
                fn()
            harness._sync(device)
        print(f"\n== {name}")
        print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=90))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="subset of the configurations (CUDA) / tiny shapes (CPU)")
    ap.add_argument("--profile", action="store_true", help="per-kernel profile of mole_ext at one shape, no timing table")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of " + ",".join(PROVIDERS))
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--model-bw-gbps", type=float, default=3000.0,
                    help="CPU runs only: the bandwidth at which the traffic model's times are printed")
    args = ap.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile:
        profile_kernels(device)
        return []
    env = harness.environment(device)
    env["mole_ext_cuda_backend"] = ops.cuda_backend()
    configs = cuda_configs(args.quick) if device == "cuda" else cpu_configs(args.quick)
    reps = args.reps or (3 if device == "cpu" and args.quick else (7 if device == "cpu" else 20))
    wanted = [p for p in args.providers.split(",") if p]
    if device == "cpu":
        print(f"CPU run ({env['device']}): the CPU kernels at small float32 sizes; the GPU numbers come from "
              "bench/gpu_check.sh on a GPU machine. grouped_mm is CUDA-only.")
        wanted = [p for p in wanted if p not in ("grouped_mm", "mole_ext_scalar", "mole_ext_unpipelined",
                                                 "mole_ext_two_pass", "mole_ext_fused_any_rank")]
    elif not hasattr(F, "grouped_mm"):
        print(f"torch {torch.__version__} has no torch.nn.functional.grouped_mm: that provider is skipped")
        wanted = [p for p in wanted if p != "grouped_mm"]
    copy_bw = harness.copy_bandwidth(device)
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", traffic.DEFAULT_L2) or traffic.DEFAULT_L2
        model_bw, model_bw_src = copy_bw, "the copy_ measured in this run"
    else:
        sms, l2 = traffic.DEFAULT_SMS, traffic.DEFAULT_L2
        model_bw, model_bw_src = args.model_bw_gbps * 1e9, "assumed (--model-bw-gbps); the GPU run uses its measured copy"
    print(f"a large copy_ reaches {copy_bw / 1e9:.0f} GB/s here; GB/s columns count each op's minimum bytes")
    mcols = ["mode", "N", "in", "out", "r", "K", "routing", "min_MB", "impl_MB", "pred_frac", "pred_us"]
    model_cfgs = configs if device == "cuda" else cuda_configs(args.quick)
    model_rows = model_table(model_cfgs, model_bw, sms, l2)
    print(f"\ntraffic model of the CUDA kernels (bench/traffic.py; {sms} SMs, L2 {l2 >> 20} MiB), predicted at "
          f"{model_bw / 1e9:.0f} GB/s ({model_bw_src})" + ("" if device == "cuda" else ": predictions only, no GPU here"))
    harness.print_table(model_rows, mcols)
    print(flush=True)
    flush_buf = torch.empty(256 << 20 if device == "cuda" else 32 << 20, dtype=torch.uint8, device=device)
    flush = lambda: flush_buf.zero_()

    rows, skipped = [], {}
    for cfg in configs:
        tensors = make_inputs(cfg, device)
        scaling = 2.0
        fns = {}
        for name in wanted:
            try:
                fwd, bwd = PROVIDERS[name](*tensors, scaling)
            except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as exc:
                skipped.setdefault((name, "fwd+bwd"), str(exc).splitlines()[0][:160])
                continue
            # forward and backward validated apart: a provider that cannot run one still runs the other
            for mode, fn in (("fwd", fwd), ("bwd", bwd)):
                try:
                    fn()
                    fns[(name, mode)] = fn
                except (RuntimeError, TypeError, ValueError, NotImplementedError, AttributeError) as exc:
                    skipped.setdefault((name, mode), str(exc).splitlines()[0][:160])
        for mode in ("fwd", "bwd"):
            mode_fns = {name: fn for (name, md), fn in fns.items() if md == mode}
            if not mode_fns:
                continue
            times = harness.time_interleaved(mode_fns, device, warmup=1 if device == "cpu" else 3, reps=reps,
                                             flush=flush)
            q = {name: harness.quantiles(t) for name, t in times.items()}
            t_model = model(cfg, mode, sms, l2)
            nbytes = t_model.minimum
            pred = t_model.predicted_s(copy_bw)
            mole = q.get("mole_ext", {}).get("median")
            # one line per case as it finishes, so a run cut short by a time cap still leaves its numbers
            print(f"{mode} N={cfg.n} {cfg.d_in}->{cfg.d_out} r={cfg.r} K={cfg.k} {cfg.routing}: " + ", ".join(
                f"{name} {st['median'] * 1e6:.1f} us" for name, st in q.items()) +
                (f"; model: {pred * 1e6:.1f} us at the copy bandwidth, best fraction {t_model.fraction:.2f}"
                 if device == "cuda" else ""), flush=True)
            for name, st in q.items():
                rows.append({
                    "bench": "grouped_gemm", "provider": name, "mode": mode, "N": cfg.n, "in": cfg.d_in,
                    "out": cfg.d_out, "r": cfg.r, "K": cfg.k, "routing": cfg.routing, "dtype": cfg.dtype,
                    "us": st["median"] * 1e6, "p20_us": st["p20"] * 1e6, "p80_us": st["p80"] * 1e6,
                    "bytes": nbytes, "GB/s": nbytes / st["median"] / 1e9, "of_copy": nbytes / copy_bw / st["median"],
                    "pred_us": pred * 1e6 if device == "cuda" and name == "mole_ext" else None,
                    "of_pred": pred / st["median"] if device == "cuda" and name == "mole_ext" else None,
                    "mole_ext_speedup": (st["median"] / mole) if mole else None, "quick": args.quick,
                })
        del tensors, fns
    cols = ["provider", "mode", "N", "in", "out", "r", "K", "routing", "us", "p20_us", "p80_us", "GB/s", "of_copy",
            "pred_us", "of_pred", "mole_ext_speedup"]
    harness.print_table(rows, cols)
    for (name, mode), why in skipped.items():
        print(f"provider {name} {mode} skipped for some cases: {why}")
    verdicts = []
    if device == "cuda":
        for mode, target in (("fwd", 0.80), ("bwd", 0.70)):
            big = [r for r in rows if r["provider"] == "mole_ext" and r["mode"] == mode and r["N"] >= 16384]
            if big:
                worst = min(big, key=lambda r: r["of_copy"])
                verdicts.append(
                    f"mole_ext {mode} worst fraction of the copy bandwidth at N >= 16384: {worst['of_copy']:.2f} "
                    f"(r={worst['r']}, {worst['in']}->{worst['out']}; target >= {target:.2f}): "
                    f"{'MET' if worst['of_copy'] >= target else 'MISSED'}; the model predicted at best "
                    f"{min(r['pred_frac'] for r in model_rows if r['mode'] == mode):.2f}, measured/predicted time "
                    f"worst {max(1 / r['of_pred'] for r in big):.2f}x")
        vs = [r for r in rows if r["provider"] == "grouped_mm" and r["r"] <= 64]
        for mode in ("fwd", "bwd"):
            m = [r for r in vs if r["mode"] == mode]
            if m:
                worst = min(r["mole_ext_speedup"] for r in m)
                verdicts.append(f"mole_ext {mode} speed-up over grouped_mm for r <= 64, worst {worst:.2f}x "
                                f"(target >= 1.5x): {'MET' if worst >= 1.5 else 'MISSED'}")
    for v in verdicts:
        print(v)
    if not args.no_save:
        cmd = "python bench/grouped_gemm.py" + (" --quick" if args.quick else "")
        md = (f"# bench/grouped_gemm.py\n\n{env['device']}, torch {env['torch']}, commit {env['git_commit']}, "
              f"{env['date']}\n\nCommand: `{cmd}`; median of {reps} round-robin reps, L2 flushed before each; "
              f"GB/s of each op's minimum bytes; of_copy: its fraction of a large copy_'s {copy_bw / 1e9:.0f} GB/s "
              f"measured in the same run; pred_us / of_pred: the traffic model's time at that bandwidth and the "
              f"measured time's fraction of it.\n\n" + harness.markdown_table(rows, cols) +
              f"\n## Traffic model (bench/traffic.py), {sms} SMs, L2 {l2 >> 20} MiB, at {model_bw / 1e9:.0f} GB/s "
              f"({model_bw_src})\n\n" + harness.markdown_table(model_rows, mcols) +
              "".join(f"\n{v}\n" for v in verdicts) +
              "".join(f"\nprovider {n} {md_} skipped for some cases: {w}\n" for (n, md_), w in skipped.items()))
        print("wrote", harness.write_results("grouped_gemm", env, rows, md))
    return rows


if __name__ == "__main__":
    main()
