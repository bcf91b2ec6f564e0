"""The __host__ __device__ index arithmetic (csrc/core/index_math.h, csrc/core/routing_math.h),
checked on the CPU through mole_ext._C.index_math: the exact functions the CUDA kernels call.

simulate_permute runs the CUDA permute's whole index algorithm (tile histogram, one-block scan,
warp-tile stable ranking with an emulated __match_any_sync) on the host; it must agree with the
CPU kernel bit for bit on every routing, which is what the GPU kernel promises too.
"""

from __future__ import annotations

import random

import pytest
import torch

from mole_ext import _C

im = _C.index_math


# ---- index_math.h (the core issue's functions) -------------------------------------------------

def test_exclusive_scan():
    assert im.exclusive_scan([]) == [0]
    assert im.exclusive_scan([3, 0, 2]) == [0, 3, 3, 5]


# ---- warp lane arithmetic ---------------------------------------------------------------------

def test_lanemask_and_rank():
    assert im.lanemask_lt(0) == 0
    assert im.lanemask_lt(1) == 1
    assert im.lanemask_lt(31) == 0x7FFFFFFF
    match = 0b1011_0100  # lanes 2, 4, 5, 7
    assert [im.rank_in_group(match, lane) for lane in (2, 4, 5, 7)] == [0, 1, 2, 3]
    assert im.group_leader(match) == 2
    assert im.group_leader(0x80000000) == 31
    assert im.popc32(0xFFFFFFFF) == 32


def test_expert_bin():
    assert [im.expert_bin(e, 4) for e in (-5, -1, 0, 3, 4, 2**40)] == [4, 4, 0, 3, 4, 4]


# ---- permute tiling, histogram slots, scan partition ------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 31, 32, 255, 256, 257, 1025, 65536, 1 << 20, (1 << 31) - 1])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 64, 1024])
def test_permute_tiling(n, k):
    tile, tiles = im.permute_tiling(n, k)
    assert tile % 32 == 0 and tile >= 64
    if n == 0:
        assert tiles == 0
        return
    assert tiles == -(-n // tile)
    assert (tiles - 1) * tile < n <= tiles * tile
    # the (k + 1) x tiles histogram fits the one-block scan
    assert (k + 1) * tiles <= im.PERMUTE_MAX_HIST_ENTRIES
    # tiles partition [0, n)
    assert im.tile_tokens_range(n, tile, 0)[0] == 0
    assert im.tile_tokens_range(n, tile, tiles - 1)[1] == n
    assert im.tile_tokens_range(n, tile, tiles) == (n, n)


@pytest.mark.parametrize("n,k,tiles", [
    (1 << 20, 8, True), (8 << 20, 8, True), (1 << 20, 64, True), (200_000, 256, True), (1, 1024, True),
    (8 << 20, 64, False), (1 << 20, 256, False), (200_000, 1024, False), (5, 1025, False),
])
def test_permute_uses_tiles(n, k, tiles):
    # the tile histogram while its tiles stay short (a warp walks a tile step by step), else the sort
    assert im.permute_uses_tiles(n, k) == tiles
    assert tiles == (k <= im.PERMUTE_MAX_TILE_EXPERTS and im.permute_tiling(n, k)[0] <= im.PERMUTE_MAX_TILE_TOKENS)


def test_hist_slot_is_bin_major():
    tiles = 5
    slots = [im.hist_slot(b, t, tiles) for b in range(3) for t in range(tiles)]
    assert slots == list(range(15))


@pytest.mark.parametrize("length", [0, 1, 5, 1023, 1024, 1025, 65536, 66560])
@pytest.mark.parametrize("parts", [1, 32, 1024])
def test_block_partition_covers_in_order(length, parts):
    end_prev = 0
    for p in range(parts):
        b, e = im.block_partition(length, parts, p)
        assert b == end_prev and b <= e
        end_prev = e
    assert end_prev == length


# ---- row copy geometry ------------------------------------------------------------------------

def test_copy_vec_bytes():
    assert im.copy_vec_bytes(8192, 0x1000, 0x2000) == 16
    assert im.copy_vec_bytes(8192, 0x1008, 0x2000) == 8   # src only 8-aligned
    assert im.copy_vec_bytes(6, 0x1000, 0x2000) == 2      # 3 fp16 per row
    assert im.copy_vec_bytes(3, 0x1000, 0x2000) == 1      # 3 int8 per row
    assert im.copy_vec_bytes(0, 0x1001, 0x2000) == 1


@pytest.mark.parametrize("vecs", [1, 2, 3, 4, 31, 64, 255, 256, 512, 100000])
def test_row_copy_geometry(vecs):
    tpr, rpb = im.row_copy_geometry(vecs, 256)
    assert tpr & (tpr - 1) == 0 and tpr * rpb == 256
    assert tpr >= min(vecs, 256)        # a row is covered by one sweep of its threads ...
    assert tpr < 2 * max(vecs, 1) or tpr == 1   # ... without more than half of them idle


# ---- load balance layout ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 1000, 16384, 1 << 20, 10**8])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 200, 256, 300, 1 << 20])
def test_lb_rows_per_block(n, k):
    rows = im.lb_rows_per_block(n, k)
    blocks = -(-n // rows)
    assert rows >= 1 and blocks >= 1
    assert blocks <= 2048 and blocks * k <= max(1 << 22, k)


@pytest.mark.parametrize("k", [1, 2, 3, 8, 100, 128, 129, 255, 256, 257, 1000])
def test_lb_layout_covers_each_element_once(k):
    threads = 256
    col_threads, row_lanes, active = im.lb_layout(k, threads)
    assert active == row_lanes * col_threads <= threads
    rows = 7
    seen = {}
    for tid in range(active):
        if row_lanes == 1:   # the kernel's whole-column branch
            cols, lane, step = range(tid, k, threads), 0, 1
        else:
            cols, lane, step = [tid % col_threads], tid // col_threads, row_lanes
        for c in cols:
            for r in range(lane, rows, step):
                seen[(r, c)] = seen.get((r, c), 0) + 1
    assert seen == {(r, c): 1 for r in range(rows) for c in range(k)}


# ---- the permute index algorithm, end to end --------------------------------------------------

def _cpu_permute_indices(expert, k):
    x = torch.zeros(len(expert), 1)
    _, st, off = torch.ops.mole_ext.permute(x, torch.tensor(expert, dtype=torch.int64), k)
    return st.tolist(), off.tolist()


def _routings():
    rng = random.Random(0)
    yield "one token", [0], 1
    yield "k=1", [0] * 300, 1
    yield "all on one expert", [2] * 1000, 3
    yield "empty experts", [rng.choice([1, 5]) for _ in range(777)], 8
    yield "uniform 1025", [rng.randrange(8) for _ in range(1025)], 8
    yield "skewed", [0 if rng.random() < 0.99 else rng.randrange(4) for _ in range(5000)], 4
    yield "many experts", [rng.randrange(1024) for _ in range(3000)], 1024
    yield "sorted", sorted(rng.randrange(5) for _ in range(600)), 5
    yield "reversed", sorted((rng.randrange(5) for _ in range(600)), reverse=True), 5
    # forces tiles larger than 256 tokens (the (k+1) x tiles cap)
    yield "large tiles", [rng.randrange(512) for _ in range(70000)], 512


@pytest.mark.parametrize("name,expert,k", list(_routings()), ids=[r[0] for r in _routings()])
def test_simulated_cuda_permute_matches_cpu(name, expert, k):
    st, off = im.simulate_permute(expert, k)
    want_st, want_off = _cpu_permute_indices(expert, k)
    assert off == want_off
    assert st == want_st


@pytest.mark.parametrize("scan_threads", [1, 32, 1024])
def test_simulated_permute_independent_of_scan_threads(scan_threads):
    rng = random.Random(1)
    expert = [rng.randrange(6) for _ in range(4000)]
    assert im.simulate_permute(expert, 6, scan_threads) == im.simulate_permute(expert, 6, 1024)


def test_simulated_permute_invalid_ids_go_last():
    # what the CUDA kernel does with ids outside [0, K) (it also reports them): the rows keep
    # token order after all valid rows, sorted_token stays a permutation, offsets[K] < N.
    expert = [1, -1, 0, 7, 1, 2, 99, 0]
    st, off = im.simulate_permute(expert, 3)
    assert off == [0, 2, 4, 5]
    assert st == [2, 7, 0, 4, 5, 1, 3, 6]
    assert sorted(st) == list(range(len(expert)))


def test_simulated_permute_empty():
    assert im.simulate_permute([], 4) == ([], [0, 0, 0, 0, 0])


# ---- the load-balance reduction, emulated with the kernels' layout functions -----------------

def _emulate_lb(expert, probs, mask, k, threads=256):
    """csrc/cuda/load_balance.cu's two launches, thread by thread: per-block partial sums and
    counts (row lanes x columns, then a fixed-order combine), then the one-block totals (runs of
    blocks per thread, then a fixed-order combine). Returns (counts, psum) per expert."""
    n = len(expert)
    rows = im.lb_rows_per_block(n, k)
    blocks = -(-n // rows)
    col_threads, row_lanes, active = im.lb_layout(k, threads)
    psum = [[0.0] * k for _ in range(blocks)]
    cnt = [[0] * k for _ in range(blocks)]
    for blk in range(blocks):
        r0, r1 = blk * rows, min(blk * rows + rows, n)

        def column(c, lane, step):
            s, cn = 0.0, 0
            for r in range(r0 + lane, r1, step):
                b = im.expert_bin(expert[r], k)
                use = b != k and (mask is None or mask[r])
                if use:
                    s += probs[r][c]
                    cn += b == c
            return s, cn

        if row_lanes == 1:
            for c in range(k):
                psum[blk][c], cnt[blk][c] = column(c, 0, 1)
        else:
            part = [column(t % col_threads, t // col_threads, row_lanes) if t < active else (0.0, 0)
                    for t in range(threads)]
            for c in range(k):
                psum[blk][c] = sum(part[q * k + c][0] for q in range(row_lanes))
                cnt[blk][c] = sum(part[q * k + c][1] for q in range(row_lanes))
    tot_s, tot_c = [0.0] * k, [0] * k
    if row_lanes == 1:
        for c in range(k):
            tot_s[c] = sum(psum[b][c] for b in range(blocks))
            tot_c[c] = sum(cnt[b][c] for b in range(blocks))
    else:
        runs = {}
        for t in range(active):
            c, q = t % col_threads, t // col_threads
            b0, b1 = im.block_partition(blocks, row_lanes, q)
            runs[(q, c)] = (sum(psum[b][c] for b in range(b0, b1)), sum(cnt[b][c] for b in range(b0, b1)))
        for c in range(k):
            tot_s[c] = sum(runs[(q, c)][0] for q in range(row_lanes))
            tot_c[c] = sum(runs[(q, c)][1] for q in range(row_lanes))
    return tot_c, tot_s


@pytest.mark.parametrize("n,k", [(1, 1), (97, 3), (1025, 8), (3000, 129), (700, 300), (5000, 2)])
def test_emulated_load_balance_reduction_matches_cpu(n, k):
    g = torch.Generator().manual_seed(n + k)
    probs = torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), -1)
    expert = torch.randint(0, k, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.7
    counts, psum = _emulate_lb(expert.tolist(), probs.tolist(), mask.tolist(), k)
    keep = mask
    assert counts == torch.bincount(expert[keep], minlength=k).tolist()
    assert psum == pytest.approx(probs[keep].sum(0).tolist(), rel=1e-12, abs=1e-12)
    m = sum(counts)
    loss = k * sum(c * s for c, s in zip(counts, psum)) / (m * m)
    want = float(torch.ops.mole_ext.load_balance_loss(probs, expert, mask))
    assert loss == pytest.approx(want, rel=1e-12)


# ---- lora_tiles.h: the grouped LoRA kernels' tile map ------------------------------------------

def _all_offsets(n, k):
    """Every non-decreasing list 0 = o_0 <= ... <= o_k = n."""
    if k == 1:
        yield [0, n]
        return
    for head in _all_offsets(n, k - 1):
        for v in range(head[-2], n + 1):
            yield head[:-1] + [v, n]


def _check_tile_map(offsets, bm):
    k, n = len(offsets) - 1, offsets[-1]
    grid = im.seg_tile_grid(n, k, bm)
    assert grid <= -(-n // bm) + k
    hits = [0] * n
    busy = 0
    for t in range(grid):
        seg, b, e = im.seg_tile(offsets, n, bm, t)
        assert im.seg_tile_base(offsets, seg, n, bm) <= t < im.seg_tile_base(offsets, seg + 1, n, bm)
        if b >= e:
            continue
        busy += 1
        assert offsets[seg] <= b < e <= offsets[seg + 1] and e - b <= bm
        for row in range(b, e):
            hits[row] += 1
    assert hits == [1] * n
    assert busy == sum(-(-(offsets[s + 1] - offsets[s]) // bm) for s in range(k))


@pytest.mark.parametrize("bm", [1, 2, 3, 4, 64])
def test_seg_tile_map_exhaustive(bm):
    # every routing of up to 6 rows over up to 4 experts: empty experts and N = 0 included
    for k in range(1, 5):
        for n in range(0, 7):
            for offsets in _all_offsets(n, k):
                _check_tile_map(offsets, bm)


def test_seg_tile_map_skewed_and_large():
    rnd = random.Random(3)
    for _ in range(50):
        k, n, bm = rnd.choice([1, 2, 3, 8]), rnd.choice([0, 1, 33, 97, 1025]), rnd.choice([32, 64])
        cuts = sorted(rnd.randint(0, n) for _ in range(k - 1))
        if rnd.random() < 0.5:  # one expert takes (almost) everything
            cuts = [0] * (k - 1) if rnd.random() < 0.5 else [n] * (k - 1)
        _check_tile_map([0] + cuts + [n], bm)


def test_seg_tile_ill_formed_offsets_stay_in_range():
    rnd = random.Random(5)
    for _ in range(300):
        k, n, bm = rnd.randint(1, 5), rnd.randint(0, 40), rnd.randint(1, 8)
        offsets = [rnd.randint(-20, 60) for _ in range(k + 1)]
        for t in range(im.seg_tile_grid(n, k, bm)):
            seg, b, e = im.seg_tile(offsets, n, bm, t)
            assert 0 <= seg < k and 0 <= b <= e <= n and e - b <= bm


def test_split_plans():
    for length in (0, 1, 16, 17, 4096, 11008):
        for want in (1, 3, 16):
            chunk, splits = im.split_plan(length, want, 32)
            assert chunk % 32 == 0 and 1 <= splits <= want
            if length:
                assert (splits - 1) * chunk < length <= splits * chunk
    assert im.want_splits(1032, 264, 4096, 256, 16) == 1      # N = 65536: the row tiles fill the GPU
    assert im.want_splits(9, 264, 4096, 256, 16) == 16        # N = 33: split the reduction over `in`
    assert im.wgrad_chunk_rows(65536, 8, 32, 64) == 8192
