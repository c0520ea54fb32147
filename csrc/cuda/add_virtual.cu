// add_virtual and its backward on CUDA: the virtual experts' terms of an MoE layer's output
// (a copy expert adds w * x[t], a const expert w * const_vectors[c], a zero expert nothing)
// in one pass over [T, H], instead of a broadcast product and a GEMM with K = #const.
//
// One warp per token in a grid-stride loop, lanes over the row's 16-byte vectors where
// alignment allows. Most tokens of a layer with a small virtual share have no virtual slot:
// the warp first checks the token's slots (one lane per slot) and, finding none, copies the
// row. Otherwise each vector sums its sources over j ascending in fp32 (fp64 for fp64), the
// products unfused as in the CPU kernel, so both give the same bits. The backward writes
// grad_x = (sum of the token's copy weights, in slot order) * grad (0 without a copy slot,
// as in the reference, whose masks keep a NaN in grad out of it) and, per slot with a
// source, grad_weights = grad[t] . source row as one warp reduction; no atomics, so it is
// deterministic.
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

using cuda::kFullMask;
using cuda::kWarp;
using cuda::opmath_t;
using cuda::Pack;

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;

// Where a token's sources live: ids, weights, the sources table and the rows they read.
template <typename scalar_t>
struct Sources {
  const int32_t* __restrict__ ids;
  const opmath_t<scalar_t>* __restrict__ weights;
  const int32_t* __restrict__ codes;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ const_vectors;
  int64_t k, num_real, num_virtual, num_const;

  __device__ int32_t code(int64_t t, int64_t j) const {
    return virtual_source(ids[t * k + j], num_real, codes, num_virtual, num_const);
  }
  // The row of vectors that a source code reads for token t.
  template <typename V>
  __device__ const V* row(int32_t c, int64_t t, int64_t vecs) const {
    return reinterpret_cast<const V*>(c == kVirtualCopy ? x : const_vectors) +
           (c == kVirtualCopy ? t : int64_t{c}) * vecs;
  }
  // Whether any slot of token t has a source (the whole warp answers).
  __device__ bool any(int64_t t, int lane) const {
    bool found = false;
    for (int64_t j = lane; j < k; j += kWarp) found |= code(t, j) != kVirtualZero;
    return __any_sync(kFullMask, found);
  }
};

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    add_virtual_kernel(const scalar_t* __restrict__ out, Sources<scalar_t> src,
                       scalar_t* __restrict__ result, int64_t tokens, int64_t vecs) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t t = cuda::global_warp(); t < tokens; t += cuda::global_warp_count()) {
    const V* o = reinterpret_cast<const V*>(out) + t * vecs;
    V* r = reinterpret_cast<V*>(result) + t * vecs;
    if (!src.any(t, lane)) {
      for (int64_t v = lane; v < vecs; v += kWarp) r[v] = o[v];
      continue;
    }
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V ov = o[v];
      acc_t acc[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = static_cast<acc_t>(ov.v[e]);
      for (int64_t j = 0; j < src.k; ++j) {
        const int32_t c = src.code(t, j);
        if (c == kVirtualZero) continue;
        const acc_t w = src.weights[t * src.k + j];
        const V sv = src.template row<V>(c, t, vecs)[v];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = acc[e] + cuda::mul_rn(w, static_cast<acc_t>(sv.v[e]));
      }
      V rv;
#pragma unroll
      for (int e = 0; e < kVec; ++e) rv.v[e] = static_cast<scalar_t>(acc[e]);
      r[v] = rv;
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    add_virtual_backward_kernel(const scalar_t* __restrict__ grad, Sources<scalar_t> src,
                                scalar_t* __restrict__ grad_x,
                                opmath_t<scalar_t>* __restrict__ grad_w, int64_t tokens,
                                int64_t vecs) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t t = cuda::global_warp(); t < tokens; t += cuda::global_warp_count()) {
    const V* g = reinterpret_cast<const V*>(grad) + t * vecs;
    // The token's copy weights summed by every lane in slot order, as the CPU kernel does.
    acc_t coef = 0;
    bool copied = false;  // without a copy slot grad_x[t] is 0, even where grad[t] is NaN
    for (int64_t j = 0; j < src.k; ++j) {
      if (src.code(t, j) == kVirtualCopy) {
        coef += src.weights[t * src.k + j];
        copied = true;
      }
    }
    for (int64_t j = lane; j < src.k; j += kWarp) {
      if (src.code(t, j) == kVirtualZero) grad_w[t * src.k + j] = 0;  // the others: below
    }
    V* gx = reinterpret_cast<V*>(grad_x) + t * vecs;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V gv = g[v];
      V out;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        out.v[e] = copied ? static_cast<scalar_t>(coef * static_cast<acc_t>(gv.v[e])) : scalar_t(0);
      }
      gx[v] = out;
    }
    if (!src.any(t, lane)) continue;
    for (int64_t j = 0; j < src.k; ++j) {
      const int32_t c = src.code(t, j);
      if (c == kVirtualZero) continue;
      const V* row = src.template row<V>(c, t, vecs);
      acc_t dot = 0;
      for (int64_t v = lane; v < vecs; v += kWarp) {
        const V gv = g[v];
        const V sv = row[v];
#pragma unroll
        for (int e = 0; e < kVec; ++e) dot += static_cast<acc_t>(gv.v[e]) * static_cast<acc_t>(sv.v[e]);
      }
      dot = cuda::warp_sum(dot);
      if (lane == 0) grad_w[t * src.k + j] = dot;
    }
  }
}

// ---- host -----------------------------------------------------------------------------

template <typename scalar_t>
Sources<scalar_t> sources_of(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& w,
                             int64_t num_real, const at::Tensor& codes, const at::Tensor& cv) {
  return {ids.const_data_ptr<int32_t>(), w.const_data_ptr<opmath_t<scalar_t>>(),
          codes.const_data_ptr<int32_t>(), x.const_data_ptr<scalar_t>(),
          cv.const_data_ptr<scalar_t>(), ids.size(1), num_real, codes.size(0), cv.size(0)};
}

at::Tensor add_virtual_cuda(const at::Tensor& out, const at::Tensor& x, const at::Tensor& ids,
                            const at::Tensor& weights, int64_t num_real,
                            const at::Tensor& sources, const at::Tensor& const_vectors) {
  check_add_virtual(out, x, ids, weights, num_real, sources, const_vectors);
  const c10::cuda::CUDAGuard guard(out.device());
  const cuda::NvtxRange range("anyexperts::add_virtual");
  const at::Tensor oc = out.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = ids.contiguous();
  const at::Tensor wc = weights.to(accumulate_dtype(out.scalar_type())).contiguous();
  const at::Tensor sc = sources.contiguous();
  const at::Tensor vc = const_vectors.contiguous();
  const int64_t tokens = oc.size(0), hidden = oc.size(1);
  at::Tensor result = at::empty({tokens, hidden}, oc.options());
  if (tokens == 0 || hidden == 0) return result;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, oc.scalar_type(), "add_virtual_cuda", [&] {
    const int vec = cuda::vec_width<scalar_t>(
        hidden, {oc.const_data_ptr(), xc.const_data_ptr(), vc.const_data_ptr(),
                 result.const_data_ptr()});
    cuda::with_vec<scalar_t>(vec, [&](auto kv) {
      constexpr int kVec = decltype(kv)::value;
      add_virtual_kernel<scalar_t, kVec><<<cuda::grid_for(tokens, kWarpsPerBlock), kThreads, 0, stream>>>(
          oc.const_data_ptr<scalar_t>(), sources_of<scalar_t>(xc, ic, wc, num_real, sc, vc),
          result.mutable_data_ptr<scalar_t>(), tokens, hidden / kVec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return result;
}

std::tuple<at::Tensor, at::Tensor> add_virtual_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
    int64_t num_real, const at::Tensor& sources, const at::Tensor& const_vectors) {
  check_add_virtual(grad, x, ids, weights, num_real, sources, const_vectors,
                    "add_virtual_backward", "grad");
  const c10::cuda::CUDAGuard guard(grad.device());
  const cuda::NvtxRange range("anyexperts::add_virtual_backward");
  const auto acc_type = accumulate_dtype(grad.scalar_type());
  const at::Tensor gc = grad.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor ic = ids.contiguous();
  const at::Tensor wc = weights.to(acc_type).contiguous();
  const at::Tensor sc = sources.contiguous();
  const at::Tensor vc = const_vectors.contiguous();
  const int64_t tokens = gc.size(0), hidden = gc.size(1);
  at::Tensor grad_x = at::empty({tokens, hidden}, gc.options());
  at::Tensor grad_w = at::empty(ic.sizes(), gc.options().dtype(acc_type));
  if (tokens == 0) return {grad_x, grad_w};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(),
                                  "add_virtual_backward_cuda", [&] {
    const int vec = cuda::vec_width<scalar_t>(
        hidden, {gc.const_data_ptr(), xc.const_data_ptr(), vc.const_data_ptr(),
                 grad_x.const_data_ptr()});
    cuda::with_vec<scalar_t>(vec, [&](auto kv) {
      constexpr int kVec = decltype(kv)::value;
      add_virtual_backward_kernel<scalar_t, kVec>
          <<<cuda::grid_for(tokens, kWarpsPerBlock), kThreads, 0, stream>>>(
              gc.const_data_ptr<scalar_t>(), sources_of<scalar_t>(xc, ic, wc, num_real, sc, vc),
              grad_x.mutable_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<opmath_t<scalar_t>>(),
              tokens, hidden / kVec);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) {
  m.impl("add_virtual", &add_virtual_cuda);
  m.impl("add_virtual_backward", &add_virtual_backward_cuda);
}

}  // namespace anyexperts
