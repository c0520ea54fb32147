// hsm and its backward on CUDA: x' = x + a[t] * x, and back dx = g + a[t] * g with
// grad_a[t] the dot product of the row's g and x; each one pass over [T, H], where the
// layer used to pay a broadcast addcmul forward and three [T, H] passes backward.
//
// One warp per row in a grid-stride loop, lanes over the row's 16-byte vectors where
// alignment allows. The row's dot product is each lane's sum in order, then a butterfly
// warp_sum: a fixed order, so grad_a is bitwise reproducible from run to run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "anyexperts/checks.h"
#include "anyexperts/cuda_utils.cuh"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

using cuda::kWarp;
using cuda::opmath_t;
using cuda::Pack;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// Enough warps to fill any current GPU several times over; the grid-stride loop takes the
// rest.
constexpr int64_t kMaxBlocks = 4096;

// x and out rows are `vecs` vectors; a holds the coefficients in the math type.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    hsm_kernel(const scalar_t* __restrict__ x, const opmath_t<scalar_t>* __restrict__ a,
               scalar_t* __restrict__ out, int64_t rows, int64_t vecs) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = cuda::global_warp(); r < rows; r += cuda::global_warp_count()) {
    const acc_t a_r = a[r];
    const V* in = reinterpret_cast<const V*>(x) + r * vecs;
    V* o = reinterpret_cast<V*>(out) + r * vecs;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V xv = in[v];
      V ov;
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        ov.v[e] = static_cast<scalar_t>(hsm_value(static_cast<acc_t>(xv.v[e]), a_r));
      o[v] = ov;
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    hsm_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                        const opmath_t<scalar_t>* __restrict__ a, scalar_t* __restrict__ grad_x,
                        opmath_t<scalar_t>* __restrict__ grad_a, int64_t rows, int64_t vecs) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = cuda::global_warp(); r < rows; r += cuda::global_warp_count()) {
    const acc_t a_r = a[r];
    const V* g = reinterpret_cast<const V*>(grad) + r * vecs;
    const V* in = reinterpret_cast<const V*>(x) + r * vecs;
    V* dx = reinterpret_cast<V*>(grad_x) + r * vecs;
    acc_t dot = 0;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V gv = g[v];
      const V xv = in[v];
      V dv;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const auto d = hsm_grad(static_cast<acc_t>(gv.v[e]), static_cast<acc_t>(xv.v[e]), a_r);
        dv.v[e] = static_cast<scalar_t>(d.x);
        dot += d.a;
      }
      dx[v] = dv;
    }
    dot = cuda::warp_sum(dot);
    if (lane == 0) grad_a[r] = dot;
  }
}

// ---- host -----------------------------------------------------------------------------

at::Tensor hsm_cuda(const at::Tensor& x, const at::Tensor& a) {
  check_hsm(x, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::NvtxRange range("anyexperts::hsm");
  const at::Tensor xc = x.contiguous();
  // fp32 coefficients of fp64 data are read as fp64, the math type.
  const at::Tensor ac = a.to(accumulate_dtype(xc.scalar_type())).contiguous();
  const int64_t rows = xc.size(0);
  const int64_t width = xc.size(1);
  at::Tensor out = at::empty({rows, width}, xc.options());
  if (rows == 0 || width == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "hsm_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const int vec = cuda::vec_width<scalar_t>(width, {xc.const_data_ptr(), out.const_data_ptr()});
    cuda::with_vec<scalar_t>(vec, [&](auto kv) {
      constexpr int kVec = decltype(kv)::value;
      hsm_kernel<scalar_t, kVec>
          <<<cuda::grid_for(rows, kWarpsPerBlock, kMaxBlocks), kThreads, 0, stream>>>(
              xc.const_data_ptr<scalar_t>(), ac.const_data_ptr<acc_t>(),
              out.mutable_data_ptr<scalar_t>(), rows, width / kVec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hsm_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                     const at::Tensor& a) {
  check_hsm_backward(grad, x, a);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::NvtxRange range("anyexperts::hsm_backward");
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor ac = a.to(accumulate_dtype(xc.scalar_type())).contiguous();
  const int64_t rows = xc.size(0);
  const int64_t width = xc.size(1);
  at::Tensor grad_x = at::empty({rows, width}, xc.options());
  at::Tensor grad_a = at::empty({rows}, ac.options());
  if (width == 0) grad_a.zero_();  // an empty row's dot product
  if (rows == 0 || width == 0) return {grad_x, grad_a.to(a.scalar_type())};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(),
                                  "hsm_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const int vec = cuda::vec_width<scalar_t>(
        width, {gc.const_data_ptr(), xc.const_data_ptr(), grad_x.const_data_ptr()});
    cuda::with_vec<scalar_t>(vec, [&](auto kv) {
      constexpr int kVec = decltype(kv)::value;
      hsm_backward_kernel<scalar_t, kVec>
          <<<cuda::grid_for(rows, kWarpsPerBlock, kMaxBlocks), kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
              ac.const_data_ptr<acc_t>(), grad_x.mutable_data_ptr<scalar_t>(),
              grad_a.mutable_data_ptr<acc_t>(), rows, width / kVec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_a.to(a.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) {
  m.impl("hsm", &hsm_cuda);
  m.impl("hsm_backward", &hsm_backward_cuda);
}

}  // namespace anyexperts
