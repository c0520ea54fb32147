"""unpermute and unpermute_backward on CPU vs DESIGN.md section 3 and reference.py."""
from __future__ import annotations

import pytest
import torch

from anyexperts_ops import reference as ref
from conftest import (FLOAT_DTYPES, assert_close, assert_exact, check_float, dispatch_to,
                      poison_allocator)

ops = torch.ops.anyexperts
NAN = float("nan")


def i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def random_slot_rows(T, K, R, *, masked=0.25, bad=True):
    """slot_rows[T,K] int32 in [0, R) with -1s and, with `bad`, rows outside [0, R)."""
    rows = torch.randint(0, max(R, 1), (T, K), dtype=torch.int32) if R > 0 else \
        torch.full((T, K), -1, dtype=torch.int32)
    r = torch.rand(T, K)
    rows = torch.where(r < masked, torch.full_like(rows, -1), rows)
    if bad:
        junk = torch.tensor([R, R + 3, -2, -100, 2**31 - 1, -2**31], dtype=torch.int32)
        rows = torch.where(r < masked / 3, junk[torch.randint(0, len(junk), (T, K))], rows)
    return rows


def weights_for(dtype, shape):
    return torch.randn(shape, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


# ---- parity with the reference ----------------------------------------------------------

# (T, K, R, H)
SHAPES = [(30, 4, 50, 12), (1, 3, 5, 7), (0, 4, 9, 3), (8, 0, 6, 5), (6, 3, 0, 4),
          (17, 6, 200, 33)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_K{}_R{}_H{}".format(*s))
def test_matches_reference(shape):
    T, K, R, H = shape
    y = torch.randn(R, H)
    slot_rows = random_slot_rows(T, K, R)
    w = torch.randn(T, K)
    out = ops.unpermute(y, slot_rows, w)
    assert out.shape == (T, H) and out.dtype == torch.float32
    assert_close(out, ref.unpermute(y, slot_rows, w), "unpermute")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dtypes_match_reference(dtype):
    T, K, R, H = 25, 5, 90, 24
    y = torch.randn(R, H).to(dtype)
    slot_rows = random_slot_rows(T, K, R)
    w = weights_for(dtype, (T, K))
    out = ops.unpermute(y, slot_rows, w)
    assert out.dtype == dtype
    check_float(out, ref.unpermute(y.double(), slot_rows, w.double()), dtype, str(dtype))


def test_fp64_data_with_fp32_weights():
    y = torch.randn(20, 5, dtype=torch.float64)
    slot_rows = random_slot_rows(7, 3, 20)
    w = torch.randn(7, 3)
    out = ops.unpermute(y, slot_rows, w)
    assert out.dtype == torch.float64
    assert_close(out, ref.unpermute(y, slot_rows, w.double()), "fp64 y, fp32 w", rtol=1e-12)


def test_large_T_vs_reference():
    # reference.unpermute is vectorized over tokens, so it is cheap at large T.
    T, K, R, H = 4096, 8, 4096 * 8, 32
    y = torch.randn(R, H)
    slot_rows = random_slot_rows(T, K, R)
    w = torch.rand(T, K)
    assert_close(ops.unpermute(y, slot_rows, w), ref.unpermute(y, slot_rows, w), "large T")


# ---- hand-written expectations ----------------------------------------------------------

def test_handwritten():
    y = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    slot_rows = i32([[2, -1, 0], [1, 1, 3], [-1, -1, -1]])   # 3 >= R: masked
    w = torch.tensor([[0.5, 7.0, 2.0], [1.0, 0.25, 9.0], [1.0, 1.0, 1.0]])
    out = ops.unpermute(y, slot_rows, w)
    expect = torch.tensor([[0.5 * 3 + 2 * 1, 0.5 * 30 + 2 * 10],
                           [1.25 * 2, 1.25 * 20],
                           [0.0, 0.0]])
    assert_exact(out, expect, "unpermute")


def test_sums_slots_in_ascending_order():
    """out[t] = sum over j ascending (DESIGN.md 3), in fp32: with rows 1, 1e8 and -1e8 the
    order shows in the result (1 + 1e8 rounds to 1e8 in fp32), in the kernel and in the
    reference alike."""
    y = torch.tensor([[1.0], [1e8], [-1e8]])
    rows = i32([[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    w = torch.ones(3, 3)
    want = torch.tensor([[0.0], [1.0], [0.0]])
    assert_exact(ops.unpermute(y, rows, w), want, "kernel")
    assert_exact(ref.unpermute(y, rows, w), want, "reference")


def test_masked_slots_ignore_their_weights_and_unused_rows_are_not_read():
    T, K, R, H = 12, 4, 60, 8
    y = torch.randn(R, H)
    slot_rows = random_slot_rows(T, K, R, masked=0.4)
    used = torch.zeros(R, dtype=torch.bool)
    live = (slot_rows >= 0) & (slot_rows < R)
    used[slot_rows[live].long()] = True
    y[~used] = NAN                          # rows no slot points at
    w = torch.randn(T, K)
    w[~live] = NAN                          # weights of masked slots
    poison_allocator(((T, H), torch.float32))
    out = ops.unpermute(y, slot_rows, w)
    assert torch.isfinite(out).all()
    assert_close(out, ref.unpermute(y, slot_rows, w), "unpermute")


def test_accumulation_is_fp32_for_bf16():
    # 256 followed by 128 ones: a bf16 accumulator stalls at 256 (its spacing there is 2),
    # fp32 accumulation gives 384, which bf16 represents exactly.
    K = 129
    y = torch.ones(K, 4, dtype=torch.bfloat16)
    y[0] = 256.0
    slot_rows = torch.arange(K, dtype=torch.int32)[None]
    w = torch.full((1, K), 1.0)
    out = ops.unpermute(y, slot_rows, w)
    assert_exact(out, torch.full((1, 4), 384.0, dtype=torch.bfloat16), "fp32 accumulation")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_weights_stay_fp32_for_half_types(dtype):
    """A weight of 1 + eps/2 (not representable in y's dtype) times 3 is 3 + 1.5 eps in fp32,
    which rounds once to 3 + 2 eps; a weight rounded to y's dtype first would give 3."""
    eps = torch.finfo(dtype).eps
    y = torch.full((1, 4), 3.0, dtype=dtype)
    w = torch.tensor([[1.0 + eps / 2]])
    out = ops.unpermute(y, i32([[0]]), w)
    assert_exact(out, torch.full((1, 4), 3.0 + 2 * eps, dtype=dtype), "fp32 weights")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_rounds_as_the_reference(dtype):
    """On the CPU (built with -ffp-contract=off) the op rounds as reference.unpermute: the
    same fp32 products and sums in the same order, rounded once: bitwise equal."""
    T, K, R, H = 40, 6, 200, 24
    y = torch.randn(R, H, dtype=torch.float64).to(dtype)
    slot_rows = random_slot_rows(T, K, R)
    w = torch.rand(T, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    assert_exact(ops.unpermute(y, slot_rows, w), ref.unpermute(y, slot_rows, w), str(dtype))


# ---- layout and determinism -----------------------------------------------------------

def test_non_contiguous_inputs():
    T, K, R, H = 14, 3, 40, 9
    y = torch.randn(H, R).t()
    slot_rows = random_slot_rows(K, T, R).t()
    w = torch.randn(T, 2 * K)[:, ::2]
    assert not (y.is_contiguous() or slot_rows.is_contiguous() or w.is_contiguous())
    out = ops.unpermute(y, slot_rows, w)
    assert_close(out, ref.unpermute(y, slot_rows, w), "non-contiguous")


def test_deterministic_and_thread_count_invariant():
    T, K, R, H = 1500, 6, 5000, 160     # H > 64: the backward splits columns over threads
    y = torch.randn(R, H)
    slot_rows = random_slot_rows(T, K, R)
    w = torch.randn(T, K)
    g = torch.randn(T, H)
    o1 = ops.unpermute(y, slot_rows, w)
    b1 = ops.unpermute_backward(g, y, slot_rows, w)
    o2 = ops.unpermute(y, slot_rows, w)
    b2 = ops.unpermute_backward(g, y, slot_rows, w)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        o3 = ops.unpermute(y, slot_rows, w)
        b3 = ops.unpermute_backward(g, y, slot_rows, w)
    finally:
        torch.set_num_threads(n)
    assert_exact(o2, o1, "out run 2")
    assert_exact(o3, o1, "out 1 thread")
    for name, u, v, x in zip(("grad_y", "grad_weights"), b1, b2, b3):
        assert_exact(v, u, f"{name} run 2")
        assert_exact(x, u, f"{name} 1 thread")


# ---- gradients --------------------------------------------------------------------------

def test_gradcheck():
    T, K, R, H = 5, 3, 8, 4
    y = torch.randn(R, H, dtype=torch.float64, requires_grad=True)
    w = torch.randn(T, K, dtype=torch.float64, requires_grad=True)
    slot_rows = i32([[0, 3, -1], [3, 7, 8], [5, -1, 2], [-1, -1, -1], [1, 1, 6]])

    def fn(y, w):
        return ops.unpermute(y, slot_rows, w)

    assert torch.autograd.gradcheck(fn, (y, w), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_matches_reference_autograd(dtype):
    T, K, R, H = 30, 4, 70, 16
    y0 = torch.randn(R, H).to(dtype)
    w0 = torch.randn(T, K)
    slot_rows = random_slot_rows(T, K, R)
    g = torch.randn(T, H).to(dtype)
    res = []
    for fn in (ops.unpermute, ref.unpermute):
        y = y0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        fn(y, slot_rows, w).backward(g)
        res.append((y.grad, w.grad))
    (gy, gw), (ry, rw) = res
    assert gy.dtype == dtype and gw.dtype == torch.float32
    if dtype == torch.float32:
        assert_close(gy, ry, "grad y")
        assert_close(gw, rw, "grad weights")
    else:
        check_float(gy, ry.double(), dtype, "grad y bf16")
        check_float(gw, rw.double(), dtype, "grad weights bf16")
    live = (slot_rows >= 0) & (slot_rows < R)
    assert (gw[~live] == 0).all(), "masked slots get zero weight grad"


def test_backward_op_fp64_data_with_fp32_weights():
    """grad_weights has the weights' dtype (fp32 here), grad_y y's (fp64): what the fake
    implementation promises and what the reference's autograd gives."""
    T, K, R, H = 7, 3, 20, 5
    y = torch.randn(R, H, dtype=torch.float64)
    slot_rows = random_slot_rows(T, K, R)
    w = torch.randn(T, K)
    g = torch.randn(T, H, dtype=torch.float64)
    gy, gw = ops.unpermute_backward(g, y, slot_rows, w)
    assert gy.dtype == torch.float64 and gw.dtype == torch.float32
    with dispatch_to("fake"):
        fy, fw = ops.unpermute_backward(g, y, slot_rows, w)
    assert (fy.dtype, fw.dtype) == (gy.dtype, gw.dtype), "kernel and fake agree"
    y1, w1 = y.clone().requires_grad_(), w.clone().requires_grad_()
    ref.unpermute(y1, slot_rows, w1).backward(g)
    assert_close(gy, y1.grad, "grad y", rtol=1e-12)
    assert_close(gw, w1.grad, "grad weights")


def test_grad_ignores_nan_behind_masked_slots():
    """NaN in a masked slot's weight, or in a row no live slot reads, reaches no gradient:
    not in the op, not in the reference (a NaN-logit token can carry a NaN weight on a slot
    that permute masked)."""
    T, K, R, H = 20, 4, 50, 8
    slot_rows = random_slot_rows(T, K, R, masked=0.4)
    live = (slot_rows >= 0) & (slot_rows < R)
    read = torch.zeros(R, dtype=torch.bool)
    read[slot_rows[live].long()] = True
    y0 = torch.randn(R, H)
    y0[~read] = NAN
    w0 = torch.randn(T, K)
    w0[~live] = NAN
    g = torch.randn(T, H)
    for fn in (ops.unpermute, ref.unpermute):
        y = y0.clone().requires_grad_()
        w = w0.clone().requires_grad_()
        fn(y, slot_rows, w).backward(g)
        assert torch.isfinite(y.grad).all() and (y.grad[~read] == 0).all(), fn
        assert torch.isfinite(w.grad).all() and (w.grad[~live] == 0).all(), fn


def test_backward_op_direct():
    T, K, R, H = 9, 3, 15, 6
    y = torch.randn(R, H, dtype=torch.float64)
    w = torch.randn(T, K, dtype=torch.float64)
    slot_rows = random_slot_rows(T, K, R)
    slot_rows[0] = i32([4, 4, 4])              # the same row three times
    g = torch.randn(T, H, dtype=torch.float64)
    gy, gw = ops.unpermute_backward(g, y, slot_rows, w)
    yr, wr = y.clone().requires_grad_(), w.clone().requires_grad_()
    ry, rw = torch.autograd.grad(ref.unpermute(yr, slot_rows, wr), (yr, wr), g)
    assert_close(gy, ry, "grad_y", rtol=1e-12)
    assert_close(gw, rw, "grad_weights", rtol=1e-12)
