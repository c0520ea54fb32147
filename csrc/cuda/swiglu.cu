// swiglu and its backward on CUDA: h = silu(gate) * up over the rows of some group, zero
// past the last group (the rows a static-shape MoE layer allocates but does not use).
//
// One warp per row in a grid-stride loop, lanes over the row's 16-byte vectors where
// alignment allows. Each block first finds the live end itself, a max over the G offsets
// (live_rows, rules.h), so the op is one launch with no host sync. Dead rows are written
// as zeros without reading gu (their cost is the zero store only, whatever gu holds
// there), or, without zero_tail, not touched at all.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>


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
// Enough blocks to fill any current GPU several times over; fewer blocks read the offsets
// fewer times, more would not run any sooner.
constexpr int64_t kMaxBlocks = 4096;

// live_rows(offsets, groups, rows) computed by the whole block: max(0, offsets...) clamped
// to rows, which is what group_end's running max gives for the last group.
__device__ __forceinline__ int64_t block_live_rows(const int32_t* __restrict__ offsets,
                                                   int64_t groups, int64_t rows,
                                                   int64_t* scratch) {
  int64_t end = 0;
  for (int64_t g = threadIdx.x; g < groups; g += blockDim.x) end = max(end, int64_t{offsets[g]});
  end = cuda::block_reduce(end, scratch, int64_t{0}, [](int64_t x) { return cuda::warp_max(x); });
  return end < rows ? end : rows;
}

// gu rows are [gate | up], `vecs` vectors each half; h rows are `vecs` vectors.
template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    swiglu_kernel(const scalar_t* __restrict__ gu, const int32_t* __restrict__ offsets,
                  scalar_t* __restrict__ h, int64_t groups, int64_t rows, int64_t vecs,
                  bool zero_tail) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  __shared__ int64_t scratch[kWarp];
  const int64_t live = block_live_rows(offsets, groups, rows, scratch);
  const int lane = threadIdx.x % kWarp;
  const int64_t written = zero_tail ? rows : live;
  for (int64_t r = cuda::global_warp(); r < written; r += cuda::global_warp_count()) {
    V* out = reinterpret_cast<V*>(h) + r * vecs;
    if (r >= live) {
      for (int64_t v = lane; v < vecs; v += kWarp) out[v] = V{};
      continue;
    }
    const V* gate = reinterpret_cast<const V*>(gu) + r * 2 * vecs;
    const V* up = gate + vecs;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V g = gate[v];
      const V u = up[v];
      V o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        o.v[e] = static_cast<scalar_t>(
            swiglu_value(static_cast<acc_t>(g.v[e]), static_cast<acc_t>(u.v[e])));
      }
      out[v] = o;
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    swiglu_backward_kernel(const scalar_t* __restrict__ grad_h, const scalar_t* __restrict__ gu,
                           const int32_t* __restrict__ offsets, scalar_t* __restrict__ grad_gu,
                           int64_t groups, int64_t rows, int64_t vecs, bool zero_tail) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  __shared__ int64_t scratch[kWarp];
  const int64_t live = block_live_rows(offsets, groups, rows, scratch);
  const int lane = threadIdx.x % kWarp;
  const int64_t written = zero_tail ? rows : live;
  for (int64_t r = cuda::global_warp(); r < written; r += cuda::global_warp_count()) {
    V* d_gate = reinterpret_cast<V*>(grad_gu) + r * 2 * vecs;
    V* d_up = d_gate + vecs;
    if (r >= live) {
      for (int64_t v = lane; v < vecs; v += kWarp) d_gate[v] = d_up[v] = V{};
      continue;
    }
    const V* dh = reinterpret_cast<const V*>(grad_h) + r * vecs;
    const V* gate = reinterpret_cast<const V*>(gu) + r * 2 * vecs;
    const V* up = gate + vecs;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V d = dh[v];
      const V g = gate[v];
      const V u = up[v];
      V dg, du;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const auto grad = swiglu_grad(static_cast<acc_t>(d.v[e]), static_cast<acc_t>(g.v[e]),
                                      static_cast<acc_t>(u.v[e]));
        dg.v[e] = static_cast<scalar_t>(grad.gate);
        du.v[e] = static_cast<scalar_t>(grad.up);
      }
      d_gate[v] = dg;
      d_up[v] = du;
    }
  }
}

// ---- host -----------------------------------------------------------------------------

at::Tensor swiglu_cuda(const at::Tensor& gu, const at::Tensor& offsets, bool zero_tail) {
  check_swiglu(gu, offsets);
  const c10::cuda::CUDAGuard guard(gu.device());
  const cuda::NvtxRange range("anyexperts::swiglu");
  const at::Tensor gc = gu.contiguous();
  const at::Tensor oc = offsets.contiguous();
  const int64_t rows = gc.size(0);
  const int64_t width = gc.size(1) / 2;
  at::Tensor h = at::empty({rows, width}, gc.options());
  if (rows == 0 || width == 0) return h;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "swiglu_cuda", [&] {
    const int vec = cuda::vec_width<scalar_t>(width, {gc.const_data_ptr(), h.const_data_ptr()});
    cuda::with_vec<scalar_t>(vec, [&](auto kv) {
      constexpr int kVec = decltype(kv)::value;
      const int64_t vecs = width / kVec;
      swiglu_kernel<scalar_t, kVec>
          <<<cuda::grid_for(rows, kWarpsPerBlock, kMaxBlocks), kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), oc.const_data_ptr<int32_t>(),
              h.mutable_data_ptr<scalar_t>(), oc.size(0), rows, vecs, zero_tail);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return h;
}

at::Tensor swiglu_backward_cuda(const at::Tensor& grad_h, const at::Tensor& gu,
                                const at::Tensor& offsets, bool zero_tail) {
  check_swiglu_backward(grad_h, gu, offsets);
  const c10::cuda::CUDAGuard guard(gu.device());
  const cuda::NvtxRange range("anyexperts::swiglu_backward");
  const at::Tensor dc = grad_h.contiguous();
  const at::Tensor gc = gu.contiguous();
  const at::Tensor oc = offsets.contiguous();
  const int64_t rows = gc.size(0);
  const int64_t width = gc.size(1) / 2;
  at::Tensor grad_gu = at::empty({rows, 2 * width}, gc.options());
  if (rows == 0 || width == 0) return grad_gu;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(),
                                  "swiglu_backward_cuda", [&] {
    const int vec = cuda::vec_width<scalar_t>(
        width, {dc.const_data_ptr(), gc.const_data_ptr(), grad_gu.const_data_ptr()});
    cuda::with_vec<scalar_t>(vec, [&](auto kv) {
      constexpr int kVec = decltype(kv)::value;
      const int64_t vecs = width / kVec;
      swiglu_backward_kernel<scalar_t, kVec>
          <<<cuda::grid_for(rows, kWarpsPerBlock, kMaxBlocks), kThreads, 0, stream>>>(
              dc.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
              oc.const_data_ptr<int32_t>(), grad_gu.mutable_data_ptr<scalar_t>(), oc.size(0), rows,
              vecs, zero_tail);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return grad_gu;
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) {
  m.impl("swiglu", &swiglu_cuda);
  m.impl("swiglu_backward", &swiglu_backward_cuda);
}

}  // namespace anyexperts
