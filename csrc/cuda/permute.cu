// permute on CUDA (DESIGN.md section 3): groups the rows of live slots by expert.
//
// The flattened slots i = t*K + j are cut into chunks of 512, one warp each. Rows follow a
// deterministic count/scan/scatter scheme with no atomics:
//   1. count:  per (expert, chunk) live slots, by warp match (__match_any_sync);
//   2. scan:   per expert, exclusive prefix over chunks (one block per expert), totals;
//   3. groups: exclusive scan of the padded totals over experts -> offsets, group starts;
//   4. scatter: each warp walks its chunk again in slot order, so rows inside an expert are
//      ordered by (t, j); it writes slot_rows and the source token of every row;
//   5. gather: one warp per output row copies x[token] or writes zeros (padding, tail);
//              without zero_tail, rows from offsets[num_real-1] on are left unwritten.
// Nothing is read back on the host, so the op is CUDA-graph capturable.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
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

constexpr int kChunkSteps = 16;              // warp steps per chunk
constexpr int kChunk = kChunkSteps * kWarp;  // slots per chunk
constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int kGroupThreads = 1024;  // single block scanning over experts
constexpr int kCopyBatch = 4;        // row copies in flight per lane

// The expert of slot i when live, else -1: the key lanes are matched on.
__device__ __forceinline__ int live_key(const int32_t* ids, int64_t i, int64_t slots,
                                        int num_real) {
  if (i >= slots) return -1;
  const int32_t e = ids[i];
  return is_live(e, num_real) ? e : -1;
}

// counts[e][chunk] (zeroed) += live slots of expert e in the chunk. Only this warp touches
// its chunk's counters; the leader lane of each expert group updates them, and the
// __syncwarp orders one step's update before the next step's (maybe other) leader reads.
__global__ void __launch_bounds__(kThreads)
    count_kernel(const int32_t* __restrict__ ids, int64_t slots, int num_real, int64_t chunks,
                 int32_t* __restrict__ counts) {
  const int lane = threadIdx.x % kWarp;
  const int64_t chunk = cuda::global_warp();
  if (chunk >= chunks) return;
  for (int step = 0; step < kChunkSteps; ++step) {
    const int e = live_key(ids, chunk * kChunk + step * kWarp + lane, slots, num_real);
    const unsigned peers = __match_any_sync(kFullMask, e);
    if (e >= 0 && lane == __ffs(peers) - 1) counts[e * chunks + chunk] += __popc(peers);
    __syncwarp();
  }
}

// Per expert: counts[e][c] -> live rows of e in chunks before c; totals[e] = all of them.
__global__ void __launch_bounds__(kThreads)
    scan_chunks_kernel(int32_t* __restrict__ counts, int64_t chunks, int32_t* __restrict__ totals) {
  __shared__ int64_t scratch[kWarp];
  int32_t* row = counts + int64_t{blockIdx.x} * chunks;
  int64_t carry = 0;
  for (int64_t begin = 0; begin < chunks; begin += kThreads) {
    const int64_t c = begin + threadIdx.x;
    const int64_t v = c < chunks ? row[c] : 0;
    int64_t total;
    const int64_t inclusive = cuda::block_inclusive_scan(v, scratch, total);
    if (c < chunks) row[c] = static_cast<int32_t>(carry + inclusive - v);
    carry += total;
  }
  if (threadIdx.x == 0) totals[blockIdx.x] = static_cast<int32_t>(carry);
}

// Groups laid end to end, each padded to a multiple of align: offsets (end rows) and the
// start row of each group.
__global__ void __launch_bounds__(kGroupThreads)
    groups_kernel(const int32_t* __restrict__ totals, int num_real, int64_t align,
                  int32_t* __restrict__ offsets, int32_t* __restrict__ starts) {
  __shared__ int64_t scratch[kWarp];
  int64_t carry = 0;
  for (int begin = 0; begin < num_real; begin += kGroupThreads) {
    const int e = begin + static_cast<int>(threadIdx.x);
    const int64_t padded = e < num_real ? padded_count(totals[e], align) : 0;
    int64_t total;
    const int64_t end = carry + cuda::block_inclusive_scan(padded, scratch, total);
    if (e < num_real) {
      offsets[e] = static_cast<int32_t>(end);
      starts[e] = static_cast<int32_t>(end - padded);
    }
    carry += total;
  }
}

// Walks each chunk again in slot order: a slot's row is its group's start, plus the rows
// of its expert in earlier chunks and earlier steps (the running counter), plus its rank
// among the matching lanes below it. Same counter discipline as count_kernel.
__global__ void __launch_bounds__(kThreads)
    scatter_kernel(const int32_t* __restrict__ ids, int64_t slots, int64_t k, int num_real,
                   int64_t chunks, int32_t* __restrict__ running,
                   const int32_t* __restrict__ starts, int32_t* __restrict__ slot_rows,
                   int32_t* __restrict__ row_token) {
  const int lane = threadIdx.x % kWarp;
  const unsigned lanes_below = (1u << lane) - 1;
  const int64_t chunk = cuda::global_warp();
  if (chunk >= chunks) return;
  for (int step = 0; step < kChunkSteps; ++step) {
    const int64_t i = chunk * kChunk + step * kWarp + lane;
    const int e = live_key(ids, i, slots, num_real);
    const unsigned peers = __match_any_sync(kFullMask, e);
    const int leader = __ffs(peers) - 1;
    int32_t* counter = e >= 0 ? running + e * chunks + chunk : nullptr;
    int32_t base = e >= 0 && lane == leader ? *counter : 0;
    base = __shfl_sync(kFullMask, base, leader);
    if (e >= 0) {
      const int32_t row = starts[e] + base + __popc(peers & lanes_below);
      slot_rows[i] = row;
      row_token[row] = static_cast<int32_t>(i / k);
      if (lane == leader) *counter = base + __popc(peers);
    } else if (i < slots) {
      slot_rows[i] = -1;
    }
    __syncwarp();
  }
}

// One warp per output row: the row of its token, or zeros where no slot lands. With
// `live_end` (the last group's end offset), rows from there on are not written.
template <typename Unit>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const Unit* __restrict__ x, const int32_t* __restrict__ row_token,
                  const int32_t* __restrict__ live_end, Unit* __restrict__ x_perm, int64_t rows,
                  int64_t units_per_row) {
  const int lane = threadIdx.x % kWarp;
  const int64_t written = live_end != nullptr ? min(rows, int64_t{*live_end}) : rows;
  for (int64_t r = cuda::global_warp(); r < written; r += cuda::global_warp_count()) {
    const int32_t t = row_token[r];
    const Unit* src = t >= 0 ? x + t * units_per_row : nullptr;
    Unit* dst = x_perm + r * units_per_row;
    for (int64_t u0 = lane; u0 < units_per_row; u0 += kWarp * kCopyBatch) {
      Unit v[kCopyBatch];
#pragma unroll
      for (int b = 0; b < kCopyBatch; ++b) {
        const int64_t u = u0 + b * kWarp;
        v[b] = t >= 0 && u < units_per_row ? src[u] : Unit{};
      }
#pragma unroll
      for (int b = 0; b < kCopyBatch; ++b) {
        const int64_t u = u0 + b * kWarp;
        if (u < units_per_row) dst[u] = v[b];
      }
    }
  }
}

// The copy moves bytes: 16-byte units where every row is 16-byte aligned, else elements.
template <typename F>
void with_copy_unit(int64_t row_bytes, int64_t elem_bytes, const void* a, const void* b, F&& f) {
  if (cuda::rows_aligned16(row_bytes, {a, b})) return f(uint4{});
  switch (elem_bytes) {
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    default: return f(uint64_t{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> permute_cuda(const at::Tensor& x,
                                                            const at::Tensor& ids,
                                                            int64_t num_real, int64_t align,
                                                            bool zero_tail) {
  check_permute(x, ids, num_real, align);
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::NvtxRange range("anyexperts::permute");
  const at::Tensor xc = x.contiguous();
  const at::Tensor idc = ids.contiguous();
  const int64_t tokens = idc.size(0);
  const int64_t k = idc.size(1);
  const int64_t hidden = xc.size(1);
  const int64_t slots = tokens * k;
  const int64_t rows = permuted_rows(tokens, k, num_real, align);
  const int64_t chunks = (slots + kChunk - 1) / kChunk;
  const int experts = static_cast<int>(num_real);
  const auto i32 = xc.options().dtype(at::kInt);

  at::Tensor x_perm = at::empty({rows, hidden}, xc.options());
  at::Tensor offsets = at::empty({num_real}, i32);
  at::Tensor slot_rows = at::empty({tokens, k}, i32);
  if (experts == 0) {  // no slot is live and every row is tail; a 0-block scan cannot launch
    slot_rows.fill_(-1);
    if (zero_tail) x_perm.zero_();
    return {x_perm, offsets, slot_rows};
  }
  at::Tensor running = at::zeros({num_real, chunks}, i32);
  at::Tensor totals = at::empty({num_real}, i32);
  at::Tensor starts = at::empty({num_real}, i32);
  at::Tensor row_token = at::full({rows}, -1, i32);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* id = idc.const_data_ptr<int32_t>();

  const auto chunk_blocks =
      static_cast<unsigned>((chunks + kWarpsPerBlock - 1) / kWarpsPerBlock);
  if (chunks > 0) {
    count_kernel<<<chunk_blocks, kThreads, 0, stream>>>(id, slots, experts, chunks,
                                                        running.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  scan_chunks_kernel<<<static_cast<unsigned>(experts), kThreads, 0, stream>>>(
      running.mutable_data_ptr<int32_t>(), chunks, totals.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  groups_kernel<<<1, kGroupThreads, 0, stream>>>(totals.const_data_ptr<int32_t>(), experts, align,
                                                 offsets.mutable_data_ptr<int32_t>(),
                                                 starts.mutable_data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (chunks > 0) {
    scatter_kernel<<<chunk_blocks, kThreads, 0, stream>>>(
        id, slots, k, experts, chunks, running.mutable_data_ptr<int32_t>(),
        starts.const_data_ptr<int32_t>(), slot_rows.mutable_data_ptr<int32_t>(),
        row_token.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (rows > 0 && hidden > 0) {
    const int64_t elem_bytes = xc.element_size();
    const int64_t row_bytes = hidden * elem_bytes;
    with_copy_unit(row_bytes, elem_bytes, xc.const_data_ptr(), x_perm.const_data_ptr(),
                   [&](auto unit) {
      using Unit = decltype(unit);
      gather_kernel<Unit><<<cuda::grid_for(rows, kWarpsPerBlock), kThreads, 0, stream>>>(
          static_cast<const Unit*>(xc.const_data_ptr()), row_token.const_data_ptr<int32_t>(),
          zero_tail ? nullptr : offsets.const_data_ptr<int32_t>() + (num_real - 1),
          static_cast<Unit*>(x_perm.mutable_data_ptr()), rows,
          row_bytes / static_cast<int64_t>(sizeof(Unit)));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {x_perm, offsets, slot_rows};
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) { m.impl("permute", &permute_cuda); }

}  // namespace anyexperts
