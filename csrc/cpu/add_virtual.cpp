// add_virtual and its backward on the CPU, one token per iteration, in fp32 (fp64 for fp64
// data) over the token's slots j ascending, rounded once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

// The row a source code reads: the token's x for a copy, else a const vector.
template <typename T>
const T* source_row(int32_t code, const T* x_row, const T* const_vectors, int64_t H) {
  return code == kVirtualCopy ? x_row : const_vectors + code * H;
}

at::Tensor add_virtual_cpu(const at::Tensor& out_in, const at::Tensor& x_in,
                           const at::Tensor& ids_in, const at::Tensor& weights_in,
                           int64_t num_real, const at::Tensor& sources_in,
                           const at::Tensor& const_vectors_in) {
  check_add_virtual(out_in, x_in, ids_in, weights_in, num_real, sources_in, const_vectors_in);
  const auto out = out_in.contiguous();
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto sources = sources_in.contiguous();
  const auto cv = const_vectors_in.contiguous();
  const int64_t T = out.size(0), H = out.size(1), K = ids.size(1);
  const int64_t M = sources.size(0), C = cv.size(0);
  auto result = at::empty({T, H}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "add_virtual_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto weights = weights_in.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const scalar_t* op = out.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = cv.data_ptr<scalar_t>();
    const int32_t* id = ids.data_ptr<int32_t>();
    const int32_t* src = sources.data_ptr<int32_t>();
    const Acc* w = weights.data_ptr<Acc>();
    scalar_t* rp = result.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      std::vector<Acc> acc(H);
      for (int64_t t = begin; t < end; ++t) {
        for (int64_t h = 0; h < H; ++h) acc[h] = static_cast<Acc>(op[t * H + h]);
        for (int64_t j = 0; j < K; ++j) {
          const int32_t code = virtual_source(id[t * K + j], num_real, src, M, C);
          if (code == kVirtualZero) continue;
          const Acc wj = w[t * K + j];
          const scalar_t* row = source_row(code, xp + t * H, vp, H);
          for (int64_t h = 0; h < H; ++h) acc[h] += wj * static_cast<Acc>(row[h]);
        }
        for (int64_t h = 0; h < H; ++h) rp[t * H + h] = static_cast<scalar_t>(acc[h]);
      }
    });
  });
  return result;
}

// grad_x[t] = (sum of the token's copy weights) * grad[t], and exactly 0 for a token without
// a copy slot (x[t] took no part: a NaN in grad[t] does not reach it, as in the reference's
// masked autograd); grad_weights[t, j] = grad[t] .
// (the row slot j adds) for a slot with a source, else 0. The gradient for out is grad
// itself and the one for const_vectors a product over tokens: both are left to autograd.
std::tuple<at::Tensor, at::Tensor> add_virtual_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& ids_in,
    const at::Tensor& weights_in, int64_t num_real, const at::Tensor& sources_in,
    const at::Tensor& const_vectors_in) {
  check_add_virtual(grad_in, x_in, ids_in, weights_in, num_real, sources_in, const_vectors_in,
                    "add_virtual_backward", "grad");
  const auto grad = grad_in.contiguous();
  const auto x = x_in.contiguous();
  const auto ids = ids_in.contiguous();
  const auto sources = sources_in.contiguous();
  const auto cv = const_vectors_in.contiguous();
  const int64_t T = grad.size(0), H = grad.size(1), K = ids.size(1);
  const int64_t M = sources.size(0), C = cv.size(0);
  const auto acc_type = accumulate_dtype(grad.scalar_type());
  auto grad_x = at::empty({T, H}, grad.options());
  auto grad_w = at::empty({T, K}, grad.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "add_virtual_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto weights = weights_in.to(acc_type).contiguous();
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* vp = cv.data_ptr<scalar_t>();
    const int32_t* id = ids.data_ptr<int32_t>();
    const int32_t* src = sources.data_ptr<int32_t>();
    const Acc* w = weights.data_ptr<Acc>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    Acc* gw = grad_w.data_ptr<Acc>();
    at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* gt = g + t * H;
        Acc coef = 0;
        bool copied = false;
        for (int64_t j = 0; j < K; ++j) {
          const int32_t code = virtual_source(id[t * K + j], num_real, src, M, C);
          Acc dot = 0;
          if (code != kVirtualZero) {
            if (code == kVirtualCopy) {
              coef += w[t * K + j];
              copied = true;
            }
            const scalar_t* row = source_row(code, xp + t * H, vp, H);
            for (int64_t h = 0; h < H; ++h)
              dot += static_cast<Acc>(gt[h]) * static_cast<Acc>(row[h]);
          }
          gw[t * K + j] = dot;
        }
        for (int64_t h = 0; h < H; ++h)
          gx[t * H + h] = copied ? static_cast<scalar_t>(coef * static_cast<Acc>(gt[h])) : scalar_t(0);
      }
    });
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) {
  m.impl("add_virtual", &add_virtual_cpu);
  m.impl("add_virtual_backward", &add_virtual_backward_cpu);
}

}  // namespace anyexperts
