"""The input checks of csrc/include/anyexperts/checks.h, for the fake implementations.

Under torch.compile, and for meta tensors, the dispatcher runs the fakes in ops.py instead
of a kernel; without these checks a bad input would trace without complaint (and a mix of
CPU and meta tensors would return uninitialised CPU memory). Each function raises what its
C++ namesake raises, message for message: tests/test_errors.py runs every invalid-input case
against the CPU kernels and against these, on meta tensors. Conditions go through
torch._check, so symbolic sizes become guards or runtime asserts rather than errors.
"""
from __future__ import annotations

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# c10's ScalarType names, which the C++ messages print
_C10_NAMES = {torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float32: "Float",
              torch.float64: "Double", torch.int8: "Char", torch.uint8: "Byte",
              torch.int16: "Short", torch.int32: "Int", torch.int64: "Long",
              torch.bool: "Bool", torch.complex32: "ComplexHalf",
              torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
              torch.uint16: "UInt16", torch.uint32: "UInt32", torch.uint64: "UInt64",
              torch.float8_e4m3fn: "Float8_e4m3fn", torch.float8_e5m2: "Float8_e5m2"}


def _name(dtype: torch.dtype) -> str:
    return _C10_NAMES.get(dtype, str(dtype))


def _sizes(t: Tensor) -> str:
    return str(list(t.shape))


def _same_shape(a: Tensor, b: Tensor):
    """a.shape == b.shape as one condition: sizes compared one by one and joined with &,
    so that a data-dependent (unbacked) size becomes a runtime assert, not a failed guard."""
    if a.dim() != b.dim():
        return False
    cond = True
    for x, y in zip(a.shape, b.shape):
        cond = (x == y) & cond
    return cond


def _check(cond, op: str, message) -> None:
    """message: the text after "op: ", or a callable that builds it (only on failure)."""
    torch._check(cond, lambda: f"{op}: {message() if callable(message) else message}")


def _float(t: Tensor, op: str, name: str, dim: int) -> None:
    _check(t.dim() == dim, op, lambda: f"{name} must be {dim}-D, got {t.dim()}-D")
    _check(t.dtype in FLOATS, op, lambda: f"{name} must be float16, bfloat16, float32 or "
                                          f"float64, got {_name(t.dtype)}")


def _int32(t: Tensor, op: str, name: str, dim: int) -> None:
    _check(t.dim() == dim, op, lambda: f"{name} must be {dim}-D, got {t.dim()}-D")
    _check(t.dtype == torch.int32, op, lambda: f"{name} must be int32, got {_name(t.dtype)}")


def _same_device(a: Tensor, b: Tensor, op: str, name_a: str, name_b: str) -> None:
    _check(a.device == b.device, op, lambda: f"{name_a} and {name_b} must be on the same "
                                             f"device, got {a.device} and {b.device}")


def _weights_dtype(w: Tensor, data: torch.dtype, op: str, name: str = "weights") -> None:
    ok = w.dtype == torch.float32 or (w.dtype == torch.float64 and data == torch.float64)
    _check(ok, op, lambda: f"{name} must be float32 (or float64 with float64 data), got "
                           f"{_name(w.dtype)}")


def norm(name: str, op: str = "segmented_topk") -> None:
    _check(name in ("none", "selected", "real"), op,
           lambda: f"norm must be 'none', 'selected' or 'real', got '{name}'")


def segmented_topk(logits, slots, max_virtual, k_max, num_real, norm_name) -> None:
    op = "segmented_topk"
    _float(logits, op, "logits", 2)
    _int32(slots, op, "slots", 1)
    _int32(max_virtual, op, "max_virtual", 1)
    _same_device(logits, slots, op, "logits", "slots")
    _same_device(logits, max_virtual, op, "logits", "max_virtual")
    T, E = logits.shape
    _check((slots.shape[0] == T) & (max_virtual.shape[0] == T), op,
           lambda: f"slots and max_virtual must have one entry per token ({T}), got "
                   f"{slots.shape[0]} and {max_virtual.shape[0]}")
    _check(k_max >= 0, op, lambda: f"k_max must be >= 0, got {k_max}")
    _check(k_max <= INT32_MAX, op, lambda: f"k_max must fit in int32 (ids are int32), got {k_max}")
    _check(E <= INT32_MAX, op, lambda: f"E must fit in int32 (ids are int32), got {E}")
    _check((num_real >= 0) & (num_real <= E), op,
           lambda: f"num_real must be in [0, E] with E = {E}, got {num_real}")
    norm(norm_name)


def segmented_topk_backward(grad_weights, logits, ids, num_real, norm_name) -> None:
    op = "segmented_topk_backward"
    _float(logits, op, "logits", 2)
    _int32(ids, op, "ids", 2)
    _check(grad_weights.dim() == 2 and _same_shape(grad_weights, ids), op,
           lambda: f"grad_weights must have the shape of ids {_sizes(ids)}, got "
                   f"{_sizes(grad_weights)}")
    _float(grad_weights, op, "grad_weights", 2)
    _check(ids.shape[0] == logits.shape[0], op, "ids must have one row per token")
    _check((logits.shape[1] <= INT32_MAX) & (ids.shape[1] <= INT32_MAX), op,
           "E and K must fit in int32 (ids are int32)")
    _same_device(logits, ids, op, "logits", "ids")
    _same_device(logits, grad_weights, op, "logits", "grad_weights")
    _check((num_real >= 0) & (num_real <= logits.shape[1]), op,
           lambda: f"num_real must be in [0, E], got {num_real}")
    norm(norm_name, op)


def permute(x, ids, num_real, align) -> None:
    op = "permute"
    _float(x, op, "x", 2)
    _int32(ids, op, "ids", 2)
    _same_device(x, ids, op, "x", "ids")
    _check(ids.shape[0] == x.shape[0], op,
           lambda: f"ids must have one row per token of x ({x.shape[0]}), got {ids.shape[0]}")
    _check(num_real >= 0, op, lambda: f"num_real must be >= 0, got {num_real}")
    _check(num_real <= INT32_MAX, op, lambda: f"num_real must fit in int32, got {num_real}")
    _check(align >= 1, op, lambda: f"align must be >= 1, got {align}")
    slots = ids.shape[0] * ids.shape[1]
    room_per_expert = (INT32_MAX - slots) // max(num_real, 1)
    _check((slots <= INT32_MAX) & ((num_real == 0) | (align - 1 <= room_per_expert)), op,
           lambda: f"R = T*K + num_real*(align-1) must fit in int32 (slot_rows are int32); "
                   f"got T*K = {slots}, num_real = {num_real}, align = {align}")


def grouped_mm(a, b, offsets) -> None:
    op = "grouped_mm"
    _float(a, op, "a", 2)
    _float(b, op, "b", 3)
    _int32(offsets, op, "offsets", 1)
    _check(a.dtype == b.dtype, op, lambda: f"a and b must have the same dtype, got "
                                           f"{_name(a.dtype)} and {_name(b.dtype)}")
    _same_device(a, b, op, "a", "b")
    _same_device(a, offsets, op, "a", "offsets")
    _check(a.shape[1] == b.shape[1], op, lambda: f"a[R,K] and b[G,K,N] must agree on K, got "
                                                 f"{a.shape[1]} and {b.shape[1]}")
    _check(offsets.shape[0] == b.shape[0], op,
           lambda: f"offsets must have one entry per group ({b.shape[0]}), got "
                   f"{offsets.shape[0]}")
    _check(a.shape[0] < 2**31, op, "a must have fewer than 2^31 rows")


def grouped_mm_wgrad(a, dout, offsets) -> None:
    op = "grouped_mm_wgrad"
    _float(a, op, "a", 2)
    _float(dout, op, "dout", 2)
    _int32(offsets, op, "offsets", 1)
    _check(a.dtype == dout.dtype, op, lambda: f"a and dout must have the same dtype, got "
                                              f"{_name(a.dtype)} and {_name(dout.dtype)}")
    _same_device(a, dout, op, "a", "dout")
    _same_device(a, offsets, op, "a", "offsets")
    _check(a.shape[0] == dout.shape[0], op, lambda: f"a and dout must have the same rows, got "
                                                    f"{a.shape[0]} and {dout.shape[0]}")
    _check(a.shape[0] < 2**31, op, "a must have fewer than 2^31 rows")


def swiglu(gu, offsets, op: str = "swiglu") -> None:
    _float(gu, op, "gu", 2)
    _int32(offsets, op, "offsets", 1)
    _same_device(gu, offsets, op, "gu", "offsets")
    _check(gu.shape[1] % 2 == 0, op,
           lambda: f"gu must be [R, 2F] ([gate | up]), got an odd width {gu.shape[1]}")


def swiglu_backward(grad_h, gu, offsets) -> None:
    op = "swiglu_backward"
    swiglu(gu, offsets, op)
    _float(grad_h, op, "grad_h", 2)
    R, F = gu.shape[0], gu.shape[1] // 2
    _check((grad_h.shape[0] == R) & (grad_h.shape[1] == F), op,
           lambda: f"grad_h must be [R, F] = [{R}, {F}], got {_sizes(grad_h)}")
    _check(grad_h.dtype == gu.dtype, op, lambda: f"grad_h must have gu's dtype "
                                                 f"{_name(gu.dtype)}, got {_name(grad_h.dtype)}")
    _same_device(gu, grad_h, op, "gu", "grad_h")


def hsm(x, a, op: str = "hsm") -> None:
    _float(x, op, "x", 2)
    _check(a.dim() == 1, op, lambda: f"a must be 1-D, got {a.dim()}-D")
    _weights_dtype(a, x.dtype, op, "a")
    _check(a.shape[0] == x.shape[0], op, lambda: f"a must have one entry per row of x "
                                                 f"({x.shape[0]}), got {a.shape[0]}")
    _same_device(x, a, op, "x", "a")


def hsm_backward(grad, x, a) -> None:
    op = "hsm_backward"
    hsm(x, a, op)
    _float(grad, op, "grad", 2)
    _check(_same_shape(grad, x), op,
           lambda: f"grad must have x's shape {_sizes(x)}, got {_sizes(grad)}")
    _check(grad.dtype == x.dtype, op, lambda: f"grad must have x's dtype {_name(x.dtype)}, "
                                              f"got {_name(grad.dtype)}")
    _same_device(x, grad, op, "x", "grad")


def unpermute(y, slot_rows, weights, op: str = "unpermute") -> None:
    _float(y, op, "y", 2)
    _int32(slot_rows, op, "slot_rows", 2)
    _check(weights.dim() == 2 and _same_shape(weights, slot_rows), op,
           lambda: f"weights must have the shape of slot_rows {_sizes(slot_rows)}, got "
                   f"{_sizes(weights)}")
    _weights_dtype(weights, y.dtype, op)
    _same_device(y, slot_rows, op, "y", "slot_rows")
    _same_device(y, weights, op, "y", "weights")


def unpermute_backward(grad_out, y, slot_rows, weights) -> None:
    op = "unpermute_backward"
    unpermute(y, slot_rows, weights, op)
    _float(grad_out, op, "grad_out", 2)
    T, H = slot_rows.shape[0], y.shape[1]
    _check((grad_out.shape[0] == T) & (grad_out.shape[1] == H), op,
           lambda: f"grad_out must be [T, H] = [{T}, {H}], got {_sizes(grad_out)}")
    _check(grad_out.dtype == y.dtype, op, lambda: f"grad_out must have y's dtype "
                                                  f"{_name(y.dtype)}, got {_name(grad_out.dtype)}")
    _same_device(y, grad_out, op, "y", "grad_out")


def add_virtual(out, x, ids, weights, num_real, sources, const_vectors,
                op: str = "add_virtual", out_name: str = "out") -> None:
    _float(out, op, out_name, 2)
    _float(x, op, "x", 2)
    _int32(ids, op, "ids", 2)
    _int32(sources, op, "sources", 1)
    _float(const_vectors, op, "const_vectors", 2)
    _check(_same_shape(x, out), op,
           lambda: f"x must have {out_name}'s shape {_sizes(out)}, got {_sizes(x)}")
    _check(x.dtype == out.dtype and const_vectors.dtype == out.dtype, op,
           lambda: f"x and const_vectors must have {out_name}'s dtype {_name(out.dtype)}, got "
                   f"{_name(x.dtype)} and {_name(const_vectors.dtype)}")
    _check(ids.shape[0] == out.shape[0], op,
           lambda: f"ids must have one row per token ({out.shape[0]}), got {ids.shape[0]}")
    _check(weights.dim() == 2 and _same_shape(weights, ids), op,
           lambda: f"weights must have the shape of ids {_sizes(ids)}, got {_sizes(weights)}")
    _weights_dtype(weights, out.dtype, op)
    _check(const_vectors.shape[1] == out.shape[1], op,
           lambda: f"const_vectors must be [C, {out.shape[1]}], got {_sizes(const_vectors)}")
    _check((num_real >= 0) & (num_real <= INT32_MAX), op,
           lambda: f"num_real must be in [0, 2^31 - 1] (ids are int32), got {num_real}")
    for name, t in (("x", x), ("ids", ids), ("weights", weights), ("sources", sources),
                    ("const_vectors", const_vectors)):
        _same_device(out, t, op, out_name, name)


def add_virtual_backward(grad, x, ids, weights, num_real, sources, const_vectors) -> None:
    add_virtual(grad, x, ids, weights, num_real, sources, const_vectors,
                "add_virtual_backward", "grad")
