// unpermute and its backward on CUDA (DESIGN.md section 3).
//
// Forward: one warp per token gathers the token's slot rows and reduces them in registers
// (fp32, fp64 for fp64 y), j ascending, so there are no atomics and the sum order is fixed.
// Backward: a stable radix sort orders the slots by row (ascending slot order within a row),
// then one warp per slot writes grad_weights = <grad_out[t], y[row]> and, for a row it has
// alone (every row permute makes), grad_y[row] = w * grad_out[t] in the same pass. A row
// shared by several slots gets the sum of their terms in that order (fp32, fp64 for fp64 y),
// written once by its first slot: deterministic, no atomics. A second pass zeroes the rows no slot refers to
// (unless zero_unreferenced is false). Rows are 16-byte vectors where alignment allows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <tuple>
#include <type_traits>

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
constexpr int kSlotBatch = 4;  // slot rows loaded before any is accumulated, for overlap

template <typename scalar_t, typename weight_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    unpermute_kernel(const scalar_t* __restrict__ y, const int32_t* __restrict__ slot_rows,
                     const weight_t* __restrict__ weights, scalar_t* __restrict__ out,
                     int64_t tokens, int64_t k, int64_t rows, int64_t vecs) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  const V* yv = reinterpret_cast<const V*>(y);
  V* ov = reinterpret_cast<V*>(out);
  const int lane = threadIdx.x % kWarp;
  for (int64_t t = cuda::global_warp(); t < tokens; t += cuda::global_warp_count()) {
    const int32_t* token_rows = slot_rows + t * k;
    const weight_t* token_weights = weights + t * k;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      acc_t acc[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = 0;
      for (int64_t j0 = 0; j0 < k; j0 += kSlotBatch) {
        int64_t row[kSlotBatch];
        acc_t w[kSlotBatch];
        V val[kSlotBatch];
#pragma unroll
        for (int b = 0; b < kSlotBatch; ++b) {
          const int32_t r = j0 + b < k ? token_rows[j0 + b] : -1;
          row[b] = is_live_row(r, rows) ? r : -1;
          if (row[b] >= 0) {
            w[b] = static_cast<acc_t>(token_weights[j0 + b]);
            val[b] = yv[row[b] * vecs + v];
          }
        }
#pragma unroll
        for (int b = 0; b < kSlotBatch; ++b) {
          if (row[b] < 0) continue;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            acc[e] = acc[e] + cuda::mul_rn(w[b], static_cast<acc_t>(val[b].v[e]));
          }
        }
      }
      V o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
      ov[t * vecs + v] = o;
    }
  }
}

// ---- backward ------------------------------------------------------------------------

// keys[s] = slot_rows[s] where live, else `sentinel` (above every live row: sorts after
// them); vals[s] = s. Keys are unsigned so the radix sort reads their low bits as they are.
__global__ void __launch_bounds__(kThreads)
    slot_keys_kernel(const int32_t* __restrict__ slot_rows, int64_t slots, int64_t rows,
                     uint32_t sentinel, uint32_t* __restrict__ keys, int32_t* __restrict__ vals) {
  const int64_t s = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (s >= slots) return;
  const int32_t r = slot_rows[s];
  keys[s] = is_live_row(r, rows) ? static_cast<uint32_t>(r) : sentinel;
  vals[s] = static_cast<int32_t>(s);
}

// first[r] = position of row r's first slot in the sorted order (stays -1 without slots).
__global__ void __launch_bounds__(kThreads)
    row_starts_kernel(const uint32_t* __restrict__ sorted_rows, int64_t slots, uint32_t sentinel,
                      int32_t* __restrict__ first) {
  const int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x;
  if (i >= slots) return;
  const uint32_t r = sorted_rows[i];
  if (r < sentinel && (i == 0 || sorted_rows[i - 1] != r)) first[r] = static_cast<int32_t>(i);
}

// One warp per slot, so the K slots of a token run side by side and share grad_out[t] in
// cache. A slot alone on its row (every row permute makes) writes both gradients in one
// pass. On a shared row each slot writes its own grad_weights, and the row's first slot
// (in ascending order) writes grad_y[row]: the sum over the row's slots in that order.
template <typename scalar_t, typename weight_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    unpermute_backward_kernel(const scalar_t* __restrict__ grad_out,
                              const scalar_t* __restrict__ y,
                              const int32_t* __restrict__ slot_rows,
                              const weight_t* __restrict__ weights,
                              const uint32_t* __restrict__ sorted_rows,
                              const int32_t* __restrict__ sorted_slots,
                              const int32_t* __restrict__ first, scalar_t* __restrict__ grad_y,
                              weight_t* __restrict__ grad_weights, int64_t slots, int64_t k,
                              int64_t rows, int64_t vecs) {
  using acc_t = opmath_t<scalar_t>;
  using V = Pack<scalar_t, kVec>;
  const V* gv = reinterpret_cast<const V*>(grad_out);
  const V* yv = reinterpret_cast<const V*>(y);
  V* gyv = reinterpret_cast<V*>(grad_y);
  const int lane = threadIdx.x % kWarp;
  for (int64_t s = cuda::global_warp(); s < slots; s += cuda::global_warp_count()) {
    const int32_t r = slot_rows[s];
    if (!is_live_row(r, rows)) continue;  // grad_weights[s] stays 0
    const int64_t t = s / k;
    const int64_t i0 = first[r];
    const bool alone = i0 + 1 == slots || sorted_rows[i0 + 1] != static_cast<uint32_t>(r);
    const acc_t w = static_cast<acc_t>(weights[s]);
    acc_t dot = 0;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      const V g = gv[t * vecs + v];
      const V x = yv[r * vecs + v];
      V o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const acc_t ge = static_cast<acc_t>(g.v[e]);
        dot = fma(ge, static_cast<acc_t>(x.v[e]), dot);
        o.v[e] = static_cast<scalar_t>(cuda::mul_rn(w, ge));
      }
      if (alone) gyv[r * vecs + v] = o;
    }
    dot = cuda::warp_sum(dot);
    if (lane == 0) grad_weights[s] = static_cast<weight_t>(dot);
    if (alone || sorted_slots[i0] != s) continue;
    for (int64_t v = lane; v < vecs; v += kWarp) {
      acc_t acc[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[e] = 0;
      for (int64_t i = i0; i < slots && sorted_rows[i] == static_cast<uint32_t>(r); ++i) {
        const int64_t si = sorted_slots[i];
        const acc_t wi = static_cast<acc_t>(weights[si]);
        const V g = gv[(si / k) * vecs + v];
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          acc[e] = acc[e] + cuda::mul_rn(wi, static_cast<acc_t>(g.v[e]));
        }
      }
      V o;
#pragma unroll
      for (int e = 0; e < kVec; ++e) o.v[e] = static_cast<scalar_t>(acc[e]);
      gyv[r * vecs + v] = o;
    }
  }
}

template <typename scalar_t, int kVec>
__global__ void __launch_bounds__(kThreads)
    zero_unreferenced_kernel(const int32_t* __restrict__ first, scalar_t* __restrict__ grad_y,
                             int64_t rows, int64_t vecs) {
  using V = Pack<scalar_t, kVec>;
  V* gyv = reinterpret_cast<V*>(grad_y);
  const int lane = threadIdx.x % kWarp;
  for (int64_t r = cuda::global_warp(); r < rows; r += cuda::global_warp_count()) {
    if (first[r] >= 0) continue;
    for (int64_t v = lane; v < vecs; v += kWarp) gyv[r * vecs + v] = V{};
  }
}

// Slot indices ordered by row: {sorted rows, sorted slots, first position of each row}.
// Rows are uint32 keys stored in int32 tensors; the sort reads only the bits up to the
// sentinel's (one past the largest live row, at most 2^31), so it makes few passes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sort_slots_by_row(const at::Tensor& slot_rows,
                                                                  int64_t rows,
                                                                  cudaStream_t stream) {
  const int64_t slots = slot_rows.numel();
  const auto i32 = slot_rows.options().dtype(at::kInt);
  at::Tensor keys = at::empty({slots}, i32), vals = at::empty({slots}, i32);
  at::Tensor sorted_rows = at::empty({slots}, i32), sorted_slots = at::empty({slots}, i32);
  at::Tensor first = at::full({rows}, -1, i32);
  if (slots == 0) return {sorted_rows, sorted_slots, first};
  auto as_keys = [](const at::Tensor& t) {
    return reinterpret_cast<uint32_t*>(t.data_ptr<int32_t>());
  };
  const auto sentinel = static_cast<uint32_t>(std::min<int64_t>(rows, int64_t{1} << 31));
  int end_bit = 1;
  while (end_bit < 32 && (uint64_t{1} << end_bit) <= sentinel) ++end_bit;
  const unsigned blocks = static_cast<unsigned>((slots + kThreads - 1) / kThreads);
  slot_keys_kernel<<<blocks, kThreads, 0, stream>>>(slot_rows.const_data_ptr<int32_t>(), slots,
                                                    rows, sentinel, as_keys(keys),
                                                    vals.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  size_t temp_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, temp_bytes, as_keys(keys), as_keys(sorted_rows), vals.const_data_ptr<int32_t>(),
      sorted_slots.mutable_data_ptr<int32_t>(), static_cast<int>(slots), 0, end_bit, stream));
  // From the caching allocator: no cudaMalloc, and CUDA-graph capture keeps it alive.
  at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, i32.dtype(at::kByte));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      temp.mutable_data_ptr(), temp_bytes, as_keys(keys), as_keys(sorted_rows),
      vals.const_data_ptr<int32_t>(), sorted_slots.mutable_data_ptr<int32_t>(),
      static_cast<int>(slots), 0, end_bit, stream));
  row_starts_kernel<<<blocks, kThreads, 0, stream>>>(as_keys(sorted_rows), slots, sentinel,
                                                     first.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {sorted_rows, sorted_slots, first};
}

// ---- host -----------------------------------------------------------------------------

// Weights are fp32, or fp64 with fp64 y (checked): only those pairs are instantiated.
template <typename scalar_t, typename F>
void with_weight_type(at::ScalarType weights, F&& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    if (weights == at::kDouble) return f(double{});
  }
  f(float{});
}

// zero_unreferenced concerns the backward only.
at::Tensor unpermute_cuda(const at::Tensor& y, const at::Tensor& slot_rows,
                          const at::Tensor& weights, bool /*zero_unreferenced*/) {
  check_unpermute(y, slot_rows, weights);
  const c10::cuda::CUDAGuard guard(y.device());
  const cuda::NvtxRange range("anyexperts::unpermute");
  const at::Tensor yc = y.contiguous();
  const at::Tensor rc = slot_rows.contiguous();
  const at::Tensor wc = weights.contiguous();
  const int64_t tokens = rc.size(0);
  const int64_t k = rc.size(1);
  const int64_t rows = yc.size(0);
  const int64_t hidden = yc.size(1);
  at::Tensor out = at::empty({tokens, hidden}, yc.options());
  if (tokens == 0 || hidden == 0) return out;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "unpermute_cuda",
                                  [&] {
    const int width =
        cuda::vec_width<scalar_t>(hidden, {yc.const_data_ptr(), out.const_data_ptr()});
    with_weight_type<scalar_t>(wc.scalar_type(), [&](auto w) {
      using weight_t = decltype(w);
      cuda::with_vec<scalar_t>(width, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        unpermute_kernel<scalar_t, weight_t, kVec>
            <<<cuda::grid_for(tokens, kWarpsPerBlock), kThreads, 0, stream>>>(
                yc.const_data_ptr<scalar_t>(), rc.const_data_ptr<int32_t>(),
                wc.const_data_ptr<weight_t>(), out.mutable_data_ptr<scalar_t>(), tokens, k, rows,
                hidden / kVec);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unpermute_backward_cuda(const at::Tensor& grad_out,
                                                           const at::Tensor& y,
                                                           const at::Tensor& slot_rows,
                                                           const at::Tensor& weights,
                                                           bool zero_unreferenced) {
  check_unpermute_backward(grad_out, y, slot_rows, weights);
  const c10::cuda::CUDAGuard guard(y.device());
  const cuda::NvtxRange range("anyexperts::unpermute_backward");
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor yc = y.contiguous();
  const at::Tensor rc = slot_rows.contiguous();
  const at::Tensor wc = weights.contiguous();
  const int64_t slots = rc.numel();
  const int64_t k = rc.size(1);
  const int64_t rows = yc.size(0);
  const int64_t hidden = yc.size(1);
  TORCH_CHECK(slots <= kInt32Max, "unpermute_backward: at most 2^31 - 1 slots on CUDA, got ",
              slots);
  at::Tensor grad_y = at::empty({rows, hidden}, yc.options());
  at::Tensor grad_weights = at::zeros(wc.sizes(), wc.options());  // masked slots stay 0
  if (rows == 0) return {grad_y, grad_weights};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor sorted_rows, sorted_slots, first;
  std::tie(sorted_rows, sorted_slots, first) = sort_slots_by_row(rc, rows, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(),
                                  "unpermute_backward_cuda", [&] {
    const int width = cuda::vec_width<scalar_t>(
        hidden, {gc.const_data_ptr(), yc.const_data_ptr(), grad_y.const_data_ptr()});
    with_weight_type<scalar_t>(wc.scalar_type(), [&](auto w) {
      using weight_t = decltype(w);
      cuda::with_vec<scalar_t>(width, [&](auto vec) {
        constexpr int kVec = decltype(vec)::value;
        if (slots > 0) {
          unpermute_backward_kernel<scalar_t, weight_t, kVec>
              <<<cuda::grid_for(slots, kWarpsPerBlock), kThreads, 0, stream>>>(
                  gc.const_data_ptr<scalar_t>(), yc.const_data_ptr<scalar_t>(),
                  rc.const_data_ptr<int32_t>(), wc.const_data_ptr<weight_t>(),
                  reinterpret_cast<const uint32_t*>(sorted_rows.const_data_ptr<int32_t>()),
                  sorted_slots.const_data_ptr<int32_t>(), first.const_data_ptr<int32_t>(),
                  grad_y.mutable_data_ptr<scalar_t>(), grad_weights.mutable_data_ptr<weight_t>(),
                  slots, k, rows, hidden / kVec);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (zero_unreferenced && hidden > 0) {
          zero_unreferenced_kernel<scalar_t, kVec>
              <<<cuda::grid_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
                  first.const_data_ptr<int32_t>(), grad_y.mutable_data_ptr<scalar_t>(), rows,
                  hidden / kVec);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  return {grad_y, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) {
  m.impl("unpermute", &unpermute_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace anyexperts
