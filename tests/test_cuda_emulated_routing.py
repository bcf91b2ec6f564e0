"""The routing CUDA kernels (csrc/cuda/router.cu, permute.cu, load_balance.cu), EXECUTED on the CPU.

The same emulator and source transform as test_cuda_emulated.py (see tests/cuda_emu/README.md): the
real, current sources are transformed (launches, static and dynamic __shared__ declarations),
compiled as C++ against tests/cuda_emu with the alignment sanitizer on (any misaligned access in a
kernel fails the launch, as it faults on a GPU), and registered as torch.ops.mole_cuda_emu_routing.*
(CPU tensors stand in for CUDA ones). The results are compared with mole_ext's CPU kernels:

  * router_top1: probs and expert BIT-identical (on a GPU probs may differ by CUDA's expf, within
    2 ulp; here both sides call glibc's expf, so every other operation is compared bit for bit),
    for every register-kernel size (K <= 64, float64 <= 32) and the generic kernel, exact ties,
    NaN and infinite logits; router_top1_backward bit-identical (the source's claim).
  * permute: x_sorted, sorted_token and offsets bit-identical, on the tile path (tiles of 64
    tokens and grown ones) and the device-sort path, int32 / int64 ids, empty experts; invalid ids
    reported and sorted after every valid row. permute_rows / unpermute bit-identical, every row
    copy width (16 / 8 / 4 / 2 / 1 bytes) including misaligned bases; bad and repeated entries.
  * load_balance_loss: the loss to float64 rounding (the source's claim: only the summation order
    differs) and bit-identical run to run in any block / thread order; the gradient bit-identical,
    both partial-sum layouts (K <= 128 and K > 128), with and without a mask; an invalid id
    leaves its row out (zero gradient row) and is reported.

The error slots' host side is emu_support.cpp's (errors.cu's semantics and messages): in validate
mode (the default here) an op raises what its kernels reported; with set_validate(False) the report
stays pending until check_errors() or the next op, as errors.cu's lazy mode.

MOLE_EXT_EMU_CSRC=/path/to/copy/of/csrc runs the suite against a copy of the csrc tree (e.g. with a
planted bug, to see it fail). The build lives in .cache/cuda_emu/mole_cuda_emu_routing-<hash>/.
"""

from __future__ import annotations

import re

import pytest
import torch

from helpers import load_balance_inputs as lb_inputs
from test_cuda_emulated import EMU, PAD, SANITIZE_ALIGNMENT, Emulated, build_library, code_only, csrc_root

ops_cpu = torch.ops.mole_ext
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
LOSS_RTOL = {torch.float32: 2.5e-7, torch.float64: 1e-14}
ROUTING_SOURCES = ("router.cu", "permute.cu", "load_balance.cu")


def build_routing() -> Emulated:
    root = csrc_root()
    return build_library("mole_cuda_emu_routing", [root / "cuda" / f for f in ROUTING_SOURCES],
                         [EMU / "emu_ops_routing.cpp", root / "checks.cpp"], SANITIZE_ALIGNMENT)


@pytest.fixture(scope="session")
def remu_build() -> Emulated:
    # A TransformError or a compiler error is an error of every test that uses it: never a skip.
    return build_routing()


@pytest.fixture
def remu(remu_build):
    ops = remu_build.ops
    ops.configure(132, 0, 0, 1)
    ops.set_validate(True)
    yield remu_build
    ops.configure(132, 0, 0, 1)
    ops.set_validate(True)
    ops.check_errors()  # a test must not leave a reported error pending


# ---- helpers ------------------------------------------------------------------------------------

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.view(_INT_VIEW[t.element_size()])


def assert_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Same shape, dtype and bits (the sign of zero included), except that any NaN equals any NaN:
    x86 takes a NaN result's payload from one operand by position, and the compiler may swap the
    operands of a commutative operation (a GPU returns one canonical NaN anyway)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    diff = bits(got) != bits(want)
    if got.is_floating_point():
        diff &= ~(got.isnan() & want.isnan())
    diff = diff.flatten()
    if diff.any():
        i = int(diff.nonzero()[0])
        raise AssertionError(f"{what}: {int(diff.sum())}/{diff.numel()} elements differ in their bits; first at flat "
                             f"index {i}: got {got.flatten()[i].item()!r}, want {want.flatten()[i].item()!r}")


def padded(t: torch.Tensor, misalign: int = 0) -> torch.Tensor:
    """A copy of t inside a poisoned buffer (PAD elements before and after; `misalign` more in front):
    NaN around float data, -1 (an invalid id / index) around integers, so an out-of-bounds read shows
    up in the result or as a reported error."""
    fill = float("nan") if t.is_floating_point() else (True if t.dtype == torch.bool else -1)
    buf = torch.full((t.numel() + 2 * PAD + misalign,), fill, dtype=t.dtype)
    v = buf[PAD + misalign: PAD + misalign + t.numel()].view(t.shape)
    v.copy_(t)
    return v


def instances(emu: Emulated) -> dict:
    return dict(emu.stats()["instances"])


def ran_since(emu: Emulated, before: dict) -> set[str]:
    """Kernel specialisations launched since `before` = instances(emu)."""
    return {k for k, v in emu.stats()["instances"].items() if v > before.get(k, 0)}


# ---- the emulator's new rules (dynamic shared memory, match / ballot, atomics, alignment) -------

@pytest.mark.parametrize("name,expect", [
    ("match_any_divergent", r"reached by 16 of the 32 lanes"),
    ("dynamic_smem_overflow", r"past the end of the 1020 bytes of dynamic shared memory"),
    ("dynamic_smem_too_big", r"need more than 49152 bytes"),
    # the uint2 copy's own check, or (first, in this build) the sanitizer's
    ("misaligned_vec8", r"8-byte vector load from a misaligned address|misaligned reference binding to address "
                        r"0x[0-9a-f]+ for type 'const struct uint2', which requires 8-byte alignment"),
    ("misaligned_scalar", r"misaligned load of address 0x[0-9a-f]+ for type 'const unsigned int', which requires "
                          r"4-byte alignment \(.*emu_support.cpp:\d+\) \[kernel misaligned_scalar"),
])
def test_emulator_enforces_cuda_rules(remu, name, expect):
    assert remu.ops.sanitize_alignment()
    with pytest.raises(RuntimeError, match=expect):
        remu.ops.selftest(name)


def test_emulator_warp_votes_dynamic_shared_memory_and_atomics(remu):
    ops = remu.ops
    r = ops.selftest("match_and_ballot")
    t = torch.arange(256)
    want_match = torch.zeros(256, dtype=torch.long)
    for i in range(32):  # warp 0: key t % 5
        want_match[i] = sum(1 << j for j in range(32) if j % 5 == i % 5)
    for i in range(32, 256):  # other warps: lanes < 7 share a key, the others are alone
        lane = i % 32
        want_match[i] = 0x7F if lane < 7 else 1 << lane
    assert torch.equal(r[:256], want_match)
    ballot = torch.tensor([sum(1 << j for j in range(32) if (w * 32 + j) % 3 == 0) for w in range(8)])
    assert torch.equal(r[256:512], ballot.repeat_interleave(32))
    anyall = torch.tensor([(1 if w == 1 else 0) + (2 if w != 3 else 0) for w in range(8)])
    assert torch.equal(r[512:768], anyall.repeat_interleave(32))
    # dynamic shared memory: written, read back by the neighbour, 16-byte aligned and not 32
    d = ops.selftest("dynamic_smem")
    assert torch.equal(d[:256], ((t + 1) % 256).float()) and d[256].item() == 16
    assert ops.selftest("dynamic_smem_unwritten")[:256].isnan().all()  # poisoned before every block
    assert torch.equal(ops.selftest("dynamic_smem_fits")[:256], torch.full((256,), 2.0))
    ops.reset_stats()
    h = ops.selftest("atomics")
    assert torch.equal(h, torch.tensor([4 * ((256 - i + 6) // 7) for i in range(7)], dtype=torch.int32))
    assert remu.stats()["atomics"] == 1024


def test_transform_matches_the_routing_sources(remu):
    for src in remu.sources:
        text = src.path.read_text()
        assert len(src.launches) == len(re.findall(r"<<<", code_only(text))), src.display
        assert {launch.name for launch in src.launches} == src.kernels, f"{src.display}: a kernel is never launched"
    permute = next(s for s in remu.sources if s.path.name == "permute.cu")
    assert any(len(launch.config) > 2 and launch.config[2] == "smem" for launch in permute.launches), \
        "permute's tile kernels no longer take dynamic shared memory: update this test"


# ---- router_top1 --------------------------------------------------------------------------------

# every side of every register-kernel boundary: KMAX 4 / 8 / 16 / 32 / 64 (float64: up to 32; the
# backward up to 16), then the generic kernel
ROUTER_KS = [1, 2, 3, 4, 5, 8, 9, 16, 17, 32, 33, 64, 65, 100]


def special_rows(k: int) -> torch.Tensor:
    """Exact ties, NaN, infinities, huge and tiny logits in a row of k."""
    nan, inf = float("nan"), float("inf")
    rows = [torch.full((k,), 2.0), torch.zeros(k), torch.full((k,), -inf), torch.full((k,), inf),
            torch.full((k,), nan)]
    for j in {0, k // 2, k - 1}:
        for v in (nan, inf, -inf, 1e30, -1e30, 1e-45):
            r = torch.linspace(-1, 1, k)
            r[j] = v
            rows.append(r)
    if k >= 3:
        tie = torch.linspace(-2, 0.5, k)
        tie[1] = tie[k - 1] = 3.0  # the lower index wins
        rows.append(tie)
        both = torch.zeros(k)
        both[0], both[k - 1] = inf, nan
        rows.append(both)
    return torch.stack(rows)


def check_router(emu, logits: torch.Tensor, label: str) -> None:
    probs, expert = emu.ops.router_top1(logits)
    cprobs, cexpert = ops_cpu.router_top1(logits)
    assert_bits(probs, cprobs, f"{label}: probs")
    assert_bits(expert, cexpert, f"{label}: expert")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_router_forward_bit_identical_to_cpu(remu, dtype):
    before = instances(remu)
    for k in ROUTER_KS:
        g = torch.Generator().manual_seed(k)
        for n in (1, 33, 300):  # 300: three blocks of 128 threads, the last one partial
            logits = (torch.randn(n, k, generator=g) * 3).to(dtype)
            check_router(remu, padded(logits), f"{dtype} N={n} K={k}")
        special = special_rows(k).to(dtype)
        check_router(remu, padded(special), f"{dtype} K={k} special values")
        # the CPU kernel's documented choices on the special rows
        _, expert = remu.ops.router_top1(special)
        assert expert[0] == 0 and expert[1] == 0  # an all-equal row: the lowest index
        if k >= 3:
            assert expert[-2] == 1 and expert[-1] == 0  # tie at 3.0 -> index 1; [inf, .., nan]: exp(nan) = nan
    ran = ran_since(remu, before)
    scalar = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "c10::BFloat16",
              torch.float16: "c10::Half"}[dtype]
    acc = "double" if dtype == torch.float64 else "float"
    kmaxes = [4, 8, 16, 32] + ([] if dtype == torch.float64 else [64])
    want = {f"router_top1_regs_kernel<{scalar}, {acc}, {m}>" for m in kmaxes}
    want.add(f"router_top1_generic_kernel<{scalar}, {acc}>")
    missing = [w for w in want if not any(r.endswith(w) for r in ran)]
    assert not missing, f"kernel specialisations that never ran: {missing}"


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_router_backward_bit_identical_to_cpu(remu, dtype):
    before = instances(remu)
    for k in ROUTER_KS:
        g = torch.Generator().manual_seed(100 + k)
        for n in (1, 33, 300):
            probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1).to(dtype)
            grad = torch.randn(n, k, generator=g).to(dtype)
            out = remu.ops.router_top1_backward(padded(grad), padded(probs))
            assert_bits(out, ops_cpu.router_top1_backward(grad, probs), f"{dtype} N={n} K={k}: grad_logits")
    ran = ran_since(remu, before)
    assert sum("router_top1_backward_regs_kernel" in r for r in ran) == 3  # KMAX 4, 8, 16
    assert any("router_top1_backward_generic_kernel" in r for r in ran)


def test_router_strided_mixed_and_empty(remu):
    base = torch.randn(8, 301)
    logits = base.t()  # [301, 8], not contiguous
    check_router(remu, logits, "transposed logits")
    probs = torch.softmax(torch.randn(8, 200), 0).t()  # float32, not contiguous
    grad = torch.randn(200, 8).to(torch.bfloat16)  # converted to probs' dtype first
    assert_bits(remu.ops.router_top1_backward(grad, probs), ops_cpu.router_top1_backward(grad, probs), "mixed")
    for dtype in (torch.float32, torch.bfloat16):
        p, e = remu.ops.router_top1(torch.empty(0, 5, dtype=dtype))
        assert p.shape == (0, 5) and e.shape == (0,) and e.dtype == torch.int32
        assert remu.ops.router_top1_backward(torch.empty(0, 5), torch.empty(0, 5)).shape == (0, 5)


# ---- permute ------------------------------------------------------------------------------------

def routing(n: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "uniform":
        return torch.randint(0, k, (n,), generator=gen)
    if kind == "empty_experts":  # only even experts get tokens
        return (torch.randint(0, (k + 1) // 2, (n,), generator=gen) * 2).clamp_max(k - 1)
    if kind == "skewed":  # 99% on the last expert
        e = torch.randint(0, k, (n,), generator=gen)
        return torch.where(torch.rand(n, generator=gen) < 0.99, torch.full_like(e, k - 1), e)
    raise ValueError(kind)


def check_permute(emu, x, expert, k, label, misalign=0):
    got = emu.ops.permute(padded(x, misalign), padded(expert), k)
    want = ops_cpu.permute(x, expert, k)
    for name, a, b in zip(("x_sorted", "sorted_token", "offsets"), got, want):
        assert_bits(a, b, f"{label}: {name}")
    return got


# (n, k, kind, path): path "tiles" (64-token tiles), "big_tiles" (grown past 64), "sort"
PERMUTE_CASES = [
    (1, 1, "uniform", "tiles"),
    (33, 3, "empty_experts", "tiles"),
    (97, 8, "skewed", "tiles"),
    (1025, 8, "uniform", "tiles"),
    (1025, 1024, "empty_experts", "tiles"),
    (5000, 1024, "uniform", "big_tiles"),
    (1, 1500, "uniform", "sort"),
    (3000, 1500, "empty_experts", "sort"),
    (130_000, 1024, "skewed", "sort"),  # K <= 1024, but tiles would pass 2048 tokens
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("n,k,kind,path", PERMUTE_CASES, ids=[f"N{c[0]}-K{c[1]}-{c[2]}" for c in PERMUTE_CASES])
def test_permute_bit_identical_to_cpu(remu, n, k, kind, path, index_dtype):
    tile_tokens, num_tiles, uses_tiles = remu.ops.permute_plan(n, k)
    assert uses_tiles == (path != "sort")
    if path == "big_tiles":
        assert tile_tokens > 64 and num_tiles * (k + 1) <= 1 << 16
    gen = torch.Generator().manual_seed(n + k)
    expert = routing(n, k, kind, gen).to(index_dtype)
    d = 2 if n > 10_000 else 24
    x = torch.randn(n, d, generator=gen).to(torch.bfloat16)
    remu.ops.reset_stats()
    check_permute(remu, x, expert, k, f"N={n} K={k} {kind} {index_dtype}")
    launched = remu.stats()["launch"]
    if path == "sort":
        assert launched.get("flag_bad_experts_kernel") == 1 and "tile_kernel" not in launched
    else:
        assert launched.get("tile_kernel") == 2 and launched.get("scan_kernel") == 1
        assert remu.stats()["dynamic_smem_launches"] == 2


def test_permute_no_rows(remu):
    for k in (3, 1500):
        for index_dtype in (torch.int32, torch.int64):
            xs, st, off = remu.ops.permute(torch.empty(0, 4), torch.empty(0, dtype=index_dtype), k)
            assert xs.shape == (0, 4) and st.shape == (0,) and st.dtype == torch.int32
            assert_bits(off, torch.zeros(k + 1, dtype=torch.int32), "offsets of no rows")


def test_permute_non_contiguous_inputs(remu):
    n, d, k = 300, 40, 6
    x = torch.randn(d, n).t()
    expert = torch.randint(0, k, (2 * n,))[::2]
    assert not x.is_contiguous() and not expert.is_contiguous()
    got = remu.ops.permute(x, expert, k)
    for a, b in zip(got, ops_cpu.permute(x, expert, k)):
        assert_bits(a, b, "non-contiguous")


def expected_vec(row_bytes: int, *addresses: int) -> int:
    for v in (16, 8, 4, 2):
        if row_bytes % v == 0 and all(a % v == 0 for a in addresses):
            return v
    return 1


VEC_NAME = {16: "uint4", 8: "uint2", 4: "unsigned int", 2: "short unsigned int", 1: "unsigned char"}

# (dtype, d, misalign in elements): 16-byte rows, rows that are not a multiple of 16 bytes, bases
# that are not 16-byte aligned
ROW_CASES = [
    (torch.bfloat16, 64, 0),   # 128 B rows: 16 bytes
    (torch.float16, 64, 1),    # base 2 mod 16: 2 bytes
    (torch.float16, 64, 2),    # 4 bytes
    (torch.float16, 64, 4),    # 8 bytes
    (torch.float32, 3, 0),     # 12 B rows: 4 bytes
    (torch.float64, 1, 0),     # 8 B rows
    (torch.bfloat16, 3, 0),    # 6 B rows: 2 bytes
    (torch.int8, 3, 0),        # 3 B rows: 1 byte
    (torch.bool, 33, 0),
    (torch.int64, 5, 1),       # 40 B rows, base 8 mod 16
    (torch.float32, 1000, 3),  # long rows (several unrolled steps per thread), base 12 mod 16
    (torch.float32, 0, 0),     # no bytes
]


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype,d,misalign", ROW_CASES, ids=[f"{c[0]}-d{c[1]}-m{c[2]}".replace("torch.", "")
                                                            for c in ROW_CASES])
def test_row_moves_bit_identical_to_cpu(remu, dtype, d, misalign, index_dtype):
    gen = torch.Generator().manual_seed(d * 10 + misalign)
    n, k = 97, 5
    x = (torch.randn(n, d, generator=gen) * 50).to(dtype)
    expert = torch.randint(0, k, (n,), generator=gen).to(index_dtype)
    perm = torch.randperm(n, generator=gen).to(index_dtype)
    xp = padded(x, misalign)
    before = instances(remu)
    check_permute(remu, x, expert, k, f"permute {dtype} d={d}", misalign)
    out = remu.ops.permute_rows(xp, padded(perm))
    assert_bits(out, ops_cpu.permute_rows(x, perm), f"permute_rows {dtype} d={d}")
    back = remu.ops.unpermute(out, perm)
    assert_bits(back, ops_cpu.unpermute(out, perm), f"unpermute {dtype} d={d}")
    assert_bits(back, x, "unpermute(permute_rows(x))")
    assert_bits(remu.ops.unpermute(xp, padded(perm)), ops_cpu.unpermute(x, perm), f"unpermute {dtype} d={d} (input)")
    ran = ran_since(remu, before)
    if d == 0:
        assert not any("move_rows_kernel" in r for r in ran)
        return
    row_bytes = d * x.element_size()
    # inputs: xp (maybe misaligned) -> outputs allocated by the op (256-byte aligned)
    vec_in = VEC_NAME[expected_vec(row_bytes, xp.data_ptr(), 256)]
    vec_out = VEC_NAME[expected_vec(row_bytes, out.data_ptr(), 256)]
    idx = "int" if index_dtype == torch.int32 else "long int"
    want = {f"move_rows_kernel<{vec_in}, int, false>",     # permute: by sorted_token (int32)
            f"move_rows_kernel<{vec_in}, {idx}, false>",   # permute_rows
            f"move_rows_kernel<{vec_out}, {idx}, true>",   # unpermute(out)
            f"move_rows_kernel<{vec_in}, {idx}, true>"}    # unpermute(xp)
    missing = [w for w in want if not any(r.endswith(w) for r in ran)]
    assert not missing, f"row copies that did not run (or took another width): {missing}; ran {sorted(ran)}"


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
def test_permute_rows_and_unpermute_match_cpu(remu, index_dtype):
    for n in (1, 33, 1025):
        gen = torch.Generator().manual_seed(n)
        x = torch.randn(n, 24, generator=gen)
        perm = torch.randperm(n, generator=gen).to(index_dtype)
        assert_bits(remu.ops.permute_rows(padded(x), padded(perm)), ops_cpu.permute_rows(x, perm), f"permute_rows {n}")
        assert_bits(remu.ops.unpermute(padded(x), padded(perm)), ops_cpu.unpermute(x, perm), f"unpermute {n}")
        assert remu.ops.permute_rows(torch.empty(0, 3), torch.empty(0, dtype=index_dtype)).shape == (0, 3)


# ---- bad ids: reported, never out of bounds -------------------------------------------------------

@pytest.mark.parametrize("k", [4, 1500])
@pytest.mark.parametrize("bad", [-1, "k", 1 << 40])
def test_permute_bad_expert_raises_in_validate_mode(remu, k, bad):
    bad = k if bad == "k" else bad
    for index_dtype in (torch.int32, torch.int64):
        if index_dtype == torch.int32 and bad == 1 << 40:
            continue
        expert = torch.randint(0, min(k, 4), (100,)).to(index_dtype)
        expert[37] = bad
        with pytest.raises(RuntimeError, match=r"expert ids must be in \[0, num_experts\): found "
                                               rf"{bad} at position 37 \(valid range \[0, {k}\)\)"):
            remu.ops.permute(torch.randn(100, 8), expert, k)


def expected_routing_of_bad_ids(expert: torch.Tensor, k: int):
    """Bad ids go to bin K after every valid row, in token order; offsets[K] = valid rows."""
    e = expert.long()
    bins = torch.where((e >= 0) & (e < k), e, torch.full_like(e, k))
    st = torch.sort(bins, stable=True).indices.to(torch.int32)
    off = torch.searchsorted(bins.sort().values, torch.arange(k + 1), out_int32=True)
    return st, off


def test_permute_bad_expert_lazy_mode(remu):
    """Without validate mode the op returns, rows all defined; the error waits for check_errors or
    for the next op (which raises it before doing anything)."""
    ops = remu.ops
    ops.set_validate(False)
    x = torch.randn(10, 4)
    expert = torch.tensor([1, -1, 0, 7, 1, 2, 99, 0, 2, 1])
    xs, st, off = ops.permute(x, expert, 3)
    assert off.tolist() == [0, 2, 5, 7]
    assert st.tolist() == [2, 7, 0, 4, 9, 5, 8, 1, 3, 6]
    assert_bits(xs, x[st.long()], "x_sorted follows sorted_token")
    with pytest.raises(RuntimeError, match="found -1|found 7|found 99"):
        ops.check_errors()
    ops.check_errors()  # cleared
    ops.permute(x, expert, 3)
    with pytest.raises(RuntimeError, match="an earlier op's error.*expert ids must be in"):
        ops.permute(x, expert.clamp(0, 2), 3)
    got = ops.permute(x, expert.clamp(0, 2), 3)  # and then works
    assert_bits(got[1], ops_cpu.permute(x, expert.clamp(0, 2), 3)[1], "after the error")
    # the sort path and larger tile cases sort bad ids the same way
    for n, k in ((3000, 1500), (1025, 8), (5000, 1024)):
        gen = torch.Generator().manual_seed(k)
        expert = torch.randint(0, k, (n,), generator=gen)
        bad = torch.randperm(n, generator=gen)[:n // 10]
        expert[bad] = torch.randint(k, 3 * k, (bad.numel(),), generator=gen) * torch.where(
            torch.rand(bad.numel(), generator=gen) < 0.5, 1, -1)
        x = torch.randn(n, 6, generator=gen)
        xs, st, off = ops.permute(padded(x), padded(expert.to(torch.int32)), k)
        want_st, want_off = expected_routing_of_bad_ids(expert, k)
        assert_bits(st, want_st, f"sorted_token with bad ids N={n} K={k}")
        assert_bits(off, want_off, f"offsets with bad ids N={n} K={k}")
        assert_bits(xs, x[want_st.long()], f"x_sorted with bad ids N={n} K={k}")
        with pytest.raises(RuntimeError, match="permute: expert ids must be in"):
            ops.check_errors()


def test_permute_rows_bad_and_repeated_entries(remu):
    ops = remu.ops
    x = torch.randn(8, 4)
    for index_dtype in (torch.int32, torch.int64):
        with pytest.raises(RuntimeError, match=r"permute_rows: .*out of range: found 8 at position 7"):
            ops.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 8], dtype=index_dtype))
        with pytest.raises(RuntimeError, match=r"unpermute: .*out of range: found -1 at position 6"):
            ops.unpermute(x, torch.tensor([0, 1, 2, 3, 4, 5, -1, 7], dtype=index_dtype))
        ops.reset_stats()
        with pytest.raises(RuntimeError, match=r"permute_rows: .*hit other than once: row [67] of 8 is hit [02] times"):
            ops.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6], dtype=index_dtype))
        assert remu.stats()["atomics"] == 8  # validate mode counts the hits with integer atomics
        with pytest.raises(RuntimeError, match=r"unpermute: .*hit other than once"):
            ops.unpermute(x, torch.tensor([0, 0, 2, 3, 4, 5, 6, 7], dtype=index_dtype))
    ops.set_validate(False)
    # lazily: the gathered row of a bad index is zero, the scatter skips it; repeats go unseen
    out = ops.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 99]))
    assert_bits(out[:7], x[:7], "good rows")
    assert_bits(out[7], torch.zeros(4), "row of a bad index")
    with pytest.raises(RuntimeError, match="out of range: found 99 at position 7"):
        ops.check_errors()
    y = ops.unpermute(x, torch.tensor([1, 2, 3, 4, 5, 6, 7, -5]))
    assert_bits(y[1:], x[:7], "scattered rows")
    with pytest.raises(RuntimeError, match="out of range: found -5 at position 7"):
        ops.check_errors()
    ops.reset_stats()
    ops.permute_rows(x, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))
    assert remu.stats()["atomics"] == 0
    ops.check_errors()  # not a reported error without validate mode
    # rows of no bytes: nothing is copied, the bad index is still reported
    for op in (ops.permute_rows, ops.unpermute):
        op(torch.empty(8, 0), torch.tensor([0, 1, 2, 3, 4, 5, 6, 99]))
        with pytest.raises(RuntimeError, match="out of range: found 99"):
            ops.check_errors()


# ---- load_balance_loss --------------------------------------------------------------------------



def acc_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_load_balance(emu, probs, expert, mask, label, index_dtype=torch.int64):
    e = expert.to(index_dtype)
    mp = None if mask is None else padded(mask)
    loss = emu.ops.load_balance_loss(padded(probs), padded(e), mp)
    want = ops_cpu.load_balance_loss(probs, expert, mask)
    assert loss.shape == () and loss.dtype == want.dtype, label
    rtol = LOSS_RTOL[want.dtype]
    assert abs(loss.item() - want.item()) <= rtol * abs(want.item()), \
        f"{label}: loss {loss.item()!r} != {want.item()!r}"
    # 0.1 and 1/3 are inexact, so the order of g * K * count / M^2 shows in the bits
    for g in (1.0, -0.75, 0.1, 1 / 3):
        grad_loss = torch.tensor(g, dtype=acc_of(probs.dtype))
        grad = emu.ops.load_balance_loss_backward(grad_loss, padded(probs), padded(e), mp)
        assert_bits(grad, ops_cpu.load_balance_loss_backward(grad_loss, probs, expert, mask), f"{label}: grad g={g}")
    return loss


# (n, k): K <= 128 splits each column over row lanes (K = 1, 3, 8, 128), K > 128 gives threads
# whole columns (129, 300: more than one column per thread); several partial blocks everywhere
# but N = 1 / 33 with small K.
LB_SHAPES = [(1, 1), (33, 3), (1025, 8), (5000, 3), (700, 128), (600, 129), (400, 300), (33, 300)]


@pytest.mark.parametrize("mask_kind", ["none", "random", "all_false"])
@pytest.mark.parametrize("n,k", LB_SHAPES, ids=[f"N{n}-K{k}" for n, k in LB_SHAPES])
def test_load_balance_matches_cpu(remu, n, k, mask_kind):
    for dtype in FLOATS:
        probs, expert, mask = lb_inputs(n, k, dtype, mask_kind, n * 31 + k, skew=0.9 if n == 5000 else None)
        loss = check_load_balance(remu, probs, expert, mask, f"N={n} K={k} {dtype} mask={mask_kind}",
                                  torch.int32 if dtype == torch.bfloat16 else torch.int64)
        if mask_kind == "all_false":
            assert loss.item() == 0


def test_load_balance_no_rows_and_grad_loss_dtypes(remu):
    for dtype in (torch.float32, torch.float64):
        probs = torch.empty(0, 4, dtype=dtype)
        expert = torch.empty(0, dtype=torch.long)
        loss = remu.ops.load_balance_loss(probs, expert, None)
        assert loss.item() == 0 and loss.dtype == acc_of(dtype)
        assert remu.ops.load_balance_loss_backward(torch.tensor(1.0), probs, expert, None).shape == (0, 4)
    probs, expert, mask = lb_inputs(50, 3, torch.bfloat16, "random", 14)
    for g in (torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1e-3, dtype=torch.bfloat16), torch.tensor([0.3])):
        assert_bits(remu.ops.load_balance_loss_backward(g, probs, expert, mask),
                    ops_cpu.load_balance_loss_backward(g, probs, expert, mask), f"grad_loss {g.dtype}")


@pytest.mark.parametrize("k", [3, 300])
@pytest.mark.parametrize("bad", [-1, "k", 1 << 40])
def test_load_balance_bad_expert(remu, k, bad):
    """Validate mode raises; lazily the row is left out of every sum (zero gradient row) and the
    error waits for the next check."""
    bad = k if bad == "k" else bad
    ops = remu.ops
    n, b = (1025 if k < 128 else 400), 10
    for mask_kind in ("none", "random"):
        probs, expert, mask = lb_inputs(n, k, torch.float32, mask_kind, 15 + k)
        expert[b] = bad
        with pytest.raises(RuntimeError, match=rf"expert ids must be in \[0, K\) \(K = probs.size\(1\)\): found "
                                               rf"{bad} at position {b} "):
            ops.load_balance_loss(probs, expert, mask)
        with pytest.raises(RuntimeError, match=r"expert ids must be in \[0, K\)"):
            ops.load_balance_loss_backward(torch.tensor(1.0), probs, expert, mask)
        ops.set_validate(False)
        keep = torch.arange(n) != b
        if mask is not None:
            keep &= mask
        fixed = expert.clamp(0, k - 1)
        loss = ops.load_balance_loss(probs, expert, mask)
        want = ops_cpu.load_balance_loss(probs, fixed, keep)
        assert abs(loss.item() - want.item()) <= LOSS_RTOL[torch.float32] * abs(want.item()), "loss without the row"
        with pytest.raises(RuntimeError, match="load_balance_loss: expert ids"):
            ops.check_errors()
        for g in (1.0, -0.1):
            grad = ops.load_balance_loss_backward(torch.tensor(g), probs, expert, mask)
            assert_bits(grad, ops_cpu.load_balance_loss_backward(torch.tensor(g), probs, fixed, keep),
                        f"gradient with the bad row masked (g={g}, mask {mask_kind})")
            assert (grad[b] == 0).all()
            with pytest.raises(RuntimeError, match="load_balance_loss: expert ids"):
                ops.check_errors()
        ops.set_validate(True)


# ---- order independence and coverage --------------------------------------------------------------

def test_results_do_not_depend_on_block_or_thread_order(remu):
    """Blocks in grid / reverse / random order, the threads of a block forward / reverse / random
    between barriers and warp collectives: a missing barrier or __syncwarp, or a race, would change
    the bits (the permute's rank pass, the load-balance reductions)."""
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(1025, 40, generator=gen)
    expert = torch.randint(0, 8, (1025,), generator=gen)
    expert_big = torch.randint(0, 1024, (5000,), generator=gen)
    x_big = torch.randn(5000, 2, generator=gen)
    lb = [lb_inputs(5000, 3, torch.float32, "random", 22), lb_inputs(1025, 300, torch.float32, "random", 23)]
    logits = torch.randn(300, 17, generator=gen)
    runs = []
    for block_order, thread_order, seed in ((0, 0, 1), (1, 1, 1), (2, 2, 5), (2, 2, 6)):
        remu.ops.configure(132, block_order, thread_order, seed)
        r = list(remu.ops.permute(x, expert, 8)) + list(remu.ops.permute(x_big, expert_big, 1024))
        r += list(remu.ops.router_top1(logits))
        for probs, e, mask in lb:
            r.append(remu.ops.load_balance_loss(probs, e, mask))
            r.append(remu.ops.load_balance_loss_backward(torch.tensor(0.5), probs, e, mask))
        runs.append(r)
    for other in runs[1:]:
        for i, (a, b) in enumerate(zip(runs[0], other)):
            assert_bits(b, a, f"result {i} depends on the execution order")
    want = ops_cpu.permute(x, expert, 8)
    for a, b in zip(runs[0][:3], want):
        assert_bits(a, b, "permute in grid order")


def test_every_launch_site_ran(remu):
    """Every kernel launch of the three sources executed in this session, validate-mode checks and
    the row-less flag kernel included."""
    ops = remu.ops
    x = torch.randn(40, 3)
    perm = torch.randperm(40)
    ops.permute(x, torch.randint(0, 3, (40,)), 3)
    ops.permute(x, torch.randint(0, 3000, (40,)), 3000)
    ops.permute_rows(x, perm)
    ops.unpermute(x, perm)
    ops.permute_rows(torch.empty(40, 0), perm)
    for dtype in FLOATS:
        for k in (3, 100):
            p, _ = ops.router_top1(torch.randn(5, k).to(dtype))
            ops.router_top1_backward(torch.randn(5, k), p.to(dtype))
        probs, expert, mask = lb_inputs(40, 3, dtype, "random", 1)
        ops.load_balance_loss(probs, expert, mask)
        ops.load_balance_loss_backward(torch.tensor(1.0), probs, expert, mask)
    ran = set(remu.stats()["ever_at"])
    missing = [f"{src.display}:{launch.line} {launch.kernel}" for src in remu.sources for launch in src.launches
               if (src.display, launch.line) not in ran]
    assert not missing, f"launches never executed (add a case that reaches them): {missing}"
