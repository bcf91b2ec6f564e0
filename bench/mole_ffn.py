"""MoLE FFN forward+backward against the baselines, side by side in one process.

Providers (all with the same frozen base SwiGLU FFN and trainable LoRA of rank r):
  mole_ext     MoLEFFN, top-1 routing through the grouped path (route, permute once, grouped
               LoRA, unpermute once)
  single_lora  one plain LoRA per projection (PyTorch Linear + LoRA, what PEFT does)
  expert_loop  the released LLaVA-MoLE code's style: a Python loop over experts in token order
               (mole_ext.reference.mole_ffn: the LoRA math in float32, the readable oracle)
  expert_loop_native  the same loop in the model's dtype (bf16 on CUDA: no float32 copies of the
               rows, LoRA GEMMs on tensor cores), deltas added in place: the cheaper loop, and the
               one the overhead target is judged against whenever it is the faster of the two
  dense        every expert on every token, weighted by the router (MoLEFFN routing="dense")
  base         the frozen FFN without any LoRA (the floor every provider sits above)

Columns: median / p20 / p80 ms, ratio to single_lora, overhead above the frozen base in ms
and as a share of the faster expert loop's overhead (the issue's target: mole_ext at most 1/3 at K = 8),
and the activations each provider saves for its backward (MiB, parameters excluded; the issue's
rule: mole_ext no more than single_lora plus O(N) routing state).

Each timed call is forward + backward (gradients for x and the trainable parameters); the forward
alone is timed too (a second table), and each provider's forward and backward are validated
apart, so a provider whose backward fails still reports its forward. Providers are timed
round-robin so machine noise hits all alike; ratios come from the same run.

Traffic model (bench/traffic.py): for each case, the bytes mole_ext's own ops in the FFN (router,
permute, the three projections' grouped LoRA, unpermute and their backward) must move at minimum
and the bytes they move, forward and backward apart, and the time that takes at the copy
bandwidth measured in the same run; on a GPU, mole_ext's measured time above the frozen base as a
fraction of that prediction (the base GEMMs and activation, common to every provider, are not modelled).

  python bench/mole_ffn.py              # CPU: float32, N=2048, d=1024, m=2816, r=32, K in {2,4,8}
  python bench/mole_ffn.py --quick      # tiny shapes, a smoke run
  python bench/mole_ffn.py --gpu-check  # the GPU check's case: N=16384, d=4096, m=11008, r=32, K=4, bf16
On CUDA (when available) the LLaMA-7B shapes of issue 4 run in bf16 instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import traffic  # noqa: E402

from mole_ext import MoLEFFN, reference as ref  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    n: int
    d: int
    m: int
    r: int
    k: int
    dtype: torch.dtype


CPU_CONFIGS = [Config(2048, 1024, 2816, 32, k, torch.float32) for k in (2, 4, 8)]
CUDA_CONFIGS = [Config(n, 4096, 11008, 32, k, torch.bfloat16) for n in (8192, 16384) for k in (3, 4, 8)]
QUICK_CONFIGS = [Config(256, 128, 352, 8, k, torch.float32) for k in (2, 4)]
GPU_CHECK_CONFIGS = [Config(16384, 4096, 11008, 32, 4, torch.bfloat16)]  # the FFN target shape


class SingleLoRAFFN(nn.Module):
    """Frozen SwiGLU FFN with one LoRA per projection (PEFT's computation)."""

    def __init__(self, base: MoLEFFN):
        super().__init__()
        self.base = base
        d, m, r = base.hidden_size, base.intermediate_size, base.rank
        kw = {"dtype": base.gate_proj.weight.dtype, "device": base.gate_proj.weight.device}
        self.a = nn.ParameterDict({p: nn.Parameter(torch.randn(r, i, **kw) * i ** -0.5)
                                   for p, i in (("gate", d), ("up", d), ("down", m))})
        self.b = nn.ParameterDict({p: nn.Parameter(torch.randn(o, r, **kw) * 0.01)
                                   for p, o in (("gate", m), ("up", m), ("down", d))})

    def forward(self, x):
        s = self.base.scaling

        def proj(z, name, layer):
            return F.linear(z, layer.weight) + F.linear(F.linear(z, self.a[name]), self.b[name]) * s

        h = F.silu(proj(x, "gate", self.base.gate_proj)) * proj(x, "up", self.base.up_proj)
        return proj(h, "down", self.base.down_proj)


def native_expert_loop(mole: MoLEFFN):
    """The per-expert loop in the model's dtype: top-1 routing in float32 (as MoLEFFN's), then
    per projection the base linear and, for each expert, its rows' LoRA added in place."""
    def proj(z, p, rows, gate):
        out = F.linear(z, p.weight, p.bias)
        for k, idx in enumerate(rows):
            if idx.numel():
                zk = z[idx]
                delta = F.linear(F.linear(zk, p.lora_A[k]), p.lora_B[k]) * (gate[idx, None] * mole.scaling)
                out.index_add_(0, idx, delta)
        return out

    def forward(t):
        x2 = t.reshape(-1, t.shape[-1])
        logits = F.linear(x2.float(), mole.router.weight.float(),
                          None if mole.router.bias is None else mole.router.bias.float())
        probs = logits.softmax(-1)
        p_top, expert = probs.max(-1)
        gate = p_top.to(t.dtype)
        # each expert's rows, once per forward for all three projections: a host sync per expert,
        # as in the released code
        rows = [(expert == k).nonzero().squeeze(1) for k in range(mole.gate_proj.lora_A.shape[0])]
        h = F.silu(proj(x2, mole.gate_proj, rows, gate)) * proj(x2, mole.up_proj, rows, gate)
        return proj(h, mole.down_proj, rows, gate).reshape(t.shape)

    return forward


def make_providers(cfg: Config, device: str):
    torch.manual_seed(0)
    mole = MoLEFFN(cfg.d, cfg.m, cfg.k, cfg.r, 2.0 * cfg.r, dtype=cfg.dtype, device=device)
    with torch.no_grad():  # trained-looking LoRA and a router that spreads tokens
        for p in (mole.gate_proj, mole.up_proj, mole.down_proj):
            p.lora_B.normal_(0, 0.01)
        mole.router.weight.normal_(0, cfg.d ** -0.5)
    dense = MoLEFFN(cfg.d, cfg.m, cfg.k, cfg.r, 2.0 * cfg.r, routing="dense", dtype=cfg.dtype, device=device)
    dense.load_state_dict(mole.state_dict())
    single = SingleLoRAFFN(mole)
    proj = lambda p: ref.Projection(p.weight, p.bias, p.lora_A, p.lora_B)
    forwards = {
        "mole_ext": mole,
        "single_lora": single,
        "expert_loop": lambda t: ref.mole_ffn(t, mole.router.weight, mole.router.bias, proj(mole.gate_proj),
                                              proj(mole.up_proj), proj(mole.down_proj), mole.scaling)[0],
        "expert_loop_native": native_expert_loop(mole),
        "dense": dense,
        "base": lambda t: ref.base_ffn(t, mole.gate_proj.weight, mole.up_proj.weight, mole.down_proj.weight),
    }
    params = {p.untyped_storage().data_ptr() for mod in (mole, dense, single) for p in mod.parameters()}
    return forwards, params


def make_input(cfg: Config, device: str):
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(cfg.n, cfg.d, dtype=cfg.dtype, device=device, generator=g, requires_grad=True)
    grad = torch.randn(cfg.n, cfg.d, dtype=cfg.dtype, device=device, generator=g)
    return x, grad


def timed_calls(forwards, x, grad):
    def fwd_bwd(f):
        def run():
            x.grad = None
            f(x).backward(grad)
        return run

    return {name: fwd_bwd(f) for name, f in forwards.items()}


def saved_mib(f, x, params) -> float:
    """MiB that autograd saves for f's backward: each storage once, parameters excluded. The
    input is an intermediate (x * 1), as an FFN's input is inside a model."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        f(x * 1)
    return sum(seen.values()) / 2 ** 20


def model_for(cfg: Config, copy_bw: float, device: str, qf: dict, q: dict) -> list:
    """Traffic-model rows of the case: forward and backward apart; on CUDA with the measured time
    of mole_ext above the frozen base (the backward's as fwd+bwd minus fwd)."""
    e = torch.empty((), dtype=cfg.dtype).element_size()
    sms, l2 = traffic.DEFAULT_SMS, traffic.DEFAULT_L2
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        sms, l2 = props.multi_processor_count, getattr(props, "L2_cache_size", l2) or l2
    ops = traffic.mole_ffn(cfg.n, cfg.d, cfg.m, cfg.r, cfg.k, elem=e, sms=sms, l2=l2)
    measured = {}
    if device == "cuda" and all(p in qf for p in ("mole_ext", "base")):
        measured["fwd"] = qf["mole_ext"]["median"] - qf["base"]["median"]
        if all(p in q for p in ("mole_ext", "base")):
            measured["bwd"] = (q["mole_ext"]["median"] - qf["mole_ext"]["median"]) - \
                (q["base"]["median"] - qf["base"]["median"])
    out = []
    for mode, parts in ops.items():
        t = traffic.summary(parts)
        pred = t.predicted_s(copy_bw)
        got = measured.get(mode)
        out.append({"mode": mode, "N": cfg.n, "d": cfg.d, "m": cfg.m, "r": cfg.r, "K": cfg.k,
                    "min_MB": t.minimum / 1e6, "impl_MB": t.implementation / 1e6, "pred_frac": t.fraction,
                    "pred_ms": pred * 1e3, "measured_ms": got * 1e3 if got is not None else None,
                    "of_pred": pred / got if got else None})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--gpu-check", action="store_true", help="the GPU check's single target case, 10 reps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: torch's). On a shared machine use 1: with 2 threads every small "
                         "GEMM waits for the second thread to be scheduled, which penalises many-GEMM providers")
    args = ap.parse_args(argv)
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = (GPU_CHECK_CONFIGS if args.gpu_check else QUICK_CONFIGS if args.quick else
               (CUDA_CONFIGS if device == "cuda" else CPU_CONFIGS))
    reps = args.reps or (3 if args.quick else (10 if args.gpu_check else (20 if device == "cuda" else 7)))
    env = harness.environment(device)
    if device == "cpu":
        print(f"CPU run ({env['device']}): float32 at CPU sizes; GPU numbers come from the GPU check.")
    copy_bw = harness.copy_bandwidth(device)
    print(f"a large copy_ reaches {copy_bw / 1e9:.0f} GB/s here")
    rows, fwd_rows, model_rows, skipped = [], [], [], {}
    for cfg in configs:
        forwards, params = make_providers(cfg, device)
        x, grad = make_input(cfg, device)
        fb_calls = timed_calls(forwards, x, grad)
        calls = {}
        for name, f in forwards.items():  # forward and backward validated apart
            try:
                f(x)
                calls[(name, "fwd")] = (lambda f=f: f(x))
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                skipped.setdefault((name, "fwd"), str(exc).splitlines()[0][:160])
                continue
            try:
                fb_calls[name]()
                calls[(name, "fwd+bwd")] = fb_calls[name]
            except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
                skipped.setdefault((name, "bwd"), str(exc).splitlines()[0][:160])
        saved = {name: saved_mib(f, x, params) for name, f in forwards.items() if (name, "fwd+bwd") in calls}
        times = harness.time_interleaved(calls, device, warmup=1 if device == "cpu" else 3, reps=reps)
        qf = {name: harness.quantiles(t) for (name, mode), t in times.items() if mode == "fwd"}
        q = {name: harness.quantiles(t) for (name, mode), t in times.items() if mode == "fwd+bwd"}
        for name, st in qf.items():
            fwd_rows.append({"bench": "mole_ffn", "mode": "fwd", "provider": name, "N": cfg.n, "d": cfg.d, "m": cfg.m,
                             "r": cfg.r, "K": cfg.k, "ms": st["median"] * 1e3, "p20_ms": st["p20"] * 1e3,
                             "p80_ms": st["p80"] * 1e3,
                             "vs_single_lora": st["median"] / qf["single_lora"]["median"] if "single_lora" in qf else None})
        model_rows += model_for(cfg, copy_bw, device, qf, q)
        if not all(p in q for p in ("base", "single_lora", "mole_ext", "expert_loop", "expert_loop_native")):
            print(f"N={cfg.n} K={cfg.k}: a provider's backward failed; only the forward table has this case")
            continue
        base, single = q["base"]["median"], q["single_lora"]["median"]
        loop_overhead = min(q["expert_loop"]["median"], q["expert_loop_native"]["median"]) - base
        # one line per configuration as it finishes: a run cut short by a time cap still leaves numbers
        print(f"N={cfg.n} d={cfg.d} m={cfg.m} r={cfg.r} K={cfg.k}: " + ", ".join(
            f"{name} {st['median'] * 1e3:.3f} ms" for name, st in q.items()), flush=True)
        for name, stats in q.items():
            rows.append({
                "bench": "mole_ffn", "mode": "fwd+bwd", "provider": name, "N": cfg.n, "d": cfg.d, "m": cfg.m, "r": cfg.r, "K": cfg.k,
                "dtype": str(cfg.dtype).replace("torch.", ""), "ms": stats["median"] * 1e3,
                "p20_ms": stats["p20"] * 1e3, "p80_ms": stats["p80"] * 1e3,
                "vs_single_lora": stats["median"] / single,
                "overhead_vs_base_ms": (stats["median"] - base) * 1e3,
                # this provider's overhead above the frozen base, as a share of the faster loop's
                "overhead_vs_loop": (stats["median"] - base) / loop_overhead if loop_overhead > 0 else None,
                "speedup_mole_ext": stats["median"] / q["mole_ext"]["median"],
                "saved_MiB": saved[name],
                "saved_vs_single_lora": saved[name] / saved["single_lora"],
            })
    cols = ["provider", "N", "d", "m", "r", "K", "dtype", "ms", "p20_ms", "p80_ms", "vs_single_lora",
            "overhead_vs_base_ms", "overhead_vs_loop", "speedup_mole_ext", "saved_MiB", "saved_vs_single_lora"]
    fcols = ["provider", "mode", "N", "d", "m", "r", "K", "ms", "p20_ms", "p80_ms", "vs_single_lora"]
    mcols = ["mode", "N", "d", "m", "r", "K", "min_MB", "impl_MB", "pred_frac", "pred_ms", "measured_ms", "of_pred"]
    print("\nforward + backward")
    if rows:
        harness.print_table(rows, cols)
    print("\nforward only")
    harness.print_table(fwd_rows, fcols)
    print(f"\ntraffic model of mole_ext's ops in the FFN (bench/traffic.py), at the copy bandwidth "
          f"({copy_bw / 1e9:.0f} GB/s); measured: mole_ext minus base" +
          ("" if device == "cuda" else " (CPU kernels: not what the model describes)"))
    harness.print_table(model_rows, mcols)
    for (name, mode), why in skipped.items():
        print(f"provider {name} {mode} failed: {why}")
    if not rows:
        print("no case has every provider's backward: no forward+backward verdict")
        return fwd_rows
    worst = max(r["vs_single_lora"] for r in rows if r["provider"] == "mole_ext")
    slower_than_loop = sorted({r["K"] for r in rows if r["provider"] in ("expert_loop", "expert_loop_native")
                               and r["speedup_mole_ext"] < 1})
    target = 1.10 if device == "cpu" else 1.05
    verdict = (f"mole_ext / single_lora worst {worst:.3f} (target <= {target}): {'MET' if worst <= target else 'MISSED'}; "
               f"slower than the expert loop at K = {slower_than_loop or 'none'}")
    k8 = [r["overhead_vs_loop"] for r in rows if r["provider"] == "mole_ext" and r["K"] == 8
          and r["overhead_vs_loop"] is not None]
    if k8:
        verdict += (f"; mole_ext overhead above base at K = 8 is {max(k8):.2f} of the expert loop's "
                    f"(target <= 0.33): {'MET' if max(k8) <= 1 / 3 else 'MISSED'}")
    extra = max(r["saved_MiB"] - s["saved_MiB"] for r in rows for s in rows
                if r["provider"] == "mole_ext" and s["provider"] == "single_lora" and (r["N"], r["K"]) == (s["N"], s["K"]))
    verdict += (f"; saved activations, mole_ext minus single_lora: at most {extra:+.2f} MiB "
                f"(rule: no more than O(N) routing state)")
    print(verdict)
    if not args.no_save and not args.quick:
        cmd = "python bench/mole_ffn.py" + (" --gpu-check" if args.gpu_check else "") + \
            (f" --threads {args.threads}" if args.threads else "")
        md = (f"# bench/mole_ffn.py\n\n{env['device']}, torch {env['torch']}, commit {env['git_commit']}, "
              f"{env['date']}\n\nCommand: `{cmd}`; forward+backward per call, median of "
              f"{reps} round-robin reps.\n\n" + harness.markdown_table(rows, cols) + f"\n{verdict}\n" +
              "\n## Forward only\n\n" + harness.markdown_table(fwd_rows, fcols) +
              f"\n## Traffic model of mole_ext's ops (bench/traffic.py) at the copy bandwidth, {copy_bw / 1e9:.0f} "
              "GB/s; measured: mole_ext minus base\n\n" + harness.markdown_table(model_rows, mcols) +
              "".join(f"\nprovider {n} {m_} failed: {w}\n" for (n, m_), w in skipped.items()))
        print("wrote", harness.write_results("mole_ffn", env, rows + fwd_rows, md))
    return rows


if __name__ == "__main__":
    main()
