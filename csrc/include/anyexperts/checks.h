// Input validation shared by the CPU and CUDA kernels: one message per rule, checked
// before any dispatch. Values that would need a device sync (ids, slots, offsets) are not
// checked here; the kernels clamp or mask them by the rules in rules.h.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string_view>

#include "anyexperts/rules.h"

namespace anyexperts {

// ids, slot rows and offsets are int32: the sizes they index must fit.
constexpr int64_t kInt32Max = 2147483647;

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(is_float_type(t.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

inline void check_int32(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ",
              t.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op,
                              const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), op, ": ", name_a, " and ", name_b,
              " must be on the same device, got ", a.device(), " and ", b.device());
}

// Kernels accumulate, and routing weights are kept, in fp32, or fp64 when the data is fp64.
inline at::ScalarType accumulate_dtype(at::ScalarType data) {
  return data == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_weights_dtype(const at::Tensor& w, at::ScalarType data, const char* op,
                                const char* name = "weights") {
  TORCH_CHECK(w.scalar_type() == at::kFloat ||
                  (w.scalar_type() == at::kDouble && data == at::kDouble),
              op, ": ", name, " must be float32 (or float64 with float64 data), got ",
              w.scalar_type());
}

inline Norm parse_norm(std::string_view norm, const char* op = "segmented_topk") {
  if (norm == "none") return Norm::kNone;
  if (norm == "selected") return Norm::kSelected;
  if (norm == "real") return Norm::kReal;
  TORCH_CHECK(false, op, ": norm must be 'none', 'selected' or 'real', got '", norm,
              "'");
}

inline void check_segmented_topk(const at::Tensor& logits, const at::Tensor& slots,
                                 const at::Tensor& max_virtual, int64_t k_max,
                                 int64_t num_real) {
  constexpr const char* op = "segmented_topk";
  check_float(logits, op, "logits", 2);
  check_int32(slots, op, "slots", 1);
  check_int32(max_virtual, op, "max_virtual", 1);
  check_same_device(logits, slots, op, "logits", "slots");
  check_same_device(logits, max_virtual, op, "logits", "max_virtual");
  TORCH_CHECK(slots.size(0) == logits.size(0) && max_virtual.size(0) == logits.size(0), op,
              ": slots and max_virtual must have one entry per token (", logits.size(0),
              "), got ", slots.size(0), " and ", max_virtual.size(0));
  TORCH_CHECK(k_max >= 0, op, ": k_max must be >= 0, got ", k_max);
  TORCH_CHECK(k_max <= kInt32Max, op, ": k_max must fit in int32 (ids are int32), got ", k_max);
  TORCH_CHECK(logits.size(1) <= kInt32Max, op, ": E must fit in int32 (ids are int32), got ",
              logits.size(1));
  TORCH_CHECK(num_real >= 0 && num_real <= logits.size(1), op,
              ": num_real must be in [0, E] with E = ", logits.size(1), ", got ", num_real);
}

inline void check_segmented_topk_backward(const at::Tensor& grad_weights,
                                          const at::Tensor& logits, const at::Tensor& ids,
                                          int64_t num_real) {
  constexpr const char* op = "segmented_topk_backward";
  check_float(logits, op, "logits", 2);
  check_int32(ids, op, "ids", 2);
  TORCH_CHECK(grad_weights.dim() == 2 && grad_weights.sizes() == ids.sizes(), op,
              ": grad_weights must have the shape of ids ", ids.sizes(), ", got ",
              grad_weights.sizes());
  check_float(grad_weights, op, "grad_weights", 2);
  TORCH_CHECK(ids.size(0) == logits.size(0), op, ": ids must have one row per token");
  TORCH_CHECK(logits.size(1) <= kInt32Max && ids.size(1) <= kInt32Max, op,
              ": E and K must fit in int32 (ids are int32)");
  check_same_device(logits, ids, op, "logits", "ids");
  check_same_device(logits, grad_weights, op, "logits", "grad_weights");
  TORCH_CHECK(num_real >= 0 && num_real <= logits.size(1), op,
              ": num_real must be in [0, E], got ", num_real);
}

inline void check_permute(const at::Tensor& x, const at::Tensor& ids, int64_t num_real,
                          int64_t align) {
  constexpr const char* op = "permute";
  check_float(x, op, "x", 2);
  check_int32(ids, op, "ids", 2);
  check_same_device(x, ids, op, "x", "ids");
  TORCH_CHECK(ids.size(0) == x.size(0), op, ": ids must have one row per token of x (",
              x.size(0), "), got ", ids.size(0));
  TORCH_CHECK(num_real >= 0, op, ": num_real must be >= 0, got ", num_real);
  TORCH_CHECK(num_real <= kInt32Max, op, ": num_real must fit in int32, got ", num_real);
  TORCH_CHECK(align >= 1, op, ": align must be >= 1, got ", align);
  // R = T*K + num_real*(align-1) <= 2^31 - 1, tested without forming the product, which
  // can overflow int64 for a huge align.
  const int64_t slots = ids.numel();
  const bool fits = slots <= kInt32Max &&
                    (num_real == 0 || align - 1 <= (kInt32Max - slots) / num_real);
  TORCH_CHECK(fits, op,
              ": R = T*K + num_real*(align-1) must fit in int32 (slot_rows are int32); got T*K = ",
              slots, ", num_real = ", num_real, ", align = ", align);
}

inline void check_grouped_mm(const at::Tensor& a, const at::Tensor& b,
                             const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm";
  check_float(a, op, "a", 2);
  check_float(b, op, "b", 3);
  check_int32(offsets, op, "offsets", 1);
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  check_same_device(a, b, op, "a", "b");
  check_same_device(a, offsets, op, "a", "offsets");
  TORCH_CHECK(a.size(1) == b.size(1), op, ": a[R,K] and b[G,K,N] must agree on K, got ",
              a.size(1), " and ", b.size(1));
  TORCH_CHECK(offsets.size(0) == b.size(0), op, ": offsets must have one entry per group (",
              b.size(0), "), got ", offsets.size(0));
  TORCH_CHECK(a.size(0) < (int64_t{1} << 31), op, ": a must have fewer than 2^31 rows");
}

inline void check_grouped_mm_wgrad(const at::Tensor& a, const at::Tensor& dout,
                                   const at::Tensor& offsets) {
  constexpr const char* op = "grouped_mm_wgrad";
  check_float(a, op, "a", 2);
  check_float(dout, op, "dout", 2);
  check_int32(offsets, op, "offsets", 1);
  TORCH_CHECK(a.scalar_type() == dout.scalar_type(), op,
              ": a and dout must have the same dtype, got ", a.scalar_type(), " and ",
              dout.scalar_type());
  check_same_device(a, dout, op, "a", "dout");
  check_same_device(a, offsets, op, "a", "offsets");
  TORCH_CHECK(a.size(0) == dout.size(0), op, ": a and dout must have the same rows, got ",
              a.size(0), " and ", dout.size(0));
  TORCH_CHECK(a.size(0) < (int64_t{1} << 31), op, ": a must have fewer than 2^31 rows");
}

inline void check_swiglu(const at::Tensor& gu, const at::Tensor& offsets,
                         const char* op = "swiglu") {
  check_float(gu, op, "gu", 2);
  check_int32(offsets, op, "offsets", 1);
  check_same_device(gu, offsets, op, "gu", "offsets");
  TORCH_CHECK(gu.size(1) % 2 == 0, op, ": gu must be [R, 2F] ([gate | up]), got an odd width ",
              gu.size(1));
}

inline void check_swiglu_backward(const at::Tensor& grad_h, const at::Tensor& gu,
                                  const at::Tensor& offsets) {
  constexpr const char* op = "swiglu_backward";
  check_swiglu(gu, offsets, op);
  check_float(grad_h, op, "grad_h", 2);
  TORCH_CHECK(grad_h.size(0) == gu.size(0) && grad_h.size(1) == gu.size(1) / 2, op,
              ": grad_h must be [R, F] = [", gu.size(0), ", ", gu.size(1) / 2, "], got ",
              grad_h.sizes());
  TORCH_CHECK(grad_h.scalar_type() == gu.scalar_type(), op, ": grad_h must have gu's dtype ",
              gu.scalar_type(), ", got ", grad_h.scalar_type());
  check_same_device(gu, grad_h, op, "gu", "grad_h");
}

// a holds per-token coefficients, kept in the accumulate type like routing weights.
inline void check_hsm(const at::Tensor& x, const at::Tensor& a, const char* op = "hsm") {
  check_float(x, op, "x", 2);
  TORCH_CHECK(a.dim() == 1, op, ": a must be 1-D, got ", a.dim(), "-D");
  check_weights_dtype(a, x.scalar_type(), op, "a");
  TORCH_CHECK(a.size(0) == x.size(0), op, ": a must have one entry per row of x (", x.size(0),
              "), got ", a.size(0));
  check_same_device(x, a, op, "x", "a");
}

inline void check_hsm_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& a) {
  constexpr const char* op = "hsm_backward";
  check_hsm(x, a, op);
  check_float(grad, op, "grad", 2);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad must have x's shape ", x.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), op, ": grad must have x's dtype ",
              x.scalar_type(), ", got ", grad.scalar_type());
  check_same_device(x, grad, op, "x", "grad");
}

inline void check_unpermute(const at::Tensor& y, const at::Tensor& slot_rows,
                            const at::Tensor& weights, const char* op = "unpermute") {
  check_float(y, op, "y", 2);
  check_int32(slot_rows, op, "slot_rows", 2);
  TORCH_CHECK(weights.dim() == 2 && weights.sizes() == slot_rows.sizes(), op,
              ": weights must have the shape of slot_rows ", slot_rows.sizes(), ", got ",
              weights.sizes());
  check_weights_dtype(weights, y.scalar_type(), op);
  check_same_device(y, slot_rows, op, "y", "slot_rows");
  check_same_device(y, weights, op, "y", "weights");
}

inline void check_unpermute_backward(const at::Tensor& grad_out, const at::Tensor& y,
                                     const at::Tensor& slot_rows, const at::Tensor& weights) {
  constexpr const char* op = "unpermute_backward";
  check_unpermute(y, slot_rows, weights, op);
  check_float(grad_out, op, "grad_out", 2);
  TORCH_CHECK(grad_out.size(0) == slot_rows.size(0) && grad_out.size(1) == y.size(1), op,
              ": grad_out must be [T, H] = [", slot_rows.size(0), ", ", y.size(1), "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == y.scalar_type(), op,
              ": grad_out must have y's dtype ", y.scalar_type(), ", got ",
              grad_out.scalar_type());
  check_same_device(y, grad_out, op, "y", "grad_out");
}

// add_virtual(out, x, ids, weights, num_real, sources, const_vectors) and its backward
// (which passes grad for out): out and x [T, H] of one dtype, ids / weights [T, K],
// sources [M] int32, const_vectors [C, H] of out's dtype (C may be 0).
inline void check_add_virtual(const at::Tensor& out, const at::Tensor& x, const at::Tensor& ids,
                              const at::Tensor& weights, int64_t num_real,
                              const at::Tensor& sources, const at::Tensor& const_vectors,
                              const char* op = "add_virtual", const char* out_name = "out") {
  check_float(out, op, out_name, 2);
  check_float(x, op, "x", 2);
  check_int32(ids, op, "ids", 2);
  check_int32(sources, op, "sources", 1);
  check_float(const_vectors, op, "const_vectors", 2);
  TORCH_CHECK(x.sizes() == out.sizes(), op, ": x must have ", out_name, "'s shape ",
              out.sizes(), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == out.scalar_type() &&
                  const_vectors.scalar_type() == out.scalar_type(),
              op, ": x and const_vectors must have ", out_name, "'s dtype ", out.scalar_type(),
              ", got ", x.scalar_type(), " and ", const_vectors.scalar_type());
  TORCH_CHECK(ids.size(0) == out.size(0), op, ": ids must have one row per token (",
              out.size(0), "), got ", ids.size(0));
  TORCH_CHECK(weights.dim() == 2 && weights.sizes() == ids.sizes(), op,
              ": weights must have the shape of ids ", ids.sizes(), ", got ", weights.sizes());
  check_weights_dtype(weights, out.scalar_type(), op);
  TORCH_CHECK(const_vectors.size(1) == out.size(1), op, ": const_vectors must be [C, ",
              out.size(1), "], got ", const_vectors.sizes());
  TORCH_CHECK(num_real >= 0 && num_real <= kInt32Max, op,
              ": num_real must be in [0, 2^31 - 1] (ids are int32), got ", num_real);
  check_same_device(out, x, op, out_name, "x");
  check_same_device(out, ids, op, out_name, "ids");
  check_same_device(out, weights, op, out_name, "weights");
  check_same_device(out, sources, op, out_name, "sources");
  check_same_device(out, const_vectors, op, out_name, "const_vectors");
}

}  // namespace anyexperts
