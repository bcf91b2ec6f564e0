// CPU kernels for permute / permute_rows / unpermute: a counting sort of tokens by expert
// (histogram, exclusive scan, stable scatter) and row moves in both directions.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "../core/index_math.h"
#include "../ops.h"

namespace mole_ext {
namespace {

// Copies row src_index(i) of `src` to row dst_index(i) of `dst` for i in [0, n), byte-wise so
// one kernel serves every dtype.
template <typename SrcIdx, typename DstIdx>
void move_rows(const at::Tensor& src, at::Tensor& dst, int64_t n, SrcIdx src_index, DstIdx dst_index) {
  const int64_t row_bytes = src.size(1) * src.element_size();
  if (n == 0 || row_bytes == 0) return;
  const char* s = static_cast<const char*>(src.const_data_ptr());
  char* d = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / row_bytes);
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      std::memcpy(d + dst_index(i) * row_bytes, s + src_index(i) * row_bytes, row_bytes);
    }
  });
}

// Reads sorted_token as int64 and checks it is a permutation of [0, n): an index out of range
// or repeated would leave rows unwritten or read out of bounds.
std::vector<int64_t> checked_permutation(const at::Tensor& sorted_token_in) {
  const at::Tensor st = sorted_token_in.to(at::kLong).contiguous();
  const int64_t n = st.size(0);
  const int64_t* p = st.const_data_ptr<int64_t>();
  std::vector<int64_t> idx(p, p + n);
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < n, "sorted_token must be a permutation of [0, ", n,
                "), but sorted_token[", i, "] = ", idx[i]);
    TORCH_CHECK(!seen[idx[i]], "sorted_token must be a permutation of [0, ", n, "), but ", idx[i],
                " appears more than once");
    seen[idx[i]] = 1;
  }
  return idx;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in, const at::Tensor& expert_in,
                                                           int64_t num_experts) {
  const BelowAutograd below_autograd;
  check_permute(x_in, expert_in, num_experts);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor expert = expert_in.to(at::kLong).contiguous();
  const int64_t n = x.size(0);
  const int64_t* e = expert.const_data_ptr<int64_t>();

  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(e[t] >= 0 && e[t] < num_experts, "expert ids must be in [0, num_experts = ",
                num_experts, "), but expert[", t, "] = ", e[t]);
    ++counts[e[t]];
  }
  at::Tensor offsets = at::empty({num_experts + 1}, x.options().dtype(at::kInt));
  int32_t* off = offsets.mutable_data_ptr<int32_t>();
  index_math::exclusive_scan(counts.data(), num_experts, off);

  // Stable scatter: walking tokens in order keeps each expert's rows in their original order.
  at::Tensor sorted_token = at::empty({n}, x.options().dtype(at::kInt));
  int32_t* st = sorted_token.mutable_data_ptr<int32_t>();
  std::vector<int64_t> cursor(off, off + num_experts);
  for (int64_t t = 0; t < n; ++t) st[cursor[e[t]]++] = static_cast<int32_t>(t);

  at::Tensor x_sorted = at::empty_like(x);
  move_rows(x, x_sorted, n, [st](int64_t i) { return static_cast<int64_t>(st[i]); },
            [](int64_t i) { return i; });
  return {x_sorted, sorted_token, offsets};
}

at::Tensor permute_rows_cpu(const at::Tensor& x_in, const at::Tensor& sorted_token) {
  const BelowAutograd below_autograd;
  check_permute_rows(x_in, sorted_token, "x");
  const at::Tensor x = x_in.contiguous();
  const std::vector<int64_t> idx = checked_permutation(sorted_token);
  at::Tensor out = at::empty_like(x);
  move_rows(x, out, x.size(0), [&idx](int64_t i) { return idx[i]; }, [](int64_t i) { return i; });
  return out;
}

at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& sorted_token) {
  const BelowAutograd below_autograd;
  check_permute_rows(y_in, sorted_token, "y_sorted");
  const at::Tensor y = y_in.contiguous();
  const std::vector<int64_t> idx = checked_permutation(sorted_token);
  at::Tensor out = at::empty_like(y);
  move_rows(y, out, y.size(0), [](int64_t i) { return i; }, [&idx](int64_t i) { return idx[i]; });
  return out;
}

TORCH_LIBRARY_IMPL(mole_ext, CPU, m) {
  m.impl("permute", &permute_cpu);
  m.impl("permute_rows", &permute_rows_cpu);
  m.impl("unpermute", &unpermute_cpu);
}

}  // namespace mole_ext
