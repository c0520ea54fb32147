// Small CUDA helpers shared by the routing kernels (csrc/cuda/*.cu): NVTX ranges, launch
// sizing, warp/block reductions in a fixed order (so results are bitwise reproducible) and
// aligned vector packs for 16-byte memory accesses.
#pragma once

#include <cuda_runtime.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

namespace anyexperts::cuda {

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Names the op's host-side span so nsys timelines show where each op's kernels come from.
struct NvtxRange {
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// Grid size for a grid-stride loop over n items, `per_block` items per block per pass;
// capped at `max_blocks` because the kernels loop over the rest.
inline unsigned grid_for(int64_t n, int per_block, int64_t max_blocks = int64_t{1} << 20) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + per_block - 1) / per_block, 1, max_blocks));
}

// Grid-stride loops with one warp per item (blocks of whole warps): this warp's first item,
// and the stride, the number of warps in the grid.
__device__ __forceinline__ int64_t global_warp() {
  return (int64_t{blockIdx.x} * blockDim.x + threadIdx.x) / kWarp;
}

__device__ __forceinline__ int64_t global_warp_count() {
  return int64_t{gridDim.x} * blockDim.x / kWarp;
}

// Accumulation type of the contract: fp32, or fp64 for fp64 data (reference._opmath).
template <typename T>
struct OpMath {
  using type = float;
};
template <>
struct OpMath<double> {
  using type = double;
};
template <typename T>
using opmath_t = typename OpMath<T>::type;

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// Unfused product, so `acc + mul_rn(w, y)` rounds the term first exactly as the reference's
// `acc + w * y` does instead of being contracted into an FMA.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

// Butterfly reductions: every lane ends with the same, bitwise identical value.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(kFullMask, v, off);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v = max(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

// Block reductions for blocks of whole warps (at most 32 of them). `scratch` holds one value
// per warp; the call starts with a barrier, so consecutive calls may share it.
// `warp_reduce` reduces within each warp, then over the per-warp values (lanes past the last
// warp contribute `identity`).
template <typename T, typename WarpReduce>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, WarpReduce warp_reduce) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
  v = warp_reduce(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = lane < warps ? scratch[lane] : identity;
  return warp_reduce(total);
}

template <typename T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  return block_reduce(v, scratch, T(0), [](T x) { return warp_sum(x); });
}

template <typename T>
__device__ __forceinline__ T block_max(T v, T* scratch) {
  return block_reduce(v, scratch, neg_inf<T>(), [](T x) { return warp_max(x); });
}

// Inclusive prefix sum over a block of whole warps, and the block's total; `scratch` holds
// one int64 per warp. Starts with a barrier so consecutive calls may share `scratch`.
__device__ __forceinline__ int64_t block_inclusive_scan(int64_t v, int64_t* scratch,
                                                        int64_t& total) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int warps = blockDim.x / kWarp;
#pragma unroll
  for (int off = 1; off < kWarp; off *= 2) {
    const int64_t up = __shfl_up_sync(kFullMask, v, off);
    if (lane >= off) v += up;
  }
  __syncthreads();
  if (lane == kWarp - 1) scratch[warp] = v;
  __syncthreads();
  int64_t before = 0;
  total = 0;
  for (int w = 0; w < warps; ++w) {
    if (w < warp) before += scratch[w];
    total += scratch[w];
  }
  return v + before;
}

// N elements of T moved as one aligned access (16 bytes for the vectorised paths).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// Whether rows of `row_bytes` starting at every pointer all begin on 16-byte boundaries,
// so they can be moved in 16-byte accesses.
inline bool rows_aligned16(int64_t row_bytes, std::initializer_list<const void*> ptrs) {
  if (row_bytes % 16 != 0) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

// Elements of T per access: a 16-byte vector where rows_aligned16 allows, else one.
template <typename T>
inline int vec_width(int64_t cols, std::initializer_list<const void*> ptrs) {
  constexpr int kVec = 16 / sizeof(T);
  return rows_aligned16(cols * static_cast<int64_t>(sizeof(T)), ptrs) ? kVec : 1;
}

// Calls f(std::integral_constant<int, W>{}) with W = vec_width's answer, so kernels take
// the vector width as a template parameter: 16 bytes of T, or 1.
template <typename T, typename F>
void with_vec(int width, F&& f) {
  constexpr int kVec = 16 / sizeof(T);
  if (width == kVec) return f(std::integral_constant<int, kVec>{});
  f(std::integral_constant<int, 1>{});
}

}  // namespace anyexperts::cuda
