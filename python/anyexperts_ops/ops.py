"""Python entry points of torch.ops.anyexperts: fake (meta) implementations and autograd.

The schemas live in csrc/ops.cpp and the kernels in csrc/cpu and csrc/cuda; this module
adds what the dispatcher needs for torch.compile (static-shape fakes) and training
(autograd formulas that call the backward ops).

``zero_tail=False`` (permute, grouped_mm, swiglu) and ``zero_unreferenced=False``
(unpermute) are for callers that never read the dead rows, the way AnyExpertsMoE chains the
ops: see the README's "Dead rows". The defaults follow DESIGN.md section 3 exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loads the library, registering the ops)
except ImportError as e:
    import glob
    import os
    _here = os.path.dirname(os.path.abspath(__file__))
    if not glob.glob(os.path.join(_here, "_C.*")):  # a source checkout never built
        raise ImportError(
            f"anyexperts_ops: no compiled library in {_here}: build it there with "
            f"`bash scripts/dev_build.sh`, or install the package with `pip install "
            f"--no-build-isolation .` and import it from outside the checkout's python/ "
            f"(README, Building).") from e
    # most often a torch other than the one it was built against
    raise ImportError(
        f"anyexperts_ops: the compiled library failed to load ({e}). It links the torch it "
        f"was built against, and this is torch {torch.__version__}: rebuild it with this "
        f"torch, `pip install --no-build-isolation .` (README, Building).") from e
from . import checks as _checks
from . import reference as _reference

_ops = torch.ops.anyexperts


def _weight_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- public wrappers ------------------------------------------------------------------

def segmented_topk(logits: Tensor, slots: Tensor, max_virtual: Tensor, k_max: int,
                   num_real: int, norm: str = "none") -> tuple[Tensor, Tensor]:
    """Per-token top-k with a per-token slot count and virtual cap. See DESIGN.md 3."""
    return _ops.segmented_topk.default(logits, slots, max_virtual, k_max, num_real, norm)


def permute(x: Tensor, ids: Tensor, num_real: int, align: int = 1, *,
            zero_tail: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Groups the rows of live slots by expert: (x_perm, offsets, slot_rows). Rows from
    offsets[-1] on are zero, or with ``zero_tail=False`` unwritten (unspecified)."""
    return _ops.permute.default(x, ids, num_real, align, zero_tail=zero_tail)


def grouped_mm(a: Tensor, b: Tensor, offsets: Tensor, *, zero_tail: bool = True) -> Tensor:
    """out[rows of g] = a[rows of g] @ b[g], offsets are end offsets (group g ends at
    clamp(max(offsets[:g+1]), 0, R), the same as offsets[g] for valid offsets). Rows from the
    last group's end on are zero; with ``zero_tail=False`` they are unwritten (unspecified), in
    ``out`` and in the gradient with respect to ``a``."""
    return _ops.grouped_mm.default(a, b, offsets, zero_tail=zero_tail)


def grouped_mm_wgrad(a: Tensor, dout: Tensor, offsets: Tensor) -> Tensor:
    """db[g] = a[rows of g]^T @ dout[rows of g], zero for empty groups."""
    return _ops.grouped_mm_wgrad.default(a, dout, offsets)


def swiglu(gu: Tensor, offsets: Tensor, *, zero_tail: bool = True) -> Tensor:
    """h = silu(gate) * up with gu = [gate | up] ([R, 2F] -> [R, F]); rows past the last
    group's end are never read, and written as zero (``zero_tail=False``: unwritten, in h
    and in the gradient with respect to gu)."""
    return _ops.swiglu.default(gu, offsets, zero_tail=zero_tail)


def hsm(x: Tensor, a: Tensor) -> Tensor:
    """Hidden-state modulation: out[t] = x[t] + a[t] * x[t] for x [T, H] and per-token
    coefficients a [T] (the layer's alpha * importance), computed in fp32 (fp64 for fp64)
    and rounded once to x's dtype. ``a`` is float32, or float64 with float64 x.
    Differentiable to x and a (``hsm_backward``: one pass over [T, H] for both)."""
    return _ops.hsm.default(x, a)


def unpermute(y: Tensor, slot_rows: Tensor, weights: Tensor, *,
              zero_unreferenced: bool = True) -> Tensor:
    """out[t] = sum_j weights[t,j] * y[slot_rows[t,j]], skipping -1. In backward, the rows
    of grad y that no slot refers to are zero, or with ``zero_unreferenced=False``
    unwritten (unspecified)."""
    return _ops.unpermute.default(y, slot_rows, weights, zero_unreferenced=zero_unreferenced)


def add_virtual(out: Tensor, x: Tensor, ids: Tensor, weights: Tensor, num_real: int,
                sources: Tensor, const_vectors: Tensor) -> Tensor:
    """out plus the virtual experts' terms: each slot j of token t whose id is virtual
    expert m = ids[t,j] - num_real adds weights[t,j] times x[t] (sources[m] = -2, copy),
    const_vectors[c] (sources[m] = c >= 0) or nothing (-1, zero). One pass over [T, H]."""
    return _ops.add_virtual.default(out, x, ids, weights, num_real, sources, const_vectors)


# ---- fake implementations: the kernels' input checks, then output shapes and dtypes ----
# Every kernel returns contiguous tensors, so the fakes do too (new_empty, not empty_like,
# which would copy a non-contiguous input's strides).

@torch.library.register_fake("anyexperts::segmented_topk")
def _segmented_topk_fake(logits, slots, max_virtual, k_max, num_real, norm):
    _checks.segmented_topk(logits, slots, max_virtual, k_max, num_real, norm)
    T = logits.shape[0]
    return (logits.new_empty((T, k_max), dtype=torch.int32),
            logits.new_empty((T, k_max), dtype=_weight_dtype(logits.dtype)))


@torch.library.register_fake("anyexperts::segmented_topk_backward")
def _segmented_topk_backward_fake(grad_weights, logits, ids, num_real, norm):
    _checks.segmented_topk_backward(grad_weights, logits, ids, num_real, norm)
    return logits.new_empty(logits.shape)


@torch.library.register_fake("anyexperts::permute")
def _permute_fake(x, ids, num_real, align, *, zero_tail=True):
    _checks.permute(x, ids, num_real, align)
    T, K = ids.shape
    R = T * K + num_real * (align - 1)
    return (x.new_empty((R, x.shape[1])),
            x.new_empty((num_real,), dtype=torch.int32),
            x.new_empty((T, K), dtype=torch.int32))


@torch.library.register_fake("anyexperts::grouped_mm")
def _grouped_mm_fake(a, b, offsets, *, zero_tail=True):
    _checks.grouped_mm(a, b, offsets)
    return a.new_empty((a.shape[0], b.shape[2]))


@torch.library.register_fake("anyexperts::grouped_mm_wgrad")
def _grouped_mm_wgrad_fake(a, dout, offsets):
    _checks.grouped_mm_wgrad(a, dout, offsets)
    return a.new_empty((offsets.shape[0], a.shape[1], dout.shape[1]))


@torch.library.register_fake("anyexperts::swiglu")
def _swiglu_fake(gu, offsets, *, zero_tail=True):
    _checks.swiglu(gu, offsets)
    return gu.new_empty((gu.shape[0], gu.shape[1] // 2))


@torch.library.register_fake("anyexperts::swiglu_backward")
def _swiglu_backward_fake(grad_h, gu, offsets, *, zero_tail=True):
    _checks.swiglu_backward(grad_h, gu, offsets)
    return gu.new_empty(gu.shape)


@torch.library.register_fake("anyexperts::hsm")
def _hsm_fake(x, a):
    _checks.hsm(x, a)
    return x.new_empty(x.shape)


@torch.library.register_fake("anyexperts::hsm_backward")
def _hsm_backward_fake(grad, x, a):
    _checks.hsm_backward(grad, x, a)
    return x.new_empty(x.shape), a.new_empty(a.shape)


@torch.library.register_fake("anyexperts::unpermute")
def _unpermute_fake(y, slot_rows, weights, *, zero_unreferenced=True):
    _checks.unpermute(y, slot_rows, weights)
    return y.new_empty((slot_rows.shape[0], y.shape[1]))


@torch.library.register_fake("anyexperts::unpermute_backward")
def _unpermute_backward_fake(grad_out, y, slot_rows, weights, *, zero_unreferenced=True):
    _checks.unpermute_backward(grad_out, y, slot_rows, weights)
    return y.new_empty(y.shape), weights.new_empty(weights.shape)


@torch.library.register_fake("anyexperts::add_virtual")
def _add_virtual_fake(out, x, ids, weights, num_real, sources, const_vectors):
    _checks.add_virtual(out, x, ids, weights, num_real, sources, const_vectors)
    return out.new_empty(out.shape)


@torch.library.register_fake("anyexperts::add_virtual_backward")
def _add_virtual_backward_fake(grad, x, ids, weights, num_real, sources, const_vectors):
    _checks.add_virtual_backward(grad, x, ids, weights, num_real, sources, const_vectors)
    return grad.new_empty(grad.shape), weights.new_empty(ids.shape,
                                                         dtype=_weight_dtype(grad.dtype))


# ---- autograd -------------------------------------------------------------------------
# grouped_mm's backward is made of grouped_mm and grouped_mm_wgrad and permute's of
# unpermute, all differentiable, so those two differentiate twice. The other backward ops
# have no derivative of their own: see _no_double_backward at the end.

def _segmented_topk_setup(ctx, inputs, output):
    logits, _slots, _max_virtual, _k_max, num_real, norm = inputs
    ctx.save_for_backward(logits, output[0])
    ctx.num_real, ctx.norm = num_real, norm


def _segmented_topk_backward(ctx, _grad_ids, grad_weights):
    logits, ids = ctx.saved_tensors
    grad_logits = None
    if grad_weights is not None and ctx.needs_input_grad[0]:
        grad_logits = _ops.segmented_topk_backward.default(
            grad_weights.contiguous(), logits, ids, ctx.num_real, ctx.norm)
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("anyexperts::segmented_topk", _segmented_topk_backward,
                                setup_context=_segmented_topk_setup)


def _permute_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.save_for_backward(output[2])


def _permute_backward(ctx, grad_x_perm, _grad_offsets, _grad_slot_rows):
    (slot_rows,) = ctx.saved_tensors
    if grad_x_perm is None:
        return None, None, None, None
    # Each slot's row carries grad to its token: an unpermute with unit weights.
    ones = torch.ones(slot_rows.shape, dtype=_weight_dtype(grad_x_perm.dtype),
                      device=slot_rows.device)
    return unpermute(grad_x_perm.contiguous(), slot_rows, ones), None, None, None


torch.library.register_autograd("anyexperts::permute", _permute_backward,
                                setup_context=_permute_setup)


# An input is saved only where another input's gradient reads it: frozen experts (b needs
# no grad) keep no [R, K] activation a alive until the backward, routing weights that need
# no grad no [R, H] y, a frozen importance predictor no [T, H] x in hsm. Where a backward op
# reads such an input only for a gradient not asked for, _stand_in gives it zeros.

def _stand_in(saved, like: Tensor, shape):
    """`saved`, or where it was not kept, zeros of its shape in `like`'s dtype and device,
    made at backward time (the backward ops copy it to contiguous memory)."""
    return saved if saved is not None else like.new_zeros(()).expand(shape)


def _grouped_mm_setup(ctx, inputs, keyword_only_inputs, output):
    a, b, offsets = inputs
    need_a, need_b = ctx.needs_input_grad[:2]
    ctx.save_for_backward(a if need_b else None, b if need_a else None, offsets)
    ctx.zero_tail = keyword_only_inputs["zero_tail"]
    # b is a transposed view of [G, N, K] storage (nn.Linear layout)
    ctx.b_linear = (b.dim() == 3 and b.stride(1) == 1 and b.stride(2) == b.shape[1]
                    and b.shape[1] > 1)


def _grouped_mm_backward(ctx, grad_out):
    a, b, offsets = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = grouped_mm(grad_out, b.transpose(-2, -1), offsets, zero_tail=ctx.zero_tail)
    if ctx.needs_input_grad[1]:
        if ctx.b_linear:
            # the gradient in b's storage layout (db^T[g] = dout_g^T @ a_g), so the view's
            # backward needs no transposing copy of the whole weight gradient.
            grad_b = grouped_mm_wgrad(grad_out, a, offsets).transpose(-2, -1)
        else:
            grad_b = grouped_mm_wgrad(a, grad_out, offsets)
    return grad_a, grad_b, None


torch.library.register_autograd("anyexperts::grouped_mm", _grouped_mm_backward,
                                setup_context=_grouped_mm_setup)


def _grouped_mm_wgrad_backward(ctx, grad_db):
    # db[g] = a_g^T @ dout_g: d a_g = dout_g @ grad_db[g]^T and d dout_g = a_g @ grad_db[g];
    # rows past the last group do not reach db, and grouped_mm writes theirs as zero.
    a, dout, offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    return (grouped_mm(dout, grad_db.transpose(-2, -1), offsets) if need[0] else None,
            grouped_mm(a, grad_db, offsets) if need[1] else None, None)


def _grouped_mm_wgrad_setup(ctx, inputs, output):
    a, dout, offsets = inputs
    need_a, need_dout = ctx.needs_input_grad[:2]
    ctx.save_for_backward(a if need_dout else None, dout if need_a else None, offsets)


torch.library.register_autograd("anyexperts::grouped_mm_wgrad", _grouped_mm_wgrad_backward,
                                setup_context=_grouped_mm_wgrad_setup)


def _swiglu_setup(ctx, inputs, keyword_only_inputs, output):
    gu, offsets = inputs
    ctx.save_for_backward(gu, offsets)
    ctx.zero_tail = keyword_only_inputs["zero_tail"]


def _swiglu_backward(ctx, grad_h):
    gu, offsets = ctx.saved_tensors
    if grad_h is None or not ctx.needs_input_grad[0]:
        return None, None
    return _ops.swiglu_backward.default(grad_h.contiguous(), gu, offsets,
                                        zero_tail=ctx.zero_tail), None


torch.library.register_autograd("anyexperts::swiglu", _swiglu_backward,
                                setup_context=_swiglu_setup)


def _hsm_setup(ctx, inputs, output):
    x, a = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, a)
    ctx.x_shape = x.shape


def _hsm_backward(ctx, grad):
    x, a = ctx.saved_tensors
    grad_x, grad_a = _ops.hsm_backward.default(grad, _stand_in(x, grad, ctx.x_shape), a)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_a if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("anyexperts::hsm", _hsm_backward, setup_context=_hsm_setup)


def _unpermute_setup(ctx, inputs, keyword_only_inputs, output):
    y, slot_rows, weights = inputs
    ctx.save_for_backward(y if ctx.needs_input_grad[2] else None, slot_rows, weights)
    ctx.y_shape = y.shape
    ctx.zero_unreferenced = keyword_only_inputs["zero_unreferenced"]


def _unpermute_backward(ctx, grad_out):
    y, slot_rows, weights = ctx.saved_tensors
    grad_y, grad_weights = _ops.unpermute_backward.default(
        grad_out.contiguous(), _stand_in(y, grad_out, ctx.y_shape), slot_rows, weights,
        zero_unreferenced=ctx.zero_unreferenced)
    return (grad_y if ctx.needs_input_grad[0] else None, None,
            grad_weights if ctx.needs_input_grad[2] else None)


torch.library.register_autograd("anyexperts::unpermute", _unpermute_backward,
                                setup_context=_unpermute_setup)


def _add_virtual_setup(ctx, inputs, output):
    _out, x, ids, weights, num_real, sources, const_vectors = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, ids, weights, sources,
                          const_vectors)
    ctx.x_shape = x.shape
    ctx.num_real = num_real


def _add_virtual_backward(ctx, grad):
    x, ids, weights, sources, const_vectors = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad = grad.contiguous()
    grad_x = grad_w = grad_const = None
    if need[1] or need[3]:
        grad_x, grad_w = _ops.add_virtual_backward.default(
            grad, _stand_in(x, grad, ctx.x_shape), ids, weights, ctx.num_real, sources,
            const_vectors)
    if need[6] and const_vectors.shape[0] > 0:
        # d const_vectors[c] = sum over tokens of (their weight on c) * grad[t]: one product
        C = const_vectors.shape[0]
        codes = _reference.virtual_codes(ids, ctx.num_real, sources, C)
        wc = _reference.virtual_const_weights(codes, weights.to(_weight_dtype(grad.dtype)), C)
        grad_const = wc.t().to(grad.dtype) @ grad
    elif need[6]:
        grad_const = torch.zeros_like(const_vectors)
    return (grad if need[0] else None, grad_x if need[1] else None, None,
            grad_w if need[3] else None, None, None, grad_const)


torch.library.register_autograd("anyexperts::add_virtual", _add_virtual_backward,
                                setup_context=_add_virtual_setup)


def _no_double_backward(backward_op: str):
    """An autograd formula for a backward op that raises: without one, differentiating a
    gradient through the op would treat its output as a constant (torch only warns), a
    silently wrong second derivative. Raises only when that derivative is asked for."""
    forward_op = backward_op.removesuffix("_backward")

    def backward(ctx, *grads):
        raise RuntimeError(f"anyexperts::{backward_op}: double backward through "
                           f"anyexperts::{forward_op} is not implemented")

    torch.library.register_autograd(f"anyexperts::{backward_op}", backward)


for _op in ("segmented_topk_backward", "swiglu_backward", "hsm_backward",
            "unpermute_backward", "add_virtual_backward"):
    _no_double_backward(_op)


# ---- autocast -------------------------------------------------------------------------
# Under torch.autocast the grouped GEMMs run in the autocast dtype, as torch.mm does: their
# fp32/fp16/bf16 inputs are cast to torch.get_autocast_dtype(device) (fp64 is left alone, as
# autocast leaves it), so fp32 master weights meet bf16 activations in a bf16 kernel instead
# of failing on mixed dtypes or running in fp32. Casting b costs what autocast's cast of an
# nn.Linear weight costs. The other ops are elementwise or gathers: they keep their dtypes.
# torch.library.register_autocast casts to one dtype fixed at registration; this reads the
# region's dtype at each call.

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_autocast_lib = torch.library.Library("anyexperts", "IMPL")


def _register_autocast_lower_precision(name: str, device_type: str):
    op = getattr(_ops, name).default
    key_name = _AUTOCAST_KEYS[device_type]
    key = getattr(torch._C.DispatchKey, key_name)

    def run(*args, **kwargs):
        dtype = torch.get_autocast_dtype(device_type)
        args = tuple(a.to(dtype) if isinstance(a, Tensor) and a.dtype != dtype
                     and a.dtype in _reference.AUTOCAST_DTYPES else a for a in args)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*args, **kwargs)

    op.py_impl(key)(run)  # the Python dispatcher's path (torch.compile's tracing)
    _autocast_lib.impl(name, lambda _keyset, *args, **kwargs: run(*args, **kwargs), key_name,
                       with_keyset=True)


for _op in ("grouped_mm", "grouped_mm_wgrad"):
    for _device_type in _AUTOCAST_KEYS:
        _register_autocast_lower_precision(_op, _device_type)
