"""router_top1: fused softmax + top-1 over experts, and its backward."""

import pytest
import torch
from helpers import DEVICES, assert_close, assert_equal

from mole_ext import ops, reference as ref

FLOATS = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS + [torch.float64])
@pytest.mark.parametrize("n,k", [(0, 3), (1, 1), (33, 2), (97, 3), (1025, 8), (64, 64), (7, 65)])
def test_forward_matches_reference(device, dtype, n, k):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    logits = (torch.randn(n, k) * 3).to(dtype).to(device)
    probs, expert = ops.router_top1(logits)
    probs_ref, expert_ref = ref.router_top1(logits)
    assert probs.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(probs, probs_ref, dtype=probs.dtype, msg="probs")
    assert_equal(expert, expert_ref, msg="expert")


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_lowest_index(device):
    logits = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [5.0, 5.0, 5.0], [-1.0, 3.0, 3.0]], device=device)
    _, expert = ops.router_top1(logits)
    assert expert.tolist() == [0, 1, 0, 1]
    _, expert = ops.router_top1(torch.zeros(4, 8, device=device, dtype=torch.bfloat16))
    assert expert.tolist() == [0, 0, 0, 0]


def test_nan_row_routes_to_nan_like_argmax():
    logits = torch.tensor([[0.0, float("nan"), 1.0], [1.0, 2.0, 3.0]])
    _, expert = ops.router_top1(logits)
    _, expert_ref = ref.router_top1(logits)
    assert_equal(expert, expert_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_backward_matches_reference(device, dtype):
    logits = torch.randn(97, 5).to(dtype).to(device)
    upstream = torch.randn(97, 5, device=device)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ops.router_top1(a)[0].backward(upstream)
    ref.router_top1(b)[0].backward(upstream)
    assert a.grad.dtype == dtype
    assert_close(a.grad, b.grad, dtype=dtype)


def test_non_contiguous_input():
    base = torch.randn(8, 40)
    logits = base[:, ::5]  # [8, 8] with stride 5
    assert not logits.is_contiguous()
    probs, expert = ops.router_top1(logits)
    probs_ref, expert_ref = ref.router_top1(logits)
    assert_close(probs, probs_ref)
    assert_equal(expert, expert_ref)


def test_gradcheck_float64():
    logits = torch.randn(13, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.router_top1(t)[0], (logits,))


def test_opcheck():
    for args in [(torch.randn(9, 3, requires_grad=True),), (torch.randn(5, 1),), (torch.randn(0, 4),),
                 (torch.randn(6, 8, dtype=torch.bfloat16),)]:
        torch.library.opcheck(torch.ops.mole_ext.router_top1, args)
    probs = torch.softmax(torch.randn(9, 3), -1)
    torch.library.opcheck(torch.ops.mole_ext.router_top1_backward, (torch.randn(9, 3), probs))
    # transposed probs: contiguous gradient from the kernel and from the fake kernel alike
    probs_t = torch.softmax(torch.randn(3, 9), 0).t()
    torch.library.opcheck(torch.ops.mole_ext.router_top1_backward, (torch.randn(9, 3), probs_t))


@pytest.mark.parametrize("bad,match", [
    (torch.randn(4), "logits must be 2-D"),
    (torch.randn(2, 3, 4), "logits must be 2-D"),
    (torch.randint(0, 3, (4, 3)), "logits must be float32, bfloat16, float16 or float64"),
    (torch.randn(4, 0), "at least one expert"),
])
def test_bad_input(bad, match):
    with pytest.raises(RuntimeError, match=match):
        ops.router_top1(bad)


def test_backward_bad_shapes():
    with pytest.raises(RuntimeError, match="grad_probs must have the shape of probs"):
        torch.ops.mole_ext.router_top1_backward(torch.randn(3, 2), torch.randn(3, 3))
