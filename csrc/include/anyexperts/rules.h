// Per-element rules of the op contract (DESIGN.md section 3), shared by the CPU and the
// CUDA kernels so that the CPU tests exercise the very code the GPU runs.
#pragma once

#include <math.h>

#include <cstdint>

#if defined(__CUDACC__)
#define AE_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define AE_HOST_DEVICE inline
#endif

namespace anyexperts {

enum class Norm : int { kNone = 0, kSelected = 1, kReal = 2 };

// ---- segmented_topk -------------------------------------------------------------------

// Slot counts come from the device and are never trusted: clamp by rule.
AE_HOST_DEVICE int clamp_slots(int32_t slots, int k_max) {
  return slots < 0 ? 0 : (slots > k_max ? k_max : static_cast<int>(slots));
}

AE_HOST_DEVICE int clamp_virtual(int32_t max_virtual, int slots) {
  return max_virtual < 0 ? 0 : (max_virtual > slots ? slots : static_cast<int>(max_virtual));
}

// Ranking order: logit descending, ties to the lower index, NaN below every number
// (and NaNs among themselves by index). A strict total order, so any selection
// algorithm (sort, repeated argmax, warp shuffle) yields the same ranking.
template <typename T>
AE_HOST_DEVICE bool ranks_before(T va, int ia, T vb, int ib) {
  const bool nan_a = va != va;
  const bool nan_b = vb != vb;
  if (nan_a != nan_b) return nan_b;
  if (!nan_a && va != vb) return va > vb;
  return ia < ib;
}

// The walk down a token's ranking: real candidates are always taken, virtual ones only
// while fewer than `cap` are taken, until `want` slots are filled.
struct SlotWalk {
  int want;
  int cap;
  int taken = 0;
  int virtual_taken = 0;

  AE_HOST_DEVICE SlotWalk(int want_, int cap_) : want(want_), cap(cap_) {}
  AE_HOST_DEVICE bool done() const { return taken >= want; }
  // Returns whether `candidate` fills the next slot (slot index = taken before the call).
  AE_HOST_DEVICE bool offer(int candidate, int num_real) {
    if (done()) return false;
    if (candidate >= num_real) {
      if (virtual_taken >= cap) return false;
      ++virtual_taken;
    }
    ++taken;
    return true;
  }
};

// The slots a norm shares the weight among: every taken one ("selected"), the taken real
// ones ("real"), none ("none": a weight is the probability itself).
AE_HOST_DEVICE bool in_norm_set(bool is_real, Norm norm) {
  return norm == Norm::kSelected || (norm == Norm::kReal && is_real);
}

// expf/exp are the C library's on the host and CUDA's on the device.
AE_HOST_DEVICE float exp_of(float x) { return expf(x); }
AE_HOST_DEVICE double exp_of(double x) { return exp(x); }

// A set member's share, exp(logit - set_max) with set_max the largest logit of the set: the
// normalised weight is share / (sum of the set's shares), which is p / (sum of p over the
// set) with the row's softmax denominator cancelled. Taken that way it stays exact when a
// candidate outside the set (a virtual one past the cap; under "real", any virtual one)
// leads the whole set by more than about 87 (fp32): there every p of the set is denormal,
// or 0 past 104, and p / sum p loses its digits or is 0 / 0. The set's leader has share 1,
// so the sum is at least 1.
template <typename Acc>
AE_HOST_DEVICE Acc set_share(Acc logit, Acc set_max, bool in_set) {
  return in_set ? exp_of(logit - set_max) : Acc(0);
}

// Weight of a taken slot with probability p (softmax over the whole row). A row whose
// softmax is NaN (a NaN or +inf logit) gives its set NaN weights, as p / sum p would.
template <typename Acc>
AE_HOST_DEVICE Acc slot_weight(Acc p, bool in_set, Acc share, Acc share_sum, Norm norm) {
  if (norm == Norm::kNone) return p;
  if (!in_set) return Acc(0);
  return p != p ? p : share / share_sum;
}

// A taken slot's part of p_c * dL/dp_c, with gw its weight's gradient, w its weight and
// dot the sum over the set of gw * w. The logits' gradient is, per candidate, the sum of
// its slots' parts less p_c times the sum of every slot's part (the softmax backward). A
// set member's part is w * (gw - dot): from the weights, not from p / sum p, for the same
// reason as set_share.
template <typename Acc>
AE_HOST_DEVICE Acc slot_grad_part(Acc gw, Acc p, Acc w, bool in_set, Acc dot, Norm norm) {
  if (norm == Norm::kNone) return p * gw;
  return in_set ? w * (gw - dot) : Acc(0);
}

// ---- permute --------------------------------------------------------------------------

AE_HOST_DEVICE bool is_live(int32_t id, int num_real) { return id >= 0 && id < num_real; }

AE_HOST_DEVICE int64_t padded_count(int64_t count, int64_t align) {
  return (count + align - 1) / align * align;
}

AE_HOST_DEVICE int64_t permuted_rows(int64_t tokens, int64_t k, int64_t num_real, int64_t align) {
  return tokens * k + num_real * (align - 1);
}

// ---- grouped GEMM ---------------------------------------------------------------------

// Offsets come from the device: group g spans [end(g-1), end(g)) with
// end(g) = clamp(max(offsets[0..g]), 0, rows), so groups never overlap or leave [0, rows).
// end(g) is a running max from 0 (running_end, one step of it) clamped to rows (clamp_end):
// a loop over the groups in order carries the running max (O(1) a group), a block-wide scan
// of running_end gives every end at once (grouped_mm_prepare.cuh); group_end serves a
// thread that sees one group only.
AE_HOST_DEVICE int32_t running_end(int32_t end, int32_t offset) {
  return offset > end ? offset : end;
}

AE_HOST_DEVICE int64_t clamp_end(int32_t end, int64_t rows) { return end < rows ? end : rows; }

AE_HOST_DEVICE int64_t group_end(const int32_t* offsets, int g, int64_t rows) {
  int32_t end = 0;
  for (int i = 0; i <= g; ++i) end = running_end(end, offsets[i]);
  return clamp_end(end, rows);
}

struct RowSpan {
  int64_t begin;
  int64_t end;
};

AE_HOST_DEVICE RowSpan group_span(const int32_t* offsets, int g, int64_t rows) {
  return {g == 0 ? 0 : group_end(offsets, g - 1, rows), group_end(offsets, g, rows)};
}

// Rows at or after this one belong to no group: the tail, zero in every op's output unless
// the caller passes zero_tail=false.
AE_HOST_DEVICE int64_t live_rows(const int32_t* offsets, int groups, int64_t rows) {
  return groups > 0 ? group_end(offsets, groups - 1, rows) : 0;
}

// ---- swiglu ---------------------------------------------------------------------------

// silu(gate) * up, with silu written as torch writes it: x / (1 + exp(-x)).
template <typename Acc>
AE_HOST_DEVICE Acc swiglu_value(Acc gate, Acc up) {
  return gate / (Acc(1) + exp_of(-gate)) * up;
}

template <typename Acc>
struct SwigluGrad {
  Acc gate;
  Acc up;
};

// Gradients of h = silu(gate) * up given dh, with silu'(x) = s * (1 + x * (1 - s)),
// s = sigmoid(x), the form of torch's silu_backward.
template <typename Acc>
AE_HOST_DEVICE SwigluGrad<Acc> swiglu_grad(Acc dh, Acc gate, Acc up) {
  const Acc s = Acc(1) / (Acc(1) + exp_of(-gate));
  return {dh * up * (s * (Acc(1) + gate * (Acc(1) - s))), dh * (gate * s)};
}

// ---- hsm ------------------------------------------------------------------------------

// Hidden-state modulation x' = x + a * x, a = alpha * w for the token's importance w.
// Written as the paper and reference.hsm write it (not (1 + a) * x), so that on the
// host the op and the reference round the same two operations.
template <typename Acc>
AE_HOST_DEVICE Acc hsm_value(Acc x, Acc a) {
  return x + a * x;
}

template <typename Acc>
struct HsmGrad {
  Acc x;
  Acc a;  // this element's term of the row's dot product, grad_a = sum over the row
};

// Gradients of x' = x + a * x given dx': dx = dx' + a * dx' and da = sum of dx' * x.
template <typename Acc>
AE_HOST_DEVICE HsmGrad<Acc> hsm_grad(Acc dout, Acc x, Acc a) {
  return {dout + a * dout, dout * x};
}

// ---- unpermute ------------------------------------------------------------------------

AE_HOST_DEVICE bool is_live_row(int32_t row, int64_t rows) { return row >= 0 && row < rows; }

// ---- add_virtual ----------------------------------------------------------------------

// sources[m] says what virtual expert m (id num_real + m) adds to its token: a row of
// const_vectors (code >= 0), the token's own x (kVirtualCopy) or nothing (kVirtualZero).
constexpr int32_t kVirtualZero = -1;
constexpr int32_t kVirtualCopy = -2;

// The source of a slot. Ids and codes come from the device and are never trusted: an id
// outside [num_real, num_real + num_virtual) (a real expert, -1 for an empty slot, garbage)
// and a code that is neither kVirtualCopy nor a row of const_vectors add nothing.
AE_HOST_DEVICE int32_t virtual_source(int32_t id, int64_t num_real, const int32_t* sources,
                                      int64_t num_virtual, int64_t num_const) {
  const int64_t m = static_cast<int64_t>(id) - num_real;
  if (m < 0 || m >= num_virtual) return kVirtualZero;
  const int32_t code = sources[m];
  if (code == kVirtualCopy || (code >= 0 && code < num_const)) return code;
  return kVirtualZero;
}

}  // namespace anyexperts
