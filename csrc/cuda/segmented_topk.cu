// segmented_topk and its backward on CUDA (DESIGN.md section 3).
//
// Fast path (E <= 512 candidates, k_max <= 32): one warp per token, the token's logits in
// registers (candidate c lives in lane c % 32), and the ranking walked by repeated warp
// argmax: each step picks the best candidate ranking after the previous pick, so no
// "removed" marks are needed. Lane s keeps slot s, so normalisation is a warp sum.
// General path (any E, any k_max): one block per token, the same walk with block argmax,
// reading the row from global memory (L1/L2 resident) at each step.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
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
using cuda::neg_inf;
using cuda::opmath_t;

constexpr int kFastMaxCandidates = 16 * kWarp;  // 16 values per lane in registers
constexpr int kFastMaxSlots = kWarp;            // lane s holds slot s
constexpr int kFastThreads = 256;               // 8 tokens per block
constexpr int kBlockThreads = 256;              // general path: one token per block

// Keeps (v, c) as the better of itself and (ov, oc); c < 0 means "no candidate".
template <typename acc_t>
__device__ __forceinline__ void keep_best(acc_t& v, int& c, acc_t ov, int oc) {
  if (oc >= 0 && (c < 0 || ranks_before(ov, oc, v, c))) {
    v = ov;
    c = oc;
  }
}

template <typename acc_t>
__device__ __forceinline__ void warp_argbest(acc_t& v, int& c) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) {
    const acc_t ov = __shfl_xor_sync(kFullMask, v, off);
    const int oc = __shfl_xor_sync(kFullMask, c, off);
    keep_best(v, c, ov, oc);
  }
}

// A candidate can be the walk's next pick when it ranks after the previous pick and, if
// virtual, the cap still has room. Filtering refused virtual candidates here (SlotWalk
// would refuse them too) makes every argmax step fill a slot: at most k_max steps, not E.
template <typename acc_t>
__device__ __forceinline__ bool eligible(acc_t v, int c, acc_t last_v, int last_c,
                                         bool virtual_open, int num_real) {
  return (c < num_real || virtual_open) && (last_c < 0 || ranks_before(last_v, last_c, v, c));
}

// Softmax statistics of a register-resident row: max (NaN-ignoring; a NaN still poisons the
// denominator, as in torch.softmax) and sum of exp(x - max).
template <typename acc_t, int kVpl>
__device__ __forceinline__ void warp_softmax_stats(const acc_t (&v)[kVpl], int E, acc_t& row_max,
                                                   acc_t& denom) {
  const int lane = threadIdx.x % kWarp;
  row_max = neg_inf<acc_t>();
#pragma unroll
  for (int i = 0; i < kVpl; ++i) {
    if (lane + i * kWarp < E) row_max = max(row_max, v[i]);
  }
  row_max = cuda::warp_max(row_max);
  denom = 0;
#pragma unroll
  for (int i = 0; i < kVpl; ++i) {
    if (lane + i * kWarp < E) denom += exp(v[i] - row_max);
  }
  denom = cuda::warp_sum(denom);
}

// The same statistics for the general path: the row read from global memory by a block of
// kBlockThreads threads; every thread gets the block's values. `scratch` as cuda::block_sum.
template <typename scalar_t>
__device__ __forceinline__ void block_softmax_stats(const scalar_t* row, int E,
                                                    opmath_t<scalar_t>* scratch,
                                                    opmath_t<scalar_t>& row_max,
                                                    opmath_t<scalar_t>& denom) {
  using acc_t = opmath_t<scalar_t>;
  row_max = neg_inf<acc_t>();
  for (int c = threadIdx.x; c < E; c += kBlockThreads) {
    row_max = max(row_max, static_cast<acc_t>(row[c]));
  }
  row_max = cuda::block_max(row_max, scratch);
  denom = 0;
  for (int c = threadIdx.x; c < E; c += kBlockThreads) {
    denom += exp(static_cast<acc_t>(row[c]) - row_max);
  }
  denom = cuda::block_sum(denom, scratch);
}

template <typename scalar_t, int kVpl>
__device__ __forceinline__ void load_row(const scalar_t* row, int E,
                                         opmath_t<scalar_t> (&v)[kVpl]) {
  const int lane = threadIdx.x % kWarp;
#pragma unroll
  for (int i = 0; i < kVpl; ++i) {
    const int c = lane + i * kWarp;
    v[i] = c < E ? static_cast<opmath_t<scalar_t>>(row[c]) : neg_inf<opmath_t<scalar_t>>();
  }
}

template <typename scalar_t, int kVpl>
__global__ void __launch_bounds__(kFastThreads)
    topk_warp_kernel(const scalar_t* __restrict__ logits, const int32_t* __restrict__ slots,
                     const int32_t* __restrict__ max_virtual, int32_t* __restrict__ ids,
                     opmath_t<scalar_t>* __restrict__ weights, int64_t tokens, int E, int k_max,
                     int num_real, Norm norm) {
  using acc_t = opmath_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = int64_t{blockIdx.x} * (kFastThreads / kWarp) + threadIdx.x / kWarp;
  if (t >= tokens) return;  // whole warps only

  acc_t v[kVpl];
  load_row(logits + t * E, E, v);
  acc_t row_max, denom;
  warp_softmax_stats(v, E, row_max, denom);

  const int want = clamp_slots(slots[t], k_max);
  SlotWalk walk(want, clamp_virtual(max_virtual[t], want));
  acc_t last_v = 0;
  int last_c = -1;
  acc_t my_v = 0;  // lane s keeps the candidate of slot s
  int my_c = -1;
  while (!walk.done()) {
    const bool virtual_open = walk.virtual_taken < walk.cap;
    acc_t best_v = 0;
    int best_c = -1;
#pragma unroll
    for (int i = 0; i < kVpl; ++i) {
      const int c = lane + i * kWarp;
      if (c < E && eligible(v[i], c, last_v, last_c, virtual_open, num_real)) {
        keep_best(best_v, best_c, v[i], c);
      }
    }
    warp_argbest(best_v, best_c);
    if (best_c < 0) break;  // ranking exhausted before the slots were filled
    const int slot = walk.taken;
    if (walk.offer(best_c, num_real) && lane == slot) {
      my_v = best_v;
      my_c = best_c;
    }
    last_v = best_v;
    last_c = best_c;
  }

  const bool taken = lane < walk.taken;
  const bool in_set = taken && in_norm_set(my_c < num_real, norm);
  const acc_t p = taken ? exp(my_v - row_max) / denom : acc_t(0);
  const acc_t set_max = cuda::warp_max(in_set ? my_v : neg_inf<acc_t>());
  const acc_t share = set_share(my_v, set_max, in_set);
  const acc_t share_sum = cuda::warp_sum(share);
  if (lane < k_max) {
    ids[t * k_max + lane] = taken ? my_c : -1;
    weights[t * k_max + lane] =
        taken ? slot_weight(p, in_set, share, share_sum, norm) : acc_t(0);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    topk_block_kernel(const scalar_t* __restrict__ logits, const int32_t* __restrict__ slots,
                      const int32_t* __restrict__ max_virtual, int32_t* __restrict__ ids,
                      opmath_t<scalar_t>* __restrict__ weights, int E, int k_max, int num_real,
                      Norm norm) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t scratch[kWarp];
  __shared__ acc_t pick_v[kWarp];
  __shared__ int pick_c[kWarp];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  constexpr int kWarps = kBlockThreads / kWarp;
  const int64_t t = blockIdx.x;
  const scalar_t* row = logits + t * E;
  int32_t* out_ids = ids + t * k_max;
  acc_t* out_w = weights + t * k_max;

  acc_t row_max, denom;
  block_softmax_stats(row, E, scratch, row_max, denom);

  const int want = clamp_slots(slots[t], k_max);
  SlotWalk walk(want, clamp_virtual(max_virtual[t], want));
  acc_t last_v = 0;
  int last_c = -1;
  while (!walk.done()) {
    const bool virtual_open = walk.virtual_taken < walk.cap;
    acc_t best_v = 0;
    int best_c = -1;
    for (int c = threadIdx.x; c < E; c += kBlockThreads) {
      const acc_t x = static_cast<acc_t>(row[c]);
      if (eligible(x, c, last_v, last_c, virtual_open, num_real)) keep_best(best_v, best_c, x, c);
    }
    warp_argbest(best_v, best_c);
    if (lane == 0) {
      pick_v[warp] = best_v;
      pick_c[warp] = best_c;
    }
    __syncthreads();
    for (int w = 0; w < kWarps; ++w) keep_best(best_v, best_c, pick_v[w], pick_c[w]);
    __syncthreads();  // pick_* are rewritten by the next step
    if (best_c < 0) break;
    const int slot = walk.taken;
    if (walk.offer(best_c, num_real) && threadIdx.x == 0) {
      out_ids[slot] = best_c;
      out_w[slot] = exp(best_v - row_max) / denom;  // p for now; normalised below
    }
    last_v = best_v;
    last_c = best_c;
  }
  const int taken = walk.taken;
  for (int s = taken + threadIdx.x; s < k_max; s += kBlockThreads) {
    out_ids[s] = -1;
    out_w[s] = 0;
  }
  __syncthreads();  // thread 0's slots become visible to the block

  auto in_set = [&](int s) { return in_norm_set(out_ids[s] < num_real, norm); };
  auto logit = [&](int s) { return static_cast<acc_t>(row[out_ids[s]]); };
  acc_t set_max = neg_inf<acc_t>();
  for (int s = threadIdx.x; s < taken; s += kBlockThreads) {
    if (in_set(s)) set_max = max(set_max, logit(s));
  }
  set_max = cuda::block_max(set_max, scratch);
  acc_t share_sum = 0;
  for (int s = threadIdx.x; s < taken; s += kBlockThreads) {
    share_sum += set_share(logit(s), set_max, in_set(s));
  }
  share_sum = cuda::block_sum(share_sum, scratch);
  for (int s = threadIdx.x; s < taken; s += kBlockThreads) {
    out_w[s] = slot_weight(out_w[s], in_set(s), set_share(logit(s), set_max, in_set(s)),
                           share_sum, norm);
  }
}

// ---- backward -------------------------------------------------------------------------

// Per-slot quantities of the backward, shared by both paths. A slot counts as taken when
// its id is a candidate (ids come from the device: anything else is ignored, never read).
template <typename acc_t>
struct SlotGrad {
  bool taken;
  bool in_set;  // in the norm's set (in_norm_set)
  int c;
  acc_t v;      // the candidate's logit
  acc_t p;
  acc_t gw;
};

template <typename scalar_t>
__device__ __forceinline__ SlotGrad<opmath_t<scalar_t>> load_slot(
    const int32_t* ids, const opmath_t<scalar_t>* grad_w, const scalar_t* row, int64_t at, int E,
    int num_real, Norm norm, opmath_t<scalar_t> row_max, opmath_t<scalar_t> denom) {
  using acc_t = opmath_t<scalar_t>;
  const int c = ids[at];
  const bool taken = c >= 0 && c < E;
  const acc_t v = taken ? static_cast<acc_t>(row[c]) : acc_t(0);
  return {taken, taken && in_norm_set(c < num_real, norm), c, v,
          taken ? exp(v - row_max) / denom : acc_t(0), taken ? grad_w[at] : acc_t(0)};
}

template <typename scalar_t, int kVpl>
__global__ void __launch_bounds__(kFastThreads)
    topk_backward_warp_kernel(const opmath_t<scalar_t>* __restrict__ grad_w,
                              const scalar_t* __restrict__ logits,
                              const int32_t* __restrict__ ids, scalar_t* __restrict__ grad_logits,
                              int64_t tokens, int E, int K, int num_real, Norm norm) {
  using acc_t = opmath_t<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const int64_t t = int64_t{blockIdx.x} * (kFastThreads / kWarp) + threadIdx.x / kWarp;
  if (t >= tokens) return;
  const scalar_t* row = logits + t * E;

  acc_t v[kVpl];
  load_row(row, E, v);
  acc_t row_max, denom;
  warp_softmax_stats(v, E, row_max, denom);

  SlotGrad<acc_t> sg{false, false, -1, acc_t(0), acc_t(0), acc_t(0)};
  if (lane < K) {
    sg = load_slot(ids, grad_w, row, t * K + lane, E, num_real, norm, row_max, denom);
  }
  const acc_t set_max = cuda::warp_max(sg.in_set ? sg.v : neg_inf<acc_t>());
  const acc_t share = set_share(sg.v, set_max, sg.in_set);
  const acc_t share_sum = cuda::warp_sum(share);
  const acc_t w = sg.taken ? slot_weight(sg.p, sg.in_set, share, share_sum, norm) : acc_t(0);
  const acc_t dot = cuda::warp_sum(sg.in_set ? sg.gw * w : acc_t(0));
  const acc_t part = sg.taken ? slot_grad_part(sg.gw, sg.p, w, sg.in_set, dot, norm) : acc_t(0);
  const acc_t part_sum = cuda::warp_sum(part);

  // The parts of each candidate's slots: slots broadcast in ascending order, the owning
  // lane adds.
  acc_t g[kVpl];
#pragma unroll
  for (int i = 0; i < kVpl; ++i) g[i] = 0;
  for (int s = 0; s < K; ++s) {
    const int cs = __shfl_sync(kFullMask, sg.taken ? sg.c : -1, s);
    const acc_t gs = __shfl_sync(kFullMask, part, s);
#pragma unroll
    for (int i = 0; i < kVpl; ++i) {
      if (lane + i * kWarp == cs) g[i] += gs;
    }
  }
#pragma unroll
  for (int i = 0; i < kVpl; ++i) {
    const int c = lane + i * kWarp;
    if (c < E) {
      const acc_t p = exp(v[i] - row_max) / denom;
      // unfused, as in the block path: the product rounds, and a zero keeps its sign, as
      // on the CPU (an FMA gives -0 where p * part_sum underflows)
      grad_logits[t * E + c] = static_cast<scalar_t>(g[i] - cuda::mul_rn(p, part_sum));
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlockThreads)
    topk_backward_block_kernel(const opmath_t<scalar_t>* __restrict__ grad_w,
                               const scalar_t* __restrict__ logits,
                               const int32_t* __restrict__ ids, scalar_t* __restrict__ grad_logits,
                               int E, int K, int num_real, Norm norm) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t scratch[kWarp];
  const int64_t t = blockIdx.x;
  const scalar_t* row = logits + t * E;
  const int32_t* row_ids = ids + t * K;
  scalar_t* out = grad_logits + t * E;

  acc_t row_max, denom;
  block_softmax_stats(row, E, scratch, row_max, denom);

  auto slot = [&](int s) {
    return load_slot(ids, grad_w, row, t * K + s, E, num_real, norm, row_max, denom);
  };
  acc_t set_max = neg_inf<acc_t>();
  for (int s = threadIdx.x; s < K; s += kBlockThreads) {
    const auto sg = slot(s);
    if (sg.in_set) set_max = max(set_max, sg.v);
  }
  set_max = cuda::block_max(set_max, scratch);
  acc_t share_sum = 0;
  for (int s = threadIdx.x; s < K; s += kBlockThreads) {
    const auto sg = slot(s);
    share_sum += set_share(sg.v, set_max, sg.in_set);
  }
  share_sum = cuda::block_sum(share_sum, scratch);
  auto weight = [&](const SlotGrad<acc_t>& sg) {
    return sg.taken ? slot_weight(sg.p, sg.in_set, set_share(sg.v, set_max, sg.in_set),
                                  share_sum, norm)
                    : acc_t(0);
  };
  acc_t dot = 0;
  for (int s = threadIdx.x; s < K; s += kBlockThreads) {
    const auto sg = slot(s);
    if (sg.in_set) dot += sg.gw * weight(sg);
  }
  dot = cuda::block_sum(dot, scratch);
  auto part = [&](const SlotGrad<acc_t>& sg) {
    return sg.taken ? slot_grad_part(sg.gw, sg.p, weight(sg), sg.in_set, dot, norm) : acc_t(0);
  };
  acc_t part_sum = 0;
  for (int s = threadIdx.x; s < K; s += kBlockThreads) part_sum += part(slot(s));
  part_sum = cuda::block_sum(part_sum, scratch);

  // Every candidate as if untaken (no part), then the taken ones overwritten after the
  // barrier, each by the thread of its first slot, summing its slots' parts in ascending order.
  for (int c = threadIdx.x; c < E; c += kBlockThreads) {
    const acc_t p = exp(static_cast<acc_t>(row[c]) - row_max) / denom;
    out[c] = static_cast<scalar_t>(acc_t(0) - cuda::mul_rn(p, part_sum));
  }
  __syncthreads();
  for (int s = threadIdx.x; s < K; s += kBlockThreads) {
    const auto sg = slot(s);
    if (!sg.taken) continue;
    bool first = true;
    for (int q = 0; q < s && first; ++q) first = row_ids[q] != sg.c;
    if (!first) continue;
    acc_t g = 0;
    for (int q = s; q < K; ++q) {
      if (row_ids[q] == sg.c) g += part(slot(q));
    }
    out[sg.c] = static_cast<scalar_t>(g - cuda::mul_rn(sg.p, part_sum));
  }
}

// ---- host -----------------------------------------------------------------------------

// Values per lane of the fast path: the smallest power of two holding E candidates.
template <typename F>
void with_values_per_lane(int E, F&& f) {
  if (E <= 1 * kWarp) {
    f(std::integral_constant<int, 1>{});
  } else if (E <= 2 * kWarp) {
    f(std::integral_constant<int, 2>{});
  } else if (E <= 4 * kWarp) {
    f(std::integral_constant<int, 4>{});
  } else if (E <= 8 * kWarp) {
    f(std::integral_constant<int, 8>{});
  } else {
    f(std::integral_constant<int, 16>{});
  }
}

unsigned fast_blocks(int64_t tokens) {
  constexpr int kTokensPerBlock = kFastThreads / kWarp;
  return static_cast<unsigned>((tokens + kTokensPerBlock - 1) / kTokensPerBlock);
}

// One warp or block per token, indexed in int: E and k are bounded by the shared checks.
void check_launch_tokens(const char* op, int64_t tokens) {
  TORCH_CHECK(tokens <= kInt32Max, op, ": at most 2^31 - 1 tokens on CUDA, got ", tokens);
}

std::tuple<at::Tensor, at::Tensor> segmented_topk_cuda(const at::Tensor& logits,
                                                       const at::Tensor& slots,
                                                       const at::Tensor& max_virtual,
                                                       int64_t k_max, int64_t num_real,
                                                       c10::string_view norm) {
  check_segmented_topk(logits, slots, max_virtual, k_max, num_real);
  const Norm rule = parse_norm(norm);
  const c10::cuda::CUDAGuard guard(logits.device());
  const cuda::NvtxRange range("anyexperts::segmented_topk");
  const at::Tensor lg = logits.contiguous();
  const at::Tensor sl = slots.contiguous();
  const at::Tensor mv = max_virtual.contiguous();
  const int64_t tokens = lg.size(0);
  const int64_t E = lg.size(1);
  check_launch_tokens("segmented_topk", tokens);
  at::Tensor ids = at::empty({tokens, k_max}, lg.options().dtype(at::kInt));
  at::Tensor weights =
      at::empty({tokens, k_max}, lg.options().dtype(accumulate_dtype(lg.scalar_type())));
  if (tokens == 0 || k_max == 0) return {ids, weights};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(),
                                  "segmented_topk_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto* x = lg.const_data_ptr<scalar_t>();
    const auto* s = sl.const_data_ptr<int32_t>();
    const auto* m = mv.const_data_ptr<int32_t>();
    auto* out_ids = ids.mutable_data_ptr<int32_t>();
    auto* out_w = weights.mutable_data_ptr<acc_t>();
    if (E <= kFastMaxCandidates && k_max <= kFastMaxSlots) {
      with_values_per_lane(static_cast<int>(E), [&](auto vpl) {
        topk_warp_kernel<scalar_t, decltype(vpl)::value>
            <<<fast_blocks(tokens), kFastThreads, 0, stream>>>(
                x, s, m, out_ids, out_w, tokens, static_cast<int>(E), static_cast<int>(k_max),
                static_cast<int>(num_real), rule);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      topk_block_kernel<scalar_t><<<static_cast<unsigned>(tokens), kBlockThreads, 0, stream>>>(
          x, s, m, out_ids, out_w, static_cast<int>(E), static_cast<int>(k_max),
          static_cast<int>(num_real), rule);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {ids, weights};
}

at::Tensor segmented_topk_backward_cuda(const at::Tensor& grad_weights, const at::Tensor& logits,
                                        const at::Tensor& ids, int64_t num_real,
                                        c10::string_view norm) {
  check_segmented_topk_backward(grad_weights, logits, ids, num_real);
  const Norm rule = parse_norm(norm, "segmented_topk_backward");
  const c10::cuda::CUDAGuard guard(logits.device());
  const cuda::NvtxRange range("anyexperts::segmented_topk_backward");
  const at::Tensor lg = logits.contiguous();
  const at::Tensor id = ids.contiguous();
  const at::Tensor gw = grad_weights.to(accumulate_dtype(lg.scalar_type())).contiguous();
  const int64_t tokens = lg.size(0);
  const int64_t E = lg.size(1);
  const int64_t K = id.size(1);
  check_launch_tokens("segmented_topk_backward", tokens);
  at::Tensor grad = at::empty_like(lg);
  if (tokens == 0 || E == 0) return grad;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lg.scalar_type(),
                                  "segmented_topk_backward_cuda", [&] {
    using acc_t = opmath_t<scalar_t>;
    const auto* g = gw.const_data_ptr<acc_t>();
    const auto* x = lg.const_data_ptr<scalar_t>();
    const auto* c = id.const_data_ptr<int32_t>();
    auto* out = grad.mutable_data_ptr<scalar_t>();
    if (E <= kFastMaxCandidates && K <= kFastMaxSlots) {
      with_values_per_lane(static_cast<int>(E), [&](auto vpl) {
        topk_backward_warp_kernel<scalar_t, decltype(vpl)::value>
            <<<fast_blocks(tokens), kFastThreads, 0, stream>>>(
                g, x, c, out, tokens, static_cast<int>(E), static_cast<int>(K),
                static_cast<int>(num_real), rule);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      topk_backward_block_kernel<scalar_t>
          <<<static_cast<unsigned>(tokens), kBlockThreads, 0, stream>>>(
              g, x, c, out, static_cast<int>(E), static_cast<int>(K), static_cast<int>(num_real),
              rule);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CUDA, m) {
  m.impl("segmented_topk", &segmented_topk_cuda);
  m.impl("segmented_topk_backward", &segmented_topk_backward_cuda);
}

}  // namespace anyexperts
