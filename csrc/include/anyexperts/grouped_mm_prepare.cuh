// The per-group argument arrays of every device-scheduled grouped GEMM (SM90 and SM80
// paths alike): their place in the workspace (ArrayCarver), and the kernels that fill them
// first: each block turns `offsets` into every group's row span (BlockSpans; past 4096
// groups each thread walks group_span instead), one thread per group hands its span to the
// kernel's argument arrays, and the blocks zero what the GEMM never writes: the rows past
// the last group (forward, with zero_tail), db[g] of empty groups (wgrad; their problem is
// (0,0,0), since a GEMM with K = 0 may store garbage accumulators). Nothing is read back on
// the host.
//
// `Args` is a kernel's per-group argument arrays, passed by value, with
//   __device__ void set_forward(int64_t g, RowSpan span, const ForwardProblem& p) const;
//   __device__ void set_wgrad(int64_t slot, int64_t g, RowSpan span, const WgradProblem& p) const;
// (slot: the problem's index in the arrays, g: the group it computes)
#pragma once

#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>

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
constexpr int kEndsPerThread = 16;
constexpr int kSmemGroups = kPrepareThreads * kEndsPerThread;  // spans in shared memory up to here

// end(g) of the group rule (rules.h) is a running max of the offsets: one inclusive scan of
// running_end over the block. The wgrad kernel's blocks each need the span of a group g
// anywhere in [0, G); group_span walks O(g) offsets for it, which at G = 128 made the
// prepare kernel take 31 us where the GEMM after it takes 1.2 ms.
struct RunningEnd {
  __device__ int32_t operator()(int32_t end, int32_t offset) const {
    return running_end(end, offset);
  }
};
using EndScan = cub::BlockScan<int32_t, kPrepareThreads>;

struct SpanStorage {
  int32_t ends[kSmemGroups];
  EndScan::TempStorage scan;
};

// Every group's row span, as the block computed it into shared memory, or past
// kSmemGroups groups by group_span from `offsets` in global memory.
struct BlockSpans {
  const int32_t* offsets;
  const int32_t* ends;  // nullptr: walk `offsets`
  int64_t rows;

  __device__ RowSpan operator()(int64_t g) const {
    if (ends == nullptr) return group_span(offsets, static_cast<int>(g), rows);
    return {g == 0 ? 0 : ends[g - 1], ends[g]};
  }
};

// Called by every thread of a kPrepareThreads block (it has barriers). Thread t scans the
// offsets [16t, 16t+16); the values it pads past G come after every group and reach no end.
__device__ inline BlockSpans block_spans(const int32_t* offsets, int64_t groups, int64_t rows,
                                         SpanStorage& smem) {
  if (groups > kSmemGroups) return {offsets, nullptr, rows};
  const int64_t first = int64_t{threadIdx.x} * kEndsPerThread;
  int32_t ends[kEndsPerThread];
#pragma unroll
  for (int i = 0; i < kEndsPerThread; ++i) ends[i] = first + i < groups ? offsets[first + i] : 0;
  EndScan(smem.scan).InclusiveScan(ends, ends, RunningEnd{});
#pragma unroll
  for (int i = 0; i < kEndsPerThread; ++i) {
    // clamp_end(...) <= the running max, an int32.
    if (first + i < groups) {
      smem.ends[first + i] = static_cast<int32_t>(clamp_end(running_end(0, ends[i]), rows));
    }
  }
  __syncthreads();
  return {offsets, smem.ends, rows};
}

// The wgrad problems go to the GEMM largest first. Its persistent scheduler deals tiles to
// the SMs round robin in problem order, and a wgrad tile costs its group's rows (the GEMM's
// K): in index order a skewed load can leave some SMs several of the heaviest tiles while
// others idle at the end. Largest first, the longest-processing-time order, shortens that
// tail (bench/wgrad_order_model.py). Returns group g's problem slot: its rank by rows
// descending, ties to the lower index, so the slots are a permutation of [0, G). The rank
// is O(G) per thread: past kMaxRankedGroups groups (and without cached ends), index order;
// also when the problem asks for it (ANYEXPERTS_GROUPED_MM_WGRAD_ORDER=index, for timing).
constexpr int64_t kMaxRankedGroups = 1024;

__device__ inline int64_t wgrad_slot(const BlockSpans& spans, int64_t g, const WgradProblem& p) {
  if (!p.largest_first || spans.ends == nullptr || p.groups > kMaxRankedGroups) return g;
  const RowSpan mine = spans(g);
  const int64_t rows = mine.end - mine.begin;
  int64_t slot = 0;
  for (int64_t h = 0; h < p.groups; ++h) {
    const RowSpan other = spans(h);
    const int64_t other_rows = other.end - other.begin;
    slot += other_rows > rows || (other_rows == rows && h < g);
  }
  return slot;
}

// Block b sets the arguments of groups [b*256, b*256+256); with zero_tail every block then
// zeroes its share of the rows at or after end(G-1), which no group covers.
template <class Args>
__global__ void __launch_bounds__(kPrepareThreads)
    forward_prepare_kernel(Args args, ForwardProblem p) {
  __shared__ SpanStorage s_spans;
  __shared__ int64_t s_tail_begin;
  const BlockSpans spans = block_spans(p.offsets, p.groups, p.rows, s_spans);

  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < p.groups) args.set_forward(g, spans(g), p);
  if (!p.zero_tail) return;  // uniform over the grid: no thread reaches the barrier below

  if (threadIdx.x == 0) s_tail_begin = spans(p.groups - 1).end;
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
// [x*256, x*256+256), each in its wgrad_slot; every block zeroes its chunk of db[g] for the
// empty groups g it strides over (blocks of non-empty groups skip them).
template <class Args>
__global__ void __launch_bounds__(kPrepareThreads)
    wgrad_prepare_kernel(Args args, WgradProblem p) {
  __shared__ SpanStorage s_spans;
  const BlockSpans spans = block_spans(p.offsets, p.groups, p.rows, s_spans);

  if (blockIdx.y == 0) {
    const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (g < p.groups) args.set_wgrad(wgrad_slot(spans, g, p), g, spans(g), p);
  }

  const int64_t vec_per_group = p.k * p.n / 8;  // N % 8 == 0
  uint4* db = static_cast<uint4*>(p.db);
  const uint4 zero = make_uint4(0, 0, 0, 0);
  for (int64_t g = blockIdx.y; g < p.groups; g += gridDim.y) {
    const RowSpan span = spans(g);
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
