// hsm and its backward on the CPU: one row per iteration, fp32 math (fp64 for fp64), each
// output rounded once to x's dtype; grad_a is the row's dot product, summed in order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

// Rows per task: about GRAIN_SIZE elements, so narrow rows do not make tasks of a few
// hundred operations each.
int64_t row_grain(int64_t width) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(width, 1));
}

at::Tensor hsm_cpu(const at::Tensor& x_in, const at::Tensor& a_in) {
  check_hsm(x_in, a_in);
  const auto x = x_in.contiguous();
  // fp32 coefficients of fp64 data are read as fp64, the math type.
  const auto a = a_in.to(accumulate_dtype(x.scalar_type())).contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  auto out = at::empty({T, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "hsm_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* in = x.data_ptr<scalar_t>();
    const Acc* coef = a.data_ptr<Acc>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Acc a_t = coef[t];
        for (int64_t h = t * H; h < (t + 1) * H; ++h)
          o[h] = static_cast<scalar_t>(hsm_value(static_cast<Acc>(in[h]), a_t));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hsm_backward_cpu(const at::Tensor& grad_in,
                                                    const at::Tensor& x_in,
                                                    const at::Tensor& a_in) {
  check_hsm_backward(grad_in, x_in, a_in);
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto acc_type = accumulate_dtype(x.scalar_type());
  const auto a = a_in.to(acc_type).contiguous();
  const int64_t T = x.size(0), H = x.size(1);
  auto grad_x = at::empty({T, H}, x.options());
  auto grad_a = at::empty({T}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "hsm_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* in = x.data_ptr<scalar_t>();
    const Acc* coef = a.data_ptr<Acc>();
    scalar_t* dx = grad_x.data_ptr<scalar_t>();
    Acc* da = grad_a.data_ptr<Acc>();
    at::parallel_for(0, T, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Acc a_t = coef[t];
        Acc dot = 0;
        for (int64_t h = t * H; h < (t + 1) * H; ++h) {
          const auto d = hsm_grad(static_cast<Acc>(g[h]), static_cast<Acc>(in[h]), a_t);
          dx[h] = static_cast<scalar_t>(d.x);
          dot += d.a;
        }
        da[t] = dot;
      }
    });
  });
  return {grad_x, grad_a.to(a_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) {
  m.impl("hsm", &hsm_cpu);
  m.impl("hsm_backward", &hsm_backward_cpu);
}

}  // namespace anyexperts
