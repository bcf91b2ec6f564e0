"""Runs every mole_ext CUDA routing kernel once on small inputs, for compute-sanitizer
(bench/gpu_check.sh runs it under --tool memcheck and --tool racecheck).

Covers: router_top1 (register kernels and the generic one, forward and backward),
permute (tile path, the sort path for K > 1024, int32 and int64 ids, 16-byte and narrow rows,
a bad id in lazy mode), permute_rows / unpermute (and their validate-mode permutation check),
load_balance_loss forward and backward (both partial-kernel layouts, with and without mask).
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

    # router: K = 3 (register kernel), K = 100 (generic); bf16 and fp64
    for k, dt in ((3, torch.bfloat16), (100, torch.float32), (20, torch.float64)):
        logits = torch.randn(70, k, generator=g).to(dt)
        p, e = ops.router_top1(logits.to(dev))
        cp, ce = ops.router_top1(logits)
        ok &= same(p, cp, f"router probs k={k}") and same(e, ce, f"router expert k={k}")
        gp = torch.randn(70, k, generator=g).to(cp.dtype)
        ok &= same(ops.router_top1_backward(gp.to(dev), cp.to(dev)), ops.router_top1_backward(gp, cp),
                   f"router backward k={k}")

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

    torch.cuda.synchronize()
    print("gpu_check_kernels:", "all kernels ran, results match the CPU" if ok else "MISMATCHES (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
