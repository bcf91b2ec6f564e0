"""grouped_lora: segmented LoRA shrink/expand over expert-sorted rows, forward and backward."""

import pytest
import torch
from helpers import DEVICES, assert_close, assert_equal, routing_for

from mole_ext import ops, reference as ref


def offsets_for(expert: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.bincount(expert.long(), minlength=k)
    return torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)


def make(n, k, r, d_in, d_out, dtype, device, kind="uniform", row_scale=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    expert = routing_for(n, k, kind, g)
    off = offsets_for(expert, k)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    a = (torch.randn(k, r, d_in, generator=g) / d_in ** 0.5).to(dtype)
    b = (torch.randn(k, d_out, r, generator=g) / r ** 0.5).to(dtype)
    rs = torch.rand(n, generator=g, dtype=torch.float64 if dtype == torch.float64 else torch.float32) if row_scale else None
    to = lambda t: None if t is None else t.to(device)
    return to(x), to(a), to(b), to(off), to(rs)


CASES = [(0, 3, 8, 16, 24), (1, 1, 1, 5, 3), (33, 2, 8, 16, 24), (97, 3, 64, 33, 17), (1025, 8, 8, 48, 40),
         (97, 8, 1, 8, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,k,r,d_in,d_out", CASES)
@pytest.mark.parametrize("row_scale", [True, False])
def test_forward_matches_reference(device, dtype, n, k, r, d_in, d_out, row_scale):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    x, a, b, off, rs = make(n, k, r, d_in, d_out, dtype, device, row_scale=row_scale)
    y = ops.grouped_lora(x, a, b, off, 0.75, rs)
    assert y.dtype == dtype and y.shape == (n, d_out)
    assert_close(y, ref.grouped_lora(x, a, b, off, 0.75, rs), dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["uniform", "one", "skewed", "missing"])
@pytest.mark.parametrize("row_scale", [True, False])
def test_backward_matches_reference(device, dtype, kind, row_scale):
    n, k, r, d_in, d_out = 97, 4, 8, 24, 40
    tensors = make(n, k, r, d_in, d_out, dtype, device, kind=kind, row_scale=row_scale)
    up = torch.randn(n, d_out, device=device).to(dtype)

    def run(fn):
        x, a, b, off, rs = [None if t is None else t.clone() for t in tensors]
        leaves = [x, a, b] + ([rs] if rs is not None else [])
        for t in leaves:
            t.requires_grad_()
        fn(x, a, b, off, 1.5, rs).backward(up)
        return [t.grad for t in leaves]

    for g, g_ref, name in zip(run(ops.grouped_lora), run(ref.grouped_lora), ["x", "lora_a", "lora_b", "row_scale"]):
        # bf16/fp16 weight gradients sum over a segment's tokens: compare at the accumulation's error level
        scale = g_ref.detach().abs().max().item() + 1e-6
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        assert_close(g, g_ref, dtype=dtype, atol=tol * scale, msg=f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_empty_experts_get_exactly_zero_weight_gradients(device):
    n, k = 50, 5
    expert = torch.tensor([0] * 20 + [3] * 30, dtype=torch.int32)
    off = offsets_for(expert, k).to(device)
    x = torch.randn(n, 8, device=device)
    a = torch.randn(k, 4, 8, device=device, requires_grad=True)
    b = torch.randn(k, 6, 4, device=device, requires_grad=True)
    ops.grouped_lora(x, a, b, off, 1.0).sum().backward()
    for e in (1, 2, 4):
        assert_equal(a.grad[e], torch.zeros_like(a.grad[e]))
        assert_equal(b.grad[e], torch.zeros_like(b.grad[e]))
    assert a.grad[0].abs().sum() > 0 and b.grad[3].abs().sum() > 0


def test_all_tokens_on_one_expert_equals_plain_lora():
    x, a, b, _, rs = make(64, 3, 8, 16, 12, torch.float32, "cpu")
    off = torch.tensor([0, 0, 64, 64], dtype=torch.int32)
    y = ops.grouped_lora(x, a, b, off, 2.0, rs)
    plain = 2.0 * rs[:, None] * ((x @ a[1].T) @ b[1].T)
    assert_close(y, plain)


def test_non_contiguous_inputs():
    x, a, b, off, rs = make(33, 2, 8, 16, 24, torch.float32, "cpu")
    xt = x.t().contiguous().t()  # column-major copy
    at = a.transpose(1, 2).contiguous().transpose(1, 2)
    rs2 = torch.stack([rs, rs], 1)[:, 0]
    assert not (xt.is_contiguous() or at.is_contiguous() or rs2.is_contiguous())
    assert_close(ops.grouped_lora(xt, at, b, off, 0.5, rs2), ref.grouped_lora(x, a, b, off, 0.5, rs))


def test_gradcheck_float64():
    x, a, b, off, rs = make(11, 3, 2, 4, 5, torch.float64, "cpu", kind="missing")
    for t in (x, a, b, rs):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: ops.grouped_lora(t[0], t[1], t[2], off, 0.7, t[3]), (x, a, b, rs))
    assert torch.autograd.gradcheck(lambda *t: ops.grouped_lora(t[0], t[1], t[2], off, 0.7), (x, a, b))


def test_opcheck():
    x, a, b, off, rs = make(17, 3, 4, 8, 6, torch.float32, "cpu")
    for t in (x, a, b, rs):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora, (x, a, b, off, 0.5, rs))
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora, (x, a, b, off, 0.5, None))
    up = torch.randn(17, 6)
    plain = [t.detach() for t in (x, a, b, rs)]  # the backward op itself is not differentiable
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward, (up, plain[0], plain[1], plain[2], off, 0.5, plain[3]))


def _bad(**kw):
    x, a, b, off, rs = make(6, 2, 4, 8, 5, torch.float32, "cpu")
    args = dict(x=x, lora_a=a, lora_b=b, offsets=off, scaling=1.0, row_scale=rs)
    args.update(kw)
    return args


@pytest.mark.parametrize("kw,match", [
    (dict(x=torch.randn(6)), "x must be 2-D"),
    (dict(lora_a=torch.randn(2, 4, 9)), r"lora_a must be \[experts, rank, 8\]"),
    (dict(lora_a=torch.randn(2, 0, 8), lora_b=torch.randn(2, 5, 0)), "LoRA rank must be >= 1"),
    (dict(lora_b=torch.randn(2, 5, 3)), r"lora_b must be \[2, out_features, 4\]"),
    (dict(lora_b=torch.randn(2, 5, 4, dtype=torch.float64)), "lora_b must have the dtype of x"),
    (dict(offsets=torch.tensor([0, 6], dtype=torch.int32)), "offsets must have experts \\+ 1 = 3 entries"),
    (dict(offsets=torch.tensor([0, 2, 5], dtype=torch.int32)), "offsets must be non-decreasing .* N = 6"),
    (dict(offsets=torch.tensor([0, 4, 2], dtype=torch.int32)), "offsets must be non-decreasing"),
    (dict(offsets=torch.tensor([1, 2, 6], dtype=torch.int32)), "offsets must be non-decreasing"),
    (dict(offsets=torch.tensor([0.0, 2.0, 6.0])), "offsets must be int32 or int64"),
    (dict(row_scale=torch.rand(5)), "row_scale must have one entry per row of x"),
    (dict(x=torch.randint(0, 3, (6, 8))), "x must be float32"),
])
def test_bad_input(kw, match):
    with pytest.raises(RuntimeError, match=match):
        ops.grouped_lora(**_bad(**kw))


def test_double_backward_is_refused():
    x, a, b, off, rs = make(9, 2, 2, 4, 5, torch.float64, "cpu")
    x.requires_grad_()
    (gx,) = torch.autograd.grad(ops.grouped_lora(x, a, b, off, 1.0, rs).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="grouped_lora_backward is not differentiable"):
        gx.sum().backward()


# ---- grouped_lora_add_out: out += grouped_lora(...) in place -------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,k,r,d_in,d_out", CASES)
def test_add_out_matches_reference(device, dtype, n, k, r, d_in, d_out):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    x, a, b, off, rs = make(n, k, r, d_in, d_out, dtype, device)
    base = torch.randn(n, d_out, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    out = base.clone()
    ret = ops.grouped_lora_add_out(out, x, a, b, off, 0.75, rs)
    assert ret is out
    want = base.clone()
    ref.grouped_lora_add_out(want, x, a, b, off, 0.75, rs)
    assert_close(out, want, dtype=dtype)
    # the same as adding the op's own output, up to one rounding of the delta
    assert_close(out, (base.double() + ref.grouped_lora(x, a, b, off, 0.75, rs).double()).to(dtype), dtype=dtype)


def test_add_out_float32_is_base_plus_grouped_lora_exactly():
    x, a, b, off, rs = make(97, 3, 8, 33, 17, torch.float32, "cpu", kind="skewed")
    base = torch.randn(97, 17)
    out = base.clone()
    ops.grouped_lora_add_out(out, x, a, b, off, 1.25, rs)
    assert_equal(out, base + ops.grouped_lora(x, a, b, off, 1.25, rs))


def test_add_out_non_contiguous_out_and_empty_experts():
    x, a, b, off, rs = make(33, 4, 8, 16, 24, torch.float32, "cpu", kind="missing")
    base = torch.randn(24, 33).t()  # column-major [33, 24]
    out = base.clone()
    assert not out.is_contiguous()
    ops.grouped_lora_add_out(out, x, a, b, off, 0.5, rs)
    assert_close(out, base + ref.grouped_lora(x, a, b, off, 0.5, rs))
    assert out.stride() == base.stride()  # updated in place, layout kept


def test_add_out_zero_rows():
    x, a, b, off, rs = make(0, 3, 8, 16, 24, torch.float32, "cpu")
    out = torch.empty(0, 24)
    ops.grouped_lora_add_out(out, x, a, b, off, 0.5, rs)
    assert out.shape == (0, 24)


@pytest.mark.parametrize("out,match", [
    (torch.zeros(6, 4), r"out must be \[6, 5\]"),
    (torch.zeros(5, 5), r"out must be \[6, 5\]"),
    (torch.zeros(6, 5, dtype=torch.float64), "out must have the dtype of x"),
    (torch.zeros(30), "out must be 2-D"),
])
def test_add_out_bad_input(out, match):
    with pytest.raises(RuntimeError, match=match):
        ops.grouped_lora_add_out(out, **_bad())


def test_add_out_opcheck():
    x, a, b, off, rs = make(17, 3, 4, 8, 6, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_add_out, (torch.randn(17, 6), x, a, b, off, 0.5, rs))
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_add_out, (torch.randn(17, 6), x, a, b, off, 0.5, None))


def test_add_out_compiles():
    x, a, b, off, rs = make(17, 3, 4, 8, 6, torch.float32, "cpu")

    def f(base, x, a, b, off, rs):
        y = base * 2
        torch.ops.mole_ext.grouped_lora_add_out(y, x, a, b, off, 0.5, rs)
        return y

    base = torch.randn(17, 6)
    assert_close(torch.compile(f, fullgraph=True)(base, x, a, b, off, rs), f(base, x, a, b, off, rs))


def test_mole_projection_inference_uses_the_same_math():
    from mole_ext import functional
    from mole_ext.reference import Projection
    x, a, b, off, rs = make(97, 3, 8, 16, 24, torch.float32, "cpu", kind="skewed")
    w = torch.randn(24, 16)
    proj = Projection(w, None, a.requires_grad_(), b)
    with_grad = functional.mole_projection(x, proj, off, 0.5, rs)
    with torch.no_grad():
        no_grad = functional.mole_projection(x, proj, off, 0.5, rs)
    assert with_grad.requires_grad and not no_grad.requires_grad
    assert_equal(no_grad, with_grad.detach())
