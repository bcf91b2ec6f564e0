"""permute / permute_rows / unpermute: stable grouping by expert and its inverse."""

import pytest
import torch
from helpers import DEVICES, assert_equal, routing_for

from mole_ext import ops, reference as ref

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,d", [(0, 3, 8), (1, 1, 5), (33, 2, 16), (97, 3, 7), (1025, 8, 64)])
@pytest.mark.parametrize("kind", ["uniform", "one", "missing"])
def test_forward_matches_reference(device, dtype, n, k, d, kind):
    x = torch.randn(n, d).to(dtype).to(device)
    expert = routing_for(n, k, kind).to(device)
    xs, st, off = ops.permute(x, expert, k)
    xs_ref, st_ref, off_ref = ref.permute(x, expert, k)
    assert_equal(st, st_ref, "sorted_token")
    assert_equal(off, off_ref, "offsets")
    assert_equal(xs, xs_ref, "x_sorted")  # a row move: bit-identical
    assert off[0] == 0 and off[-1] == n
    back = ops.unpermute(xs, st)
    assert_equal(back, x, "unpermute(permute(x))")
    assert_equal(ops.permute_rows(x, st), xs, "permute_rows")


@pytest.mark.parametrize("device", DEVICES)
def test_stable_within_expert(device):
    expert = torch.tensor([2, 0, 2, 1, 0, 2, 0], dtype=torch.int32, device=device)
    x = torch.arange(7, dtype=torch.float32, device=device)[:, None]
    xs, st, off = ops.permute(x, expert, 4)
    assert st.tolist() == [1, 4, 6, 3, 0, 2, 5]
    assert off.tolist() == [0, 3, 4, 7, 7]  # expert 3 is empty
    assert xs[:, 0].tolist() == [1, 4, 6, 3, 0, 2, 5]


def test_int64_expert_and_non_contiguous_x():
    x = torch.randn(40, 12)[::2, ::3]  # [20, 4], non-contiguous
    expert = torch.randint(0, 3, (20,), dtype=torch.int64)
    xs, st, off = ops.permute(x, expert, 3)
    xs_ref, st_ref, off_ref = ref.permute(x, expert, 3)
    assert_equal(xs, xs_ref)
    assert_equal(st, st_ref)
    assert xs.is_contiguous()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_are_the_adjoint(device, dtype):
    n, k, d = 97, 3, 16
    x = torch.randn(n, d).to(dtype).to(device)
    expert = routing_for(n, k, "uniform").to(device)
    up = torch.randn(n, d).to(dtype).to(device)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ops.permute(a, expert, k)[0].backward(up)
    ref.permute(b, expert, k)[0].backward(up)
    assert_equal(a.grad, b.grad, "permute grad")
    _, st, _ = ops.permute(x, expert, k)
    for op, ref_op in ((ops.unpermute, ref.unpermute), (ops.permute_rows, ref.permute_rows)):
        a = x.clone().requires_grad_()
        b = x.clone().requires_grad_()
        op(a, st).backward(up)
        ref_op(b, st).backward(up)
        assert_equal(a.grad, b.grad, f"{op.__name__} grad")


def test_gradcheck_float64():
    x = torch.randn(11, 3, dtype=torch.float64, requires_grad=True)
    expert = torch.tensor([1, 0, 1, 2, 2, 0, 1, 1, 0, 2, 1], dtype=torch.int32)
    assert torch.autograd.gradcheck(lambda t: ops.permute(t, expert, 4)[0], (x,))
    st = ops.permute(x.detach(), expert, 4)[1]
    assert torch.autograd.gradcheck(lambda t: ops.unpermute(t, st), (x,))
    assert torch.autograd.gradcheck(lambda t: ops.permute_rows(t, st), (x,))


def test_opcheck():
    x = torch.randn(17, 6, requires_grad=True)
    expert = routing_for(17, 3, "uniform")
    torch.library.opcheck(torch.ops.mole_ext.permute, (x, expert, 3))
    torch.library.opcheck(torch.ops.mole_ext.permute, (torch.randn(0, 4), torch.zeros(0, dtype=torch.int32), 2))
    st = ops.permute(x.detach(), expert, 3)[1]
    torch.library.opcheck(torch.ops.mole_ext.unpermute, (x, st))
    torch.library.opcheck(torch.ops.mole_ext.permute_rows, (x, st))


@pytest.mark.parametrize("expert,k,match", [
    (torch.tensor([0, 3, 1], dtype=torch.int32), 3, r"expert ids must be in \[0, num_experts = 3\), but expert\[1\] = 3"),
    (torch.tensor([0, -1, 1], dtype=torch.int32), 3, r"expert\[1\] = -1"),
    (torch.tensor([0, 1, 1], dtype=torch.int32), 0, "num_experts must be >= 1"),
    (torch.tensor([0, 1], dtype=torch.int32), 3, "expert must have one entry per row of x"),
    (torch.tensor([[0, 1, 1]], dtype=torch.int32), 3, "expert must be 1-D"),
    (torch.tensor([0.0, 1.0, 1.0]), 3, "expert must be int32 or int64"),
])
def test_bad_input(expert, k, match):
    with pytest.raises(RuntimeError, match=match):
        ops.permute(torch.randn(3, 4), expert, k)


def test_bad_permutation_rejected():
    y = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="sorted_token must be a permutation"):
        ops.unpermute(y, torch.tensor([0, 0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"sorted_token\[2\] = 3"):
        ops.permute_rows(y, torch.tensor([0, 1, 3], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="one entry per row of y_sorted"):
        ops.unpermute(y, torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ops.permute(torch.randn(3), torch.zeros(3, dtype=torch.int32), 2)
