"""permute on CPU vs DESIGN.md section 3 and reference.py."""
from __future__ import annotations

import pytest
import torch

from anyexperts_ops import reference as ref
from conftest import (FLOAT_DTYPES, assert_close, assert_exact, fast_permute,
                      poison_allocator, random_ids)

ops = torch.ops.anyexperts
ALIGNS = (1, 8, 16, 128)


def i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def check_vs_reference(x, ids, num_real, align, what=""):
    out = ops.permute(x, ids, num_real, align)
    expect = ref.permute(x, ids, num_real, align)
    for name, a, b in zip(("x_perm", "offsets", "slot_rows"), out, expect):
        assert_exact(a, b, f"{name} {what}", equal_nan=True)  # a gather: bitwise
    return out


# ---- parity with the reference ----------------------------------------------------------

# (T, K, num_real)
SHAPES = [(33, 4, 6), (1, 3, 4), (0, 4, 5), (20, 2, 1), (12, 0, 3), (9, 7, 12), (8, 3, 0)]


@pytest.mark.parametrize("align", ALIGNS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_K{}_N{}".format(*s))
def test_matches_reference(shape, align):
    T, K, N = shape
    x = torch.randn(T, 10)
    ids = random_ids(T, K, N)
    x_perm, offsets, slot_rows = check_vs_reference(x, ids, N, align)
    assert x_perm.shape == (T * K + N * (align - 1), 10)
    assert offsets.dtype == torch.int32 and slot_rows.dtype == torch.int32


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dtypes_match_reference(dtype):
    x = torch.randn(21, 6).to(dtype)
    ids = random_ids(21, 3, 5)
    x_perm, _, _ = check_vs_reference(x, ids, 5, 8, str(dtype))
    assert x_perm.dtype == dtype


def test_fast_oracle_matches_reference():
    for align in (1, 4):
        x = torch.randn(40, 3)
        ids = random_ids(40, 5, 7)
        for a, b in zip(fast_permute(x, ids, 7, align), ref.permute(x, ids, 7, align)):
            assert_exact(a, b, "oracle")


@pytest.mark.parametrize("shape", [(4096, 8, 64), (50, 4, 5000), (2000, 16, 3)],
                         ids=["largeT", "many-experts", "few-experts"])
@pytest.mark.parametrize("align", [1, 16])
def test_large_vs_fast_oracle(align, shape):
    T, K, N = shape
    x = torch.randn(T, 32)
    ids = random_ids(T, K, N, masked=0.1)
    out = ops.permute(x, ids, N, align)
    for name, a, b in zip(("x_perm", "offsets", "slot_rows"), out,
                          fast_permute(x, ids, N, align)):
        assert_exact(a, b, name)


# ---- hand-written expectations ----------------------------------------------------------

def test_handwritten_align_4():
    x = torch.arange(1.0, 4.0)[:, None] * torch.ones(1, 2)     # rows [1,1], [2,2], [3,3]
    ids = i32([[1, 0], [1, -1], [7, 1]])                        # 7 >= num_real: masked
    x_perm, offsets, slot_rows = ops.permute(x, ids, 2, 4)
    # count_0 = 1 -> 4 rows; count_1 = 3 -> 4 rows; R = 3*2 + 2*3 = 12.
    assert_exact(offsets, i32([4, 8]), "offsets")
    assert_exact(slot_rows, i32([[4, 0], [5, -1], [-1, 6]]), "slot_rows")
    expect = torch.zeros(12, 2)
    expect[0] = 1
    expect[4], expect[5], expect[6] = 1, 2, 3
    assert_exact(x_perm, expect, "x_perm")


def test_empty_experts_and_all_on_one_expert():
    T, K, N = 10, 3, 5
    x = torch.randn(T, 4)
    ids = torch.full((T, K), 2, dtype=torch.int32)
    x_perm, offsets, slot_rows = ops.permute(x, ids, N, 8)
    # 30 rows on expert 2, padded to 32; experts 0, 1, 3, 4 empty.
    assert_exact(offsets, i32([0, 0, 32, 32, 32]), "offsets")
    assert_exact(slot_rows, torch.arange(T * K, dtype=torch.int32).view(T, K), "slot_rows")
    assert_exact(x_perm[:30], x.repeat_interleave(K, 0), "gathered rows")
    assert (x_perm[30:] == 0).all()
    assert x_perm.shape[0] == T * K + N * 7


def test_all_masked():
    x = torch.randn(6, 3)
    ids = i32([[-1, 5, -3], [9, -1, 2**31 - 1]] * 3)
    x_perm, offsets, slot_rows = ops.permute(x, ids, 5, 16)
    assert_exact(offsets, torch.zeros(5, dtype=torch.int32), "offsets")
    assert_exact(slot_rows, torch.full((6, 3), -1, dtype=torch.int32), "slot_rows")
    assert_exact(x_perm, torch.zeros(6 * 3 + 5 * 15, 3), "x_perm")


def test_rows_within_group_ordered_by_token_then_slot():
    # Token 0 lists expert 0 twice (slots 0, 2): rows by (t, j) ascending.
    ids = i32([[0, 1, 0], [1, 0, 0]])
    x = torch.tensor([[1.0], [2.0]])
    x_perm, offsets, slot_rows = ops.permute(x, ids, 2, 1)
    assert_exact(slot_rows, i32([[0, 4, 1], [5, 2, 3]]), "slot_rows")
    assert_exact(offsets, i32([4, 6]), "offsets")
    assert_exact(x_perm[:, 0], torch.tensor([1.0, 1.0, 2.0, 2.0, 1.0, 2.0]), "x_perm")


def test_K_zero_and_T_zero():
    x_perm, offsets, slot_rows = ops.permute(torch.randn(4, 3), torch.zeros(4, 0, dtype=torch.int32), 3, 8)
    assert x_perm.shape == (21, 3) and (x_perm == 0).all()
    assert_exact(offsets, torch.zeros(3, dtype=torch.int32), "offsets")
    assert slot_rows.shape == (4, 0)
    x_perm, offsets, slot_rows = ops.permute(torch.randn(0, 3), torch.zeros(0, 5, dtype=torch.int32), 2, 1)
    assert x_perm.shape == (0, 3) and slot_rows.shape == (0, 5)
    assert_exact(offsets, torch.zeros(2, dtype=torch.int32), "offsets")


# ---- poison: padding and tail rows are zero, whatever the input ---------------------

@pytest.mark.parametrize("align", [1, 8, 128])
def test_padding_and_tail_rows_zero_with_nan_input(align):
    T, K, N, H = 30, 4, 6, 8
    ids = random_ids(T, K, N)
    R = T * K + N * (align - 1)
    poison_allocator(((R, H), torch.float32), ((T, K), torch.int32), ((N,), torch.int32))
    x = torch.full((T, H), float("nan"))
    x_perm, offsets, slot_rows = ops.permute(x, ids, N, align)
    live_rows = torch.zeros(R, dtype=torch.bool)
    live_rows[slot_rows[slot_rows >= 0].long()] = True
    assert torch.isnan(x_perm[live_rows]).all(), "live rows carry their token's values"
    assert (x_perm[~live_rows] == 0).all(), "padding rows and rows after the last offset are 0"
    assert int(live_rows.sum()) == int(((ids >= 0) & (ids < N)).sum())
    assert int(offsets[-1]) <= R


def test_tokens_without_live_slots_are_never_read():
    T, K, N = 20, 3, 4
    ids = random_ids(T, K, N)
    ids[::3] = -1                      # every third token: all slots masked
    ids[1::3, 0] = N + 2               # some masked by range
    x = torch.randn(T, 5)
    dead = ~((ids >= 0) & (ids < N)).any(1)
    x[dead] = float("nan")
    x_perm, _, _ = ops.permute(x, ids, N, 8)
    assert torch.isfinite(x_perm).all()
    check_vs_reference(x, ids, N, 8)


# ---- layout and determinism -----------------------------------------------------------

def test_non_contiguous_inputs():
    T, K, N = 19, 3, 5
    x = torch.randn(7, T * 2).t()[::2]          # [T, 7], non-contiguous
    ids = random_ids(K, T, N).t()              # [T, K] transposed view
    assert not x.is_contiguous() and not ids.is_contiguous()
    check_vs_reference(x, ids, N, 8, "non-contiguous")


def test_deterministic_and_thread_count_invariant():
    T, K, N = 3000, 6, 32
    x = torch.randn(T, 16)
    ids = random_ids(T, K, N)
    a = ops.permute(x, ids, N, 16)
    b = ops.permute(x, ids, N, 16)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = ops.permute(x, ids, N, 16)
    finally:
        torch.set_num_threads(n)
    for name, u, v, w in zip(("x_perm", "offsets", "slot_rows"), a, b, c):
        assert_exact(v, u, f"{name} run 2")
        assert_exact(w, u, f"{name} 1 thread")


# ---- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("align", [1, 8])
def test_gradcheck(align):
    T, K, N = 6, 3, 4
    x = torch.randn(T, 3, dtype=torch.float64, requires_grad=True)
    ids = random_ids(T, K, N)
    ids[0] = i32([1, 1, 2])          # a token twice on one expert

    def fn(x):
        return ops.permute(x, ids, N, align)[0]

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


def test_grad_matches_reference_autograd():
    T, K, N = 25, 4, 6
    x0 = torch.randn(T, 7)
    ids = random_ids(T, K, N)
    g = torch.randn(T * K + N * 7, 7)
    x1 = x0.clone().requires_grad_()
    ops.permute(x1, ids, N, 8)[0].backward(g)
    x2 = x0.clone().requires_grad_()
    ref.permute(x2, ids, N, 8)[0].backward(g)
    assert_close(x1.grad, x2.grad, "grad x")
