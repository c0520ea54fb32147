"""segmented_topk on CPU vs DESIGN.md section 3 and reference.py."""
from __future__ import annotations

import pytest
import torch

from anyexperts_ops import reference as ref
from conftest import (FLOAT_DTYPES, assert_close, assert_exact, assert_rel_norm, distinct_logits,
                      fast_segmented_topk, poison_allocator, randint, routing_inputs)

ops = torch.ops.anyexperts
NORMS = ("none", "selected", "real")
NAN, INF = float("nan"), float("inf")


def topk(logits, slots, max_virtual, k_max, num_real, norm="none"):
    return ops.segmented_topk(logits, slots, max_virtual, k_max, num_real, norm)


def i32(rows):
    return torch.tensor(rows, dtype=torch.int32)


def check_vs_reference(logits, slots, mv, k_max, num_real, norm, what=""):
    ids, w = topk(logits, slots, mv, k_max, num_real, norm)
    rids, rw = ref.segmented_topk(logits, slots, mv, k_max, num_real, norm)
    assert_exact(ids, rids, f"ids {what}")
    assert w.dtype == rw.dtype, f"weights dtype {w.dtype}, expected {rw.dtype}"
    assert_close(w, rw, f"weights {what}", atol=1e-7 if w.dtype != torch.float64 else 1e-12)
    return ids, w


# ---- parity with the reference ----------------------------------------------------------

# (T, num_real, M virtual, k_max)
SHAPES = [
    (37, 8, 3, 6),
    (16, 5, 0, 5),    # num_real = E: no virtual candidates
    (9, 4, 4, 10),    # k_max > E
    (7, 6, 2, 0),     # k_max = 0
    (1, 8, 3, 4),     # T = 1
    (0, 8, 3, 4),     # T = 0
    (11, 0, 5, 3),    # num_real = 0: every candidate virtual
    (13, 1, 1, 2),
]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_N{}_M{}_k{}".format(*s))
def test_matches_reference(shape, norm):
    T, N, M, k_max = shape
    logits, slots, mv = routing_inputs(T, N + M, k_max)
    check_vs_reference(logits, slots, mv, k_max, N, norm)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_dtypes_match_reference(dtype, norm):
    T, N, M, k_max = 29, 7, 3, 5
    logits, slots, mv = routing_inputs(T, N + M, k_max, dtype=dtype, wild=True)
    ids, w = check_vs_reference(logits, slots, mv, k_max, N, norm, str(dtype))
    assert ids.dtype == torch.int32
    assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("norm", NORMS)
def test_out_of_range_slots_and_virtual_caps_match_reference(norm):
    logits, slots, mv = routing_inputs(40, 10, 4, wild=True)
    check_vs_reference(logits, slots, mv, 4, 7, norm)


@pytest.mark.parametrize("norm", NORMS)
def test_ties_match_reference(norm):
    logits, slots, mv = routing_inputs(40, 9, 6, ties=True)
    check_vs_reference(logits, slots, mv, 6, 6, norm)


def test_fast_oracle_matches_reference():
    """The vectorized oracle used for large T agrees with reference.py (incl. NaN/inf/ties)."""
    for norm in NORMS:
        logits, slots, mv = routing_inputs(30, 9, 7, wild=True, ties=True)
        logits[0, 3] = NAN
        logits[1] = NAN
        logits[2, :4] = -INF
        logits[3, 5] = INF
        rids, rw = ref.segmented_topk(logits, slots, mv, 7, 6, norm)
        fids, fw = fast_segmented_topk(logits, slots, mv, 7, 6, norm)
        assert_exact(fids, rids, "oracle ids")
        assert_close(fw, rw, "oracle weights", atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("shape", [(3000, 48, 8, 12), (200, 3, 500, 9), (100, 1000, 0, 8),
                                   (300, 20, 20, 40)],
                         ids=["largeT", "many-virtual", "many-real", "kmax>E"])
@pytest.mark.parametrize("norm", NORMS)
def test_large_vs_fast_oracle(norm, shape):
    T, N, M, k_max = shape
    logits, slots, mv = routing_inputs(T, N + M, k_max, wild=True)
    if M:   # make the walk skip many virtual candidates: half the rows rank them first
        logits[::2, N:] += 3
    ids, w = topk(logits, slots, mv, k_max, N, norm)
    fids, fw = fast_segmented_topk(logits, slots, mv, k_max, N, norm)
    assert_exact(ids, fids, "ids")
    assert_close(w, fw, "weights", atol=1e-7)


# ---- hand-written expectations (independent of reference.py) ---------------------------

def test_handwritten_virtual_cap_walk():
    # Candidates 0..2 real with logits 1,2,3; 3..5 virtual with 10,9,8.
    # Ranking: 3,4,5,2,1,0.
    row = [1.0, 2.0, 3.0, 10.0, 9.0, 8.0]
    logits = torch.tensor([row] * 5)
    slots = i32([4, 4, 4, 4, 2])
    mv = i32([0, 1, 2, 9, 1])
    ids, w = topk(logits, slots, mv, 4, 3)
    expect = i32([[2, 1, 0, -1],     # no virtual: the 3 real ones, then an empty slot
                  [3, 2, 1, 0],      # one virtual, then real
                  [3, 4, 2, 1],
                  [3, 4, 5, 2],      # cap 9 clamped to slots = 4
                  [3, 2, -1, -1]])
    assert_exact(ids, expect, "ids")
    p = torch.softmax(logits[0], 0)
    exp_w = torch.stack([torch.where(r >= 0, p[r.clamp(min=0).long()], torch.zeros(()))
                         for r in expect])
    assert_close(w, exp_w, "weights")
    assert (w[expect < 0] == 0).all(), "empty slots must have weight exactly 0"


def test_handwritten_norms():
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0, 3.0]])  # 0..2 real, 3..4 virtual
    slots, mv = i32([3]), i32([1])
    # Ranking 4(v),1,3(v),0,2 -> take 4, 1, skip 3 (cap), 0.
    p = torch.softmax(logits[0], 0)
    ids, w_none = topk(logits, slots, mv, 4, 3, "none")
    assert_exact(ids, i32([[4, 1, 0, -1]]), "ids")
    assert_close(w_none, torch.stack([p[4], p[1], p[0], p.new_zeros(())])[None], "none")
    _, w_sel = topk(logits, slots, mv, 4, 3, "selected")
    s = p[4] + p[1] + p[0]
    assert_close(w_sel, torch.stack([p[4] / s, p[1] / s, p[0] / s, p.new_zeros(())])[None],
                 "selected")
    _, w_real = topk(logits, slots, mv, 4, 3, "real")
    sr = p[1] + p[0]
    assert_close(w_real, torch.tensor([[0.0, float(p[1] / sr), float(p[0] / sr), 0.0]]), "real")


def test_ties_go_to_lower_index():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
                           [0.0, 2.0, 2.0, 0.0, 2.0, 2.0],
                           [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    slots, mv = i32([3, 5, 3]), i32([0, 1, 3])
    ids, w = topk(logits, slots, mv, 5, 4)  # 4, 5 are virtual
    assert_exact(ids, i32([[0, 1, 2, -1, -1],
                           [1, 2, 4, 0, 3],
                           [0, 1, 2, -1, -1]]), "ids")
    assert_close(w[0, :3], torch.full((3,), 1 / 6), "uniform weights")


def test_ranks_by_logit_not_by_underflowed_probability():
    # p of candidates 1 and 2 both underflow to exactly 0 in fp32, but their logits differ:
    # the ranking is by logit, so 2 (-1000) comes before 1 (-2000).
    logits = torch.tensor([[0.0, -2000.0, -1000.0, -3000.0]])
    ids, w = topk(logits, i32([4]), i32([0]), 4, 4)
    assert_exact(ids, i32([[0, 2, 1, 3]]), "ids")
    assert_exact(w, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), "weights")


def capped_virtual_far_ahead(gap: float, T: int = 6):
    """Rows whose virtual candidates (4, 5) lead every real one by `gap` but are past the
    cap (max_virtual 0 or 1), so the taken set's p are denormal or 0 in fp32."""
    logits = torch.randn(T, 6)
    logits[:, 4:] += gap
    slots = torch.tensor([1, 2, 3, 4, 3, 4], dtype=torch.int32)[:T]
    mv = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.int32)[:T]
    return logits, slots, mv


@pytest.mark.parametrize("gap", [95.0, 110.0, 1000.0])
@pytest.mark.parametrize("norm", ["selected", "real"])
def test_normalised_weights_exact_when_a_capped_candidate_leads_by_far(norm, gap):
    """p / sum p over the set, when every p of the set is denormal (gap 95) or 0 (110, 1000)
    in fp32: the weights and their gradient match the fp64 reference (they were 0 / 0 = NaN,
    or a few digits), and the ids are untouched. The fp32 reference is as exact (as a
    softmax of log p over the set it was 1e-5 off: log p's rounding, |log p| ulps)."""
    logits, slots, mv = capped_virtual_far_ahead(gap)
    gw = torch.randn(logits.shape[0], 4, dtype=torch.float64)
    l32, l64 = logits.clone().requires_grad_(), logits.double().requires_grad_()
    ids, w = topk(l32, slots, mv, 4, 4, norm)
    rids, rw = ref.segmented_topk(l64, slots, mv, 4, 4, norm)
    assert_exact(ids, rids, "ids")
    assert torch.isfinite(w).all() and (w[ids >= 0].sum() > 0)
    assert_close(w, rw, "weights", rtol=1e-6, atol=1e-7)
    assert_close(ref.segmented_topk(logits, slots, mv, 4, 4, norm)[1], rw, "fp32 reference",
                 rtol=1e-6, atol=1e-7)
    (w * gw.float()).sum().backward()
    (rw * gw).sum().backward()
    assert_close(l32.grad, l64.grad, "grad logits", atol=1e-6)


@pytest.mark.parametrize("norm", NORMS)
def test_normalised_weights_of_very_negative_logits(norm):
    """Logits all far below 0 (every exp(logit) underflows in fp32): softmax and the set
    shares are shift invariant, so the weights are those of the reference, finite and,
    under "selected", summing to 1 over the taken slots."""
    logits, slots, mv = routing_inputs(24, 9, 4)
    logits = logits - 300.0
    slots = slots.clamp(min=1)
    ids, w = check_vs_reference(logits, slots, mv, 4, 6, norm, "logits - 300")
    assert torch.isfinite(w).all()
    if norm == "selected":
        assert_close(w.sum(1), torch.ones(24), "selected weights sum to 1")


@pytest.mark.parametrize("norm", NORMS)
def test_weights_of_rows_with_a_nan_softmax_match_reference(norm):
    """A NaN logit (even one not taken) or a +inf one makes the row's softmax NaN: the
    weights of the norm's set are NaN, as the reference's p / sum p; weights outside the set
    (virtual slots under "real", empty slots) stay exactly 0."""
    logits = torch.tensor([[NAN, 1.0, 0.0, 2.0, 3.0, -1.0],
                           [1.0, INF, 0.0, 2.0, 0.5, -1.0],
                           [0.5, 1.5, -0.5, 0.0, 2.5, 1.0]])
    slots, mv = i32([3, 2, 3]), i32([1, 0, 1])       # candidates 4 and 5 virtual
    ids, w = topk(logits, slots, mv, 4, 4, norm)
    rids, rw = ref.segmented_topk(logits, slots, mv, 4, 4, norm)
    assert_exact(ids, rids, "ids")
    assert_exact(ids, i32([[4, 3, 1, -1], [1, 3, -1, -1], [4, 1, 0, -1]]), "ids")
    assert_close(w, rw, f"weights norm={norm}", atol=1e-7, equal_nan=True)
    assert torch.isnan(w[0, 1:3]).all() and torch.isnan(w[1, :2]).all()
    assert torch.isfinite(w[2]).all()
    assert (w[:, 3] == 0).all() and w[1, 2] == 0
    assert bool(torch.isnan(w[0, 0])) == (norm != "real")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_ranking_uses_input_values(dtype):
    # Values distinct in the input dtype must rank by value, not collapse to ties.
    vals = torch.tensor([1.0, 1.0078125, 0.9921875, 1.015625]).to(dtype)
    assert len(set(vals.tolist())) == 4
    ids, _ = topk(vals[None], i32([4]), i32([0]), 4, 4)
    assert_exact(ids, i32([[3, 1, 0, 2]]), "ids")


def test_nan_logits_rank_last_and_do_not_poison_other_rows():
    logits = torch.tensor([[NAN, 1.0, 0.0, 2.0, NAN, -1.0],
                           [NAN, NAN, NAN, NAN, NAN, NAN],
                           [0.5, 1.5, -0.5, 0.0, 2.5, 1.0],
                           [NAN, -INF, 3.0, -INF, NAN, 1.0]])
    slots, mv = i32([6, 4, 3, 6]), i32([6, 1, 1, 6])
    # Hand-checked (4, 5 virtual): NaN ranks below every number, -inf above NaN,
    # NaNs among themselves by index.
    expect = i32([[3, 1, 2, 5, 0, 4],
                  [0, 1, 2, 3, -1, -1],
                  [4, 1, 0, -1, -1, -1],
                  [2, 5, 1, 3, 0, 4]])
    for norm in NORMS:
        ids, w = topk(logits, slots, mv, 6, 4, norm)
        assert_exact(ids, expect, f"ids norm={norm}")
        # Row 2 has no NaN: its weights are unaffected by the other rows.
        rw = ref.segmented_topk(logits[2:3], slots[2:3], mv[2:3], 6, 4, norm)[1]
        assert_close(w[2:3], rw, f"clean row, norm={norm}", atol=1e-7)


@pytest.mark.parametrize("E", [4096, 32768])
def test_wide_rows_softmax_accuracy(E):
    """fp32 weights within 1e-5 of the fp64 softmax on wide rows where many logits are equal
    (a long fp32 sum of equal terms is where rounding accumulates)."""
    logits = torch.randn(16, E)
    logits[torch.rand(16, E) < 1 / 3] = 0.5
    slots = torch.full((16,), 8, dtype=torch.int32)
    ids, w = topk(logits, slots, slots * 0, 8, E)
    exact = torch.softmax(logits.double(), dim=-1).gather(1, ids.long())
    assert float(((w.double() - exact).abs() / exact).max()) < 1e-5


def test_nan_everywhere_large_no_crash():
    logits, slots, mv = routing_inputs(500, 40, 9, wild=True)
    logits[torch.rand_like(logits) < 0.3] = NAN
    logits[torch.rand_like(logits) < 0.1] = -INF
    logits[torch.rand_like(logits) < 0.05] = INF
    ids, w = topk(logits, slots, mv, 9, 33, "selected")
    fids, _ = fast_segmented_topk(logits, slots, mv, 9, 33)
    assert_exact(ids, fids, "ids with NaN/inf")
    assert ((ids >= -1) & (ids < 40)).all()


def test_neg_inf_logits():
    logits = torch.tensor([[-INF, 0.0, -INF, 1.0],
                           [-INF, -INF, -INF, -INF]])
    ids, w = topk(logits, i32([4, 2]), i32([0, 0]), 4, 4)
    assert_exact(ids[0], i32([3, 1, 0, 2]), "ids row 0")
    assert_exact(ids[1], i32([0, 1, -1, -1]), "ids row 1")
    p = torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert_close(w[0], torch.tensor([float(p[1]), float(p[0]), 0.0, 0.0]), "weights row 0")
    assert (w[0, 2:] == 0).all(), "-inf candidates have weight exactly 0"


def test_all_virtual_ranking_respects_cap():
    # Every virtual candidate outranks every real one.
    T, N, M, k = 50, 6, 6, 5
    logits = torch.cat([torch.randn(T, N), torch.randn(T, M) + 100], 1)
    slots = randint(0, k, (T,))
    mv = randint(-1, k + 1, (T,))
    ids, w = topk(logits, slots, mv, k, N, "real")
    cap = torch.minimum(mv.clamp(min=0), slots.clamp(0, k))
    n_virtual = (ids >= N).sum(1).to(torch.int32)
    n_taken = (ids >= 0).sum(1).to(torch.int32)
    assert_exact(n_virtual, cap, "virtual slots = cap")
    assert_exact(n_taken, slots.clamp(0, k), "slots filled")
    # The virtual ones come first (they rank first) and weigh 0 under norm 'real'.
    j = torch.arange(k)[None]
    assert ((ids >= N) == (j < cap[:, None])).all()
    assert (w[ids >= N] == 0).all()
    real = (ids >= 0) & (ids < N)
    sums = torch.where(real, w, torch.zeros(())).sum(1)
    has_real = real.any(1)
    assert_close(sums[has_real], torch.ones(int(has_real.sum())), "real weights sum to 1")
    check_vs_reference(logits, slots, mv, k, N, "real")


def test_clamping_handwritten():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 4)  # 3, 4 virtual
    slots = i32([-5, 99, 3, 2])
    mv = i32([2, -4, 99, 1])
    ids, w = topk(logits, slots, mv, 4, 3)
    assert_exact(ids, i32([[-1, -1, -1, -1],   # negative slots -> 0
                           [0, 1, 2, -1],      # slots 99 -> k_max 4, cap -4 -> 0: 3 reals
                           [0, 1, 2, -1],      # cap 99 -> 3 but reals rank first
                           [0, 1, -1, -1]]), "ids")
    assert (w[ids < 0] == 0).all()


def test_zero_slots_and_k_max_zero():
    logits, _, _ = routing_inputs(6, 7, 3)
    ids, w = topk(logits, torch.zeros(6, dtype=torch.int32), i32([1] * 6), 3, 5, "selected")
    assert_exact(ids, torch.full((6, 3), -1, dtype=torch.int32), "ids")
    assert_exact(w, torch.zeros(6, 3), "weights")
    ids, w = topk(logits, i32([2] * 6), i32([1] * 6), 0, 5)
    assert ids.shape == (6, 0) and w.shape == (6, 0)


def test_k_max_larger_than_E():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    ids, w = topk(logits, i32([7]), i32([7]), 7, 2)
    assert_exact(ids, i32([[1, 2, 0, -1, -1, -1, -1]]), "ids")
    assert_close(w[0, :3].sum(), torch.tensor(1.0), "weights of all candidates sum to 1")


def test_no_candidates():
    ids, w = topk(torch.zeros(3, 0), i32([2, 0, 1]), i32([1, 0, 1]), 2, 0, "selected")
    assert_exact(ids, torch.full((3, 2), -1, dtype=torch.int32), "ids")
    assert_exact(w, torch.zeros(3, 2), "weights")


def test_T_zero_shapes():
    ids, w = topk(torch.zeros(0, 5), torch.zeros(0, dtype=torch.int32),
                  torch.zeros(0, dtype=torch.int32), 3, 4, "selected")
    assert ids.shape == (0, 3) and ids.dtype == torch.int32
    assert w.shape == (0, 3) and w.dtype == torch.float32


# ---- layout, determinism, fresh outputs -------------------------------------------------

def test_non_contiguous_inputs():
    T, E, k = 25, 9, 4
    base = torch.randn(E, T * 2)
    logits = base.t()[::2]                       # [T, E], strides (2, 2T)
    assert not logits.is_contiguous()
    slots = randint(0, k, (3 * T,))[::3]
    mv = randint(0, k, (T, 2))[:, 1]
    assert not slots.is_contiguous() and not mv.is_contiguous()
    for norm in NORMS:
        check_vs_reference(logits, slots, mv, k, 6, norm, "non-contiguous")


def test_deterministic_and_thread_count_invariant():
    logits, slots, mv = routing_inputs(2000, 64, 8, wild=True, ties=True)
    logits = logits + torch.randn_like(logits) * 1e-3
    ids1, w1 = topk(logits, slots, mv, 8, 56, "selected")
    ids2, w2 = topk(logits, slots, mv, 8, 56, "selected")
    assert_exact(ids2, ids1, "ids run 2")
    assert_exact(w2, w1, "weights run 2")
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ids3, w3 = topk(logits, slots, mv, 8, 56, "selected")
    finally:
        torch.set_num_threads(n)
    assert_exact(ids3, ids1, "ids with 1 thread")
    assert_exact(w3, w1, "weights with 1 thread")


def test_outputs_are_fresh():
    T, E, k = 64, 12, 6
    poison_allocator(((T, k), torch.int32), ((T, k), torch.float32))
    logits, slots, mv = routing_inputs(T, E, k)
    slots[:10] = 0
    ids, w = topk(logits, slots, mv, k, 9)
    assert torch.isfinite(w).all()
    j = torch.arange(k)[None]
    empty = j >= slots.clamp(0, k)[:, None]
    assert (ids[empty] == -1).all() and (w[empty] == 0).all()


# ---- gradients --------------------------------------------------------------------------

@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck(norm):
    T, N, M, k = 5, 4, 3, 5
    logits = distinct_logits(T, N + M).requires_grad_()
    slots = i32([5, 3, 0, 2, 4])
    mv = i32([2, 1, 0, 2, 3])

    def fn(l):
        return ops.segmented_topk(l, slots, mv, k, N, norm)[1]

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_grad_matches_reference_autograd(norm, dtype):
    T, N, M, k = 23, 7, 3, 5
    logits0, slots, mv = routing_inputs(T, N + M, k, dtype=dtype, wild=True)
    gw = torch.randn(T, k)
    l1 = logits0.clone().requires_grad_()
    ids, w = ops.segmented_topk(l1, slots, mv, k, N, norm)
    (w * gw).sum().backward()
    l2 = logits0.clone().requires_grad_()
    _, rw = ref.segmented_topk(l2, slots, mv, k, N, norm)
    (rw * gw).sum().backward()
    assert l1.grad.dtype == dtype
    if dtype == torch.float32:
        assert_close(l1.grad, l2.grad, f"grad logits norm={norm}", atol=1e-6)
    else:
        assert_rel_norm(l1.grad, l2.grad.double(), f"grad logits bf16 norm={norm}")


@pytest.mark.parametrize("norm", NORMS)
def test_nan_logits_grad_stays_in_its_row(norm):
    """A row with a NaN logit has a NaN softmax, so its logits gradient is NaN, whether or not
    it took a slot (softmax's autograd, as the reference's); the other rows' gradients are
    untouched by it."""
    logits, slots, mv = routing_inputs(12, 8, 4, wild=False)
    logits[2, 5] = NAN
    logits[7] = NAN
    slots[7] = 0
    gw = torch.randn(12, 4)
    grads = []
    for fn in (ops.segmented_topk, ref.segmented_topk):
        l = logits.clone().requires_grad_()
        (fn(l, slots, mv, 4, 6, norm)[1] * gw).sum().backward()
        grads.append(l.grad)
    assert_close(grads[0], grads[1], f"grad logits norm={norm}", atol=1e-6, equal_nan=True)
    nan_rows = torch.isnan(grads[0]).any(dim=1)
    assert nan_rows.tolist() == [t in (2, 7) for t in range(12)]
    assert torch.isnan(grads[0][[2, 7]]).all()


@pytest.mark.parametrize("norm", NORMS)
def test_backward_op_direct(norm):
    T, N, M, k = 17, 6, 2, 4
    logits, slots, mv = routing_inputs(T, N + M, k, dtype=torch.float64)
    ids, _ = ref.segmented_topk(logits, slots, mv, k, N, norm)
    gw = torch.randn(T, k, dtype=torch.float64)
    g = ops.segmented_topk_backward(gw, logits, ids, N, norm)
    l = logits.clone().requires_grad_()
    _, rw = ref.segmented_topk(l, slots, mv, k, N, norm)
    (rg,) = torch.autograd.grad(rw, l, gw)
    assert_close(g, rg, f"segmented_topk_backward norm={norm}", rtol=1e-10)


def test_backward_ignores_ids_outside_the_candidates():
    """segmented_topk_backward reads only ids in [0, E): any other id (E, junk, negative) is
    an empty slot, whatever its gradient, exactly as -1."""
    T, N, M, k = 9, 5, 2, 4
    E = N + M
    logits, slots, mv = routing_inputs(T, E, k, dtype=torch.float64)
    slots = slots.clamp(min=1)
    ids, _ = ref.segmented_topk(logits, slots, mv, k, N, "selected")
    junk = i32([E, E + 3, 2**31 - 1, -2, -2**31, E])
    bad = ids.clone()
    for t in range(T - 1):                       # not the last row: an id E there is past it
        bad[t, k - 1] = junk[t % len(junk)]
    gw = torch.randn(T, k, dtype=torch.float64)
    clean = torch.where((bad >= 0) & (bad < E), bad, torch.full_like(bad, -1))
    gw_bad = torch.where(clean >= 0, gw, torch.full_like(gw, NAN))
    for norm in NORMS:
        got = ops.segmented_topk_backward(gw_bad, logits, bad, N, norm)
        want = ops.segmented_topk_backward(gw, logits, clean, N, norm)
        assert torch.isfinite(got).all(), norm
        assert_exact(got, want, f"junk ids as empty slots, norm={norm}")


@pytest.mark.parametrize("norm", NORMS)
def test_grad_of_weights_fixed_at_zero_does_not_reach_logits(norm):
    """Empty slots, and virtual slots under "real", weigh exactly 0 whatever the logits: a
    gradient on them, even NaN or inf, takes no part (as in the reference's autograd)."""
    T, N, M, k = 16, 5, 3, 4
    logits, _, _ = routing_inputs(T, N + M, k, dtype=torch.float64)
    slots = randint(1, k, (T,))
    mv = slots.clone()                            # virtual slots are taken
    logits[:, N:] += 1.0
    ids, _ = ref.segmented_topk(logits, slots, mv, k, N, norm)
    fixed = ids < 0 if norm != "real" else (ids < 0) | (ids >= N)
    assert fixed.any() and (norm != "real" or (ids >= N).any())
    gw = torch.randn(T, k, dtype=torch.float64)
    gw_bad = gw.masked_fill(fixed, NAN)
    gw_bad[0].masked_fill_(fixed[0], INF)
    got = ops.segmented_topk_backward(gw_bad, logits, ids, N, norm)
    assert torch.isfinite(got).all()
    assert_exact(got, ops.segmented_topk_backward(gw.masked_fill(fixed, 0.0), logits, ids, N,
                                                  norm), "fixed-zero slots' gradient ignored")
    l = logits.clone().requires_grad_()
    _, rw = ref.segmented_topk(l, slots, mv, k, N, norm)
    (rg,) = torch.autograd.grad(rw, l, gw_bad)
    assert_close(got, rg, f"vs reference autograd norm={norm}", rtol=1e-10)
