// grouped_mm_wgrad on the CPU: db[g] = a_g^T @ dout_g per group, zero for empty groups.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

at::Tensor grouped_mm_wgrad_cpu(const at::Tensor& a, const at::Tensor& dout,
                                const at::Tensor& offsets_in) {
  check_grouped_mm_wgrad(a, dout, offsets_in);
  const auto offsets = offsets_in.contiguous();
  const int64_t R = a.size(0), G = offsets.size(0);
  const auto acc = accumulate_dtype(a.scalar_type());
  auto db = at::zeros({G, a.size(1), dout.size(1)}, a.options());
  const int32_t* off = offsets.data_ptr<int32_t>();
  int32_t reach = 0;
  for (int64_t g = 0, begin = 0; g < G; ++g) {
    reach = running_end(reach, off[g]);
    const int64_t end = clamp_end(reach, R);
    const int64_t n = end - begin;
    if (n > 0) {
      db[g].copy_(at::mm(a.narrow(0, begin, n).to(acc).t(), dout.narrow(0, begin, n).to(acc)));
    }
    begin = end;
  }
  return db;
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) { m.impl("grouped_mm_wgrad", &grouped_mm_wgrad_cpu); }

}  // namespace anyexperts
