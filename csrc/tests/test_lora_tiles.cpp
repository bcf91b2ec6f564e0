// Host-side tests of csrc/core/lora_tiles.h, the tile map of the CUDA grouped LoRA kernels:
// exhaustive over every valid offsets list of up to 7 rows and 4 segments, for several tile
// heights, plus random ill-formed lists (rows must stay in range). Exits non-zero on failure.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/lora_tiles.h"
#include "expect.h"

namespace lt = mole_ext::lora_tiles;

// Every row is covered by exactly one non-idle tile of its own segment; non-idle tiles number
// sum ceil(n_s / bm); each segment's tiles lie in [base(s), base(s+1)); an empty segment owns
// exactly one tile number (idle).
static void check_valid(const std::vector<int64_t>& off, int64_t bm) {
  const int64_t k = static_cast<int64_t>(off.size()) - 1, n = off[k];
  const int64_t grid = lt::seg_tile_grid(n, k, bm);
  EXPECT(grid <= mole_ext::index_math::ceil_div(n, bm) + k);
  EXPECT(lt::seg_tile_base(off.data(), k, n, bm) == grid);
  std::vector<int> hits(n, 0);
  int64_t busy = 0, want = 0;
  for (int64_t s = 0; s < k; ++s) want += mole_ext::index_math::ceil_div(off[s + 1] - off[s], bm);
  std::vector<int64_t> tiles_of(k, 0);
  for (int64_t t = 0; t < grid; ++t) {
    const lt::SegTile st = lt::seg_tile(off.data(), k, n, bm, t);
    EXPECT(st.segment >= 0 && st.segment < k);
    EXPECT(t >= lt::seg_tile_base(off.data(), st.segment, n, bm));
    EXPECT(t < lt::seg_tile_base(off.data(), st.segment + 1, n, bm));
    ++tiles_of[st.segment];
    if (st.row_begin >= st.row_end) continue;
    ++busy;
    EXPECT(st.row_end - st.row_begin <= bm);
    EXPECT(off[st.segment] <= st.row_begin && st.row_end <= off[st.segment + 1]);
    for (int64_t r = st.row_begin; r < st.row_end; ++r) ++hits[r];
  }
  EXPECT(busy == want);
  for (int64_t r = 0; r < n; ++r) EXPECT(hits[r] == 1);
  for (int64_t s = 0; s < k; ++s) {
    EXPECT(tiles_of[s] == lt::seg_tile_base(off.data(), s + 1, n, bm) - lt::seg_tile_base(off.data(), s, n, bm));
    if (off[s + 1] == off[s]) EXPECT(tiles_of[s] == 1);
  }
}

// All non-decreasing lists 0 = o_0 <= ... <= o_k = n.
static void for_all_offsets(int64_t n, int64_t k, std::vector<int64_t>& cur, int64_t bm) {
  if (static_cast<int64_t>(cur.size()) == k) {
    cur.push_back(n);
    check_valid(cur, bm);
    cur.pop_back();
    return;
  }
  for (int64_t v = cur.back(); v <= n; ++v) {
    cur.push_back(v);
    for_all_offsets(n, k, cur, bm);
    cur.pop_back();
  }
}

static void test_exhaustive() {
  long cases = 0;
  for (int64_t bm : {1, 2, 3, 4, 5, 8, 64}) {
    for (int64_t k = 1; k <= 4; ++k) {
      for (int64_t n = 0; n <= 7; ++n) {
        std::vector<int64_t> cur = {0};
        for_all_offsets(n, k, cur, bm);
        ++cases;
      }
    }
  }
  // larger, random valid lists (skewed: most rows on one segment, others empty)
  std::mt19937_64 rng(7);
  for (int it = 0; it < 2000; ++it) {
    const int64_t k = 1 + rng() % 9, n = rng() % 3000, bm = 1 + rng() % 130;
    std::vector<int64_t> off(k + 1, 0);
    for (int64_t s = 1; s < k; ++s) off[s] = (rng() % 3 == 0) ? off[s - 1] : off[s - 1] + rng() % (n - off[s - 1] + 1);
    off[k] = n;
    check_valid(off, bm);
  }
  std::printf("lora_tiles: %ld exhaustive groups + 2000 random lists checked\n", cases);
}

// Ill-formed lists: tiles still name rows inside [0, n) only.
static void test_ill_formed_stays_in_range() {
  std::mt19937_64 rng(11);
  for (int it = 0; it < 5000; ++it) {
    const int64_t k = 1 + rng() % 6, n = rng() % 50, bm = 1 + rng() % 9;
    std::vector<int64_t> off(k + 1);
    for (auto& o : off) o = static_cast<int64_t>(rng() % 120) - 40;
    for (int64_t t = 0; t < lt::seg_tile_grid(n, k, bm); ++t) {
      const lt::SegTile st = lt::seg_tile(off.data(), k, n, bm, t);
      EXPECT(st.segment >= 0 && st.segment < k);
      EXPECT(st.row_begin >= 0 && st.row_end <= n && st.row_begin <= st.row_end);
      EXPECT(st.row_end - st.row_begin <= bm);
    }
  }
}

static void test_split_plan() {
  for (int64_t len = 0; len <= 300; ++len) {
    for (int64_t want = 0; want <= 9; ++want) {
      for (int64_t align : {1, 16, 32}) {
        const lt::SplitPlan p = lt::split_plan(len, want, align);
        EXPECT(p.chunk % align == 0 && p.chunk >= align);
        EXPECT(p.splits >= 1 && p.splits <= (want < 1 ? 1 : want));
        if (len > 0) {
          EXPECT((p.splits - 1) * p.chunk < len && p.splits * p.chunk >= len);  // no empty piece, all covered
        } else {
          EXPECT(p.splits == 1);
        }
      }
    }
  }
  EXPECT(lt::want_splits(1000, 264, 4096, 256, 16) == 1);
  EXPECT(lt::want_splits(4, 264, 4096, 256, 16) == 16);
  EXPECT(lt::want_splits(4, 264, 4096, 512, 16) == 8);
  EXPECT(lt::want_splits(4, 264, 100, 256, 16) == 1);
  EXPECT(lt::want_splits(0, 264, 4096, 256, 16) == 16);
  EXPECT(lt::wgrad_chunk_rows(0, 8, 32, 64) == 64);
  EXPECT(lt::wgrad_chunk_rows(65536, 8, 32, 64) == 8192);
  EXPECT(lt::wgrad_chunk_rows(1000, 8, 32, 64) == 128);
  // whole waves of 264 blocks (2 per SM, 132 SMs): 64 tiles, K = 4: (8 + 4) * 64 = 768 blocks need
  // 3 waves (792), which hold 12 chunks of 64 tiles: 8 + 4, as before; 1 tile: 264 - 4 chunks,
  // capped at 64; 10 tiles, K = 1: 90 blocks fill one wave at 26 - 1 = 25 chunks
  EXPECT(lt::wgrad_target_chunks(64, 264, 4, 8, 64) == 8);
  EXPECT(lt::wgrad_target_chunks(1, 264, 4, 8, 64) == 64);
  EXPECT(lt::wgrad_target_chunks(10, 264, 1, 8, 64) == 25);
  EXPECT(lt::wgrad_target_chunks(172, 264, 4, 8, 64) == 8);   // 2112 / 172 = 12 chunks in 8 waves
  EXPECT(lt::wgrad_target_chunks(1000, 264, 0, 8, 64) == 8);  // never below the minimum
  EXPECT(lt::wgrad_target_chunks(0, 0, 0, 0, 64) == 1);       // degenerate arguments stay sane
  for (int64_t tiles = 1; tiles < 300; tiles += 7) {
    for (int64_t k = 1; k < 9; ++k) {
      const int64_t c = lt::wgrad_target_chunks(tiles, 264, k, 8, 64);
      EXPECT(c >= 8 && c <= 64);
      // the grid stays within the waves the minimum needs (or the cap binds)
      const int64_t waves = mole_ext::index_math::ceil_div((8 + k) * tiles, int64_t{264});
      EXPECT(c == 64 || (c == 8 && (c + k) * tiles > waves * 264) || (c + k) * tiles <= waves * 264);
      EXPECT(c == 64 || c == 8 || (c + k + 1) * tiles > waves * 264);  // and nothing more fits
    }
  }
}

// ---- the kernels' block decomposition, emulated on the host with the same tile map, split plan
// and operand layouts as csrc/cuda/grouped_lora.cu, against the formulas computed directly ----

constexpr int64_t kBM = 64, kBN = 64, kBK = 32;  // the CUDA kernels' tile (grouped_lora.cu)

// row_gemm over every block (tile, column tile, split) -> partials [splits, n, ncols].
static std::vector<double> emulate_row_gemm(const lt::RowGemmShape& sh, const std::vector<double>& left,
                                            const std::vector<double>& right, const std::vector<int64_t>& off,
                                            int64_t n, int64_t splits, int64_t kchunk) {
  const int64_t k = static_cast<int64_t>(off.size()) - 1;
  std::vector<double> part(splits * n * sh.ncols, std::nan(""));
  for (int64_t t = 0; t < lt::seg_tile_grid(n, k, kBM); ++t) {
    const lt::SegTile st = lt::seg_tile(off.data(), k, n, kBM, t);
    if (st.row_begin >= st.row_end) continue;
    for (int64_t n0 = 0; n0 < sh.ncols; n0 += kBN) {
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t kb = sp * kchunk, ke = std::min(sh.klen, kb + kchunk);
        for (int64_t i = st.row_begin; i < st.row_end; ++i) {
          for (int64_t c = n0; c < std::min(sh.ncols, n0 + kBN); ++c) {
            double acc = 0;
            for (int64_t kk = kb; kk < ke; ++kk) {
              acc += left[i * sh.lda + kk] * right[st.segment * sh.r_seg + kk * sh.r_sk + c * sh.r_sn];
            }
            part[(sp * n + i) * sh.ncols + c] = acc;
          }
        }
      }
    }
  }
  return part;
}

static std::vector<double> sum_splits(const std::vector<double>& part, int64_t splits, int64_t elems) {
  std::vector<double> out(elems, 0.0);
  for (int64_t sp = 0; sp < splits; ++sp) {
    for (int64_t e = 0; e < elems; ++e) out[e] += part[sp * elems + e];
  }
  return out;
}

// wgrad partials per chunk, then the per-segment reduction -> [k, m_rows, ncols].
static std::vector<double> emulate_wgrad(const lt::WgradShape& sh, const std::vector<double>& left,
                                         const std::vector<double>& right, const std::vector<int64_t>& off,
                                         int64_t n) {
  const int64_t k = static_cast<int64_t>(off.size()) - 1;
  const int64_t chunk_rows = lt::wgrad_chunk_rows(n, 8, kBK, kBM);
  const int64_t chunks = lt::seg_tile_grid(n, k, chunk_rows), elems = sh.m_rows * sh.ncols;
  std::vector<double> part(chunks * elems, std::nan(""));
  for (int64_t t = 0; t < chunks; ++t) {
    const lt::SegTile st = lt::seg_tile(off.data(), k, n, chunk_rows, t);
    for (int64_t m = 0; m < sh.m_rows; ++m) {
      for (int64_t c = 0; c < sh.ncols; ++c) {
        double acc = 0;
        for (int64_t i = st.row_begin; i < st.row_end; ++i) acc += left[i * sh.lda + m] * right[i * sh.ldb + c];
        part[(t * sh.m_rows + m) * sh.ncols + c] = acc;
      }
    }
  }
  std::vector<double> grad(k * elems, std::nan(""));
  for (int64_t s = 0; s < k; ++s) {
    const int64_t t0 = lt::seg_tile_base(off.data(), s, n, chunk_rows);
    const int64_t t1 = lt::seg_tile_base(off.data(), s + 1, n, chunk_rows);
    for (int64_t e = 0; e < elems; ++e) {
      double acc = 0;
      for (int64_t t = t0; t < t1; ++t) acc += part[t * elems + e];
      grad[s * elems + e] = acc;
    }
  }
  return grad;
}

static bool near(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!(std::fabs(a[i] - b[i]) <= 1e-9 * (1.0 + std::fabs(b[i])))) return false;  // NaN: never written
  }
  return true;
}

static void test_emulated_forward_backward() {
  std::mt19937_64 rng(13);
  std::normal_distribution<double> nd;
  struct Case {
    int64_t n, k, r, in, out;
    int kind;  // 0 uniform, 1 skewed (one expert), 2 with empty experts
  };
  const Case cases[] = {{0, 3, 8, 40, 72, 0},  {1, 1, 1, 5, 3, 0},     {33, 2, 8, 40, 72, 2},
                        {97, 3, 16, 40, 72, 1}, {130, 8, 64, 70, 33, 2}, {200, 4, 128, 300, 90, 0},
                        {2, 3, 8, 1000, 700, 0}};
  for (const Case& cs : cases) {
    const int64_t n = cs.n, k = cs.k, r = cs.r, in = cs.in, out = cs.out;
    std::vector<int64_t> off(k + 1, 0);
    for (int64_t s = 1; s < k; ++s) {
      if (cs.kind == 1) off[s] = 0;
      else if (cs.kind == 2 && s % 2 == 1) off[s] = off[s - 1];
      else off[s] = off[s - 1] + static_cast<int64_t>(rng() % (n - off[s - 1] + 1));
    }
    off[k] = n;
    auto rnd = [&](int64_t len) {
      std::vector<double> v(len);
      for (auto& e : v) e = nd(rng);
      return v;
    };
    const std::vector<double> x = rnd(n * in), a = rnd(k * r * in), b = rnd(k * out * r), dy = rnd(n * out);
    std::vector<double> m(n);
    for (auto& e : m) e = 0.5 + (rng() % 100) / 100.0;
    // direct formulas
    std::vector<double> h(n * r, 0), g(n * r, 0), y(n * out, 0), dx(n * in, 0), da(k * r * in, 0),
        db(k * out * r, 0);
    for (int64_t s = 0; s < k; ++s) {
      for (int64_t i = off[s]; i < off[s + 1]; ++i) {
        for (int64_t j = 0; j < r; ++j) {
          for (int64_t c = 0; c < in; ++c) h[i * r + j] += x[i * in + c] * a[(s * r + j) * in + c];
          for (int64_t o = 0; o < out; ++o) g[i * r + j] += dy[i * out + o] * b[(s * out + o) * r + j];
        }
        for (int64_t o = 0; o < out; ++o) {
          for (int64_t j = 0; j < r; ++j) y[i * out + o] += m[i] * h[i * r + j] * b[(s * out + o) * r + j];
        }
        for (int64_t c = 0; c < in; ++c) {
          for (int64_t j = 0; j < r; ++j) {
            dx[i * in + c] += m[i] * g[i * r + j] * a[(s * r + j) * in + c];
            da[(s * r + j) * in + c] += m[i] * g[i * r + j] * x[i * in + c];
          }
        }
        for (int64_t o = 0; o < out; ++o) {
          for (int64_t j = 0; j < r; ++j) db[(s * out + o) * r + j] += dy[i * out + o] * m[i] * h[i * r + j];
        }
      }
    }
    // the kernels' decomposition: splits as the CUDA host code plans them for a 132-SM GPU
    const int64_t target = 264;
    const lt::RowGemmShape sh = lt::shrink_shape(in, r);
    const lt::SplitPlan ph = lt::split_plan(
        in, lt::want_splits(lt::seg_tile_grid(n, k, kBM) * ((r + kBN - 1) / kBN), target, in, 256, 16), kBK);
    const std::vector<double> h_e = sum_splits(emulate_row_gemm(sh, x, a, off, n, ph.splits, ph.chunk), ph.splits, n * r);
    EXPECT(near(h_e, h));
    std::vector<double> hs(n * r), dh(n * r);
    const lt::RowGemmShape sg = lt::dy_b_shape(out, r);
    const lt::SplitPlan pg = lt::split_plan(
        out, lt::want_splits(lt::seg_tile_grid(n, k, kBM) * ((r + kBN - 1) / kBN), target, out, 256, 16), kBK);
    const std::vector<double> g_e = sum_splits(emulate_row_gemm(sg, dy, b, off, n, pg.splits, pg.chunk), pg.splits, n * r);
    EXPECT(near(g_e, g));
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < r; ++j) {
        hs[i * r + j] = m[i] * h_e[i * r + j];
        dh[i * r + j] = m[i] * g_e[i * r + j];
      }
    }
    EXPECT(near(emulate_row_gemm(lt::expand_shape(r, out), hs, b, off, n, 1, r), y));
    EXPECT(near(emulate_row_gemm(lt::dx_shape(r, in), dh, a, off, n, 1, r), dx));
    EXPECT(near(emulate_wgrad(lt::grad_a_shape(r, in), dh, x, off, n), da));
    EXPECT(near(emulate_wgrad(lt::grad_b_shape(out, r), dy, hs, off, n), db));
  }
  std::printf("lora_tiles: emulated kernel decomposition matches the formulas\n");
}

// Chunks of v elements cover exactly the valid columns [0, cv) of a C-wide tile row, each valid
// column once, whatever cv.
void test_vec_chunks() {
  for (int v : {2, 4, 8}) {
    for (int c = v; c <= 64; c += v) {
      for (int cv = -3; cv <= c + 3; ++cv) {
        std::vector<int> hits(c, 0);
        for (int c0 = 0; c0 < c; c0 += v) {
          const int valid = lt::vec_chunk_valid(c0, v, cv);
          EXPECT(valid >= 0 && valid <= v);
          for (int i = 0; i < valid; ++i) ++hits[c0 + i];
        }
        for (int col = 0; col < c; ++col) EXPECT(hits[col] == (col < cv ? 1 : 0));
      }
    }
  }
  std::printf("lora_tiles: vector chunks cover each valid column once\n");
}

// The fused dY pass's block order: every (row chunk, column chunk, rank chunk) exactly once, the
// rank chunks of one dY tile adjacent (fastest), the order of the r <= 32 kernel with one rank
// chunk; the rank chunks tile [0, r) exactly; the traffic rule's break-even.
void test_dy_pass_blocks() {
  for (uint32_t col_chunks : {1u, 3u, 43u}) {
    for (uint32_t rank_chunks : {1u, 2u, 4u}) {
      const uint32_t row_chunks = 5;
      std::vector<int> seen(row_chunks * col_chunks * rank_chunks, 0);
      for (uint32_t b = 0; b < row_chunks * col_chunks * rank_chunks; ++b) {
        const lt::DyPassBlock d = lt::dy_pass_block(b, col_chunks, rank_chunks);
        EXPECT(d.row_chunk >= 0 && d.row_chunk < row_chunks);
        EXPECT(d.col_chunk >= 0 && d.col_chunk < col_chunks);
        EXPECT(d.rank_chunk >= 0 && d.rank_chunk < rank_chunks);
        ++seen[(d.row_chunk * col_chunks + d.col_chunk) * rank_chunks + d.rank_chunk];
        // adjacent blocks of one dY tile differ in the rank chunk only
        EXPECT(d.rank_chunk == b % rank_chunks);
        if (b % rank_chunks != 0) {
          const lt::DyPassBlock prev = lt::dy_pass_block(b - 1, col_chunks, rank_chunks);
          EXPECT(prev.row_chunk == d.row_chunk && prev.col_chunk == d.col_chunk &&
                 prev.rank_chunk + 1 == d.rank_chunk);
        }
        if (rank_chunks == 1) EXPECT(d.row_chunk == b / col_chunks && d.col_chunk == b % col_chunks);
      }
      for (int v : seen) EXPECT(v == 1);
    }
  }
  // the largest grid the launch allows (grid_dim: < 2^31 blocks) decodes without overflow
  const lt::DyPassBlock last = lt::dy_pass_block(2147483646u, 43u, 4u);
  EXPECT(last.rank_chunk == 2147483646u % 4u && last.col_chunk == (2147483646u / 4u) % 43u &&
         last.row_chunk == (2147483646u / 4u) / 43u);
  for (int64_t r = 0; r <= 130; ++r) {
    const int64_t chunks = lt::dy_pass_rank_chunks(r, 32);
    EXPECT(chunks == (r <= 32 ? 1 : (r + 31) / 32));
    int64_t covered = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      const int cols = lt::dy_pass_rank_cols(r, c, 32);
      EXPECT(cols >= 0 && cols <= 32);
      EXPECT(r == 0 || cols > 0);  // no rank chunk is empty unless r is
      covered += cols;
    }
    EXPECT(covered == r);
    EXPECT(lt::dy_pass_rank_cols(r, chunks, 32) == 0);
  }
  EXPECT(lt::dy_pass_rank_cols(40, 1, 32) == 8 && lt::dy_pass_rank_cols(128, 3, 32) == 32);
  // 16-bit: G's fp32 partials (8 r / cols bytes an element) below the 2 bytes of dY's second read
  EXPECT(lt::dy_pass_pays(32, 256, 2) && lt::dy_pass_pays(63, 256, 2) && !lt::dy_pass_pays(64, 256, 2));
  EXPECT(lt::dy_pass_pays(64, 512, 2) && lt::dy_pass_pays(127, 512, 2) && !lt::dy_pass_pays(128, 512, 2));
  EXPECT(lt::dy_pass_pays(128, 512, 4));
  for (int64_t r = 0; r <= 130; ++r) EXPECT(lt::dy_pass_halves(r, 32) == (r <= 32 ? 1 : 2));
  std::printf("lora_tiles: dy_pass blocks, rank chunks, break-even\n");
}

int main() {
  test_dy_pass_blocks();
  test_vec_chunks();
  test_emulated_forward_backward();
  test_exhaustive();
  test_ill_formed_stays_in_range();
  test_split_plan();
  return finish("lora_tiles");
}
