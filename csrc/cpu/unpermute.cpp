// unpermute and its backward on the CPU, one token per iteration, accumulating in fp32
// (fp64 for fp64 data) over j ascending. The backward accumulates grad_y in a zeroed buffer,
// so it zeroes unreferenced rows whatever zero_unreferenced says (zeros are one of the values
// "unspecified" allows).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

// zero_unreferenced concerns the backward only.
at::Tensor unpermute_cpu(const at::Tensor& y_in, const at::Tensor& slot_rows_in,
                         const at::Tensor& weights_in, bool /*zero_unreferenced*/) {
  check_unpermute(y_in, slot_rows_in, weights_in);
  const auto y = y_in.contiguous();
  const auto slot_rows = slot_rows_in.contiguous();
  const int64_t T = slot_rows.size(0), K = slot_rows.size(1), R = y.size(0), H = y.size(1);
  auto out = at::empty({T, H}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "unpermute_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto weights = weights_in.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* rows = slot_rows.data_ptr<int32_t>();
    const Acc* w = weights.data_ptr<Acc>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t j = 0; j < K; ++j) {
          const int32_t r = rows[t * K + j];
          if (!is_live_row(r, R)) continue;
          const Acc wj = w[t * K + j];
          const scalar_t* src = yp + r * H;
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<Acc>(src[h]);
        }
        for (int64_t h = 0; h < H; ++h) op[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return out;
}

// grad_y[r] accumulates w * grad_out[t] over the slots on row r (a row permute produced is
// on one slot; summing keeps duplicate rows right too), so the loop parallelises over
// columns, each thread walking every slot in order: deterministic.
std::tuple<at::Tensor, at::Tensor> unpermute_backward_cpu(const at::Tensor& grad_out_in,
                                                          const at::Tensor& y_in,
                                                          const at::Tensor& slot_rows_in,
                                                          const at::Tensor& weights_in,
                                                          bool /*zero_unreferenced*/) {
  check_unpermute_backward(grad_out_in, y_in, slot_rows_in, weights_in);
  const auto grad_out = grad_out_in.contiguous();
  const auto y = y_in.contiguous();
  const auto slot_rows = slot_rows_in.contiguous();
  const int64_t T = slot_rows.size(0), K = slot_rows.size(1), R = y.size(0), H = y.size(1);
  const auto acc_type = accumulate_dtype(y.scalar_type());
  auto grad_y_acc = at::zeros({R, H}, y.options().dtype(acc_type));
  auto grad_w = at::zeros({T, K}, y.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(),
                                  "unpermute_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto weights = weights_in.to(acc_type).contiguous();
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const int32_t* rows = slot_rows.data_ptr<int32_t>();
    const Acc* w = weights.data_ptr<Acc>();
    Acc* gy = grad_y_acc.data_ptr<Acc>();
    Acc* gw = grad_w.data_ptr<Acc>();
    at::parallel_for(0, H, 64, [&](int64_t h0, int64_t h1) {
      for (int64_t s = 0; s < T * K; ++s) {
        const int32_t r = rows[s];
        if (!is_live_row(r, R)) continue;
        const scalar_t* gt = g + (s / K) * H;
        for (int64_t h = h0; h < h1; ++h) gy[r * H + h] += w[s] * static_cast<Acc>(gt[h]);
      }
    });
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t j = 0; j < K; ++j) {
          const int32_t r = rows[t * K + j];
          if (!is_live_row(r, R)) continue;
          Acc dot = 0;
          for (int64_t h = 0; h < H; ++h)
            dot += static_cast<Acc>(g[t * H + h]) * static_cast<Acc>(yp[r * H + h]);
          gw[t * K + j] = dot;
        }
    });
  });
  return {grad_y_acc.to(y.scalar_type()), grad_w.to(weights_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) {
  m.impl("unpermute", &unpermute_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace anyexperts
