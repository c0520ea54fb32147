// permute on the CPU: a serial counting sort of the live slots (stable in (t, j) order),
// then a parallel gather of the token rows; padding rows, and the tail when asked, zeroed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cpu(const at::Tensor& x_in,
                                                           const at::Tensor& ids_in,
                                                           int64_t num_real, int64_t align,
                                                           bool zero_tail) {
  check_permute(x_in, ids_in, num_real, align);
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = ids.size(0), K = ids.size(1), H = x.size(1);
  const int64_t R = permuted_rows(T, K, num_real, align);
  auto x_perm = at::empty({R, H}, x.options());
  auto offsets = at::empty({num_real}, ids.options());
  auto slot_rows = at::empty({T, K}, ids.options());

  const int32_t* id = ids.data_ptr<int32_t>();
  int32_t* rows = slot_rows.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  std::vector<int64_t> cursor(num_real, 0);
  for (int64_t s = 0; s < T * K; ++s)
    if (is_live(id[s], static_cast<int>(num_real))) ++cursor[id[s]];
  const int64_t row_bytes = H * x.element_size();
  char* dst = static_cast<char*>(x_perm.data_ptr());
  auto zero_rows = [&](int64_t begin, int64_t end) {
    if (end > begin) std::memset(dst + begin * row_bytes, 0, (end - begin) * row_bytes);
  };
  int64_t start = 0;
  for (int64_t e = 0; e < num_real; ++e) {
    const int64_t count = cursor[e];
    cursor[e] = start;
    zero_rows(start + count, start + padded_count(count, align));
    start += padded_count(count, align);
    off[e] = static_cast<int32_t>(start);
  }
  if (zero_tail) zero_rows(start, R);
  for (int64_t s = 0; s < T * K; ++s)
    rows[s] = is_live(id[s], static_cast<int>(num_real)) ? static_cast<int32_t>(cursor[id[s]]++)
                                                          : -1;

  const char* src = static_cast<const char*>(x.data_ptr());
  at::parallel_for(0, T, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t j = 0; j < K; ++j)
        if (rows[t * K + j] >= 0)
          std::memcpy(dst + rows[t * K + j] * row_bytes, src + t * row_bytes, row_bytes);
  });
  return {x_perm, offsets, slot_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) { m.impl("permute", &permute_cpu); }

}  // namespace anyexperts
