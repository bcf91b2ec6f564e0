"""CUDA kernels of permute / permute_rows / unpermute against the CPU kernel: bit-identical
x_sorted, sorted_token and offsets, for every dtype (rows move as bytes), both index dtypes,
aligned and unaligned rows, the tile path (K <= 1024) and the sort path (K > 1024), and the
documented handling of bad ids. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import mole_ext
from mole_ext import _C
from mole_ext import reference as ref

from cuda_testing import assert_equal, cpu_op, cuda_params, validate_mode, validated_device

NS = [0, 1, 33, 97, 1025]
KS = [1, 2, 3, 8, 1024, 1500]  # 1500: the device-sort path


device = pytest.fixture(params=cuda_params(), name="device")(validated_device)


def _routing(n, k, kind, gen):
    if kind == "uniform":
        return torch.randint(0, k, (n,), generator=gen)
    if kind == "one_expert":
        return torch.full((n,), k - 1, dtype=torch.long)
    if kind == "empty_experts":  # only even experts get tokens
        return (torch.randint(0, (k + 1) // 2, (n,), generator=gen) * 2).clamp_max(k - 1)
    if kind == "skewed":  # 99% on expert 0
        e = torch.randint(0, k, (n,), generator=gen)
        return torch.where(torch.rand(n, generator=gen) < 0.99, torch.zeros_like(e), e)
    raise ValueError(kind)


def check_permute_against_cpu(x, expert, k):
    xs, st, off = mole_ext.ops.permute(x, expert, k)
    cxs, cst, coff = cpu_op("permute", x, expert, k)
    assert xs.device == x.device and st.dtype == torch.int32 and off.dtype == torch.int32
    assert_equal(off, coff, "offsets")
    assert_equal(st, cst, "sorted_token")
    assert_equal(xs, cxs, "x_sorted")
    return xs, st, off


@pytest.mark.parametrize("kind", ["uniform", "one_expert", "empty_experts", "skewed"])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_permute_matches_cpu(device, n, k, kind):
    gen = torch.Generator().manual_seed(n * 7 + k)
    expert = _routing(n, k, kind, gen)
    x = torch.randn(n, 64, generator=gen).to(torch.bfloat16)
    check_permute_against_cpu(x.to(device), expert.to(device), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
                                   torch.bool, torch.int64], ids=str)
@pytest.mark.parametrize("d", [0, 1, 3, 8, 33, 4096])
def test_permute_dtypes_and_row_sizes(device, dtype, d):
    gen = torch.Generator().manual_seed(d)
    n, k = 97, 5
    x = (torch.randn(n, d, generator=gen) * 50).to(dtype)
    expert = torch.randint(0, k, (n,), generator=gen, dtype=torch.int32)
    check_permute_against_cpu(x.to(device), expert.to(device), k)


@pytest.mark.parametrize("shift", [1, 2, 3, 4])
def test_permute_unaligned_rows(device, shift):
    # contiguous tensors whose base is not 16-byte aligned: the copy must fall back to narrower
    # accesses (fp16 rows of 64 elements, base shifted by `shift` elements)
    n, d, k = 65, 64, 4
    buf = torch.randn(n * d + shift, dtype=torch.float16, device=device)
    x = buf[shift:].view(n, d)
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    expert = torch.randint(0, k, (n,), device=device)
    xs, st, _ = check_permute_against_cpu(x, expert, k)
    y = torch.ops.mole_ext.unpermute(xs, st)
    assert_equal(y, x, "unpermute(permute(x)) on unaligned rows")


def test_permute_non_contiguous_inputs(device):
    n, d, k = 300, 40, 6
    x = torch.randn(d, n, device=device).t()  # non-contiguous
    expert = torch.randint(0, k, (2 * n,), device=device)[::2]  # strided
    assert not x.is_contiguous() and not expert.is_contiguous()
    check_permute_against_cpu(x, expert, k)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_one_million_tokens(device, index_dtype):
    gen = torch.Generator().manual_seed(3)
    n, k = 1 << 20, 8
    expert = torch.randint(0, k, (n,), generator=gen).to(index_dtype)
    x = torch.randn(n, 8, generator=gen).to(torch.bfloat16)
    xs, st, off = check_permute_against_cpu(x.to(device), expert.to(device), k)
    xr = torch.ops.mole_ext.unpermute(xs, st)
    assert_equal(xr, x, "round trip (1M tokens)")


@pytest.mark.parametrize("n,k,tiles", [(200_000, 256, True), (200_000, 1024, False), (3000, 1500, False)])
def test_permute_large_tiles(device, n, k, tiles):
    # Many experts with many tokens grow the tiles past the base 64 tokens (the histogram cap);
    # past PERMUTE_MAX_TILE_TOKENS (and above 1024 experts) the permute sorts instead.
    # (that these cases grow the tiles past 64 tokens and take the path `tiles` says is checked on
    # the CPU: csrc/tests/test_routing_math.cpp, test_permute_cases_of_the_cuda_tests)
    gen = torch.Generator().manual_seed(4)
    expert = torch.randint(0, k, (n,), generator=gen)
    check_permute_against_cpu(torch.randn(n, 2, generator=gen).to(device), expert.to(device), k)


def test_permute_matches_reference(device):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1025, 16, generator=gen).to(device)
    expert = torch.randint(0, 3, (1025,), generator=gen).to(device)
    xs, st, off = mole_ext.ops.permute(x, expert, 3)
    rxs, rst, roff = ref.permute(x, expert, 3)
    assert_equal(xs, rxs, "x_sorted vs reference")
    assert_equal(st, rst, "sorted_token vs reference")
    assert_equal(off, roff, "offsets vs reference")


def test_permute_is_deterministic(device):
    x = torch.randn(50_000, 32, device=device)
    expert = torch.randint(0, 8, (50_000,), device=device)
    a = mole_ext.ops.permute(x, expert, 8)
    for _ in range(3):
        b = mole_ext.ops.permute(x, expert, 8)
        for u, v in zip(a, b):
            assert_equal(u, v, "repeat")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("n", NS)
def test_permute_rows_and_unpermute_match_cpu(device, n, index_dtype):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, 24, generator=gen).to(device)
    perm = torch.randperm(n, generator=gen).to(index_dtype).to(device)
    assert_equal(torch.ops.mole_ext.permute_rows(x, perm), cpu_op("permute_rows", x, perm), "permute_rows")
    assert_equal(torch.ops.mole_ext.unpermute(x, perm), cpu_op("unpermute", x, perm), "unpermute")
    assert_equal(torch.ops.mole_ext.unpermute(torch.ops.mole_ext.permute_rows(x, perm), perm), x, "round trip")


def test_permute_gradients_match_cpu(device):
    gen = torch.Generator().manual_seed(9)
    x0 = torch.randn(97, 16, generator=gen)
    expert = torch.randint(0, 4, (97,), generator=gen)
    up = torch.randn(97, 16, generator=gen)
    grads = []
    for dev in ("cpu", device):
        x = x0.to(dev).requires_grad_(True)
        xs, st, _ = mole_ext.ops.permute(x, expert.to(dev), 4)
        y = mole_ext.ops.unpermute(mole_ext.ops.permute_rows(xs, torch.argsort(st).to(dev)), st)
        (y * up.to(dev)).sum().backward()
        grads.append(x.grad)
    assert_equal(grads[1], grads[0], "grad x")


def test_permute_opcheck(device):
    x = torch.randn(33, 8, device=device, requires_grad=True)
    expert = torch.randint(0, 3, (33,), device=device)
    torch.library.opcheck(torch.ops.mole_ext.permute.default, (x, expert, 3))
    perm = torch.randperm(33, device=device).to(torch.int32)
    torch.library.opcheck(torch.ops.mole_ext.permute_rows.default, (x, perm))
    torch.library.opcheck(torch.ops.mole_ext.unpermute.default, (x, perm))


# ---- bad ids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [4, 1500])
@pytest.mark.parametrize("bad", [-1, 4, 1 << 40])
def test_permute_bad_expert_raises_in_validate_mode(device, k, bad):
    expert = torch.randint(0, min(k, 4), (100,), device=device)
    expert[37] = bad if bad != 4 else k  # k itself is out of range
    with pytest.raises(RuntimeError, match=r"expert ids must be in \[0, num_experts\)"):
        mole_ext.ops.permute(torch.randn(100, 8, device=device), expert, k)


def test_permute_bad_expert_lazy_mode(device):
    # Without validate mode: no sync, no raise in the call; rows are still all defined (bad ids
    # sorted last in token order, offsets[K] = valid rows) and the error surfaces at the next
    # check: cuda_check_errors() or the next mole_ext CUDA op.
    x = torch.randn(10, 4, device=device)
    expert = torch.tensor([1, -1, 0, 7, 1, 2, 99, 0, 2, 1], device=device)
    with validate_mode(False):
        xs, st, off = mole_ext.ops.permute(x, expert, 3)
        torch.cuda.synchronize()
        assert off.tolist() == [0, 2, 5, 7]
        assert st.tolist() == [2, 7, 0, 4, 9, 5, 8, 1, 3, 6]
        assert_equal(xs, x[st.long()], "x_sorted follows sorted_token")
        with pytest.raises(RuntimeError, match="found -1|found 7|found 99"):
            _C.cuda_check_errors(True)
        _C.cuda_check_errors(True)  # cleared: a second check passes
        # the next op raises a pending error too
        mole_ext.ops.permute(x, expert, 3)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="expert ids must be in"):
            mole_ext.ops.permute(x, expert.clamp(0, 2), 3)
        xs, st, off = mole_ext.ops.permute(x, expert.clamp(0, 2), 3)  # and then works
        assert_equal(st, cpu_op("permute", x, expert.clamp(0, 2), 3)[1], "after the error")


def test_permute_rows_bad_index(device):
    x = torch.randn(8, 4, device=device)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.mole_ext.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 8], device=device))
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.mole_ext.unpermute(x, torch.tensor([0, 1, 2, 3, 4, 5, -1, 7], device=device))
    with pytest.raises(RuntimeError, match="other than once"):
        torch.ops.mole_ext.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6], device=device))
    with pytest.raises(RuntimeError, match="other than once"):
        torch.ops.mole_ext.unpermute(x, torch.tensor([0, 0, 2, 3, 4, 5, 6, 7], device=device))
    with validate_mode(False):  # lazily: the gathered row of a bad index is zero
        out = torch.ops.mole_ext.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 99], device=device))
        torch.cuda.synchronize()
        assert_equal(out[7], torch.zeros(4, device=device), "row of a bad index")
        with pytest.raises(RuntimeError, match="out of range"):
            _C.cuda_check_errors(True)
        # rows of no bytes: nothing is copied, the bad index is still reported
        for op in (torch.ops.mole_ext.permute_rows, torch.ops.mole_ext.unpermute):
            op(torch.empty(8, 0, device=device), torch.tensor([0, 1, 2, 3, 4, 5, 6, 99], device=device))
            with pytest.raises(RuntimeError, match="out of range"):
                _C.cuda_check_errors(True)


def test_permute_bad_shapes_rejected(device):
    with pytest.raises(RuntimeError, match="one entry per row"):
        mole_ext.ops.permute(torch.randn(4, 2, device=device), torch.zeros(3, dtype=torch.long, device=device), 2)
    with pytest.raises(RuntimeError, match="int32 or int64"):
        mole_ext.ops.permute(torch.randn(4, 2, device=device), torch.zeros(4, device=device), 2)
    with pytest.raises(RuntimeError, match="num_experts must be >= 1"):
        mole_ext.ops.permute(torch.randn(4, 2, device=device), torch.zeros(4, dtype=torch.long, device=device), 0)


def test_permute_under_cuda_graph(device):
    # No host sync on the normal path: permute can be captured and replayed with new routing.
    n, k = 4096, 8
    x = torch.randn(n, 64, device=device)
    expert = torch.randint(0, k, (n,), device=device)
    with validate_mode(False):
        mole_ext.ops.permute(x, expert, k)  # warm-up outside capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            xs, st, off = mole_ext.ops.permute(x, expert, k)
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            expert.copy_(torch.randint(0, k, (n,), generator=gen))
            x.copy_(torch.randn(n, 64, generator=gen))
            graph.replay()
            torch.cuda.synchronize()
            cxs, cst, coff = cpu_op("permute", x, expert, k)
            assert_equal(off, coff, "offsets (graph replay)")
            assert_equal(st, cst, "sorted_token (graph replay)")
            assert_equal(xs, cxs, "x_sorted (graph replay)")


def test_permute_kernels_are_registered(device):
    backend = mole_ext.ops.cuda_backend()
    assert all(backend[op] == "kernel" for op in ("permute", "permute_rows", "unpermute"))
