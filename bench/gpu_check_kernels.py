"""Runs every mole_ext CUDA kernel once on small inputs against the CPU kernels: the GPU check's
smoke stage, and its memcheck stage under compute-sanitizer (bench/gpu_check.py).
`--ncu`: instead, the main kernels at benchmark shapes, for the check's ncu stage.

Covers: router_top1 (register kernels and the generic one, forward and backward),
permute (tile path, the sort path for K > 1024, int32 and int64 ids, 16-byte and narrow rows,
a bad id in lazy mode), permute_rows / unpermute (and their validate-mode permutation check),
load_balance_loss forward and backward (both partial-kernel layouts, with and without mask),
grouped_lora / grouped_lora_add_out / grouped_lora_backward(_add_out) / lora_linear (tensor-core bf16 / fp16 and SIMT
fp32 / fp64 kernels, split and unsplit reductions, an empty expert, 16-byte and element accesses,
a misaligned base, bad offsets in lazy mode; the fused dY pass and two passes; the backward given
the forward's saved shrink h).
and MoLEFFN forward + backward (top-1 and dense routing) through autograd.
Exits non-zero when a result differs from the CPU kernel, so a wrong answer under the sanitizer
is caught too.
"""

from __future__ import annotations

import sys

import torch

import mole_ext  # noqa: F401
from mole_ext import _C

ops = torch.ops.mole_ext


def same(a, b, what):
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.dtype.is_floating_point:
        ok = torch.allclose(a.double(), b.double(), rtol=1e-5, atol=1e-7, equal_nan=True)
    else:
        ok = torch.equal(a, b)
    if not ok:
        print(f"MISMATCH: {what}", flush=True)
    return ok


def main() -> int:
    assert torch.cuda.is_available(), "needs a GPU"
    assert _C.compiled_with_cuda(), "mole_ext was built without CUDA kernels"
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    ok = True

    print("-- router", flush=True)  # section markers: a run cut by a time cap shows where it was
    # router: K = 3 (register kernel), K = 100 (generic); bf16 and fp64
    for k, dt in ((3, torch.bfloat16), (100, torch.float32), (20, torch.float64)):
        logits = torch.randn(70, k, generator=g).to(dt)
        p, e = ops.router_top1(logits.to(dev))
        cp, ce = ops.router_top1(logits)
        ok &= same(p, cp, f"router probs k={k}") and same(e, ce, f"router expert k={k}")
        gp = torch.randn(70, k, generator=g).to(cp.dtype)
        ok &= same(ops.router_top1_backward(gp.to(dev), cp.to(dev)), ops.router_top1_backward(gp, cp),
                   f"router backward k={k}")

    print("-- permute", flush=True)
    # permute: tile path (int32 ids, 16-byte rows), sort path (int64 ids, 6-byte rows)
    for n, k, d, dt, it in ((300, 5, 64, torch.bfloat16, torch.int32), (200, 1500, 3, torch.float16, torch.int64)):
        x = torch.randn(n, d, generator=g).to(dt)
        ex = torch.randint(0, k, (n,), generator=g).to(it)
        got = ops.permute(x.to(dev), ex.to(dev), k)
        want = ops.permute(x, ex, k)
        for a, b, w in zip(got, want, ("x_sorted", "sorted_token", "offsets")):
            ok &= same(a, b, f"permute {w} k={k}")
        st = got[1]
        ok &= same(ops.unpermute(got[0], st), x, "unpermute round trip")
        ok &= same(ops.permute_rows(x.to(dev), st), got[0], "permute_rows")

    # validate mode: the permutation check kernels
    _C.set_cuda_validate(True)
    perm = torch.randperm(64, generator=g).to(dev)
    y = torch.randn(64, 8, device=dev)
    ops.unpermute(ops.permute_rows(y, perm), perm)
    _C.set_cuda_validate(False)

    # a bad id in lazy mode: flagged, no out-of-bounds access
    ex = torch.randint(0, 4, (50,), generator=g)
    ex[7] = 9
    ops.permute(torch.randn(50, 8, device=dev), ex.to(dev), 4)
    try:
        _C.cuda_check_errors(True)
        print("MISSING ERROR: the bad expert id was not reported", flush=True)
        ok = False
    except RuntimeError:
        pass

    print("-- load_balance_loss", flush=True)
    # load balance: k < threads / 2 (shared combine) and k >= threads / 2 (whole columns)
    for n, k, masked in ((500, 4, True), (90, 300, False)):
        probs = torch.softmax(torch.randn(n, k, generator=g), -1)
        ex = torch.randint(0, k, (n,), generator=g)
        mask = (torch.rand(n, generator=g) < 0.6) if masked else None
        dmask = mask.to(dev) if masked else None
        ok &= same(ops.load_balance_loss(probs.to(dev), ex.to(dev), dmask), ops.load_balance_loss(probs, ex, mask),
                   f"loss k={k}")
        gl = torch.tensor(0.5)
        ok &= same(ops.load_balance_loss_backward(gl.to(dev), probs.to(dev), ex.to(dev), dmask),
                   ops.load_balance_loss_backward(gl, probs, ex, mask), f"loss backward k={k}")

    # grouped LoRA: every kernel (shrink partials, finish, expand store / add, G partials, dX,
    # weight-gradient partials and reduction, offsets check) per dtype; n = 2 splits the reduction.
    # d_in = 320 / d_out = 72 rows are 16-byte aligned in every dtype (the vectorised loads and
    # epilogues), d_in = 300 in bf16 / fp16 is not (element accesses); "misaligned": x starts one
    # element into its storage (the host's fallback to element accesses); "scalar": the vector
    # switch off (mole_ext._C.set_grouped_lora_vectorized(False)); "nopipe": 16-byte accesses but the
    # plain main loop instead of the cp.async pipeline (mole_ext._C.set_grouped_lora_pipelined(False));
    # "twopass": the backward's G and dB in two passes over dY instead of the fused dy_pass (bf16 /
    # fp16 at r < 128 by default; mole_ext._C.set_grouped_lora_fused_dy(False)); "r64" / "r128": rank
    # 64 (the fused pass in 2 rank chunks, blocks of 512 threads) and 128 (two passes by default;
    # "anyrank": the fused pass in 4 rank chunks, mole_ext._C.set_grouped_lora_fused_dy_any_rank(True)).
    # Every case also runs
    # the backward given the forward's saved shrink (grouped_lora_h), which must give the same bits.
    def close(a, b, what, tol):
        a, b = a.detach().cpu().double(), b.detach().cpu().double()
        ok_ = torch.allclose(a, b, rtol=tol, atol=tol * (b.abs().max().item() + 1e-12))
        if not ok_:
            print(f"MISMATCH: {what} (max abs err {(a - b).abs().max().item():.3e})", flush=True)
        return ok_

    def to_dev(t, misaligned):
        if not misaligned:
            return t.to(dev)
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=dev)
        view = flat[1:].view(t.shape)
        view.copy_(t)
        return view

    cases = [(70, torch.bfloat16, 3e-2, 320, ""), (70, torch.bfloat16, 3e-2, 300, ""),
             (2, torch.float16, 5e-3, 320, ""), (70, torch.float16, 5e-3, 320, "misaligned"),
             (70, torch.bfloat16, 3e-2, 320, "scalar"), (70, torch.bfloat16, 3e-2, 320, "nopipe"),
             (70, torch.bfloat16, 3e-2, 320, "twopass"),
             (70, torch.bfloat16, 3e-2, 320, "r64"), (70, torch.float16, 5e-3, 320, "r64 twopass"),
             (70, torch.bfloat16, 3e-2, 320, "r128"), (70, torch.bfloat16, 3e-2, 320, "r128 anyrank"),
             (70, torch.float32, 1e-4, 300, ""),
             (70, torch.float64, 1e-10, 300, "")]
    for n, dt, tol, d_in, variant in cases:
        print(f"-- grouped_lora n={n} {dt} d_in={d_in} {variant}", flush=True)
        _C.set_grouped_lora_vectorized(variant != "scalar")
        _C.set_grouped_lora_pipelined(variant != "nopipe")
        _C.set_grouped_lora_fused_dy("twopass" not in variant)
        _C.set_grouped_lora_fused_dy_any_rank("anyrank" in variant)
        mis = variant == "misaligned"
        k, d_out = 3, 72
        r = 128 if "r128" in variant else (64 if "r64" in variant else 8)
        tag = f"{dt} d_in={d_in} {variant}"
        off = torch.tensor([0, n // 2, n // 2, n], dtype=torch.int32)  # expert 1 empty
        x = torch.randn(n, d_in, generator=g).to(dt)
        a = (torch.randn(k, r, d_in, generator=g) / d_in ** 0.5).to(dt)
        b = torch.randn(k, d_out, r, generator=g).to(dt)
        rs = torch.rand(n, generator=g, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        gy = torch.randn(n, d_out, generator=g).to(dt)
        base_dx = torch.randn(n, d_in, generator=g).to(dt)
        cpu = (x, a, b, off)
        dev_args = [to_dev(x, mis), a.to(dev), b.to(dev), off.to(dev)]
        ok &= close(ops.grouped_lora(*dev_args, 0.5, rs.to(dev)), ops.grouped_lora(*cpu, 0.5, rs), f"grouped_lora {tag}",
                    tol)
        base = torch.randn(n, d_out, generator=g).to(dt)
        out_d, out_c = to_dev(base, mis), base.clone()
        ops.grouped_lora_add_out(out_d, *dev_args, 0.5, rs.to(dev))
        ops.grouped_lora_add_out(out_c, *cpu, 0.5, rs)
        ok &= close(out_d, out_c, f"grouped_lora_add_out {tag}", tol)
        got = ops.grouped_lora_backward(to_dev(gy, mis), *dev_args, 0.5, rs.to(dev))
        want = ops.grouped_lora_backward(gy, *cpu, 0.5, rs)
        for u, v, w in zip(got, want, ("grad_x", "grad_a", "grad_b", "grad_row_scale")):
            ok &= close(u, v, f"grouped_lora_backward {w} {tag}", tol)
        h = ops.grouped_lora_h(*dev_args, 0.5, rs.to(dev))[1]
        for u, v, w in zip(ops.grouped_lora_backward(to_dev(gy, mis), *dev_args, 0.5, rs.to(dev), h), got,
                           ("grad_x", "grad_a", "grad_b", "grad_row_scale")):
            if not torch.equal(u, v):
                print(f"MISMATCH: grouped_lora_backward {w} given the saved h != recomputed ({tag})", flush=True)
                ok = False
        gx_d, gx_c = to_dev(base_dx, mis), base_dx.clone()  # the dX epilogue that adds onto the base path's dX
        got_acc = ops.grouped_lora_backward_add_out(gx_d, gy.to(dev), *dev_args, 0.5, rs.to(dev))
        want_acc = ops.grouped_lora_backward_add_out(gx_c, gy, *cpu, 0.5, rs)
        ok &= close(gx_d, gx_c, f"grouped_lora_backward_add_out grad_x {tag}", tol)
        for u, v, w in zip(got_acc, want_acc, ("grad_a", "grad_b", "grad_row_scale")):
            ok &= close(u, v, f"grouped_lora_backward_add_out {w} {tag}", tol)
        w_base = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dt)
        ok &= close(ops.lora_linear(dev_args[0], w_base.to(dev), None, *dev_args[1:], 0.5, rs.to(dev)),
                    ops.lora_linear(x, w_base, None, a, b, off, 0.5, rs), f"lora_linear {tag}", tol)
        if int((got[1][1] != 0).sum()) or int((got[2][1] != 0).sum()):
            print(f"MISMATCH: nonzero weight gradient of the empty expert ({tag})", flush=True)
            ok = False
    _C.set_grouped_lora_vectorized(True)
    _C.set_grouped_lora_pipelined(True)
    _C.set_grouped_lora_fused_dy(True)
    _C.set_grouped_lora_fused_dy_any_rank(False)
    bad = torch.tensor([0, 9, 3, 20], dtype=torch.int32, device=dev)  # decreasing: reported, no OOB access
    ops.grouped_lora(torch.randn(20, 16, device=dev), torch.randn(3, 4, 16, device=dev),
                     torch.randn(3, 8, 4, device=dev), bad, 1.0, None)
    try:
        _C.cuda_check_errors(True)
        print("MISSING ERROR: bad grouped_lora offsets were not reported", flush=True)
        ok = False
    except RuntimeError:
        pass

    print("-- MoLEFFN forward + backward (the module through autograd)", flush=True)
    ok &= module_matches_cpu(dev, g)

    torch.cuda.synchronize()
    print("gpu_check_kernels:", "all kernels ran, results match the CPU" if ok else "MISMATCHES (see above)")
    return 0 if ok else 1


def module_matches_cpu(dev, g) -> bool:
    """MoLEFFN in fp32 on CUDA and on the CPU from the same weights: output and the gradients of
    the input and of every trainable parameter (router, LoRA A / B of the three projections)."""
    from mole_ext import MoLEFFN

    ok = True
    for routing in ("top1", "dense"):
        torch.manual_seed(0)
        cpu = MoLEFFN(48, 80, 3, 8, 16.0, routing=routing)
        with torch.no_grad():
            for p in cpu.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.1, generator=g)
        gpu = MoLEFFN(48, 80, 3, 8, 16.0, routing=routing, device=dev)
        gpu.load_state_dict(cpu.state_dict())
        x = torch.randn(2, 37, 48, generator=g)
        gy = torch.randn(2, 37, 48, generator=g)
        xc, xg = x.clone().requires_grad_(), x.to(dev).requires_grad_()
        yc, yg = cpu(xc), gpu(xg)
        yc.backward(gy)
        yg.backward(gy.to(dev))
        ok &= closef(yg, yc, f"MoLEFFN {routing} output")
        ok &= closef(xg.grad, xc.grad, f"MoLEFFN {routing} grad x")
        for (name, pc), pg in zip(cpu.named_parameters(), gpu.parameters()):
            if pc.requires_grad:
                ok &= closef(pg.grad, pc.grad, f"MoLEFFN {routing} grad {name}")
    return ok


def closef(a, b, what, tol=1e-4) -> bool:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    good = torch.allclose(a, b, rtol=tol, atol=tol * (b.abs().max().item() + 1e-12))
    if not good:
        print(f"MISMATCH: {what} (max abs err {(a - b).abs().max().item():.3e})", flush=True)
    return good


def ncu_workload(dev: str = "cuda", n: int = 16384, d_in: int = 4096, d_out: int = 11008, copy_bytes: int = 256 << 20,
                 ranks=(32, 128)) -> int:
    """The kernels bench/gpu_check.py profiles with ncu (inside cudaProfilerStart / Stop, after a
    warm-up outside): a 256 MiB copy (the bandwidth reference), the grouped LoRA forward and
    backward at the benchmark shape (N = 16384, 4096 -> 11008, K = 4, bf16) for r = 32 (the fused dY
    pass) and 128 (two passes), the forward keeping the shrink h and the backward given it,
    permute / unpermute at N = 16384, d = 4096, and the router. (Smaller on the CPU: a test.)"""
    cuda = dev == "cuda"
    assert not cuda or torch.cuda.is_available(), "needs a GPU"
    torch.manual_seed(0)
    k = 4
    bf = torch.bfloat16
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    expert = torch.randint(0, k, (n,), device=dev)
    logits = torch.randn(n, k, device=dev)
    x = torch.randn(n, d_in, device=dev, dtype=bf)
    gy = torch.randn(n, d_out, device=dev, dtype=bf)
    rs = torch.rand(n, device=dev)
    off = torch.cat([torch.zeros(1, dtype=torch.long, device=dev),
                     torch.bincount(expert, minlength=k).cumsum(0)]).to(torch.int32)
    lora = {r: ((torch.randn(k, r, d_in, device=dev) * d_in ** -0.5).to(bf),
                (torch.randn(k, d_out, r, device=dev) * r ** -0.5).to(bf)) for r in ranks}

    def work():
        dst.copy_(src)
        for r, (a, b) in lora.items():  # what autograd runs: the forward keeps h, the backward takes it
            _, h = ops.grouped_lora_h(x, a, b, off, 2.0, rs)
            ops.grouped_lora_backward(gy, x, a, b, off, 2.0, rs, h)
        xs, st, _ = ops.permute(x, expert, k)
        ops.unpermute(xs, st)
        ops.router_top1(logits)

    work()  # warm-up: allocations and first launches outside the profiled range
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    work()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print("ncu workload done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(ncu_workload() if sys.argv[1:] == ["--ncu"] else main())
