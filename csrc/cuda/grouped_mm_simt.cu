// The SIMT path of grouped_mm and grouped_mm_wgrad (interface: grouped_mm_simt.h): 64x64
// output tiles staged through shared memory, any float dtype and any strides. Group spans
// come from `offsets` by rules.h's group end rule, on the device: no host synchronisation.

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>

#include "anyexperts/cuda_utils.cuh"
#include "anyexperts/grouped_mm_simt.h"
#include "anyexperts/rules.h"

namespace anyexperts::simt {
namespace {

constexpr int kTile = 64;      // output tile kTile x kTile per block
constexpr int kTileK = 16;     // reduction slice staged in shared memory
constexpr int kThreadsXY = 16; // 16x16 threads, 4x4 outputs each (rows ty+16i, cols tx+16j)
constexpr int kPerThread = kTile / kThreadsXY;

// Register tile of one thread: outputs (ty + kThreadsXY*i, tx + kThreadsXY*j).
template <typename Acc>
__device__ __forceinline__ void zero_tile(Acc (&acc)[kPerThread][kPerThread]) {
#pragma unroll
  for (int i = 0; i < kPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc[i][j] = Acc(0);
}

// acc[i][j] += sa[kk][ty + 16i] * sb[kk][tx + 16j] over the staged slice, kk ascending.
template <typename Acc>
__device__ __forceinline__ void mma_tile(Acc (&acc)[kPerThread][kPerThread],
                                         const Acc (&sa)[kTileK][kTile + 1],
                                         const Acc (&sb)[kTileK][kTile + 1], int tx, int ty) {
#pragma unroll
  for (int kk = 0; kk < kTileK; ++kk) {
    Acc av[kPerThread], bv[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) av[i] = sa[kk][ty + kThreadsXY * i];
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) bv[j] = sb[kk][tx + kThreadsXY * j];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[i][j] += av[i] * bv[j];
  }
}

// out[(m0 + ty + 16i) * N + n0 + tx + 16j] = acc[i][j] for rows below m_end, columns below N.
template <typename T, typename Acc>
__device__ __forceinline__ void store_tile(const Acc (&acc)[kPerThread][kPerThread], T* out,
                                           int64_t m0, int64_t m_end, int64_t n0, int64_t N,
                                           int tx, int ty) {
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + ty + kThreadsXY * i;
    if (m >= m_end) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t n = n0 + tx + kThreadsXY * j;
      if (n < N) out[m * N + n] = static_cast<T>(acc[i][j]);
    }
  }
}

// ends[g] = group_end(offsets, g, rows), so group g spans [ends[g-1], ends[g]).
__global__ void group_ends_kernel(const int32_t* __restrict__ offsets, int64_t groups,
                                  int64_t rows, int64_t* __restrict__ ends) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < groups) ends[g] = group_end(offsets, static_cast<int>(g), rows);
}

// out[r, :] = a[r, :] @ b[g(r)] for r < ends[G-1], zero after (unwritten without
// zero_tail). Row blocks may straddle
// groups: the block runs one pass per group it overlaps, each pass reading only that
// group's rows of a (others masked, never multiplied, so NaNs elsewhere cannot leak).
template <typename T>
__global__ void __launch_bounds__(kThreadsXY* kThreadsXY)
    fallback_grouped_mm_kernel(const T* __restrict__ a, int64_t sa0, int64_t sa1,
                               const T* __restrict__ b, int64_t sb0, int64_t sb1, int64_t sb2,
                               T* __restrict__ out, const int64_t* __restrict__ ends,
                               int64_t groups, int64_t rows, int64_t K, int64_t N,
                               bool zero_tail) {
  using Acc = cuda::opmath_t<T>;
  __shared__ Acc sa[kTileK][kTile + 1];
  __shared__ Acc sb[kTileK][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsXY + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r1 = r0 + kTile < rows ? r0 + kTile : rows;
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTile;

  Acc acc[kPerThread][kPerThread];
  zero_tile(acc);

  // First group ending after r0 (ends are non-decreasing).
  int64_t lo = 0, hi = groups;
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (ends[mid] > r0) hi = mid; else lo = mid + 1;
  }
  for (int64_t g = lo; g < groups; ++g) {
    const int64_t gb = g == 0 ? 0 : ends[g - 1];
    const int64_t ge = ends[g];
    if (gb >= r1) break;
    const int64_t lo_r = gb > r0 ? gb : r0;
    const int64_t hi_r = ge < r1 ? ge : r1;
    if (lo_r >= hi_r) continue;  // empty group
    const T* bg = b + g * sb0;
    for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
      for (int idx = tid; idx < kTile * kTileK; idx += kThreadsXY * kThreadsXY) {
        const int i = idx / kTileK, kk = idx % kTileK;
        const int64_t r = r0 + i, k = k0 + kk;
        sa[kk][i] = (r >= lo_r && r < hi_r && k < K) ? static_cast<Acc>(a[r * sa0 + k * sa1]) : Acc(0);
      }
      for (int idx = tid; idx < kTile * kTileK; idx += kThreadsXY * kThreadsXY) {
        const int kk = idx / kTile, j = idx % kTile;
        const int64_t c = c0 + j, k = k0 + kk;
        sb[kk][j] = (c < N && k < K) ? static_cast<Acc>(bg[k * sb1 + c * sb2]) : Acc(0);
      }
      __syncthreads();
      mma_tile(acc, sa, sb, tx, ty);
      __syncthreads();
    }
  }
  // Rows past ends[G-1] were never accumulated: they are written as zero, or skipped.
  const int64_t tail = ends[groups - 1];
  store_tile(acc, out, r0, zero_tail || r1 < tail ? r1 : tail, c0, N, tx, ty);
}

// db[g] = a[rows of g]^T @ dout[rows of g]; empty groups write zeros. Block (x, y, z):
// columns x, rows y of db[g] for g = z, z + gridDim.z, ...
template <typename T>
__global__ void __launch_bounds__(kThreadsXY* kThreadsXY)
    fallback_grouped_mm_wgrad_kernel(const T* __restrict__ a, int64_t sa0, int64_t sa1,
                                     const T* __restrict__ d, int64_t sd0, int64_t sd1,
                                     T* __restrict__ db, const int64_t* __restrict__ ends,
                                     int64_t groups, int64_t K, int64_t N) {
  using Acc = cuda::opmath_t<T>;
  __shared__ Acc sa[kTileK][kTile + 1];
  __shared__ Acc sd[kTileK][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tid = ty * kThreadsXY + tx;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;  // rows of db[g] (K)
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;  // columns of db[g] (N)
  for (int64_t g = blockIdx.z; g < groups; g += gridDim.z) {
    const int64_t gb = g == 0 ? 0 : ends[g - 1];
    const int64_t ge = ends[g];
    Acc acc[kPerThread][kPerThread];
    zero_tile(acc);
    for (int64_t r0 = gb; r0 < ge; r0 += kTileK) {
      for (int idx = tid; idx < kTile * kTileK; idx += kThreadsXY * kThreadsXY) {
        const int kk = idx / kTile, i = idx % kTile;
        const int64_t r = r0 + kk;
        const int64_t m = m0 + i, n = n0 + i;
        sa[kk][i] = (r < ge && m < K) ? static_cast<Acc>(a[r * sa0 + m * sa1]) : Acc(0);
        sd[kk][i] = (r < ge && n < N) ? static_cast<Acc>(d[r * sd0 + n * sd1]) : Acc(0);
      }
      __syncthreads();
      mma_tile(acc, sa, sd, tx, ty);
      __syncthreads();
    }
    store_tile(acc, db + g * K * N, m0, K, n0, N, tx, ty);
  }
}

at::Tensor group_ends(const at::Tensor& offsets, int64_t rows, cudaStream_t stream) {
  const int64_t G = offsets.size(0);
  auto ends = at::empty({G}, offsets.options().dtype(at::kLong));
  constexpr int kThreads = 256;
  group_ends_kernel<<<static_cast<unsigned>((G + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      offsets.data_ptr<int32_t>(), G, rows, ends.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ends;
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace

void grouped_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& offsets,
                bool zero_tail, at::Tensor& out) {
  const int64_t R = a.size(0), K = a.size(1), N = b.size(2), G = b.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const auto ends = group_ends(offsets, R, stream);
  const int64_t col_blocks = (N + kTile - 1) / kTile;
  TORCH_CHECK(col_blocks <= kMaxGridY, "grouped_mm: N = ", N, " is too large for the fallback kernel");
  const dim3 grid(static_cast<unsigned>((R + kTile - 1) / kTile), static_cast<unsigned>(col_blocks));
  const dim3 block(kThreadsXY, kThreadsXY);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grouped_mm_cuda", [&] {
    fallback_grouped_mm_kernel<scalar_t><<<grid, block, 0, stream>>>(
        a.data_ptr<scalar_t>(), a.stride(0), a.stride(1), b.data_ptr<scalar_t>(), b.stride(0),
        b.stride(1), b.stride(2), out.data_ptr<scalar_t>(), ends.data_ptr<int64_t>(), G, R, K, N, zero_tail);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& dout, const at::Tensor& offsets,
                      at::Tensor& db) {
  const int64_t R = a.size(0), K = a.size(1), N = dout.size(1), G = offsets.size(0);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(a.device().index()).stream();
  const auto ends = group_ends(offsets, R, stream);
  const int64_t row_blocks = (K + kTile - 1) / kTile;
  TORCH_CHECK(row_blocks <= kMaxGridY, "grouped_mm_wgrad: K = ", K,
              " is too large for the fallback kernel");
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile), static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>(std::min<int64_t>(G, kMaxGridY)));
  const dim3 block(kThreadsXY, kThreadsXY);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "grouped_mm_wgrad_cuda", [&] {
    fallback_grouped_mm_wgrad_kernel<scalar_t><<<grid, block, 0, stream>>>(
        a.data_ptr<scalar_t>(), a.stride(0), a.stride(1), dout.data_ptr<scalar_t>(),
        dout.stride(0), dout.stride(1), db.data_ptr<scalar_t>(), ends.data_ptr<int64_t>(), G, K, N);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace anyexperts::simt
