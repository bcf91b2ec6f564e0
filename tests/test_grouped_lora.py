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
    # transposed (dense, non-contiguous) x and LoRA stacks: the kernels return contiguous gradients,
    # and the fake kernel must say the same strides (torch.compile checks them)
    xt, at_, bt = plain[0].t().contiguous().t(), plain[1].transpose(1, 2).contiguous().transpose(1, 2), \
        plain[2].transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward, (up, xt, at_, bt, off, 0.5, plain[3]))


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


def test_add_out_float32_is_base_plus_grouped_lora():
    # float32 accumulates in place (BLAS beta = 1), so only the order of the last addition differs
    x, a, b, off, rs = make(97, 3, 8, 33, 17, torch.float32, "cpu", kind="skewed")
    base = torch.randn(97, 17)
    out = base.clone()
    ops.grouped_lora_add_out(out, x, a, b, off, 1.25, rs)
    assert_close(out, base + ops.grouped_lora(x, a, b, off, 1.25, rs), rtol=1e-6, atol=1e-6)


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


# ---- grouped_lora_backward_add_out: the LoRA's dX lands on the base path's dX ------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,r,d_in,d_out", CASES)
@pytest.mark.parametrize("row_scale", [True, False])
def test_backward_add_out_matches_reference(device, dtype, n, k, r, d_in, d_out, row_scale):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    x, a, b, off, rs = make(n, k, r, d_in, d_out, dtype, device, kind="missing" if k > 2 else "uniform",
                            row_scale=row_scale)
    g = torch.Generator().manual_seed(2)
    up = torch.randn(n, d_out, generator=g).to(dtype).to(device)
    base_dx = torch.randn(n, d_in, generator=g).to(dtype).to(device)
    gx = base_dx.clone()
    ga, gb, grs = ops.grouped_lora_backward_add_out(gx, up, x, a, b, off, 0.75, rs)
    want_gx = base_dx.clone()
    want = ref.grouped_lora_backward_add_out(want_gx, up, x, a, b, off, 0.75, rs)
    assert_close(gx, want_gx, dtype=dtype)
    for got, exp in zip((ga, gb, grs), want):
        assert got.dtype == exp.dtype and got.shape == exp.shape
        assert_close(got, exp, dtype=dtype)
    # the weight gradients are grouped_lora_backward's, bit for bit (the same kernel)
    _, ga2, gb2, grs2 = torch.ops.mole_ext.grouped_lora_backward(up, x, a, b, off, 0.75, rs)
    assert_equal(ga, ga2)
    assert_equal(gb, gb2)
    assert_equal(grs, grs2)


def test_backward_add_out_float32_is_base_plus_grad_x():
    x, a, b, off, rs = make(97, 3, 8, 33, 17, torch.float32, "cpu", kind="skewed")
    up, base_dx = torch.randn(97, 17), torch.randn(97, 33)
    gx = base_dx.clone()
    ops.grouped_lora_backward_add_out(gx, up, x, a, b, off, 1.25, rs)
    want = base_dx + torch.ops.mole_ext.grouped_lora_backward(up, x, a, b, off, 1.25, rs)[0]
    assert_close(gx, want, rtol=1e-6, atol=1e-6)


def test_backward_add_out_bf16_rounds_once():
    """bf16: the sum is formed in float32 and rounded once, so it is at most one bf16 rounding
    from the exact sum (adding a separately rounded bf16 dX could be off by two)."""
    x, a, b, off, rs = make(64, 2, 8, 32, 16, torch.bfloat16, "cpu")
    up, base_dx = torch.randn(64, 16).bfloat16(), torch.randn(64, 32).bfloat16()
    gx = base_dx.clone()
    ops.grouped_lora_backward_add_out(gx, up, x, a, b, off, 0.5, rs)
    exact = base_dx.double() + ref._grouped_lora_backward_acc(up, x.double(), a.double(), b.double(), off, 0.5,
                                                              rs.double())[0]
    half_ulp = exact.abs() * 2.0 ** -8 + 1e-30  # bf16 has 8 significant bits: a rounding moves <= 2^-8 relative
    assert ((gx.double() - exact).abs() <= half_ulp * 1.01).all()


def test_backward_add_out_non_contiguous_grad_x_empty_experts_and_zero_rows():
    x, a, b, off, rs = make(33, 4, 8, 16, 24, torch.float32, "cpu", kind="missing")
    up = torch.randn(33, 24)
    base_dx = torch.randn(16, 33).t()
    gx = base_dx.clone()
    assert not gx.is_contiguous()
    ga, gb, _ = ops.grouped_lora_backward_add_out(gx, up, x, a, b, off, 0.5, rs)
    assert gx.stride() == base_dx.stride()
    assert_close(gx, base_dx + ref.grouped_lora_backward(up, x, a, b, off, 0.5, rs)[0])
    empty = [e for e in range(4) if off[e] == off[e + 1]]
    assert empty, "the 'missing' routing leaves an expert empty"
    for e in empty:
        assert_equal(ga[e], torch.zeros_like(ga[e]))
        assert_equal(gb[e], torch.zeros_like(gb[e]))
    x0, a0, b0, off0, rs0 = make(0, 3, 8, 16, 24, torch.float32, "cpu")
    ga0, gb0, grs0 = ops.grouped_lora_backward_add_out(torch.empty(0, 16), torch.empty(0, 24), x0, a0, b0, off0, 0.5,
                                                       rs0)
    assert_equal(ga0, torch.zeros_like(a0))
    assert_equal(gb0, torch.zeros_like(b0))
    assert grs0.shape == (0,)


@pytest.mark.parametrize("grad_x,grad_y,match", [
    (torch.zeros(6, 7), torch.zeros(6, 5), r"grad_x must be \[6, 8\]"),
    (torch.zeros(6, 8, dtype=torch.float64), torch.zeros(6, 5), "grad_x must have the dtype of x"),
    (torch.zeros(48), torch.zeros(6, 5), "grad_x must be 2-D"),
    (torch.zeros(6, 8), torch.zeros(6, 4), r"grad_y must be \[6, 5\]"),
])
def test_backward_add_out_bad_input(grad_x, grad_y, match):
    args = _bad()
    with pytest.raises(RuntimeError, match=match):
        ops.grouped_lora_backward_add_out(grad_x, grad_y, args["x"], args["lora_a"], args["lora_b"], args["offsets"],
                                          1.0, args["row_scale"])


def test_in_place_ops_bump_the_version_counter():
    # so a tensor autograd saved and one of these ops then changed makes the backward raise
    x, a, b, off, rs = make(17, 3, 4, 8, 6, torch.float32, "cpu")
    out, gx = torch.zeros(17, 6), torch.zeros(17, 8)
    ops.grouped_lora_add_out(out, x, a, b, off, 0.5, rs)
    torch.ops.mole_ext.grouped_lora_backward_add_out(gx, torch.randn(17, 6), x, a, b, off, 0.5, rs)
    assert out._version == 1 and gx._version == 1
    w = torch.randn(17, 6, requires_grad=True)
    y = w.exp()  # saves its output
    with torch.no_grad():
        ops.grouped_lora_add_out(y, x, a, b, off, 0.5, rs)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_backward_add_out_opcheck_and_no_double_backward():
    x, a, b, off, rs = make(17, 3, 4, 8, 6, torch.float32, "cpu")
    up = torch.randn(17, 6)
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward_add_out, (torch.randn(17, 8), up, x, a, b, off, 0.5,
                                                                            rs))
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward_add_out, (torch.randn(17, 8), up, x, a, b, off, 0.5,
                                                                            None))
    at_, bt = a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward_add_out, (torch.randn(17, 8), up, x, at_, bt, off,
                                                                            0.5, rs))


# ---- lora_linear: base GEMM + grouped LoRA in one op ---------------------------------------------

def make_linear(n, k, r, d_in, d_out, dtype, device, bias=True, kind="missing", seed=3):
    x, a, b, off, rs = make(n, k, r, d_in, d_out, dtype, device, kind=kind, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    w = (torch.randn(d_out, d_in, generator=g) / d_in ** 0.5).to(dtype).to(device)
    bb = torch.randn(d_out, generator=g).to(dtype).to(device) if bias else None
    return x, w, bb, a, b, off, rs


def unfused(x, w, bias, a, b, off, scaling, rs):
    """What mole_ext did before lora_linear: a linear and the grouped LoRA, added by autograd."""
    return torch.nn.functional.linear(x, w, bias) + ops.grouped_lora(x, a, b, off, scaling, rs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,k,r,d_in,d_out", CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_lora_linear_forward_and_gradients(device, dtype, n, k, r, d_in, d_out, bias):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    args = make_linear(n, k, r, d_in, d_out, dtype, device, bias=bias)
    x, w, bb, a, b, off, rs = args
    leaves = [t for t in (x, w, bb, a, b, rs) if t is not None]
    for t in leaves:
        t.requires_grad_()
    y = ops.lora_linear(x, w, bb, a, b, off, 0.75, rs)
    assert y.dtype == dtype and y.shape == (n, d_out)
    assert_close(y, ref.lora_linear(*(t.detach() if t is not None else None for t in args[:6]), 0.75, rs.detach()),
                 dtype=dtype)
    up = torch.randn(n, d_out, generator=torch.Generator().manual_seed(9)).to(dtype).to(device)
    got = torch.autograd.grad(y, leaves, up, allow_unused=True)
    # the oracle: the same function composed of float64 linear + reference grouped LoRA
    exp_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ex, ew, *rest = exp_leaves
    eb = rest.pop(0) if bias else None
    ea, ebb, ers = rest
    y64 = torch.nn.functional.linear(ex, ew, eb) + ref.grouped_lora(ex, ea, ebb, off, 0.75, ers)
    want = torch.autograd.grad(y64, exp_leaves, up.double(), allow_unused=True)
    for name, gt, wt, leaf in zip("x w bias a b rs".split() if bias else "x w a b rs".split(), got, want, leaves):
        assert gt is not None and gt.dtype == leaf.dtype, name
        # bf16: a few roundings of sums over in / out / tokens
        peak = float(wt.abs().max()) if wt.numel() else 0.0
        # float32 / bf16: sums over up to 1025 tokens, against a float64 oracle
        tol = {torch.bfloat16: dict(rtol=3e-2, atol=3e-2 * max(1.0, peak)),
               torch.float32: dict(rtol=1e-4, atol=2e-6 * max(1.0, peak))}.get(dtype, {})
        assert_close(gt.double(), wt, dtype=torch.float64 if dtype == torch.float64 else torch.float32, msg=name,
                     **tol)


def test_lora_linear_float32_equals_the_unfused_composition():
    x, w, bb, a, b, off, rs = make_linear(97, 3, 8, 33, 17, torch.float32, "cpu", kind="skewed")
    leaves = [t.requires_grad_() for t in (x, w, bb, a, b, rs)]
    up = torch.randn(97, 17)
    y = ops.lora_linear(x, w, bb, a, b, off, 1.5, rs)
    got = torch.autograd.grad(y, leaves, up)
    y2 = unfused(x, w, bb, a, b, off, 1.5, rs)
    want = torch.autograd.grad(y2, leaves, up)
    assert_close(y, y2)
    for gt, wt in zip(got, want):
        assert_close(gt, wt)


def test_lora_linear_with_a_separate_lora_input():
    """LoRA dropout: the base GEMM runs on x, the LoRA on lora_x; each gets its own gradient, and
    the frozen weight's input x is not saved (only lora_x is)."""
    x, w, bb, a, b, off, rs = make_linear(97, 3, 8, 33, 17, torch.float64, "cpu", kind="skewed")
    lx = torch.nn.functional.dropout(x, 0.3, True)
    x.requires_grad_()
    lx.requires_grad_()
    a.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_linear(x, w, bb, a, b, off, 1.5, rs, lx)
    assert not any(t.data_ptr() == x.data_ptr() for t in saved)
    assert any(t.data_ptr() == lx.data_ptr() for t in saved)
    up = torch.randn(97, 17, dtype=torch.float64)
    got = torch.autograd.grad(y, (x, lx, a), up)
    y2 = torch.nn.functional.linear(x, w, bb) + ref.grouped_lora(lx, a, b, off, 1.5, rs)
    assert_close(y, y2)
    for gt, wt in zip(got, torch.autograd.grad(y2, (x, lx, a), up)):
        assert_close(gt, wt)
    x11, w11, b11, a11, bb11, off11, rs11 = make_linear(11, 3, 2, 4, 5, torch.float64, "cpu")
    lx11 = torch.randn(11, 4, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (x11, w11, a11, rs11, lx11)]
    assert torch.autograd.gradcheck(
        lambda xx, ww, aa, rr, ll: ops.lora_linear(xx, ww, b11, aa, bb11, off11, 0.7, rr, ll), leaves)


def test_lora_linear_casts_x_to_the_compute_dtype():
    """Autocast's situation: float32 x, bf16 weights. The output and the LoRA math are bf16; x's
    gradient comes back in float32; only x itself is saved (no bf16 copy of it)."""
    x, w, bb, a, b, off, rs = make_linear(40, 2, 4, 16, 12, torch.float32, "cpu")
    w16, b16, a16, bb16 = (t.bfloat16() for t in (w, bb, a, b))
    x.requires_grad_()
    a16.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ops.lora_linear(x, w16, b16, a16, bb16, off, 0.5, rs)
    assert y.dtype == torch.bfloat16
    assert_equal(y, ops.lora_linear(x.detach().bfloat16(), w16, b16, a16.detach(), bb16, off, 0.5, rs))
    big = [t for t in saved if t.dim() == 2 and t.shape[0] == 40 and t.shape[1] == 16]
    assert len(big) == 1 and big[0].dtype == torch.float32 and big[0].data_ptr() == x.data_ptr()
    # besides x, only the LoRA's rank-r shrink (float32 [N, r], for the backward instead of x A^T)
    small = [t for t in saved if t.dim() == 2 and t.shape[0] == 40 and t.shape[1] != 16]
    assert [(tuple(t.shape), t.dtype) for t in small] == [((40, a.shape[1]), torch.float32)]
    gx, ga = torch.autograd.grad(y.float().sum(), (x, a16))
    assert gx.dtype == torch.float32 and ga.dtype == torch.bfloat16


def test_lora_linear_gradcheck_float64():
    x, w, bb, a, b, off, rs = make_linear(11, 3, 2, 4, 5, torch.float64, "cpu")
    leaves = [t.requires_grad_() for t in (x, w, bb, a, b, rs)]
    assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(t[0], t[1], t[2], t[3], t[4], off, 0.7, t[5]), leaves)
    assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(t[0], t[1], None, t[2], t[3], off, 0.7), leaves[:2] +
                                    leaves[3:5])


def test_lora_linear_opcheck():
    x, w, bb, a, b, off, rs = make_linear(17, 3, 4, 8, 6, torch.float32, "cpu")
    for t in (x, a, b, rs):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mole_ext.lora_linear, (x, w, bb, a, b, off, 0.5, rs))
    torch.library.opcheck(torch.ops.mole_ext.lora_linear, (x, w, None, a, b, off, 0.5, None))


def test_lora_linear_compiles():
    x, w, bb, a, b, off, rs = make_linear(33, 3, 4, 8, 6, torch.float32, "cpu")
    a.requires_grad_()
    x.requires_grad_()
    f = lambda x, a: ops.lora_linear(x, w, bb, a, b, off, 0.5, rs)
    y = torch.compile(f, fullgraph=True)(x, a)
    assert_close(y, f(x, a))
    got = torch.autograd.grad(y.square().sum(), (x, a))
    want = torch.autograd.grad(f(x, a).square().sum(), (x, a))
    for gt, wt in zip(got, want):
        assert_close(gt, wt)


def test_lora_linear_double_backward_is_refused():
    x, w, bb, a, b, off, rs = make_linear(9, 2, 2, 4, 5, torch.float64, "cpu")
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="lora_linear is not twice differentiable"):
        torch.autograd.grad(ops.lora_linear(x, w, bb, a, b, off, 1.0, rs).square().sum(), x, create_graph=True)


@pytest.mark.parametrize("kw,match", [
    (dict(weight=torch.randn(5, 7)), r"weight must be \[out_features, 8\]"),
    (dict(weight=torch.randn(5)), "weight must be 2-D"),
    (dict(bias=torch.randn(4)), r"bias must be \[5\]"),
    (dict(bias=torch.randn(5, dtype=torch.float64)), "bias must have the dtype of weight"),
    (dict(lora_a=torch.randn(2, 4, 8, dtype=torch.float64)), "lora_a must have the dtype of weight"),
    (dict(lora_b=torch.randn(2, 6, 4)), r"lora_b must be \[experts, 5, rank\]"),
    (dict(x=torch.randint(0, 3, (6, 8))), "x must be float32"),
    (dict(offsets=torch.tensor([0, 2, 5], dtype=torch.int32)), "offsets must be non-decreasing"),
    (dict(lora_x=torch.randn(6, 7)), r"lora_x must have the shape of x"),
    (dict(lora_x=torch.randint(0, 3, (6, 8))), "lora_x must be float32"),
])
def test_lora_linear_bad_input(kw, match):
    x, w, bb, a, b, off, rs = make_linear(6, 2, 4, 8, 5, torch.float32, "cpu")
    args = dict(x=x, weight=w, bias=bb, lora_a=a, lora_b=b, offsets=off, scaling=1.0, row_scale=rs)
    args.update(kw)
    with pytest.raises(RuntimeError, match=match):
        ops.lora_linear(**args)


# ---- the forward's saved shrink h (grouped_lora_h, lora_linear_h): the backward reads x once --------

def _grads(gx_ga_gb_grs):
    return [t.clone() for t in gx_ga_gb_grs]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("n,k,r,d_in,d_out,kind", [(0, 3, 8, 16, 24, "uniform"), (1, 1, 1, 5, 3, "uniform"),
                                                   (97, 3, 17, 33, 40, "missing"), (64, 4, 8, 24, 40, "one"),
                                                   (1025, 8, 8, 48, 40, "skewed")])
def test_saved_h_backward_is_bit_identical_to_recompute(device, dtype, n, k, r, d_in, d_out, kind):
    """grouped_lora_h returns grouped_lora's y bit for bit and the unscaled shrink X A_k^T in the
    accumulation dtype; both backward ops given that h return what they return recomputing it, bit
    for bit (empty experts, one token, all tokens on one expert, r not a multiple of 16, N = 0)."""
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is a CPU-only (gradcheck) dtype")
    x, a, b, off, rs = make(n, k, r, d_in, d_out, dtype, device, kind=kind)
    y, h = torch.ops.mole_ext.grouped_lora_h(x, a, b, off, 0.75, rs)
    assert h.shape == (n, r) and h.dtype == ref.acc_dtype(dtype) and h.is_contiguous()
    assert_equal(y, ops.grouped_lora(x, a, b, off, 0.75, rs))
    assert_close(h, ref.grouped_lora_h(x, a, b, off, 0.75, rs)[1], dtype=torch.float32 if dtype != torch.float64
                 else dtype)
    up = torch.randn(n, d_out, generator=torch.Generator().manual_seed(5)).to(dtype).to(device)
    for rsv in (rs, None):
        plain = torch.ops.mole_ext.grouped_lora_backward(up, x, a, b, off, 0.75, rsv)
        saved = torch.ops.mole_ext.grouped_lora_backward(up, x, a, b, off, 0.75, rsv, h)
        for p, s in zip(plain, saved):
            assert_equal(s, p)
        base = torch.randn(n, d_in, generator=torch.Generator().manual_seed(6)).to(dtype).to(device)
        gx_plain, gx_saved = base.clone(), base.clone()
        plain = torch.ops.mole_ext.grouped_lora_backward_add_out(gx_plain, up, x, a, b, off, 0.75, rsv)
        saved = torch.ops.mole_ext.grouped_lora_backward_add_out(gx_saved, up, x, a, b, off, 0.75, rsv, h)
        assert_equal(gx_saved, gx_plain)
        for p, s in zip(plain, saved):
            assert_equal(s, p)
    # the reference given h agrees with itself recomputing
    for p, s in zip(ref.grouped_lora_backward(up, x, a, b, off, 0.75, rs),
                    ref.grouped_lora_backward(up, x, a, b, off, 0.75, rs, h)):
        assert_close(s, p, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_autograd_saves_h_and_matches_the_recomputing_ops(device, dtype):
    """ops.grouped_lora / ops.lora_linear under autograd run the *_h ops (the shrink saved, x read
    once in the backward); their gradients equal those of the plain ops (which recompute) bit for bit.
    Without autograd they run the plain ops."""
    n, k, r, d_in, d_out = 97, 4, 8, 24, 40
    x, w, bb, a, b, off, rs = make_linear(n, k, r, d_in, d_out, dtype, device, kind="missing")
    up = torch.randn(n, d_out, generator=torch.Generator().manual_seed(2)).to(dtype).to(device)
    fns = {"grouped_lora": (lambda t: ops.grouped_lora(t[0], t[2], t[3], off, 0.5, t[4]),
                            lambda t: torch.ops.mole_ext.grouped_lora(t[0], t[2], t[3], off, 0.5, t[4])),
           "lora_linear": (lambda t: ops.lora_linear(t[0], t[1], bb, t[2], t[3], off, 0.5, t[4]),
                           lambda t: torch.ops.mole_ext.lora_linear(t[0], t[1], bb, t[2], t[3], off, 0.5, t[4]))}
    for name, (with_h, plain) in fns.items():
        results = []
        for fn in (with_h, plain):
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, a, b, rs)]
            y = fn(leaves)
            results.append([y.detach()] + list(torch.autograd.grad(y, [leaves[0], *leaves[2:]] + (
                [leaves[1]] if name == "lora_linear" else []), up)))
        for got, want in zip(*results):
            assert_equal(got, want)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    with prof:
        ops.grouped_lora(x, a, b, off, 0.5, rs)
        ops.lora_linear(x, w, bb, a, b, off, 0.5, rs)
    names = {e.name for e in prof.events()}
    assert "mole_ext::grouped_lora" in names and "mole_ext::grouped_lora_h" not in names
    assert "mole_ext::lora_linear" in names and "mole_ext::lora_linear_h" not in names


def test_saved_h_opcheck_and_bad_h():
    x, w, bb, a, b, off, rs = make_linear(17, 3, 4, 8, 6, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_h, (x, a, b, off, 0.5, rs))
    torch.library.opcheck(torch.ops.mole_ext.lora_linear_h, (x, w, bb, a, b, off, 0.5, rs))
    torch.library.opcheck(torch.ops.mole_ext.lora_linear_h, (x, w, None, a, b, off, 0.5, None, x * 0.5))
    for t in (x, a, b, rs):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_h, (x, a, b, off, 0.5, rs))
    plain = [t.detach() for t in (x, a, b, rs)]
    h = torch.ops.mole_ext.grouped_lora_h(*plain[:3], off, 0.5, plain[3])[1]
    up = torch.randn(17, 6)
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward, (up, *plain[:3], off, 0.5, plain[3], h))
    torch.library.opcheck(torch.ops.mole_ext.grouped_lora_backward_add_out,
                          (torch.randn(17, 8), up, *plain[:3], off, 0.5, plain[3], h))
    for bad, match in ((h[:, :3], r"h \(the forward's saved X A_k\^T\) must be \[17, 4\]"),
                       (h.double(), r"h \(the forward's saved X A_k\^T\) must be Float"),
                       (h[:16], r"must be \[17, 4\]")):
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mole_ext.grouped_lora_backward(up, *plain[:3], off, 0.5, plain[3], bad)
        with pytest.raises(RuntimeError, match=match):
            torch.ops.mole_ext.grouped_lora_backward_add_out(torch.randn(17, 8), up, *plain[:3], off, 0.5, plain[3],
                                                            bad)
