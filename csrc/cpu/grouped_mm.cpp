// grouped_mm on the CPU: one ATen matmul per group, accumulated in fp32 (fp64 for fp64).
// Reading offsets on the host is free here; the CUDA path builds its problems on device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

at::Tensor grouped_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets_in,
                          bool zero_tail) {
  check_grouped_mm(a, b, offsets_in);
  const auto offsets = offsets_in.contiguous();
  const int64_t R = a.size(0), G = b.size(0);
  const auto acc = accumulate_dtype(a.scalar_type());
  auto out = at::empty({R, b.size(2)}, a.options());
  const int32_t* off = offsets.data_ptr<int32_t>();
  // The groups tile [0, live) row after row, so every row before `live` is written here.
  int32_t reach = 0;
  int64_t live = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t begin = live;
    reach = running_end(reach, off[g]);
    live = clamp_end(reach, R);
    if (live == begin) continue;
    const auto rows = a.narrow(0, begin, live - begin);
    out.narrow(0, begin, live - begin).copy_(at::mm(rows.to(acc), b[g].to(acc)));
  }
  if (zero_tail) out.narrow(0, live, R - live).zero_();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) { m.impl("grouped_mm", &grouped_mm_cpu); }

}  // namespace anyexperts
