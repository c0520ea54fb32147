// swiglu and its backward on the CPU: one row per iteration, fp32 math (fp64 for fp64),
// rows past the last group written as zeros (or, without zero_tail, not written), never read.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

int64_t live_rows_of(const at::Tensor& offsets, int64_t rows) {
  const auto off = offsets.contiguous();
  return live_rows(off.data_ptr<int32_t>(), static_cast<int>(off.size(0)), rows);
}

at::Tensor swiglu_cpu(const at::Tensor& gu_in, const at::Tensor& offsets, bool zero_tail) {
  check_swiglu(gu_in, offsets);
  const auto gu = gu_in.contiguous();
  const int64_t R = gu.size(0), F = gu.size(1) / 2;
  const int64_t live = live_rows_of(offsets, R);
  const int64_t written = zero_tail ? R : live;
  auto h = at::empty({R, F}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(), "swiglu_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* in = gu.data_ptr<scalar_t>();
    scalar_t* out = h.data_ptr<scalar_t>();
    at::parallel_for(0, written, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = out + r * F;
        if (r >= live) {
          std::fill(o, o + F, scalar_t(0));
          continue;
        }
        const scalar_t* gate = in + r * 2 * F;
        const scalar_t* up = gate + F;
        for (int64_t f = 0; f < F; ++f)
          o[f] = static_cast<scalar_t>(
              swiglu_value(static_cast<Acc>(gate[f]), static_cast<Acc>(up[f])));
      }
    });
  });
  return h;
}

at::Tensor swiglu_backward_cpu(const at::Tensor& grad_h_in, const at::Tensor& gu_in,
                               const at::Tensor& offsets, bool zero_tail) {
  check_swiglu_backward(grad_h_in, gu_in, offsets);
  const auto grad_h = grad_h_in.contiguous();
  const auto gu = gu_in.contiguous();
  const int64_t R = gu.size(0), F = gu.size(1) / 2;
  const int64_t live = live_rows_of(offsets, R);
  const int64_t written = zero_tail ? R : live;
  auto grad_gu = at::empty({R, 2 * F}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gu.scalar_type(),
                                  "swiglu_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* g = grad_h.data_ptr<scalar_t>();
    const scalar_t* in = gu.data_ptr<scalar_t>();
    scalar_t* out = grad_gu.data_ptr<scalar_t>();
    at::parallel_for(0, written, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = out + r * 2 * F;
        if (r >= live) {
          std::fill(o, o + 2 * F, scalar_t(0));
          continue;
        }
        const scalar_t* gate = in + r * 2 * F;
        const scalar_t* up = gate + F;
        const scalar_t* dh = g + r * F;
        for (int64_t f = 0; f < F; ++f) {
          const auto d = swiglu_grad(static_cast<Acc>(dh[f]), static_cast<Acc>(gate[f]),
                                     static_cast<Acc>(up[f]));
          o[f] = static_cast<scalar_t>(d.gate);
          o[F + f] = static_cast<scalar_t>(d.up);
        }
      }
    });
  });
  return grad_gu;
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) {
  m.impl("swiglu", &swiglu_cpu);
  m.impl("swiglu_backward", &swiglu_backward_cpu);
}

}  // namespace anyexperts
