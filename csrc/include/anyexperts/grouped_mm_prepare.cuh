// The per-group argument arrays of every device-scheduled grouped GEMM (SM90 and SM80
// paths alike): their place in the workspace (ArrayCarver), and the kernels that fill them
// first: one thread per group turns `offsets` into that group's row span
// (anyexperts::group_span) and hands it to the kernel's argument arrays, and the blocks
// zero what the GEMM never writes: the rows past the last group (forward, with
// zero_tail), db[g] of empty groups (wgrad; their problem is (0,0,0), since a GEMM with
// K = 0 may store garbage accumulators). Nothing is read back on the host.
//
// `Args` is a kernel's per-group argument arrays, passed by value, with
//   __device__ void set_forward(int64_t g, RowSpan span, const ForwardProblem& p) const;
//   __device__ void set_wgrad(int64_t g, RowSpan span, const WgradProblem& p) const;
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "anyexperts/grouped_mm_problem.h"
#include "anyexperts/rules.h"

namespace anyexperts::grouped {

constexpr size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

// Hands out consecutive 16-byte-aligned arrays of one workspace buffer. Without a buffer
// (base nullptr) it only counts, so one sequence of take() calls both sizes a kernel's
// argument arrays and carves them: the two cannot drift apart.
class ArrayCarver {
 public:
  explicit ArrayCarver(void* base) : base_(static_cast<char*>(base)) {}

  template <class T>
  T* take(int64_t count) {
    T* at = base_ != nullptr ? reinterpret_cast<T*>(base_ + bytes_) : nullptr;
    bytes_ += align_up(static_cast<size_t>(count) * sizeof(T), 16);
    return at;
  }

  size_t bytes() const { return bytes_; }

 private:
  char* base_;
  size_t bytes_ = 0;
};

constexpr int kPrepareThreads = 256;
constexpr int kSmemOffsets = 4096;  // offsets cached in shared memory up to this many groups

// Copies offsets into shared memory when they fit; returns the pointer to read them from.
__device__ inline const int32_t* cache_offsets(const int32_t* offsets, int64_t groups,
                                               int32_t* smem) {
  if (groups > kSmemOffsets) return offsets;
  for (int64_t i = threadIdx.x; i < groups; i += blockDim.x) smem[i] = offsets[i];
  __syncthreads();
  return smem;
}

// Block b sets the arguments of groups [b*256, b*256+256); with zero_tail every block then
// zeroes its share of the rows at or after end(G-1), which no group covers.
template <class Args>
__global__ void __launch_bounds__(kPrepareThreads)
    forward_prepare_kernel(Args args, ForwardProblem p) {
  __shared__ int32_t s_offsets[kSmemOffsets];
  __shared__ int64_t s_tail_begin;
  const int32_t* offsets = cache_offsets(p.offsets, p.groups, s_offsets);

  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < p.groups) args.set_forward(g, group_span(offsets, static_cast<int>(g), p.rows), p);
  if (!p.zero_tail) return;  // uniform over the grid: no thread reaches the barrier below

  if (threadIdx.x == 0) s_tail_begin = group_end(offsets, static_cast<int>(p.groups - 1), p.rows);
  __syncthreads();
  // out is contiguous with N % 8 == 0: 16-byte vectors cover whole rows.
  const int64_t vec_per_row = p.n / 8;
  const int64_t first = s_tail_begin * vec_per_row;
  const int64_t last = p.rows * vec_per_row;
  uint4* out = static_cast<uint4*>(p.out);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t i = first + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < last;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = zero;
  }
}

// Grid (chunks, groups): blocks with blockIdx.y == 0 set the arguments of groups
// [x*256, x*256+256); every block zeroes its chunk of db[g] for the empty groups g it
// strides over (blocks of non-empty groups skip them).
template <class Args>
__global__ void __launch_bounds__(kPrepareThreads)
    wgrad_prepare_kernel(Args args, WgradProblem p) {
  __shared__ int32_t s_offsets[kSmemOffsets];
  const int32_t* offsets = cache_offsets(p.offsets, p.groups, s_offsets);

  if (blockIdx.y == 0) {
    const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g < p.groups) args.set_wgrad(g, group_span(offsets, static_cast<int>(g), p.rows), p);
  }

  const int64_t vec_per_group = p.k * p.n / 8;  // N % 8 == 0
  uint4* db = static_cast<uint4*>(p.db);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t g = blockIdx.y; g < p.groups; g += gridDim.y) {
    const RowSpan span = group_span(offsets, static_cast<int>(g), p.rows);
    if (span.end > span.begin) continue;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < vec_per_group;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      db[g * vec_per_group + i] = zero;
    }
  }
}

inline int64_t blocks_for_groups(int64_t groups) {
  return (groups + kPrepareThreads - 1) / kPrepareThreads;
}

// Launches forward_prepare_kernel: enough blocks for the argument arrays and to zero a tail
// as large as `out` at full bandwidth; blocks with no tail to zero exit at once. Returns
// nullptr or the launch error.
template <class Args>
const char* prepare_forward(const Args& args, const ForwardProblem& p, int sm_count,
                            cudaStream_t stream) {
  const int64_t vecs = p.zero_tail ? p.rows * (p.n / 8) : 0;
  const int64_t zero_blocks = (vecs + kPrepareThreads * 4 - 1) / (kPrepareThreads * 4);
  int64_t blocks = zero_blocks < 4 * int64_t{sm_count} ? zero_blocks : 4 * int64_t{sm_count};
  if (blocks < blocks_for_groups(p.groups)) blocks = blocks_for_groups(p.groups);
  forward_prepare_kernel<Args><<<static_cast<unsigned>(blocks), kPrepareThreads, 0, stream>>>(args, p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Launches wgrad_prepare_kernel over (chunks of db[g], groups). Returns nullptr or the
// launch error.
template <class Args>
const char* prepare_wgrad(const Args& args, const WgradProblem& p, cudaStream_t stream) {
  const int64_t vecs = p.k * p.n / 8;
  int64_t chunks = (vecs + kPrepareThreads * 8 - 1) / (kPrepareThreads * 8);
  if (chunks > 16) chunks = 16;
  if (chunks < blocks_for_groups(p.groups)) chunks = blocks_for_groups(p.groups);
  const int64_t ys = p.groups < 65535 ? p.groups : 65535;
  wgrad_prepare_kernel<Args><<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(ys), 1),
                               kPrepareThreads, 0, stream>>>(args, p);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace anyexperts::grouped
