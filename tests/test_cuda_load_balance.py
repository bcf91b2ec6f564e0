"""CUDA kernels of load_balance_loss / load_balance_loss_backward against the CPU kernel.

The loss sums in float64 in a different (fixed) order than the CPU, so it matches to float64
rounding (float32 output: almost always bit-identical; compared with a tolerance of a few ulp).
The gradient is bit-identical. Results are deterministic run to run. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

import mole_ext
from mole_ext import _C
from mole_ext import reference as ref

from cuda_testing import assert_close, assert_equal, cpu_op, cuda_params, validate_mode, validated_device
from helpers import load_balance_inputs

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
LOSS_RTOL = {torch.float32: 2.5e-7, torch.float64: 1e-14}


device = pytest.fixture(params=cuda_params(), name="device")(validated_device)


def _inputs(n, k, dtype, mask_kind, seed, device, skew=None):
    return tuple(None if t is None else t.to(device) for t in load_balance_inputs(n, k, dtype, mask_kind, seed, skew))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [1, 2, 3, 8, 300])
@pytest.mark.parametrize("n", [0, 1, 33, 97, 1025])
def test_loss_and_grad_match_cpu(device, n, k, dtype, mask_kind):
    probs, expert, mask = _inputs(n, k, dtype, mask_kind, n * 31 + k, device)
    loss = mole_ext.ops.load_balance_loss(probs, expert, mask)
    closs = cpu_op("load_balance_loss", probs, expert, mask)
    assert loss.shape == () and loss.dtype == _acc(dtype) and loss.device == probs.device
    assert_close(loss, closs, rtol=LOSS_RTOL[_acc(dtype)], what="loss")
    for g in (1.0, -0.75):
        grad_loss = torch.tensor(g, dtype=_acc(dtype), device=device)
        grad = torch.ops.mole_ext.load_balance_loss_backward(grad_loss, probs, expert, mask)
        assert_equal(grad, cpu_op("load_balance_loss_backward", grad_loss, probs, expert, mask), "grad_probs")


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_loss_one_million_tokens_skewed(device, index_dtype):
    probs, expert, mask = _inputs(1 << 20, 8, torch.float32, "random", 11, device, skew=0.99)
    expert = expert.to(index_dtype)
    loss = mole_ext.ops.load_balance_loss(probs, expert, mask)
    assert_close(loss, cpu_op("load_balance_loss", probs, expert, mask), rtol=LOSS_RTOL[torch.float32], what="loss")
    g = torch.tensor(0.5, device=device)
    assert_equal(torch.ops.mole_ext.load_balance_loss_backward(g, probs, expert, mask),
                 cpu_op("load_balance_loss_backward", g, probs, expert, mask), "grad_probs (1M)")


def test_loss_many_experts(device):
    # K above the block size takes the whole-column branch of the partial kernel
    probs, expert, mask = _inputs(3000, 1000, torch.float32, "random", 12, device)
    assert_close(mole_ext.ops.load_balance_loss(probs, expert, mask),
                 cpu_op("load_balance_loss", probs, expert, mask), rtol=LOSS_RTOL[torch.float32], what="loss")


def test_loss_matches_reference_and_autograd(device):
    probs0, expert, mask = _inputs(1025, 4, torch.float32, "random", 13, device)
    probs = probs0.clone().requires_grad_(True)
    loss = mole_ext.load_balance_loss(probs, expert, mask)
    assert_close(loss, ref.load_balance_loss(probs0, expert, mask), rtol=1e-6, what="loss vs reference")
    loss.backward()
    assert_close(probs.grad, ref.load_balance_loss_backward(torch.tensor(1.0, device=device), probs0, expert, mask),
                 rtol=1e-6, what="grad vs reference")


def test_loss_non_contiguous_and_deterministic(device):
    probs = torch.softmax(torch.randn(8, 5000, device=device), 0).t()
    expert = torch.randint(0, 8, (10000,), device=device)[::2]
    mask = (torch.rand(10000, device=device) < 0.5)[::2]
    assert not probs.is_contiguous() and not expert.is_contiguous()
    loss = mole_ext.ops.load_balance_loss(probs, expert, mask)
    assert_close(loss, cpu_op("load_balance_loss", probs, expert, mask), rtol=LOSS_RTOL[torch.float32], what="loss")
    for _ in range(3):
        assert_equal(mole_ext.ops.load_balance_loss(probs, expert, mask), loss, "repeat")


def test_loss_grad_loss_on_cpu(device):
    probs, expert, _ = _inputs(50, 3, torch.float32, "none", 14, device)
    g = torch.tensor(2.0)  # a CPU scalar is accepted and moved
    assert_equal(torch.ops.mole_ext.load_balance_loss_backward(g, probs, expert, None),
                 cpu_op("load_balance_loss_backward", g, probs, expert, None), "grad_probs")


@pytest.mark.parametrize("bad", [-1, 3, 1 << 40])
def test_loss_bad_expert(device, bad):
    probs, expert, _ = _inputs(64, 3, torch.float32, "none", 15, device)
    expert[10] = bad
    with pytest.raises(RuntimeError, match=r"expert ids must be in \[0, K\)"):
        mole_ext.ops.load_balance_loss(probs, expert)
    with pytest.raises(RuntimeError, match=r"expert ids must be in \[0, K\)"):
        torch.ops.mole_ext.load_balance_loss_backward(torch.tensor(1.0, device=device), probs, expert, None)
    with validate_mode(False):  # lazily: the row is left out, the error comes at the next check
        loss = mole_ext.ops.load_balance_loss(probs, expert)
        keep = torch.arange(64, device=device) != 10
        assert_close(loss, cpu_op("load_balance_loss", probs[keep], expert[keep], None), rtol=1e-6,
                     what="loss without the bad row")
        with pytest.raises(RuntimeError, match="load_balance_loss"):
            _C.cuda_check_errors(True)
        # the backward treats the bad row as masked: the gradient of the loss computed above
        grad = torch.ops.mole_ext.load_balance_loss_backward(torch.tensor(1.0, device=device), probs, expert, None)
        masked = cpu_op("load_balance_loss_backward", torch.tensor(1.0), probs, expert.clamp(0, 2), keep)
        assert_equal(grad, masked, what="gradient with the bad row masked")
        assert torch.all(grad[10] == 0)
        with pytest.raises(RuntimeError, match="load_balance_loss"):
            _C.cuda_check_errors(True)


def test_loss_bad_shapes_rejected(device):
    probs = torch.rand(4, 3, device=device)
    with pytest.raises(RuntimeError, match="one entry per row"):
        mole_ext.ops.load_balance_loss(probs, torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(RuntimeError, match="mask must be bool"):
        mole_ext.ops.load_balance_loss(probs, torch.zeros(4, dtype=torch.long, device=device),
                                       torch.ones(4, device=device))
    with pytest.raises(RuntimeError, match="grad_loss must be a scalar"):
        torch.ops.mole_ext.load_balance_loss_backward(torch.ones(2, device=device), probs,
                                                      torch.zeros(4, dtype=torch.long, device=device), None)


def test_loss_opcheck(device):
    probs, expert, mask = _inputs(97, 3, torch.float32, "random", 16, device)
    probs.requires_grad_(True)
    torch.library.opcheck(torch.ops.mole_ext.load_balance_loss.default, (probs, expert, mask))
    torch.library.opcheck(torch.ops.mole_ext.load_balance_loss_backward.default,
                          (torch.tensor(1.0, device=device), probs.detach(), expert, mask))


def test_loss_kernels_are_registered(device):
    backend = mole_ext.ops.cuda_backend()
    assert backend["load_balance_loss"] == "kernel" and backend["load_balance_loss_backward"] == "kernel"
