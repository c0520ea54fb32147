"""grouped_mm and grouped_mm_wgrad on CPU vs DESIGN.md section 3 and reference.py."""
from __future__ import annotations

import pytest
import torch

from anyexperts_ops import reference as ref
from conftest import (assert_close, assert_exact, check_float, poison_allocator,
                      random_offsets)

ops = torch.ops.anyexperts
LOW = (torch.bfloat16, torch.float16)


def i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def make(R, Kd, Nd, G, dtype=torch.float32, transposed_b=False):
    a = torch.randn(R, Kd).to(dtype)
    if transposed_b:
        b = torch.randn(G, Nd, Kd).to(dtype).transpose(1, 2)     # nn.Linear layout view
    else:
        b = torch.randn(G, Kd, Nd).to(dtype)
    return a, b


def ref64(a, b, offsets):
    return ref.grouped_mm(a.double(), b.double(), offsets)


# ---- parity with the reference ----------------------------------------------------------

@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
def test_matches_reference(dtype, transposed_b):
    R, Kd, Nd, G = 70, 24, 40, 5
    a, b = make(R, Kd, Nd, G, dtype, transposed_b)
    offsets = random_offsets(G, R)
    out = ops.grouped_mm(a, b, offsets)
    assert out.dtype == dtype and out.shape == (R, Nd)
    check_float(out, ref64(a, b, offsets), dtype, f"grouped_mm {dtype}")
    if dtype == torch.float32:   # also against the fp32 reference, as specified
        assert_close(out, ref.grouped_mm(a, b, offsets), "vs fp32 reference")
    tail = int(offsets[-1])
    assert (out[tail:] == 0).all(), "rows at or after offsets[G-1] are zero"


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (5, 3, 2, 1), (40, 8, 8, 16), (200, 64, 48, 3),
                                   (30, 4, 4, 64)],
                         ids=lambda s: "R{}_K{}_N{}_G{}".format(*s))
def test_shapes_match_reference(shape):
    R, Kd, Nd, G = shape
    a, b = make(R, Kd, Nd, G)
    offsets = random_offsets(G, R, tail=False)
    out = ops.grouped_mm(a, b, offsets)
    assert_close(out, ref.grouped_mm(a, b, offsets), "grouped_mm")


def test_handwritten():
    a = torch.arange(12.0).view(6, 2)
    b = torch.stack([torch.eye(2), 2 * torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])])
    offsets = i32([2, 2, 5])      # group 0: rows 0-1, group 1 empty, group 2: rows 2-4; row 5 none
    out = ops.grouped_mm(a, b, offsets)
    expect = torch.tensor([[0.0, 1], [2, 3], [5, 4], [7, 6], [9, 8], [0, 0]])
    assert_exact(out, expect, "grouped_mm")


def test_empty_groups_and_all_rows_in_one_group():
    a, b = make(30, 8, 6, 4)
    for offsets in (i32([0, 0, 0, 0]), i32([0, 0, 30, 30]), i32([30, 30, 30, 30])):
        out = ops.grouped_mm(a, b, offsets)
        assert_close(out, ref.grouped_mm(a, b, offsets), f"offsets {offsets.tolist()}")
    assert (ops.grouped_mm(a, b, i32([0, 0, 0, 0])) == 0).all()


BAD_OFFSETS = [
    [10, 5, 30, 2],          # non-monotone: group 1 and 3 empty
    [-3, 4, -1, 12],         # negative
    [8, 1000, 20, 2**31 - 1],  # beyond R
    [-2**31, 50, 49, 60],
]
BAD_OFFSETS_IDS = ["nonmono", "negative", "beyond", "extremes"]


@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=BAD_OFFSETS_IDS)
def test_bad_offsets_clamped_by_rule(offsets):
    R = 40
    a, b = make(R, 6, 5, 4)
    off = i32(offsets)
    out = ops.grouped_mm(a, b, off)
    assert_close(out, ref.grouped_mm(a, b, off), "vs reference")
    # Independently of reference.py: rules.h group_span, end(g) = clamp(max(off[0..g]), 0, R).
    expect = torch.zeros(R, 5)
    start = 0
    for g in range(4):
        end = min(max(0, max(offsets[: g + 1])), R)
        if end > start:
            expect[start:end] = a[start:end] @ b[g]
        start = end
    assert_close(out, expect, "vs rules.h group_span")


def test_zero_rows_and_zero_groups():
    a, b = make(0, 4, 3, 2)
    out = ops.grouped_mm(a, b, i32([0, 0]))
    assert out.shape == (0, 3)
    a, b = make(7, 4, 3, 0)
    out = ops.grouped_mm(a, b, torch.zeros(0, dtype=torch.int32))
    assert_exact(out, torch.zeros(7, 3), "no groups: all rows zero")
    a, b = make(7, 0, 3, 2)   # K = 0: empty reduction
    out = ops.grouped_mm(a, b, i32([3, 7]))
    assert_exact(out, torch.zeros(7, 3), "K = 0")


def test_many_groups_match_a_batched_product():
    """G = 20000 groups of 0-2 rows (half empty) against torch.bmm on the same rows, both ways."""
    G = 20000
    counts = torch.randint(0, 3, (G,)) * (torch.rand(G) < 0.5)
    offsets = counts.cumsum(0).to(torch.int32)
    R = int(offsets[-1]) + 5                          # five rows past the last group
    a, b = make(R, 4, 3, G, dtype=torch.float64)
    dout = torch.randn(R, 3, dtype=torch.float64)
    group = torch.repeat_interleave(torch.arange(G), counts)
    live = group.numel()
    expect = torch.zeros(R, 3, dtype=torch.float64)
    expect[:live] = torch.bmm(a[:live, None], b[group])[:, 0]
    assert_close(ops.grouped_mm(a, b, offsets), expect, "forward", rtol=1e-12)
    db = torch.zeros(G, 4, 3, dtype=torch.float64).index_add_(
        0, group, a[:live, :, None] * dout[:live, None, :])
    assert_close(ops.grouped_mm_wgrad(a, dout, offsets), db, "wgrad", rtol=1e-12)


def test_non_contiguous_inputs():
    R, Kd, Nd, G = 33, 12, 10, 3
    a = torch.randn(Kd, R).t()                     # column-major a
    b = torch.randn(G, Kd, 2 * Nd)[:, :, ::2]      # strided last dim
    off = torch.stack([i32([5, 9]), i32([20, 3]), i32([30, 0])], 1).reshape(-1)[::2]
    assert not a.is_contiguous() and not b.is_contiguous() and not off.is_contiguous()
    out = ops.grouped_mm(a, b, off)
    assert_close(out, ref.grouped_mm(a, b, off.contiguous()), "non-contiguous")


def test_poison_rows_outside_groups():
    R, Kd, Nd, G = 48, 16, 12, 4
    a, b = make(R, Kd, Nd, G)
    offsets = i32([10, 10, 25, 30])
    a[30:] = float("nan")                  # rows after the last offset belong to no group
    poison_allocator(((R, Nd), torch.float32))
    out = ops.grouped_mm(a, b, offsets)
    assert torch.isfinite(out).all()
    assert (out[30:] == 0).all()
    assert_close(out, ref.grouped_mm(a, b, offsets), "grouped_mm")


def test_deterministic():
    a, b = make(500, 64, 64, 8)
    offsets = random_offsets(8, 500)
    out1 = ops.grouped_mm(a, b, offsets)
    out2 = ops.grouped_mm(a, b, offsets)
    assert_exact(out2, out1, "run 2")
    w1 = ops.grouped_mm_wgrad(a, out1, offsets)
    w2 = ops.grouped_mm_wgrad(a, out1, offsets)
    assert_exact(w2, w1, "wgrad run 2")


# ---- grouped_mm_wgrad --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW], ids=str)
def test_wgrad_matches_reference(dtype):
    R, Kd, Nd, G = 60, 12, 20, 6
    a = torch.randn(R, Kd).to(dtype)
    dout = torch.randn(R, Nd).to(dtype)
    offsets = random_offsets(G, R)
    db = ops.grouped_mm_wgrad(a, dout, offsets)
    assert db.dtype == dtype and db.shape == (G, Kd, Nd)
    expect = ref.grouped_mm_wgrad(a.double(), dout.double(), offsets)
    check_float(db, expect, dtype, f"wgrad {dtype}")
    spans = ref.group_spans(offsets, R)
    for g, (s, e) in enumerate(spans):
        if e == s:
            assert (db[g] == 0).all(), f"empty group {g} must be zero"


def test_wgrad_handwritten_and_clamped_offsets():
    a = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    dout = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    offsets = i32([2, 1, 3])      # group 1 clamped to empty; row 3 in no group
    db = ops.grouped_mm_wgrad(a, dout, offsets)
    expect = torch.tensor([[[1.0, 2.0]], [[0.0, 0.0]], [[3.0, 3.0]]])
    assert_exact(db, expect, "wgrad")


@pytest.mark.parametrize("offsets", BAD_OFFSETS, ids=BAD_OFFSETS_IDS)
def test_wgrad_bad_offsets_clamped_by_rule(offsets):
    """wgrad's groups are grouped_mm's: end(g) = clamp(max(off[0..g]), 0, R)."""
    R, Kd, Nd = 40, 5, 3
    a, dout = torch.randn(R, Kd), torch.randn(R, Nd)
    off = i32(offsets)
    db = ops.grouped_mm_wgrad(a, dout, off)
    assert_close(db, ref.grouped_mm_wgrad(a, dout, off), "vs reference")
    expect = torch.zeros(4, Kd, Nd)
    start = 0
    for g in range(4):
        end = min(max(0, max(offsets[: g + 1])), R)
        if end > start:
            expect[g] = a[start:end].t() @ dout[start:end]
        start = end
    assert_close(db, expect, "vs rules.h group_span")


def test_wgrad_ignores_rows_outside_groups():
    R, Kd, Nd = 40, 5, 7
    a, dout = torch.randn(R, Kd), torch.randn(R, Nd)
    offsets = i32([-4, 12, 12, 31])
    a[31:] = float("nan")
    dout[31:] = float("nan")
    poison_allocator(((4, Kd, Nd), torch.float32))
    db = ops.grouped_mm_wgrad(a, dout, offsets)
    assert torch.isfinite(db).all()
    assert_close(db, ref.grouped_mm_wgrad(a, dout, offsets), "wgrad")
    assert (db[0] == 0).all() and (db[2] == 0).all()


def test_wgrad_zero_rows():
    db = ops.grouped_mm_wgrad(torch.zeros(0, 3), torch.zeros(0, 4), i32([0, 0]))
    assert_exact(db, torch.zeros(2, 3, 4), "R = 0")


def test_wgrad_non_contiguous():
    R, Kd, Nd, G = 30, 6, 9, 3
    a = torch.randn(Kd, R).t()
    dout = torch.randn(R, 2 * Nd)[:, 1::2]
    offsets = random_offsets(G, R)
    db = ops.grouped_mm_wgrad(a, dout, offsets)
    assert_close(db, ref.grouped_mm_wgrad(a, dout, offsets), "non-contiguous wgrad")


# ---- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
def test_gradcheck(transposed_b):
    R, Kd, Nd, G = 9, 3, 4, 3
    a = torch.randn(R, Kd, dtype=torch.float64, requires_grad=True)
    offsets = i32([3, 3, 7])           # an empty group and two tail rows
    if transposed_b:
        b_store = torch.randn(G, Nd, Kd, dtype=torch.float64, requires_grad=True)

        def fn(a, bs):
            return ops.grouped_mm(a, bs.transpose(1, 2), offsets)
    else:
        b_store = torch.randn(G, Kd, Nd, dtype=torch.float64, requires_grad=True)

        def fn(a, bs):
            return ops.grouped_mm(a, bs, offsets)

    assert torch.autograd.gradcheck(fn, (a, b_store), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
def test_grad_matches_reference_autograd(transposed_b):
    R, Kd, Nd, G = 50, 10, 12, 5
    a0, b0 = make(R, Kd, Nd, G, transposed_b=transposed_b)
    offsets = random_offsets(G, R)
    g = torch.randn(R, Nd)
    grads = []
    for fn in (ops.grouped_mm, ref.grouped_mm):
        a = a0.clone().requires_grad_()
        bs = (b0.transpose(1, 2) if transposed_b else b0).clone().requires_grad_()
        b = bs.transpose(1, 2) if transposed_b else bs
        fn(a, b, offsets).backward(g)
        grads.append((a.grad, bs.grad))
    assert_close(grads[0][0], grads[1][0], "grad a")
    assert_close(grads[0][1], grads[1][1], "grad b")
    for g_, (s, e) in enumerate(ref.group_spans(offsets, R)):
        if e == s:
            assert (grads[0][1][g_] == 0).all(), "empty group: zero weight grad"
    tail = int(offsets[-1])
    assert (grads[0][0][tail:] == 0).all(), "rows after the last group get no grad"


@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
def test_weight_gradient_in_the_storage_layout(transposed_b):
    """README: weights in nn.Linear layout reach grouped_mm as transposed views and their
    gradients are computed in that layout too: the gradient that reaches the view b is the
    transpose of a contiguous [G, N, K] tensor (no transposing copy of the whole gradient),
    and a contiguous b gets a contiguous gradient."""
    R, Kd, Nd, G = 30, 6, 5, 3
    a0, b0 = make(R, Kd, Nd, G, transposed_b=transposed_b)
    offsets = random_offsets(G, R)
    store = (b0.transpose(1, 2) if transposed_b else b0).clone().requires_grad_()
    b = store.transpose(1, 2) if transposed_b else store
    seen = []
    b.register_hook(seen.append)
    ops.grouped_mm(a0, b, offsets).backward(torch.randn(R, Nd))
    (grad_b,) = seen
    assert grad_b.shape == (G, Kd, Nd)
    layout = grad_b.transpose(1, 2) if transposed_b else grad_b
    assert layout.is_contiguous(), f"grad b strides {grad_b.stride()}"


# ---- autocast ---------------------------------------------------------------------------

@pytest.mark.parametrize("region", LOW, ids=str)
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
def test_autocast_runs_in_the_region_dtype(region, transposed_b):
    """In an autocast region the grouped GEMMs cast float32/float16/bfloat16 operands to the
    region's dtype, as torch.mm does (mixed fp32 weights and low-precision activations work);
    the gradients flow back through the casts in the leaves' dtypes; the reference agrees."""
    R, Kd, Nd, G = 60, 16, 24, 4
    a0, b0 = make(R, Kd, Nd, G, transposed_b=transposed_b)
    a0 = a0.to(torch.bfloat16)  # a bf16 activation against fp32 weights
    offsets = random_offsets(G, R)
    g = torch.randn(R, Nd)
    outs, grads = [], []
    for fn in (ops.grouped_mm, ref.grouped_mm):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=region):
            out = fn(a, b, offsets)
        out.backward(g.to(out.dtype))
        outs.append(out)
        grads.append((a.grad, b.grad))
    assert outs[0].dtype == region
    assert_exact(outs[0], ops.grouped_mm(a0.to(region), b0.to(region), offsets), "out")
    assert outs[1].dtype == region  # reference: the same casts, its own fp32 sum order,
    assert_close(outs[0].float(), outs[1].float(), "out vs reference", rtol=1e-2)  # so 1 ulp
    assert grads[0][0].dtype == torch.bfloat16 and grads[0][1].dtype == torch.float32
    for (ga, gb), what in zip(zip(*grads), ("grad a", "grad b")):
        assert_close(ga.float(), gb.float(), what, rtol=1e-2)
    with torch.autocast("cpu", dtype=region):
        db = ops.grouped_mm_wgrad(a0, g, offsets)
    assert_exact(db, ops.grouped_mm_wgrad(a0.to(region), g.to(region), offsets), "wgrad")


def test_autocast_leaves_float64_and_outside_alone():
    a, b = make(20, 8, 6, 3, torch.float64)
    offsets = i32([5, 12, 20])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.grouped_mm(a, b, offsets).dtype == torch.float64
        assert ops.grouped_mm_wgrad(a, a, offsets).dtype == torch.float64
        assert ref.grouped_mm(a, b, offsets).dtype == torch.float64
    assert ops.grouped_mm(a.float(), b.float(), offsets).dtype == torch.float32
    with pytest.raises(RuntimeError, match="same dtype"):  # no cast outside a region
        ops.grouped_mm(a.bfloat16(), b.float(), offsets)


def test_reference_autocast_rule_binds_keywords():
    a, b = make(20, 8, 6, 3)
    offsets = i32([5, 12, 20])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = ref.grouped_mm(a, b, offsets)
        assert_exact(ref.grouped_mm(a, b=b, offsets=offsets), want, "keywords")
        assert_exact(ref.grouped_mm(offsets=offsets, b=b, a=a), want, "all keywords")
    x = torch.randn(4, 8)
    assert_exact(ref.hsm(x=x, a=torch.ones(4)), 2 * x, "hsm by keywords")


def test_autocast_under_torch_compile():
    a, b = make(40, 8, 12, 3)
    offsets = i32([10, 25, 40])

    def fn(a, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.grouped_mm(a, b, offsets)

    g = torch.randn(40, 12).bfloat16()
    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
        out = f(aa, bb)
        out.backward(g)
        results.append((out, aa.grad, bb.grad))
    assert results[1][0].dtype == torch.bfloat16
    assert results[1][1].dtype == results[1][2].dtype == torch.float32
    for got, want, what in zip(results[1], results[0], ("out", "grad a", "grad b")):
        assert_exact(got, want, f"compiled {what}")
