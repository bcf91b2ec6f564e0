"""CUDA kernels of router_top1 / router_top1_backward against the CPU kernel and the reference.

Skipped without CUDA. Forward: probs within a few ulp (exp differs between CUDA and glibc),
`expert` identical; for float32 logits a mismatch is accepted only where the CPU's top two
probabilities are within a few ulp of each other (a tie floating point cannot decide the same
way on both), and each such row is checked to be one. Backward: bit-identical (no
transcendental; the kernel does the CPU's operations in the CPU's order without FMA).
"""

from __future__ import annotations

import pytest
import torch

import mole_ext
from mole_ext import _C
from mole_ext import reference as ref

from cuda_testing import PROB_RTOL, assert_close, assert_equal, cpu_op, cuda_params, require_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# 1..4, 5..8, 9..16, 17..32, 33..64 are the register kernels; 65+ the generic one
KS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 100]
NS = [0, 1, 33, 97, 1025]


@pytest.fixture(params=cuda_params())
def device(request):
    require_cuda(request.param)
    return request.param


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_router_against_cpu(logits: torch.Tensor, near_tie_ulps: float = 4.0) -> None:
    probs, expert = mole_ext.ops.router_top1(logits)
    cprobs, cexpert = cpu_op("router_top1", logits)
    assert probs.device == logits.device and probs.dtype == cprobs.dtype and expert.dtype == torch.int32
    assert_close(probs, cprobs, rtol=PROB_RTOL[cprobs.dtype], atol=1e-30, what="probs")
    e, ce = expert.cpu(), cexpert
    bad = (e != ce).nonzero().flatten()
    if bad.numel():
        assert logits.dtype in (torch.float32, torch.float64), (
            f"expert differs in {bad.numel()} rows for {logits.dtype} logits, first row {int(bad[0])}: "
            f"got {int(e[bad[0]])}, CPU {int(ce[bad[0]])}")
        # each differing row must be a near-tie between the two choices on the CPU's own probs
        p = cprobs[bad]
        a = p.gather(1, e[bad].long()[:, None]).squeeze(1)
        b = p.gather(1, ce[bad].long()[:, None]).squeeze(1)
        eps = torch.finfo(p.dtype).eps
        gap = (a - b).abs() / (b.abs() * eps)
        assert bool((gap <= near_tie_ulps).all()), (
            f"expert differs in {bad.numel()} rows and not only at near-ties: worst gap "
            f"{float(gap.max()):.1f} ulp at row {int(bad[int(gap.argmax())])}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", NS)
def test_router_forward_matches_cpu(device, n, k, dtype):
    g = torch.Generator().manual_seed(n * 131 + k)
    logits = (torch.randn(n, k, generator=g) * 3).to(dtype).to(device)
    check_router_against_cpu(logits)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_router_forward_matches_reference(device, dtype):
    logits = (torch.randn(513, 8) * 2).to(dtype).to(device)
    probs, expert = mole_ext.ops.router_top1(logits)
    rprobs, rexpert = ref.router_top1(logits)
    assert_close(probs, rprobs, rtol=PROB_RTOL[_acc(dtype)] * 4, atol=1e-7 if dtype != torch.float64 else 1e-15,
                 what="probs vs reference")
    assert_equal(expert, rexpert, "expert vs reference")


def test_router_exact_ties_go_to_lowest_index(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [-1.0, 5.0, -1.0, 5.0],
                           [0.0, 0.0, 0.0, 7.0]], device=device)
    _, expert = mole_ext.ops.router_top1(logits)
    assert expert.tolist() == [1, 0, 1, 3]


def test_router_special_values_match_cpu(device):
    nan, inf = float("nan"), float("inf")
    rows = [[nan, 1.0, 2.0], [1.0, nan, 2.0], [inf, 1.0, 2.0], [-inf, -inf, -inf], [-inf, 0.0, -inf],
            [1e30, -1e30, 0.0], [inf, inf, 1.0], [-1e-45, 0.0, 1e-45]]
    for dtype in (torch.float32, torch.float64):
        logits = torch.tensor(rows, dtype=dtype, device=device)
        probs, expert = mole_ext.ops.router_top1(logits)
        cprobs, cexpert = cpu_op("router_top1", logits)
        assert_equal(expert, cexpert, f"expert ({dtype})")
        assert_close(probs, cprobs, rtol=PROB_RTOL[dtype], atol=1e-30, what=f"probs ({dtype})")


def test_router_non_contiguous(device):
    base = torch.randn(8, 301, device=device)
    logits = base.t()  # [301, 8], strides (1, 301)
    assert not logits.is_contiguous()
    check_router_against_cpu(logits)


def test_router_one_million_tokens(device):
    g = torch.Generator().manual_seed(7)
    # bfloat16 logits: ties are exact or far apart, so expert must match everywhere
    logits = torch.randn(1 << 20, 8, generator=g).to(torch.bfloat16).to(device)
    probs, expert = mole_ext.ops.router_top1(logits)
    cprobs, cexpert = cpu_op("router_top1", logits)
    assert_equal(expert, cexpert, "expert (1M tokens)")
    assert_close(probs, cprobs, rtol=PROB_RTOL[torch.float32], atol=1e-30, what="probs (1M tokens)")
    # float32 logits: identical up to near-ties
    check_router_against_cpu(torch.randn(1 << 20, 8, generator=g).to(device))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 3, 8, 16, 17, 64, 65])
@pytest.mark.parametrize("n", [0, 1, 97, 1025])
def test_router_backward_bit_identical_to_cpu(device, n, k, dtype):
    g = torch.Generator().manual_seed(n + 1000 * k)
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1).to(dtype).to(device)
    grad = torch.randn(n, k, generator=g).to(dtype).to(device)
    out = torch.ops.mole_ext.router_top1_backward(grad, probs)
    assert out.dtype == dtype and out.device == probs.device
    assert_equal(out, cpu_op("router_top1_backward", grad, probs), "grad_logits")


def test_router_backward_mixed_dtypes_and_strides(device):
    probs = torch.softmax(torch.randn(8, 200, device=device), 0).t()  # float32, non-contiguous
    grad = torch.randn(200, 8, device=device, dtype=torch.bfloat16)
    out = torch.ops.mole_ext.router_top1_backward(grad, probs)
    assert_equal(out, cpu_op("router_top1_backward", grad, probs), "grad_logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_router_autograd_matches_cpu(device, dtype):
    logits = torch.randn(300, 5).to(dtype)
    upstream = torch.randn(300, 5)
    outs = []
    for dev in ("cpu", device):
        x = logits.to(dev).requires_grad_(True)
        probs, _ = mole_ext.ops.router_top1(x)
        (probs * upstream.to(dev)).sum().backward()
        outs.append(x.grad)
    assert outs[1].dtype == dtype
    assert_close(outs[1], outs[0], rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-6, what="grad")


def test_router_bad_input_rejected(device):
    with pytest.raises(RuntimeError, match="2-D"):
        mole_ext.ops.router_top1(torch.randn(4, device=device))
    with pytest.raises(RuntimeError, match="float32, bfloat16, float16 or float64"):
        mole_ext.ops.router_top1(torch.ones(4, 2, dtype=torch.int32, device=device))
    with pytest.raises(RuntimeError, match="at least one expert"):
        mole_ext.ops.router_top1(torch.ones(4, 0, device=device))
    with pytest.raises(RuntimeError, match="same device"):
        torch.ops.mole_ext.router_top1_backward(torch.ones(4, 2), torch.ones(4, 2, device=device))


def test_router_opcheck(device):
    logits = torch.randn(33, 3, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.mole_ext.router_top1.default, (logits,))
    probs = torch.softmax(torch.randn(33, 3, device=device), -1)
    torch.library.opcheck(torch.ops.mole_ext.router_top1_backward.default, (torch.randn_like(probs), probs))


def test_router_kernel_is_registered(device):
    backend = mole_ext.ops.cuda_backend()
    assert backend["router_top1"] == "kernel" and backend["router_top1_backward"] == "kernel"


# ---- runs without a GPU too -------------------------------------------------------------------

def test_routing_kernels_registered_when_built():
    # a build with CUDA kernels registers every routing op for the CUDA key, which turns the
    # reference fallback of mole_ext.ops off for them (grouped_lora is issue 4's)
    if not _C.compiled_with_cuda():
        pytest.skip("built without CUDA kernels")
    backend = mole_ext.ops.cuda_backend()
    for op in ("router_top1", "router_top1_backward", "permute", "permute_rows", "unpermute",
               "load_balance_loss", "load_balance_loss_backward"):
        assert backend[op] == "kernel", (op, backend[op])


def test_error_api_without_pending_errors():
    old = _C.cuda_validate()
    try:
        _C.set_cuda_validate(True)
        assert _C.cuda_validate() is _C.compiled_with_cuda()
        _C.set_cuda_validate(False)
        assert _C.cuda_validate() is False
    finally:
        _C.set_cuda_validate(old)
    _C.cuda_check_errors(False)  # nothing pending, no GPU needed
