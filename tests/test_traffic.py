"""The DRAM traffic model of the grouped LoRA kernels (bench/traffic.py) on shapes worked out by
hand from its rules and from the kernels' tiling constants."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import traffic  # noqa: E402

# N = 1024, 256 -> 512, r = 16, K = 2, bf16; everything fits a 50 MiB L2
X, Y, A, B = 1024 * 256 * 2, 1024 * 512 * 2, 2 * 16 * 256 * 2, 2 * 512 * 16 * 2
RS, OFF, H, HP = 1024 * 4, 3 * 16, 1024 * 16 * 2, 1024 * 16 * 4
SMALL = traffic.Shape(1024, 256, 512, 16, 2)


def test_lora_tiles_rules():
    assert traffic.seg_tile_grid(1024, 2, 64) == 18
    assert traffic.split_plan(4096, 3, 32) == (1376, 3)  # ceil(ceil(4096 / 3) / 32) * 32
    assert traffic.split_plan(0, 5, 32) == (32, 1)
    # 18 row tiles want ceil(264 / 18) = 15 splits, but 256 // 256 = 1 piece is all the length allows
    assert traffic.want_splits(18, 264, 256, 256, 16) == 1
    assert traffic.want_splits(4, 264, 11008, 256, 16) == 16
    assert traffic.wgrad_chunk_rows(16384) == 2048 and traffic.wgrad_chunk_rows(100) == 64
    # csrc/tests/test_lora_tiles.cpp's cases of the same rule
    assert [traffic.wgrad_target_chunks(t, 264, k) for t, k in ((64, 4), (1, 4), (10, 1), (172, 4), (1000, 0))] \
        == [8, 64, 25, 8, 8]


def test_forward_bytes_by_hand():
    t = traffic.grouped_lora(SMALL, "fwd", saved_h=False)
    assert t.minimum == X + A + B + RS + OFF + Y
    # offsets; shrink (x once, A, one split of fp32 partials); finish_h; expand (Hs, B, y)
    assert [b for _, b in t.kernels] == [OFF, X + A + HP, HP + RS + H, H + B + Y]
    # what autograd runs (grouped_lora_h): finish_h also writes the unscaled H in fp32, an output
    saved = traffic.grouped_lora(SMALL, "fwd")
    assert saved.minimum == t.minimum + HP and [b for _, b in saved.kernels] == [OFF, X + A + HP, HP + RS + H + HP,
                                                                                 H + B + Y]
    assert saved.per_element("x") == (2, 2) and saved.per_element("y") == (2, 2)
    assert t.flops == 2 * 1024 * 16 * (256 + 512)
    acc = traffic.grouped_lora(SMALL, "fwd", accumulate=True, saved_h=False)
    assert acc.minimum - t.minimum == Y and acc.implementation - t.implementation == Y  # y read, then written


def test_backward_bytes_by_hand():
    # the plain op (the shrink runs again), two passes over dY (fp32, r >= 128 or the switch off)
    t = traffic.grouped_lora(SMALL, "bwd", saved_h=False, fused_dy=False)
    assert t.minimum == Y + X + A + B + RS + OFF + X + A + B + RS
    # weight-gradient chunks fill a wave of 264 blocks: dA's 4 tiles want 64 chunks, dB's 8 tiles
    # 264 / 8 - 2 = 31; either way the chunks are the 64-row minimum: 1024 / 64 + 2 segments
    chunks = 1024 // 64 + 2
    g_splits = 2  # 512 // 256 pieces of `out`
    rest = [H + X + chunks * 16 * 256 * 4, chunks * 16 * 256 * 4 + A,
            Y + H + chunks * 512 * 16 * 4, chunks * 512 * 16 * 4 + B, H + A + X]
    want = [OFF, X + A + HP, Y + B + g_splits * HP, (1 + g_splits) * HP + RS + 2 * H + RS] + rest
    assert [b for _, b in t.kernels] == want
    # x read twice (shrink, dA), dX written once; dY read twice (G, dB): per element 6 / 4 and 4 / 2
    assert t.per_element("x") == (6, 4) and t.per_element("dY") == (4, 2)
    # with the forward's saved H (what autograd runs): no shrink; finish_bwd reads H (fp32) instead
    saved = traffic.grouped_lora(SMALL, "bwd", fused_dy=False)
    assert saved.minimum == t.minimum + HP
    assert [b for _, b in saved.kernels] == [OFF, Y + B + g_splits * HP, (1 + g_splits) * HP + RS + 2 * H + RS] + rest
    assert saved.per_element("x") == (4, 4) and saved.per_element("dY") == (4, 2)
    acc = traffic.grouped_lora(SMALL, "bwd", accumulate=True)
    assert acc.per_element("x") == (6, 6)  # dX read and written


def test_fused_dy_pass_bytes_by_hand():
    """bf16, r <= 32 (the default): Hs first, then one pass over dY writes G partials per 256
    columns (2 here) and dB partials per row chunk (the pass's 2 column chunks want 64 chunks of a
    wave: the 64-row minimum, 1024 / 64 + 2 = 18), which dB's reduction sums."""
    t = traffic.grouped_lora(SMALL, "bwd")
    two = traffic.grouped_lora(SMALL, "bwd", fused_dy=False)
    assert t.minimum == two.minimum
    dbp = 18 * 512 * 16 * 4
    want = [OFF, HP + RS + H, Y + H + B + 2 * HP + dbp, (1 + 2) * HP + RS + 2 * H + RS,
            H + X + 18 * 16 * 256 * 4, 18 * 16 * 256 * 4 + A, dbp + B, H + A + X]
    assert [b for _, b in t.kernels] == want
    assert t.per_element("dY") == (2, 2) and two.per_element("dY") == (4, 2)
    # r >= 128 or a 4-byte dtype: two passes
    for shape in (traffic.Shape(1024, 256, 512, 128, 2), traffic.Shape(1024, 256, 512, 16, 2, elem=4)):
        assert traffic.grouped_lora(shape, "bwd").per_element("dY") == (4 * shape.elem // 2, shape.elem)


def test_fused_dy_pass_in_rank_chunks_by_hand():
    """bf16, 32 < r < 128: the fused pass in rank chunks of 32, adjacent blocks, so dY is read once;
    each chunk reads its columns of Hs and B, G and dB partials cover all r columns; a block covers
    512 columns of dY (two halves). At r = 64 the 1 column chunk x 2 rank chunks want 264 / 2 - 2 =
    130 -> 64 row chunks: the 64-row minimum, 18. Its G partials (8 r / 512 = 1 byte per element of
    dY) cost less than the second read of dY (2); at r = 128 they cost as much (lora_tiles.h's
    dy_pass_pays), so the default is two passes there and any_rank forces the pass."""
    r = 64
    h, hp, b = 1024 * r * 2, 1024 * r * 4, 2 * 512 * r * 2
    t = traffic.grouped_lora(traffic.Shape(1024, 256, 512, r, 2), "bwd")
    assert t.per_element("dY") == (2, 2)
    name, nbytes = t.kernels[2]
    assert "1 column chunk(s) of 512, 2 adjacent rank chunk(s), 18 row chunks" in name
    assert nbytes == Y + h + b + 1 * hp + 18 * 512 * r * 4
    assert traffic.dy_pass_pays(63, 256, 2) and not traffic.dy_pass_pays(64, 256, 2)
    assert traffic.dy_pass_pays(127, 512, 2) and not traffic.dy_pass_pays(128, 512, 2)
    assert [traffic.dy_pass_halves(r) for r in (1, 32, 33, 128)] == [1, 1, 2, 2]
    for r, any_rank, fused in ((40, False, True), (96, False, True), (128, False, False), (128, True, True)):
        t = traffic.grouped_lora(traffic.Shape(1024, 256, 512, r, 2), "bwd", fused_any_rank=any_rank)
        assert t.per_element("dY") == ((2, 2) if fused else (4, 2)), (r, any_rank)
        if fused:
            assert f"of 512, {-(-r // 32)} adjacent rank chunk(s)" in t.kernels[2][0]


def test_adjacent_column_tiles_read_x_and_dy_once_even_past_the_l2():
    big = traffic.Shape(1024, 256, 512, 128, 2)                    # r = 128: two column tiles
    small_l2 = traffic.Shape(1024, 256, 512, 128, 2, l2=X)         # x (512 KiB) > half of it
    # the column tiles of a row tile are adjacent blocks (csrc/cuda/grouped_lora_launch.cuh), so
    # x and dY come from DRAM once however small the L2 (H = 256 KiB still fits half of it)
    for mode in ("fwd", "bwd"):
        assert traffic.grouped_lora(small_l2, mode).implementation == traffic.grouped_lora(big, mode).implementation
        assert traffic.grouped_lora(small_l2, mode).minimum == traffic.grouped_lora(big, mode).minimum
    # an intermediate past half the L2 is read once per reader: H in the expand's column tiles
    tiny_l2 = traffic.Shape(1024, 256, 512, 128, 2, l2=64 << 10)
    H2 = 1024 * 128 * 2                                            # 256 KiB > 32 KiB
    assert traffic.grouped_lora(tiny_l2, "fwd").implementation - traffic.grouped_lora(big, "fwd").implementation \
        == H2 * (512 // traffic.BN - 1)                           # the expand's 8 column tiles


@pytest.mark.parametrize("n", [1, 1000, 16384, 65536])
@pytest.mark.parametrize("r", [1, 16, 64, 128])
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_implementation_never_below_minimum(n, r, mode):
    for shape in (traffic.Shape(n, 4096, 11008, r, 4), traffic.Shape(n, 11008, 4096, r, 8)):
        t = traffic.grouped_lora(shape, mode)
        assert 0 < t.minimum <= t.implementation and 0 < t.fraction <= 1


def test_benchmark_shape_predictions():
    # N = 16384, 4096 -> 11008, r = 32, K = 4, bf16: the forward is within 3% of its minimum; the
    # plain backward reads x and dY twice (shrink + dA, G + dB) and moves fp32 partials; with the
    # forward's saved H it reads x once, dY still twice
    fwd = traffic.grouped_lora(traffic.Shape(16384, 4096, 11008, 32, 4), "fwd")
    plain = traffic.grouped_lora(traffic.Shape(16384, 4096, 11008, 32, 4), "bwd", saved_h=False, fused_dy=False)
    two = traffic.grouped_lora(traffic.Shape(16384, 4096, 11008, 32, 4), "bwd", fused_dy=False)
    bwd = traffic.grouped_lora(traffic.Shape(16384, 4096, 11008, 32, 4), "bwd")
    assert fwd.fraction > 0.97
    assert 0.45 < plain.fraction < 0.56 < two.fraction < 0.65
    assert bwd.fraction > 0.70  # one pass over dY: the backward target (0.70) is within reach
    assert fwd.predicted_s(1e12) == pytest.approx(fwd.implementation / 1e12)


def test_mole_ffn_ops_split_forward_and_backward():
    ops = traffic.mole_ffn(16384, 4096, 11008, 32, 4)
    assert set(ops) == {"fwd", "bwd"}
    x = 16384 * 4096 * 2
    router = ops["fwd"][0]
    assert router.minimum < router.implementation  # the float32 copy of x
    assert dict(router.kernels)["x -> float32"] == x + 2 * x
    fp32 = traffic.mole_ffn(1024, 64, 128, 8, 2, elem=4)["fwd"][0]
    assert dict(fp32.kernels)["x -> float32"] == 0


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be"):
        traffic.grouped_lora(SMALL, "both")


def test_model_constants_match_the_kernels():
    """The model's tile sizes and split / chunk rules are the kernels' (csrc/cuda/**). When a
    constant changes there, this fails until bench/traffic.py follows."""
    import glob
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = "".join(open(f).read() for f in glob.glob(os.path.join(root, "csrc", "cuda", "**", "*.*"), recursive=True)
                   if f.endswith((".cu", ".cuh", ".h")))
    want = {"BM": traffic.BM, "BN": traffic.BN, "BK": traffic.BK, "kMinSplitChunk": traffic.MIN_SPLIT_CHUNK,
            "kMaxSplits": traffic.MAX_SPLITS, "kWgradChunks": traffic.WGRAD_CHUNKS,
            "kMaxWgradChunks": traffic.MAX_WGRAD_CHUNKS, "kDyPassCols": traffic.DY_PASS_COLS,
            "kDyPassRank": traffic.DY_PASS_RANK}
    found = {name: int(m.group(1)) for name in want
             for m in [re.search(rf"constexpr\s+int(?:64_t)?\s+{name}\s*=\s*(\d+)\s*;", text)] if m}
    if not found:
        pytest.skip("none of the grouped LoRA tiling constants is in csrc/cuda any more: re-derive bench/traffic.py")
    assert found == {k: v for k, v in want.items() if k in found}


def test_readme_shows_the_models_current_table():
    """README's predicted fractions are the model's (regenerate with python bench/traffic.py --readme)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert traffic.readme_table() in open(os.path.join(root, "README.md")).read()
