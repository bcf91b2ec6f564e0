"""load_balance_loss: Switch-style balance loss over masked tokens and its gradient."""

import pytest
import torch
from helpers import DEVICES, assert_close, assert_equal, routing_for

from mole_ext import ops, reference as ref


def make(n, k, dtype=torch.float32, device="cpu", kind="uniform", masked=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, k, generator=g), -1).to(dtype).to(device)
    expert = routing_for(n, k, kind, g).to(device)
    mask = (torch.rand(n, generator=g) < 0.7).to(device) if masked else None
    return probs, expert, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,k", [(1, 1), (33, 2), (97, 3), (1025, 8)])
@pytest.mark.parametrize("kind", ["uniform", "one", "missing"])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_backward_match_reference(device, dtype, n, k, kind, masked):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    probs, expert, mask = make(n, k, dtype, device, kind, masked)
    a = probs.clone().requires_grad_()
    b = probs.clone().requires_grad_()
    loss = ops.load_balance_loss(a, expert, mask)
    loss_ref = ref.load_balance_loss(b, expert, mask)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.dim() == 0
    assert_close(loss, loss_ref, dtype=loss.dtype)
    loss.backward(torch.tensor(1.7, dtype=loss.dtype, device=device))
    loss_ref.backward(torch.tensor(1.7, dtype=loss.dtype, device=device))
    assert a.grad.dtype == dtype
    assert_close(a.grad, b.grad, dtype=dtype)


def test_known_values():
    k = 4
    # perfect balance with uniform probabilities -> 1.0
    probs = torch.full((8, k), 1 / k)
    expert = torch.arange(8, dtype=torch.int32) % k
    assert ops.load_balance_loss(probs, expert).item() == pytest.approx(1.0)
    # everything on expert 2 with probability 1 -> K
    probs = torch.zeros(8, k)
    probs[:, 2] = 1
    assert ops.load_balance_loss(probs, torch.full((8,), 2, dtype=torch.int32)).item() == pytest.approx(k)


def test_mask_excludes_padding_and_empty_mask_is_zero():
    probs, expert, _ = make(20, 3)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:12] = True
    assert_close(ops.load_balance_loss(probs, expert, mask), ops.load_balance_loss(probs[:12], expert[:12]))
    p = probs.clone().requires_grad_()
    none = ops.load_balance_loss(p, expert, torch.zeros(20, dtype=torch.bool))
    assert none.item() == 0.0
    none.backward()
    assert_equal(p.grad, torch.zeros_like(p))
    empty = ops.load_balance_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int32))
    assert empty.item() == 0.0


def test_non_contiguous_probs():
    base = torch.softmax(torch.randn(30, 8), -1)
    probs = base[:, ::2]  # [30, 4]
    expert = routing_for(30, 4, "uniform")
    assert_close(ops.load_balance_loss(probs, expert), ref.load_balance_loss(probs, expert))


def test_gradcheck_float64():
    probs, expert, mask = make(13, 3, torch.float64, masked=True)
    probs.requires_grad_()
    assert torch.autograd.gradcheck(lambda p: ops.load_balance_loss(p, expert, mask), (probs,))


def test_opcheck():
    probs, expert, mask = make(17, 3, masked=True)
    probs.requires_grad_()
    torch.library.opcheck(torch.ops.mole_ext.load_balance_loss, (probs, expert, mask))
    torch.library.opcheck(torch.ops.mole_ext.load_balance_loss, (probs, expert, None))
    torch.library.opcheck(torch.ops.mole_ext.load_balance_loss_backward,
                          (torch.tensor(1.0), probs.detach(), expert, mask))
    # a transposed (dense, non-contiguous) probs: the kernels return contiguous gradients, and the
    # fake kernel must say the same strides (torch.compile checks them)
    probs_t = torch.softmax(torch.randn(3, 17), 0).t()
    torch.library.opcheck(torch.ops.mole_ext.load_balance_loss_backward, (torch.tensor(1.0), probs_t, expert, mask))


@pytest.mark.parametrize("args,match", [
    ((torch.rand(4, 3), torch.tensor([0, 1, 3, 0], dtype=torch.int32)), r"expert ids must be in \[0, K = 3\)"),
    ((torch.rand(4, 3), torch.tensor([0, 1, 2], dtype=torch.int32)), "expert must have one entry per row of probs"),
    ((torch.rand(4), torch.tensor([0, 1, 2, 0], dtype=torch.int32)), "probs must be 2-D"),
    ((torch.rand(4, 3), torch.tensor([0, 1, 2, 0], dtype=torch.int32), torch.ones(4)), "mask must be bool"),
    ((torch.rand(4, 3), torch.tensor([0, 1, 2, 0], dtype=torch.int32), torch.ones(3, dtype=torch.bool)),
     "mask must have one entry per row"),
])
def test_bad_input(args, match):
    with pytest.raises(RuntimeError, match=match):
        ops.load_balance_loss(*args)
