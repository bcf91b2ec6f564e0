"""DRAM traffic model of mole_ext's CUDA kernels: the bytes an op must move at minimum, the bytes
the current kernels move, and the time that takes at a given bandwidth (the copy bandwidth
measured in the same run, never a datasheet's).

The model follows the kernels' tiling (csrc/cuda/grouped_lora.cu: 64 x 64 output tiles, 32-deep
reduction steps; the split and chunk rules of csrc/core/lora_tiles.h, mirrored below) under
these rules, which the GPU check's ncu stage (dram__bytes) can confirm or refute:
  * every kernel's inputs come from DRAM and its outputs go to DRAM (a kernel boundary is a
    round trip: an intermediate written by one kernel and read by the next counts twice);
  * within a kernel, the column tiles of one row tile (r > 64: the shrink's and G's two or more
    r-tiles; the weight-gradient chunks' r-tiles) are adjacent blocks, so they run in the same
    wave and the row tile's rows (x, dY) come from DRAM once; any other operand read by several
    tiles comes from DRAM once per reader when it is larger than half the L2, once in all when
    it fits there (weights, the rank-r intermediates);
  * permute / unpermute / permute_rows / router_top1 move their minimum (one read, one write);
    PyTorch's own ops around them (dtype casts, autograd sums) move what their inputs and outputs
    are.
The minimum of an op reads each input once and writes each output once (an output that is
accumulated into is read once too).

Bytes per element of the large activations (bf16, 2 bytes an element; rank-r and weight traffic
aside), implemented vs minimum:
  forward   x: 2 vs 2 (one read), y: 2 vs 2 (one write; add_out 4 vs 4: read, write);
  backward  x: 4 vs 4 with the forward's saved H (x read once, by dA; dX written once; add_out
            6 vs 6: dX read and written) and 6 vs 4 without it (the plain ops recompute the
            shrink: x read twice);
            dY: 2 vs 2 for bf16 / fp16 at r < 128 (G = dY B and dB = dY^T Hs in one pass; above
            r = 32 in rank chunks of 32 whose blocks of one dY tile run side by side, each block
            two halves over 512 columns; plus fp32 partials of about 8 r / W + 8 r / rows-per-chunk
            bytes per element, W = 256 columns a block up to r = 32, 512 above: 1 + small at
            r = 32 and at r = 64), else 4 vs 2 (two passes: at r = 128 the fused pass's G partials
            cost what the second read of dY does). See csrc/cuda/grouped_lora.cu. Compute time is not modelled: the FLOPs are reported so the
arithmetic intensity is visible (at r = 128 the tensor cores may bind before DRAM).

    python bench/traffic.py             # the table of the benchmark shapes, predictions at 3000 GB/s
    python bench/traffic.py --readme    # the README's table of predicted fractions
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

# the kernels' constants (csrc/cuda/grouped_lora.cu)
BM = BN = 64
BK = 32
DY_PASS_COLS = 256      # columns of dY per block of the fused dY pass (kDyPassCols; twice that above r = 32)
DY_PASS_RANK = 32       # columns of a rank chunk (kDyPassRank)
MIN_SPLIT_CHUNK = 256
MAX_SPLITS = 16
WGRAD_CHUNKS = 8        # fewest row chunks of the weight-gradient partials
MAX_WGRAD_CHUNKS = 64
# H100 SXM / H200: 132 SMs, 50 MiB L2 (the GPU check passes the device's own numbers)
DEFAULT_SMS = 132
DEFAULT_L2 = 50 << 20


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- csrc/core/lora_tiles.h ----------------------------------------------------------------

def seg_tile_grid(n: int, k: int, bm: int) -> int:
    return n // bm + k


def want_splits(blocks: int, target: int, length: int, min_chunk: int, max_splits: int) -> int:
    s = cdiv(target, max(blocks, 1))
    s = min(s, length // min_chunk, max_splits)
    return max(s, 1)


def split_plan(length: int, want: int, align: int) -> Tuple[int, int]:
    """(chunk, splits)"""
    want = max(want, 1)
    if length <= 0:
        return align, 1
    chunk = max(cdiv(cdiv(length, want), align) * align, align)
    return chunk, cdiv(length, chunk)


def wgrad_chunk_rows(n: int, target_chunks: int = WGRAD_CHUNKS, align: int = BK, min_rows: int = BM) -> int:
    return max(cdiv(cdiv(n, max(target_chunks, 1)), align) * align, min_rows)


def wgrad_target_chunks(tiles: int, wave: int, k: int, min_chunks: int = WGRAD_CHUNKS,
                        max_chunks: int = MAX_WGRAD_CHUNKS) -> int:
    tiles, wave, min_chunks = max(tiles, 1), max(wave, 1), max(min_chunks, 1)
    waves = cdiv((min_chunks + k) * tiles, wave)
    return max(min(max(waves * wave // tiles - k, min_chunks), max_chunks), 1)


# ---- the model -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    n: int       # rows (tokens)
    d_in: int
    d_out: int
    r: int
    k: int       # experts
    elem: int = 2          # bytes per element of x / weights (bf16)
    acc: int = 4           # bytes of the fp32 partials
    row_scale: bool = True
    sms: int = DEFAULT_SMS
    l2: int = DEFAULT_L2


@dataclasses.dataclass
class Traffic:
    """One op: the minimum, the kernels' bytes (name -> bytes), the FLOPs. `streams`: for the large
    activations, name -> (elements, implemented bytes, minimum bytes) of the DRAM traffic on that
    tensor and its gradient ("x": x read, dX written / read; "dY" or "y"): per_element() divides."""
    op: str
    minimum: int
    kernels: List[Tuple[str, int]]
    flops: int = 0
    streams: Dict[str, Tuple[int, int, int]] = dataclasses.field(default_factory=dict)

    def per_element(self, name: str) -> Tuple[float, float]:
        """(implemented, minimum) DRAM bytes per element of the large activation `name`."""
        elems, impl, least = self.streams[name]
        return impl / elems, least / elems

    @property
    def implementation(self) -> int:
        return sum(b for _, b in self.kernels)

    @property
    def fraction(self) -> float:
        """Minimum over implementation: the best fraction of the copy bandwidth the op can reach."""
        return self.minimum / self.implementation if self.implementation else 1.0

    def predicted_s(self, bandwidth: float) -> float:
        """Seconds to move the implementation's bytes at `bandwidth` bytes/s."""
        return self.implementation / bandwidth


def _reads(nbytes: int, readers: int, s: Shape) -> int:
    """DRAM bytes of an operand read by `readers` tiles of one kernel."""
    return nbytes if nbytes <= s.l2 // 2 else nbytes * readers


def dy_pass_halves(r: int, width: int = DY_PASS_RANK) -> int:
    """lora_tiles.h: 1 for r <= 32 (256 threads, 256 columns of dY a block), 2 above (512, 512)."""
    return 1 if r <= width else 2


def dy_pass_pays(r: int, cols: int, elem: int) -> bool:
    """lora_tiles.h: the fused pass's fp32 G partials (8 r / cols bytes per element of dY, written
    and read back) cost less than the second read of dY (elem bytes per element)."""
    return 8 * r < elem * cols


def grouped_lora(s: Shape, mode: str, accumulate: bool = False, saved_h: bool = True,
                 fused_dy: bool = True, fused_any_rank: bool = False) -> Traffic:
    """grouped_lora (mode "fwd"; accumulate: grouped_lora_add_out) or grouped_lora_backward
    ("bwd"; accumulate: grouped_lora_backward_add_out, dX added onto its buffer).

    saved_h (what autograd runs: grouped_lora_h / lora_linear_h, then the backward's `h`): the
    forward also writes the unscaled shrink H ([N, r] fp32) and the backward reads it instead of
    recomputing it from x; without it (the plain ops) the backward runs the shrink again. Either
    way the op's minimum counts what it must read and write, H included when it is an output or
    an input.

    fused_dy (the default switch of the CUDA kernels): for 16-bit types and r < 128 (dy_pass_pays;
    fused_any_rank: every r, the kernels' A/B switch) the backward computes G = dY B and
    dB = dY^T Hs in one pass over dY (dy_pass_kernel, one block per rank chunk of 32; the rank
    chunks of a dY tile are adjacent blocks, so dY comes from DRAM once), which writes fp32
    partials of G per 256 columns of dY (512 above r = 32) and of dB per row chunk; else two passes
    read dY twice."""
    if mode not in ("fwd", "bwd"):
        raise ValueError(f"mode must be 'fwd' or 'bwd', got {mode!r}")
    e, n, i, o, r, k = s.elem, s.n, s.d_in, s.d_out, s.r, s.k
    X, Y, A, B = n * i * e, n * o * e, k * r * i * e, k * o * r * e
    H = n * r * e                       # a rank-r intermediate in x's dtype
    rs = n * 4 if s.row_scale else 0
    off = (k + 1) * (8 + 8)             # offsets in, int64 copy out
    col_tiles_r = cdiv(r, BN)           # column tiles of the shrink / G outputs ([N, r])
    row_tiles = seg_tile_grid(n, k, BM)
    target = 2 * s.sms

    def shrink(name):
        _, splits = split_plan(i, want_splits(row_tiles * col_tiles_r, target, i, MIN_SPLIT_CHUNK, MAX_SPLITS), BK)
        return (f"{name} (x A^T, {col_tiles_r} column tile(s), {splits} split(s))",
                X + A + splits * n * r * s.acc), splits

    H32 = n * r * s.acc if saved_h else 0  # the saved unscaled shrink (fp32)
    y_rw = 2 if accumulate else 1        # y / dX written, and read first when accumulated into
    kernels = [("prepare_offsets", off)]
    if mode == "fwd":
        (name, nb), splits = shrink("shrink")
        kernels.append((name, nb))
        kernels.append(("finish_h (sum splits, scale" + (", keep H" if saved_h else "") + ")",
                        splits * n * r * s.acc + rs + H + H32))
        kernels.append(("expand (Hs B^T" + (", add" if accumulate else "") + ")",
                        _reads(H, cdiv(o, BN), s) + B + Y * y_rw))
        minimum = X + A + B + rs + off + Y * y_rw + H32
        flops = 2 * n * r * (i + o)
        streams = {"x": (n * i, X, X), "y": (n * o, Y * y_rw, Y * y_rw)}
        return Traffic("grouped_lora fwd" + (" (add_out)" if accumulate else ""), minimum, kernels, flops, streams)
    if saved_h:
        h_splits = 1  # finish_bwd reads the saved H as one piece
    else:
        (name, nb), h_splits = shrink("shrink again")
        kernels.append((name, nb))
    dy_cols = DY_PASS_COLS * dy_pass_halves(r)
    fused = fused_dy and e == 2 and o > 0 and (dy_pass_pays(r, dy_cols, e) or fused_any_rank)
    if fused:
        col_chunks = cdiv(o, dy_cols)
        rank_chunks = max(cdiv(r, DY_PASS_RANK), 1)
        # a wave: 2 blocks of 256 threads per SM, or 1 of 512 (two halves)
        wave = target // dy_pass_halves(r)
        chunks_b = seg_tile_grid(n, k, wgrad_chunk_rows(n, wgrad_target_chunks(col_chunks * rank_chunks, wave, k)))
        g_splits = col_chunks
        kernels.append(("finish_h (Hs for the dY pass)", h_splits * n * r * s.acc + rs + H))
        # each rank chunk reads its columns of Hs and B; dY once (the rank chunks of a tile adjacent)
        kernels.append((f"dY pass (G and dB partials, {col_chunks} column chunk(s) of {dy_cols}, {rank_chunks} "
                        f"adjacent rank chunk(s), {chunks_b} row chunks)",
                        Y + H + B + col_chunks * n * r * s.acc + chunks_b * o * r * s.acc))
    else:
        _, g_splits = split_plan(o, want_splits(row_tiles * col_tiles_r, target, o, MIN_SPLIT_CHUNK, MAX_SPLITS), BK)
        kernels.append((f"G = dY B ({col_tiles_r} column tile(s), {g_splits} split(s))",
                        Y + B + g_splits * n * r * s.acc))
    kernels.append(("finish_bwd (" + ("saved H, " if saved_h else "") + "dH, Hs, d row_scale)",
                    (h_splits + g_splits) * n * r * s.acc + rs + 2 * H + rs))
    # row chunks: whole waves of the occupancy (2 blocks per SM assumed here) over the gradient's tiles
    m_tiles_r = cdiv(r, BM)
    chunks_a = seg_tile_grid(n, k, wgrad_chunk_rows(n, wgrad_target_chunks(m_tiles_r * cdiv(i, BN), target, k)))
    kernels.append((f"dA partials (dH^T x, {m_tiles_r} adjacent r-tile(s), {chunks_a} chunks)",
                    _reads(H, cdiv(i, BN), s) + X + chunks_a * r * i * s.acc))
    kernels.append(("dA reduce", chunks_a * r * i * s.acc + A))
    if not fused:
        chunks_b = seg_tile_grid(n, k, wgrad_chunk_rows(n, wgrad_target_chunks(cdiv(o, BM) * col_tiles_r, target, k)))
        kernels.append((f"dB partials (dY^T Hs, {col_tiles_r} adjacent r-tile(s), {chunks_b} chunks)",
                        Y + _reads(H, cdiv(o, BM), s) + chunks_b * o * r * s.acc))
    kernels.append(("dB reduce", chunks_b * o * r * s.acc + B))
    kernels.append(("dX (dH A" + (", add" if accumulate else "") + ")",
                    _reads(H, cdiv(i, BN), s) + A + X * y_rw))
    # dY, x, A, B, the saved H (and row_scale) in; dX (read too when accumulating), dA, dB, d row_scale out
    minimum = Y + X + A + B + rs + off + X * y_rw + A + B + rs + H32
    flops = 2 * n * r * ((0 if saved_h else i) + 2 * i + 2 * o)  # H (recomputed), dX, dA and G, dB
    # x: read by the shrink (without saved H) and by dA, dX written (and read); dY: read once by the
    # fused pass, else by G and by dB
    streams = {"x": (n * i, X * (1 if saved_h else 2) + X * y_rw, X + X * y_rw),
               "dY": (n * o, (1 if fused else 2) * Y, Y)}
    return Traffic("grouped_lora bwd" + (" (add_out)" if accumulate else ""), minimum, kernels, flops, streams)


def mole_ffn(n: int, d: int, m: int, r: int, k: int, elem: int = 2, sms: int = DEFAULT_SMS,
             l2: int = DEFAULT_L2) -> Dict[str, List[Traffic]]:
    """The mole_ext ops of one top-1 MoLEFFN forward and backward (python/mole_ext/functional.py:
    route + permute, three lora_linear projections whose grouped LoRA adds onto the cuBLAS base
    GEMM's output, unpermute), without the base GEMMs and the activation, which a single-LoRA FFN
    runs alike. Returns {"fwd": [...], "bwd": [...]}."""
    e, f32 = elem, 4
    X = n * d * e
    acc_copy = elem != f32  # the router runs in float32: a cast of x when x is narrower

    def sh(i, o):
        return Shape(n, i, o, r, k, elem=e, sms=sms, l2=l2)

    route_min = X + n * k * f32 + n * k * f32 + n * 8
    route_impl = [("x -> float32", X + n * d * f32 if acc_copy else 0),
                  ("router GEMM (logits)", (n * d * f32 if acc_copy else X) + n * k * f32),
                  ("router_top1", n * k * f32 + n * k * f32 + n * 8)]
    fwd = [
        Traffic("router (float32 logits, softmax, top-1)", route_min, route_impl),
        Traffic("permute x, permute_rows gate", 2 * X + 2 * n * 8 + 2 * n * f32,
                [("permute", 2 * X + 2 * n * 8), ("permute_rows", 2 * n * f32)]),
        *(dataclasses.replace(grouped_lora(sh(d, m), "fwd", accumulate=True), op=f"{p}: grouped_lora add_out")
          for p in ("gate", "up")),
        dataclasses.replace(grouped_lora(sh(m, d), "fwd", accumulate=True), op="down: grouped_lora add_out"),
        Traffic("unpermute y", 2 * X + n * 8, [("unpermute", 2 * X + n * 8)]),
    ]
    bwd = [
        Traffic("unpermute's adjoint (permute_rows dY)", 2 * X + n * 8, [("permute_rows", 2 * X + n * 8)]),
        dataclasses.replace(grouped_lora(sh(m, d), "bwd", accumulate=True), op="down: grouped_lora_backward add_out"),
        *(dataclasses.replace(grouped_lora(sh(d, m), "bwd", accumulate=True), op=f"{p}: grouped_lora_backward add_out")
          for p in ("gate", "up")),
        Traffic("autograd: dx_sorted = gate's + up's", 3 * X, [("add", 3 * X)]),
        # minimum: read dx_sorted and x_sorted once, write dx (the router's dX and dW fused with the unpermute)
        Traffic("route+permute backward (unpermute dx, router dX / dW in float32)", 3 * X + 3 * n * k * f32,
                [("unpermute dx_sorted", 2 * X), ("router_top1_backward", 3 * n * k * f32),
                 ("dx -> float32, addmm_, -> dtype", (X + n * d * f32) + 2 * n * d * f32 + (n * d * f32 + X)
                  if acc_copy else 3 * X),
                 ("x_sorted -> float32 for dW, mm", (X + n * d * f32) + n * d * f32 if acc_copy else X)]),
    ]
    return {"fwd": fwd, "bwd": bwd}


def summary(ops: List[Traffic]) -> Traffic:
    return Traffic(" + ".join(t.op for t in ops), sum(t.minimum for t in ops),
                   [(t.op, t.implementation) for t in ops], sum(t.flops for t in ops))


def table(bandwidth: float = 3.0e12) -> str:
    out = [f"predictions at {bandwidth / 1e9:.0f} GB/s",
           f"{'op':44s} {'N':>6s} {'in':>6s} {'out':>6s} {'r':>4s} {'K':>2s} {'min MB':>9s} {'impl MB':>9s} "
           f"{'fraction':>8s} {'pred us':>8s}"]
    for n in (16384, 65536):
        for i, o in ((4096, 11008), (11008, 4096)):
            for r in (16, 32, 64, 128):
                for mode in ("fwd", "bwd"):
                    t = grouped_lora(Shape(n, i, o, r, 4), mode)
                    out.append(f"{t.op:44s} {n:6d} {i:6d} {o:6d} {r:4d} {4:2d} {t.minimum / 1e6:9.1f} "
                               f"{t.implementation / 1e6:9.1f} {t.fraction:8.2f} {t.predicted_s(bandwidth) * 1e6:8.1f}")
    return "\n".join(out)


def readme_table() -> str:
    """The README's table: predicted best fraction of the copy bandwidth per op and rank."""
    ranks = (16, 32, 64, 128)
    out = ["| op (N = 16384, K = 4, bf16) | " + " | ".join(f"r = {r}" for r in ranks) + " | target |",
           "|---|" + "---|" * (len(ranks) + 1)]
    for i, o in ((4096, 11008), (11008, 4096)):
        for mode, target in (("fwd", ">= 0.80"), ("bwd", ">= 0.70")):
            fr = [grouped_lora(Shape(16384, i, o, r, 4), mode).fraction for r in ranks]
            out.append(f"| grouped_lora {mode}, {i} -> {o} | " + " | ".join(f"{f:.2f}" for f in fr) + f" | {target} |")
    for mode, ops in mole_ffn(16384, 4096, 11008, 32, 4).items():
        s = summary(ops)
        out.append(f"| MoLE FFN {mode}: mole_ext's ops (r = 32) | | {s.fraction:.2f} | | | |")
    out += ["", "| bytes per element (bf16; implemented / minimum) | x (and dX) | y or dY |", "|---|---|---|"]
    for mode, acc in (("fwd", False), ("fwd", True), ("bwd", False), ("bwd", True)):
        t = grouped_lora(Shape(16384, 4096, 11008, 32, 4), mode, accumulate=acc)
        cells = [f"{a:.0f} / {b:.0f}" for a, b in (t.per_element(name) for name in t.streams)]
        out.append(f"| {t.op} | " + " | ".join(cells) + " |")
    for label, kw in (("plain op (no saved H)", dict(saved_h=False)), ("two dY passes (r >= 128 or fp32)",
                                                                      dict(fused_dy=False))):
        t = grouped_lora(Shape(16384, 4096, 11008, 32, 4), "bwd", **kw)
        out.append(f"| grouped_lora bwd, {label} | " + " | ".join(
            f"{a:.0f} / {b:.0f}" for a, b in (t.per_element(name) for name in t.streams)) + " |")
    out += ["", "| kernel (N = 16384, 4096 -> 11008, r = 32, K = 4, bf16) | MB | share |", "|---|---|---|"]
    for mode in ("fwd", "bwd"):
        t = grouped_lora(Shape(16384, 4096, 11008, 32, 4), mode)
        for name, b in t.kernels:
            out.append(f"| {mode}: {name} | {b / 1e6:.1f} | {b / t.implementation:.0%} |")
        out.append(f"| {mode}: **minimum of the op** | {t.minimum / 1e6:.1f} | {t.fraction:.0%} |")
    return "\n".join(out)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--readme"]:
        print(readme_table())
        raise SystemExit(0)
    print(table())
    for mode, ops in mole_ffn(16384, 4096, 11008, 32, 4).items():
        s = summary(ops)
        print(f"\nMoLEFFN {mode} (N=16384, d=4096, m=11008, r=32, K=4, bf16): mole_ext ops {s.minimum / 1e6:.0f} MB "
              f"minimum, {s.implementation / 1e6:.0f} MB implemented ({s.fraction:.2f})")
        for t in ops:
            print(f"  {t.op:62s} {t.minimum / 1e6:8.1f} {t.implementation / 1e6:8.1f}  {t.fraction:.2f}")
