// segmented_topk on the CPU: one token per iteration of at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "anyexperts/checks.h"
#include "anyexperts/rules.h"

namespace anyexperts {
namespace {

// p = softmax(row) in Acc. Like torch.softmax, a NaN anywhere makes the whole row NaN.
// The denominator is summed in double: a sequential fp32 sum over thousands of candidates
// drifts by up to E ulps (2e-5 relative error in p at E = 4096 with many equal logits,
// torch.softmax's split sums 1.2e-6), past the ~1e-5 the contract asks of fp32.
template <typename scalar_t, typename Acc>
void softmax_row(const scalar_t* row, int64_t E, Acc* p) {
  Acc m = -std::numeric_limits<Acc>::infinity();
  for (int64_t c = 0; c < E; ++c) m = std::max(m, static_cast<Acc>(row[c]));
  double sum = 0;
  for (int64_t c = 0; c < E; ++c) sum += (p[c] = std::exp(static_cast<Acc>(row[c]) - m));
  for (int64_t c = 0; c < E; ++c) p[c] = static_cast<Acc>(p[c] / sum);
}

// A slot is taken when its id is a candidate: ids may come from a caller, and -1 or anything
// else outside [0, E) is ignored, never read.
bool taken(int32_t c, int64_t E) { return c >= 0 && c < E; }

bool in_set(int32_t c, int64_t E, int64_t num_real, Norm norm) {
  return taken(c, E) && in_norm_set(c < num_real, norm);
}

// Weights of a token's K slots by slot_weight (rules.h); a slot not taken weighs 0.
template <typename scalar_t, typename Acc>
void slot_weights(const scalar_t* row, const Acc* p, const int32_t* ids, int64_t K, int64_t E,
                  int64_t num_real, Norm norm, Acc* w) {
  auto member = [&](int32_t c) { return in_set(c, E, num_real, norm); };
  Acc set_max = -std::numeric_limits<Acc>::infinity();
  for (int64_t j = 0; j < K; ++j) {
    if (member(ids[j])) set_max = std::max(set_max, static_cast<Acc>(row[ids[j]]));
  }
  Acc share_sum = 0;
  for (int64_t j = 0; j < K; ++j) {
    w[j] = member(ids[j]) ? set_share(static_cast<Acc>(row[ids[j]]), set_max, true) : Acc(0);
    share_sum += w[j];
  }
  for (int64_t j = 0; j < K; ++j) {
    w[j] = taken(ids[j], E) ? slot_weight(p[ids[j]], member(ids[j]), w[j], share_sum, norm)
                            : Acc(0);
  }
}

// The walk can skip at most all M virtual candidates, so the first want + M of the
// ranking are all it may look at.
template <typename scalar_t>
void rank_prefix(const scalar_t* row, int64_t E, int64_t prefix, std::vector<int>& order) {
  order.resize(E);
  for (int64_t c = 0; c < E; ++c) order[c] = static_cast<int>(c);
  auto before = [row](int a, int b) {
    using Acc = at::opmath_type<scalar_t>;
    return ranks_before(static_cast<Acc>(row[a]), a, static_cast<Acc>(row[b]), b);
  };
  std::partial_sort(order.begin(), order.begin() + std::min(prefix, E), order.end(), before);
}

std::tuple<at::Tensor, at::Tensor> segmented_topk_cpu(const at::Tensor& logits_in,
                                                      const at::Tensor& slots_in,
                                                      const at::Tensor& max_virtual_in,
                                                      int64_t k_max, int64_t num_real,
                                                      c10::string_view norm_name) {
  check_segmented_topk(logits_in, slots_in, max_virtual_in, k_max, num_real);
  const Norm norm = parse_norm(norm_name);
  const auto logits = logits_in.contiguous();
  const auto slots = slots_in.contiguous();
  const auto max_virtual = max_virtual_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  const auto w_dtype = accumulate_dtype(logits.scalar_type());
  auto ids = at::full({T, k_max}, -1, logits.options().dtype(at::kInt));
  auto weights = at::zeros({T, k_max}, logits.options().dtype(w_dtype));
  if (T == 0 || k_max == 0) return {ids, weights};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "segmented_topk_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    const int32_t* sl = slots.data_ptr<int32_t>();
    const int32_t* mv = max_virtual.data_ptr<int32_t>();
    int32_t* out_ids = ids.data_ptr<int32_t>();
    Acc* out_w = weights.data_ptr<Acc>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<Acc> p(E);
      std::vector<int> order;
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = lg + t * E;
        const int want = clamp_slots(sl[t], static_cast<int>(k_max));
        SlotWalk walk(want, clamp_virtual(mv[t], want));
        if (want == 0) continue;
        softmax_row(row, E, p.data());
        rank_prefix(row, E, want + (E - num_real), order);
        int32_t* tid = out_ids + t * k_max;
        for (int64_t r = 0; r < E && !walk.done(); ++r) {
          const int c = order[r];
          const int slot = walk.taken;
          if (walk.offer(c, static_cast<int>(num_real))) tid[slot] = c;
        }
        slot_weights(row, p.data(), tid, walk.taken, E, num_real, norm, out_w + t * k_max);
      }
    });
  });
  return {ids, weights};
}

at::Tensor segmented_topk_backward_cpu(const at::Tensor& grad_weights_in,
                                       const at::Tensor& logits_in, const at::Tensor& ids_in,
                                       int64_t num_real, c10::string_view norm_name) {
  check_segmented_topk_backward(grad_weights_in, logits_in, ids_in, num_real);
  const Norm norm = parse_norm(norm_name, "segmented_topk_backward");
  const auto logits = logits_in.contiguous();
  const auto ids = ids_in.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1), K = ids.size(1);
  auto grad_logits = at::zeros_like(logits);
  if (T == 0 || E == 0) return grad_logits;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(),
                                  "segmented_topk_backward_cpu", [&] {
    using Acc = at::opmath_type<scalar_t>;
    const auto grad_weights = grad_weights_in.to(c10::CppTypeToScalarType<Acc>::value).contiguous();
    const scalar_t* lg = logits.data_ptr<scalar_t>();
    const int32_t* id = ids.data_ptr<int32_t>();
    const Acc* gw = grad_weights.data_ptr<Acc>();
    scalar_t* gl = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
      std::vector<Acc> p(E), part(E), w(K);
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* row = lg + t * E;
        const int32_t* tid = id + t * K;
        const Acc* tgw = gw + t * K;
        softmax_row(row, E, p.data());
        slot_weights(row, p.data(), tid, K, E, num_real, norm, w.data());
        Acc dot = 0;
        for (int64_t j = 0; j < K; ++j) {
          if (in_set(tid[j], E, num_real, norm)) dot += tgw[j] * w[j];
        }
        std::fill(part.begin(), part.end(), Acc(0));
        Acc part_sum = 0;
        for (int64_t j = 0; j < K; ++j) {
          if (!taken(tid[j], E)) continue;
          const Acc g =
              slot_grad_part(tgw[j], p[tid[j]], w[j], in_set(tid[j], E, num_real, norm), dot, norm);
          part[tid[j]] += g;
          part_sum += g;
        }
        scalar_t* out = gl + t * E;
        for (int64_t c = 0; c < E; ++c) out[c] = static_cast<scalar_t>(part[c] - p[c] * part_sum);
      }
    });
  });
  return grad_logits;
}

}  // namespace

TORCH_LIBRARY_IMPL(anyexperts, CPU, m) {
  m.impl("segmented_topk", &segmented_topk_cpu);
  m.impl("segmented_topk_backward", &segmented_topk_backward_cpu);
}

}  // namespace anyexperts
