"""CUDA kernels of grouped_lora / grouped_lora_add_out / grouped_lora_backward (and its add_out
variant) and the fused lora_linear against the CPU
kernel and the reference: awkward shapes (N in 0, 1, 33, 97, 1025; K in 1, 2, 3, 8; r in 1, 8,
16, 64, 128; in / out not multiples of 16), skewed routing (99% on one expert, empty experts),
the bf16 rule (error no worse than twice PyTorch's own bf16 error against a float64 oracle),
determinism (bit-identical reruns), the SIMT cross-check of the tensor-core path, bad offsets,
and CUDA-graph replays with the routing changed between replays. Skipped without CUDA.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mole_ext import _C, ops
from mole_ext import reference as ref

from cuda_testing import assert_equal, cpu_op, cuda_params, validate_mode, validated_device
from helpers import assert_close

# (rtol, atol as a fraction of the largest expected magnitude) against the fp32 CPU kernel: the
# GPU rounds the rank-r intermediate to the input dtype once (as PyTorch's bf16 LoRA does).
TOL = {torch.float32: (1e-4, 2e-5), torch.bfloat16: (2e-2, 1.5e-2), torch.float16: (4e-3, 3e-3)}
NS = [0, 1, 33, 97, 1025]
KS = [1, 2, 3, 8]
RS = [1, 8, 16, 64, 128]
D_IN, D_OUT = 40, 72  # not multiples of 16 (nor of the 64-wide tiles)


device = pytest.fixture(params=cuda_params(), name="device")(validated_device)


def offsets_of(expert: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(expert.long(), minlength=k)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)


def routing(n, k, kind, g):
    if kind == "uniform":
        return torch.randint(0, k, (n,), generator=g)
    if kind == "skewed":  # 99% on expert k - 1, the rest spread
        e = torch.randint(0, k, (n,), generator=g)
        return torch.where(torch.rand(n, generator=g) < 0.99, torch.full_like(e, k - 1), e)
    if kind == "empty":  # only even experts get tokens
        return (torch.randint(0, (k + 1) // 2, (n,), generator=g) * 2).clamp_max(k - 1)
    raise ValueError(kind)


def make(n, k, r, d_in, d_out, dtype, kind="uniform", row_scale=True, seed=0):
    """CPU tensors: x [n, d_in], a [k, r, d_in], b [k, d_out, r], offsets [k+1] int32, rs [n] fp32."""
    g = torch.Generator().manual_seed(seed + 1000 * n + 10 * k + r)
    off = offsets_of(routing(n, k, kind, g), k)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    a = (torch.randn(k, r, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = (torch.randn(k, d_out, r, generator=g) / r ** 0.5).to(dtype)
    rs = torch.rand(n, generator=g) if row_scale else None
    return x, a, b, off, rs


def cuda_args(*ts):
    return [None if t is None else t.cuda() for t in ts]


def close(actual, expected, dtype, what):
    rtol, afrac = TOL[dtype]
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    assert_close(actual, expected, rtol=rtol, atol=afrac * scale + 1e-30, msg=what)


# ---- forward --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_forward_matches_cpu_and_reference(device, n, k, r, dtype):
    x, a, b, off, rs = make(n, k, r, D_IN, D_OUT, dtype)
    y = ops.grouped_lora(*cuda_args(x, a, b, off), 0.75, rs.cuda())
    assert y.dtype == dtype and y.shape == (n, D_OUT) and y.is_cuda
    close(y, cpu_op("grouped_lora", x, a, b, off, 0.75, rs), dtype, "vs CPU kernel")
    close(y, ref.grouped_lora(x, a, b, off, 0.75, rs), dtype, "vs reference")


@pytest.mark.parametrize("kind", ["skewed", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("row_scale", [True, False])
def test_forward_skewed_routing(device, kind, dtype, row_scale):
    x, a, b, off, rs = make(1025, 8, 16, 136, 200, dtype, kind=kind, row_scale=row_scale)
    y = ops.grouped_lora(*cuda_args(x, a, b, off), 1.5, None if rs is None else rs.cuda())
    close(y, cpu_op("grouped_lora", x, a, b, off, 1.5, rs), dtype, f"{kind} routing")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_forward_long_reduction_is_split(device, dtype):
    # few rows, a long `in`: the shrink splits its reduction into fp32 partials (that it does is
    # checked on the CPU: the emulated kernels count split launches, tests/test_cuda_emulated.py)
    for n in (1, 33):
        x, a, b, off, rs = make(n, 3, 64, 4096, 300, dtype)
        y = ops.grouped_lora(*cuda_args(x, a, b, off), 0.5, rs.cuda())
        close(y, cpu_op("grouped_lora", x, a, b, off, 0.5, rs), dtype, f"split-K n={n}")


def test_forward_int64_offsets_and_non_contiguous(device):
    x, a, b, off, rs = make(97, 3, 8, D_IN, D_OUT, torch.float32)
    xt = x.t().contiguous().t().cuda()
    at = a.transpose(1, 2).contiguous().transpose(1, 2).cuda()
    assert not xt.is_contiguous() and not at.is_contiguous()
    y = ops.grouped_lora(xt, at, b.cuda(), off.long().cuda(), 0.5, rs.cuda())
    close(y, cpu_op("grouped_lora", x, a, b, off, 0.5, rs), torch.float32, "non-contiguous, int64 offsets")


# ---- add_out ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", NS)
def test_add_out_matches_cpu(device, n, dtype):
    x, a, b, off, rs = make(n, 3, 16, D_IN, D_OUT, dtype, kind="skewed")
    base = torch.randn(n, D_OUT).to(dtype)
    out = base.cuda()
    ops.grouped_lora_add_out(out, *cuda_args(x, a, b, off), 0.75, rs.cuda())
    want = base.clone()
    cpu_op("grouped_lora_add_out", want, x, a, b, off, 0.75, rs)
    close(out, want, dtype, "add_out vs CPU kernel")
    strided = base.t().contiguous().t().cuda()  # column-major out
    ops.grouped_lora_add_out(strided, *cuda_args(x, a, b, off), 0.75, rs.cuda())
    assert_equal(strided, out, "non-contiguous out")


# ---- backward ---------------------------------------------------------------------------------

def grads(fn, x, a, b, off, rs, up, scaling=1.25):
    leaves = [t.clone().requires_grad_() for t in (x, a, b)] + ([rs.clone().requires_grad_()] if rs is not None else [])
    fn(leaves[0], leaves[1], leaves[2], off, scaling, leaves[3] if rs is not None else None).backward(up)
    return [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("r", [1, 8, 64, 128])
@pytest.mark.parametrize("n,k", [(1, 1), (33, 2), (97, 3), (1025, 8)])
@pytest.mark.parametrize("row_scale", [True, False])
def test_backward_matches_cpu(device, n, k, r, dtype, row_scale):
    x, a, b, off, rs = make(n, k, r, D_IN, D_OUT, dtype, row_scale=row_scale)
    up = torch.randn(n, D_OUT).to(dtype)
    got = grads(ops.grouped_lora, *cuda_args(x, a, b, off, rs, up))
    want = grads(ops.grouped_lora, x, a, b, off, rs, up)
    for g, w, name in zip(got, want, ("x", "lora_a", "lora_b", "row_scale")):
        assert g.dtype == w.dtype, name
        close(g, w, dtype, f"grad {name}")


@pytest.mark.parametrize("kind", ["skewed", "empty"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_skewed_and_empty_experts(device, kind, dtype):
    x, a, b, off, rs = make(1025, 8, 16, 136, 200, dtype, kind=kind)
    up = torch.randn(1025, 200).to(dtype)
    got = grads(ops.grouped_lora, *cuda_args(x, a, b, off, rs, up))
    want = grads(ops.grouped_lora, x, a, b, off, rs, up)
    for g, w, name in zip(got, want, ("x", "lora_a", "lora_b", "row_scale")):
        close(g, w, dtype, f"grad {name} ({kind})")
    empty = [e for e in range(8) if off[e + 1] == off[e]]
    for e in empty:  # exactly zero, not merely small
        assert_equal(got[1][e], torch.zeros_like(got[1][e]), f"grad lora_a[{e}] of an empty expert")
        assert_equal(got[2][e], torch.zeros_like(got[2][e]), f"grad lora_b[{e}] of an empty expert")


def test_backward_zero_rows(device):
    x, a, b, off, rs = make(0, 3, 8, D_IN, D_OUT, torch.bfloat16)
    gx, ga, gb, grs = torch.ops.mole_ext.grouped_lora_backward(
        torch.zeros(0, D_OUT, dtype=torch.bfloat16, device="cuda"), *cuda_args(x, a, b, off), 1.0, rs.cuda())
    assert gx.shape == (0, D_IN) and grs.shape == (0,)
    assert_equal(ga, torch.zeros_like(ga), "grad lora_a at N = 0")
    assert_equal(gb, torch.zeros_like(gb), "grad lora_b at N = 0")


def test_backward_long_reductions(device):
    # dY B over a long `out` with few rows (split partials), and weight gradients over many rows
    for n in (2, 3000):
        x, a, b, off, rs = make(n, 4, 32, 1000, 2750, torch.bfloat16, kind="skewed")
        up = torch.randn(n, 2750).to(torch.bfloat16)
        got = grads(ops.grouped_lora, *cuda_args(x, a, b, off, rs, up))
        want = grads(ops.grouped_lora, x, a, b, off, rs, up)
        for g, w, name in zip(got, want, ("x", "lora_a", "lora_b", "row_scale")):
            close(g, w, torch.bfloat16, f"grad {name} n={n}")


# ---- bf16: no worse than twice PyTorch's own bf16 error ---------------------------------------

def torch_lora(x, a, b, off, scaling, rs):
    """Plain PyTorch in the inputs' dtype (what a bf16 PyTorch LoRA computes), per segment."""
    pieces = []
    bounds = off.tolist()
    for e in range(a.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        h = x[s:t] @ a[e].T
        pieces.append((h * (scaling * rs[s:t, None]).to(h.dtype)) @ b[e].T)
    return torch.cat(pieces)


@pytest.mark.parametrize("r", [8, 16, 64, 128])
@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_bf16_error_at_most_twice_pytorch(device, r, kind):
    n, k, d_in, d_out = 1025, 4, 1000, 1100
    x, a, b, off, rs = make(n, k, r, d_in, d_out, torch.bfloat16, kind=kind)
    up = torch.randn(n, d_out).to(torch.bfloat16)
    xs, as_, bs, offs, rss, ups = cuda_args(x, a, b, off, rs, up)
    oracle = [t.double() for t in grads(torch_lora, *(t.double() for t in (x, a, b)), off, rs.double(),
                                        up.double())]
    y_oracle = torch_lora(x.double(), a.double(), b.double(), off, 1.25, rs.double())
    ours = [ops.grouped_lora(xs, as_, bs, offs, 1.25, rss)] + grads(ops.grouped_lora, xs, as_, bs, offs, rss, ups)
    theirs = [torch_lora(xs, as_, bs, offs, 1.25, rss)] + grads(torch_lora, xs, as_, bs, offs, rss, ups)
    for o, t, w, name in zip(ours, theirs, [y_oracle] + oracle, ("y", "grad x", "grad lora_a", "grad lora_b",
                                                                  "grad row_scale")):
        err_ours = (o.double().cpu() - w).norm().item()
        err_torch = (t.double().cpu() - w).norm().item()
        assert err_ours <= 2 * err_torch + 1e-12 * w.norm().item(), \
            f"{name}: mole_ext error {err_ours:.3e} > 2 x PyTorch bf16 error {err_torch:.3e}"


# ---- determinism, the SIMT cross-check -------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bit_identical_reruns(device, dtype):
    x, a, b, off, rs = make(3000, 4, 64, 520, 700, dtype, kind="skewed")
    up = torch.randn(3000, 700).to(dtype)
    args = cuda_args(x, a, b, off, rs, up)
    y0 = ops.grouped_lora(*args[:4], 0.5, args[4])
    g0 = torch.ops.mole_ext.grouped_lora_backward(args[5], *args[:4], 0.5, args[4])
    h0 = torch.ops.mole_ext.grouped_lora_h(*args[:4], 0.5, args[4])[1]
    for _ in range(2):
        assert_equal(ops.grouped_lora(*args[:4], 0.5, args[4]), y0, "forward rerun")
        assert_equal(torch.ops.mole_ext.grouped_lora_h(*args[:4], 0.5, args[4])[1], h0, "saved h rerun")
        for saved in (None, h0):  # recomputing the shrink, and given the forward's
            for u, v, name in zip(torch.ops.mole_ext.grouped_lora_backward(args[5], *args[:4], 0.5, args[4], saved),
                                  g0, ("x", "lora_a", "lora_b", "row_scale")):
                assert_equal(u, v, f"grad {name} rerun" + ("" if saved is None else " (saved h)"))


# The SIMT case: (dtype, r) -> inputs (the child and the parent make the same ones)
_SIMT_CASES = [(dt, r) for dt in (torch.bfloat16, torch.float16) for r in (16, 64)]


def _simt_inputs(dtype, r):
    x, a, b, off, rs = make(1025, 3, r, 200, 136, dtype, kind="skewed")
    up = torch.randn(1025, 136, generator=torch.Generator().manual_seed(r)).to(dtype)
    return x, a, b, off, rs, up


_SIMT_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_cuda_grouped_lora import _SIMT_CASES, _simt_inputs, cuda_args, close, grads
from mole_ext import ops
saved = {}
for dtype, r in _SIMT_CASES:
    x, a, b, off, rs, up = _simt_inputs(dtype, r)
    close(ops.grouped_lora(*cuda_args(x, a, b, off), 0.5, rs.cuda()), ops.grouped_lora(x, a, b, off, 0.5, rs), dtype, "y")
    got = grads(ops.grouped_lora, *cuda_args(x, a, b, off, rs, up))
    for g, w in zip(got, grads(ops.grouped_lora, x, a, b, off, rs, up)):
        close(g, w, dtype, "grad")
    saved[(str(dtype), r)] = [g.cpu() for g in got]
torch.save(saved, sys.argv[2])
print("SIMT path OK")
"""


def test_simt_path_for_16_bit_types(device, tmp_path):
    """MOLE_EXT_GROUPED_LORA_SIMT=1 sends bf16 / fp16 through the SIMT kernels (two dY passes): they
    match the CPU kernel, and the tensor-core gradients of this process (the fused dY pass at r = 16,
    and at r = 64 in rank chunks over blocks of two halves) match them within rounding."""
    assert _C.grouped_lora_fused_dy() and not _C.grouped_lora_fused_dy_any_rank()
    out = tmp_path / "simt_grads.pt"
    # MOLE_EXT_GROUPED_LORA_SIMT=1 is read once per process: run the SIMT path in a child process
    env = dict(os.environ, MOLE_EXT_GROUPED_LORA_SIMT="1")
    res = subprocess.run([sys.executable, "-c", _SIMT_SCRIPT, os.path.dirname(os.path.abspath(__file__)), str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "SIMT path OK" in res.stdout, res.stdout + res.stderr
    simt = torch.load(out)
    for dtype, r in _SIMT_CASES:
        x, a, b, off, rs, up = _simt_inputs(dtype, r)
        for g, w, name in zip(grads(ops.grouped_lora, *cuda_args(x, a, b, off, rs, up)), simt[(str(dtype), r)],
                              ("x", "lora_a", "lora_b", "row_scale")):
            close(g.cpu(), w, dtype, f"tensor cores (fused dY pass) vs SIMT, r = {r} {dtype}: grad {name}")


# ---- bad offsets --------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [[0, 5, 3, 9], [1, 3, 6, 9], [0, 3, 6, 8], [0, 3, 6, 12], [0, -2, 6, 9]])
def test_bad_offsets_raise(device, bad):
    x, a, b, _, rs = make(9, 3, 4, 8, 5, torch.float32)
    off = torch.tensor(bad, dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        ops.grouped_lora(*cuda_args(x, a, b), off, 1.0, rs.cuda())
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        torch.ops.mole_ext.grouped_lora_backward(torch.randn(9, 5, device="cuda"), *cuda_args(x, a, b), off, 1.0,
                                                 rs.cuda())


def test_bad_offsets_with_zero_rows_raise(device):
    # N = 0 still checks the offsets (here the last is not N), as the CPU kernel does
    x, a, b = torch.zeros(0, 8, device="cuda"), torch.randn(2, 4, 8, device="cuda"), torch.randn(2, 5, 4, device="cuda")
    off = torch.tensor([0, 2, 0], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        ops.grouped_lora(x, a, b, off, 1.0)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        ops.grouped_lora_add_out(torch.zeros(0, 5, device="cuda"), x, a, b, off, 1.0)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        torch.ops.mole_ext.grouped_lora_backward(torch.zeros(0, 5, device="cuda"), x, a, b, off, 1.0, None)


def test_bad_offsets_lazy_mode(device):
    x, a, b, _, rs = make(9, 3, 4, 8, 5, torch.float32)
    off = torch.tensor([0, 7, 2, 9], dtype=torch.int32, device="cuda")
    with validate_mode(False):
        ops.grouped_lora(*cuda_args(x, a, b), off, 1.0, rs.cuda())  # no out-of-bounds access, no raise yet
        with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
            _C.cuda_check_errors(True)


# ---- the fused projection: lora_linear and grouped_lora_backward_add_out ----------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n,k,kind", [(0, 3, "uniform"), (1, 1, "uniform"), (97, 3, "empty"), (1025, 8, "skewed")])
@pytest.mark.parametrize("row_scale", [True, False])
def test_backward_add_out_matches_cpu(device, n, k, kind, dtype, row_scale):
    x, a, b, off, rs = make(n, k, 16, D_IN, D_OUT, dtype, kind=kind, row_scale=row_scale)
    up = torch.randn(n, D_OUT).to(dtype)
    base_dx = torch.randn(n, D_IN).to(dtype)
    gx = base_dx.cuda()
    got = ops.grouped_lora_backward_add_out(gx, *cuda_args(up, x, a, b, off), 0.75, None if rs is None else rs.cuda())
    want_gx = base_dx.clone()
    want = cpu_op("grouped_lora_backward_add_out", want_gx, up, x, a, b, off, 0.75, rs)
    close(gx, want_gx, dtype, "grad_x accumulated vs CPU kernel")
    for g, w, name in zip(got, want, ("lora_a", "lora_b", "row_scale")):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        close(g, w, dtype, f"grad {name}")
    # the weight gradients are grouped_lora_backward's on the same device, bit for bit
    plain = torch.ops.mole_ext.grouped_lora_backward(*cuda_args(up, x, a, b, off), 0.75,
                                                     None if rs is None else rs.cuda())
    for g, w, name in zip(got, plain[1:], ("lora_a", "lora_b", "row_scale")):
        assert_equal(g, w, f"add_out vs plain backward: {name}")
    strided = base_dx.t().contiguous().t().cuda()  # column-major grad_x
    ops.grouped_lora_backward_add_out(strided, *cuda_args(up, x, a, b, off), 0.75, None if rs is None else rs.cuda())
    assert_equal(strided, gx, "non-contiguous grad_x")


@pytest.mark.parametrize("alias", ["x", "grad_y"])
def test_backward_add_out_grad_x_sharing_memory_with_an_input(device, alias):
    # grad_x may be x itself or grad_y itself (in = out here): the weight gradients read those
    # before dX is written, so the results equal the CPU kernel's on the same aliasing
    x, a, b, off, rs = make(97, 3, 8, D_IN, D_IN, torch.float32, kind="empty")
    up = torch.randn(97, D_IN)
    xc, upc = x.clone(), up.clone()
    want = cpu_op("grouped_lora_backward_add_out", xc if alias == "x" else upc, upc, xc, a, b, off, 0.5, rs)
    xd, upd = x.cuda(), up.cuda()
    got = ops.grouped_lora_backward_add_out(xd if alias == "x" else upd, upd, xd, *cuda_args(a, b, off), 0.5, rs.cuda())
    for g, w, name in zip(got, want, ("lora_a", "lora_b", "row_scale")):
        close(g, w, torch.float32, f"grad {name} with grad_x = {alias}")
    close(xd if alias == "x" else upd, xc if alias == "x" else upc, torch.float32, f"grad_x = {alias}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,k,kind", [(1, 1, "uniform"), (97, 3, "empty"), (1025, 8, "skewed")])
@pytest.mark.parametrize("lora_input", ["x", "separate"])
def test_lora_linear_matches_cpu_forward_and_backward(device, n, k, kind, dtype, lora_input):
    x, a, b, off, rs = make(n, k, 16, D_IN, D_OUT, dtype, kind=kind)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(D_OUT, D_IN, generator=g) / D_IN ** 0.5).to(dtype)
    bias = torch.randn(D_OUT, generator=g).to(dtype)
    up = torch.randn(n, D_OUT, generator=g).to(dtype)
    lx = torch.randn(n, D_IN, generator=g).to(dtype)  # stands in for drop(x)

    def run(*ts):
        leaves = [t.clone().requires_grad_() for t in ts[:5]] + [ts[6].clone().requires_grad_()]
        if lora_input == "separate":
            leaves.append(ts[8].clone().requires_grad_())
        y = ops.lora_linear(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4], ts[5], 0.75, leaves[5],
                            leaves[6] if lora_input == "separate" else None)
        y.backward(ts[7])
        return [y.detach()] + [t.grad for t in leaves]

    got = run(*cuda_args(x, w, bias, a, b, off, rs, up, lx))
    want = run(x, w, bias, a, b, off, rs, up, lx)
    for gt, wt, name in zip(got, want, ("y", "x", "weight", "bias", "lora_a", "lora_b", "row_scale", "lora_x")):
        assert gt.dtype == wt.dtype, name
        close(gt, wt, dtype, f"lora_linear {name}")


# ---- 16-byte vector accesses against element accesses --------------------------------------------

def _all_grouped_ops(x, a, b, off, rs, up, base, base_dx):
    """Every grouped op's results; the forward that keeps the shrink h (grouped_lora_h) and both
    backward ops given h must equal the plain ops (recomputing it) bit for bit, which is checked here."""
    out, gx = base.clone(), base_dx.clone()
    ops.grouped_lora_add_out(out, x, a, b, off, 0.75, rs)
    acc = ops.grouped_lora_backward_add_out(gx, up, x, a, b, off, 0.75, rs)
    res = [ops.grouped_lora(x, a, b, off, 0.75, rs), out, *torch.ops.mole_ext.grouped_lora_backward(
        up, x, a, b, off, 0.75, rs), gx, *acc]
    y_h, h = torch.ops.mole_ext.grouped_lora_h(x, a, b, off, 0.75, rs)
    gx_h = base_dx.clone()
    with_h = [y_h, *torch.ops.mole_ext.grouped_lora_backward(up, x, a, b, off, 0.75, rs, h), gx_h,
              *ops.grouped_lora_backward_add_out(gx_h, up, x, a, b, off, 0.75, rs, h)]
    for u, v, name in zip(with_h, [res[0], *res[2:]], [_ALL_OP_RESULTS[0], *_ALL_OP_RESULTS[2:]]):
        assert_equal(u, v, f"saved h vs recompute: {name}")
    return res + [h]


_ALL_OP_RESULTS = ("y", "add_out", "gx", "ga", "gb", "grs", "gx_acc", "ga_acc", "gb_acc", "grs_acc", "h")


def _upstream(n, d_in, d_out, dtype, seed):
    """The backward's incoming gradient up [n, d_out] and the bases of add_out [n, d_out] and of
    the accumulating dX [n, d_in], on the GPU, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, c, generator=g).to(dtype).cuda() for c in (d_out, d_out, d_in))


def _same_with_switch_off(args, is_on, set_on, what):
    """Every grouped op's results with a kernel switch on (the default, checked) and off must be
    identical bit for bit; returns the results with it on."""
    assert is_on(), f"{what}: on by default"
    on = _all_grouped_ops(*args)
    set_on(False)
    try:
        off = _all_grouped_ops(*args)
    finally:
        set_on(True)
    torch.cuda.synchronize()
    for u, v, name in zip(on, off, _ALL_OP_RESULTS):
        assert_equal(u, v, f"{what}: {name}")
    return on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d_in,d_out,r,misaligned", [(40, 72, 16, False), (4096, 200, 8, False),
                                                     (136, 17, 64, False), (33, 24, 8, False), (40, 72, 16, True)])
def test_vector_and_element_accesses_agree_bit_for_bit(device, dtype, d_in, d_out, r, misaligned):
    """The vectorized loads and epilogues move the same values as element accesses: every op's
    results are identical with the switch off. Ragged rows (17, 33) and a base address off by one
    element (``misaligned``: rows of 80 bytes, but the matrix starts 2 or 4 bytes past a 16-byte
    boundary) must take the element path rather than fault."""
    n = 1025
    x, a, b, off, rs = make(n, 4, r, d_in, d_out, dtype, kind="skewed")
    up, base, base_dx = _upstream(n, d_in, d_out, dtype, seed=7)
    xd = x.cuda()
    if misaligned:
        flat = torch.empty(n * d_in + 1, dtype=dtype, device="cuda")
        xd = flat[1:].view(n, d_in)
        xd.copy_(x)
        assert xd.is_contiguous() and xd.data_ptr() % 16 != 0
    args = (xd, *cuda_args(a, b, off, rs), up, base, base_dx)
    vec = _same_with_switch_off(args, _C.grouped_lora_vectorized, _C.set_grouped_lora_vectorized,
                                "vector vs element accesses")
    close(vec[0], cpu_op("grouped_lora", x, a, b, off, 0.75, rs), dtype, "vectorized forward vs CPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d_in,d_out,r,kind", [(40, 72, 16, "skewed"), (4096, 200, 8, "uniform"),
                                               (136, 264, 128, "empty"), (328, 24, 1, "skewed"),
                                               (1000, 1032, 64, "uniform")])
def test_pipelined_and_plain_main_loops_agree_bit_for_bit(device, dtype, d_in, d_out, r, kind):
    """The cp.async pipelined main loop (the default for bf16 / fp16 with 16-byte aligned rows)
    multiplies the same zero-filled tiles in the same order as the plain one: identical results,
    over ragged last k-steps (40, 328, 1000), many steps through the three stages (4096, split
    too), both layouts of the right operand (k-contiguous lora_a / lora_b in the shrink and
    expand, n-contiguous in G and dX), the weight gradients' k-major left operand (dH, dY over a
    chunk of rows: ragged at every chunk and segment end) and r from 1 to 128."""
    n = 1025
    x, a, b, off, rs = make(n, 4, r, d_in, d_out, dtype, kind=kind)
    up, base, base_dx = _upstream(n, d_in, d_out, dtype, seed=8)
    args = (*cuda_args(x, a, b, off, rs), up, base, base_dx)
    assert _C.grouped_lora_vectorized(), "the pipelined loop needs the vector path (the default)"
    piped = _same_with_switch_off(args, _C.grouped_lora_pipelined, _C.set_grouped_lora_pipelined,
                                  "pipelined vs plain main loop")
    close(piped[0], cpu_op("grouped_lora", x, a, b, off, 0.75, rs), dtype, "pipelined forward vs CPU")
    close(piped[2], cpu_op("grouped_lora_backward", up.cpu(), x, a, b, off, 0.75, rs)[0], dtype,
          "pipelined dX vs CPU")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d_in,d_out,r,kind", [(40, 72, 16, "skewed"), (1000, 1100, 32, "uniform"),
                                               (136, 4100, 8, "empty"), (328, 24, 1, "skewed"),
                                               (64, 600, 17, "skewed"),
                                               # rank chunks: 2 (r = 48 ragged, 64), 4 (r = 128, any rank)
                                               (72, 600, 48, "empty"), (136, 1100, 64, "skewed"),
                                               (40, 600, 128, "uniform")])
def test_fused_dy_pass_agrees_with_two_passes(device, dtype, d_in, d_out, r, kind):
    """bf16 / fp16: the backward's G = dY B and dB = dY^T Hs come from one pass over dY
    (dy_pass_kernel; the default below r = 128, in rank chunks of 32 above r = 32; r = 128 with the
    any-rank switch). Its sums run in another order than the two passes (row_gemm + wgrad): every
    gradient agrees with them and with the CPU kernel within rounding, the forward is untouched (bit
    for bit), and the fused pass reruns bit for bit."""
    n = 1025
    x, a, b, off, rs = make(n, 4, r, d_in, d_out, dtype, kind=kind)
    up, base, base_dx = _upstream(n, d_in, d_out, dtype, seed=9)
    args = (*cuda_args(x, a, b, off, rs), up, base, base_dx)
    assert _C.grouped_lora_fused_dy(), "the fused dY pass is on by default"
    assert not _C.grouped_lora_fused_dy_any_rank(), "the fused pass serves r < 128 by default"
    _C.set_grouped_lora_fused_dy_any_rank(r >= 128)
    try:
        fused = _all_grouped_ops(*args)
        for u, v, name in zip(_all_grouped_ops(*args), fused, _ALL_OP_RESULTS):
            assert_equal(u, v, f"fused dY pass rerun: {name}")
    finally:
        _C.set_grouped_lora_fused_dy_any_rank(False)
    _C.set_grouped_lora_fused_dy(False)
    try:
        two = _all_grouped_ops(*args)
    finally:
        _C.set_grouped_lora_fused_dy(True)
    torch.cuda.synchronize()
    for u, v, name in zip(fused, two, _ALL_OP_RESULTS):
        if name in ("y", "add_out", "h"):
            assert_equal(u, v, f"the forward does not depend on the switch: {name}")
        else:
            close(u, v, dtype, f"fused vs two dY passes: {name}")
    want = cpu_op("grouped_lora_backward", up.cpu(), x, a, b, off, 0.75, rs)
    for got, w, name in zip(fused[2:6], want, ("grad_x", "grad_a", "grad_b", "grad_row_scale")):
        close(got, w, dtype, f"fused dY pass vs CPU: {name}")


# ---- CUDA graphs: new routing between replays --------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graph_replay_with_changed_routing(device, dtype):
    n, k, r, d_in, d_out = 1025, 4, 16, 136, 200
    x, a, b, off, rs = make(n, k, r, d_in, d_out, dtype)
    up = torch.randn(n, d_out).to(dtype)
    sx, sa, sb, soff, srs, sup = cuda_args(x, a, b, off, rs, up)
    with validate_mode(False):  # validate mode synchronises, which a capture forbids
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (allocations, lazy init) outside the capture
            for _ in range(2):
                ops.grouped_lora(sx, sa, sb, soff, 0.5, srs)
                torch.ops.mole_ext.grouped_lora_backward(sup, sx, sa, sb, soff, 0.5, srs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = ops.grouped_lora(sx, sa, sb, soff, 0.5, srs)
            gx, ga, gb, grs = torch.ops.mole_ext.grouped_lora_backward(sup, sx, sa, sb, soff, 0.5, srs)
        g = torch.Generator().manual_seed(42)
        for kind in ("uniform", "skewed", "empty", "uniform"):
            new_off = offsets_of(routing(n, k, kind, g), k)
            soff.copy_(new_off)
            graph.replay()
            torch.cuda.synchronize()
            eager_y = ops.grouped_lora(sx, sa, sb, soff, 0.5, srs)
            eager_g = torch.ops.mole_ext.grouped_lora_backward(sup, sx, sa, sb, soff, 0.5, srs)
            assert_equal(y, eager_y, f"graph forward ({kind})")
            for u, v, name in zip((gx, ga, gb, grs), eager_g, ("x", "lora_a", "lora_b", "row_scale")):
                assert_equal(u, v, f"graph grad {name} ({kind})")
            close(y, cpu_op("grouped_lora", x, a, b, new_off, 0.5, rs), dtype, f"graph vs CPU ({kind})")


def test_module_under_cuda_graph_with_changed_routing(device):
    # the whole MoLE FFN forward captured once and replayed on new inputs (so new routings)
    from mole_ext import MoLEFFN
    torch.manual_seed(0)
    m = MoLEFFN(64, 176, 4, 8, 16.0, device="cuda")
    with torch.no_grad():
        for p in (m.gate_proj, m.up_proj, m.down_proj):
            p.lora_B.normal_(0, 0.05)
        m.router.weight.normal_(0, 1.0)
    static_x = torch.randn(333, 64, device="cuda")
    with validate_mode(False), torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                m(static_x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_y = m(static_x)
        for seed in range(3):
            new_x = torch.randn(333, 64, generator=torch.Generator().manual_seed(seed)).cuda()
            static_x.copy_(new_x)
            graph.replay()
            torch.cuda.synchronize()
            eager = m(new_x)
            close(static_y, eager, torch.float32, f"graph replay {seed}")
