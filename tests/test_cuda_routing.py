"""CUDA routing kernels (segmented_topk, permute, unpermute and their backwards) against
reference.py and the CPU kernels, plus opcheck, edge cases, large T, CUDA-graph replay,
run-to-run bitwise determinism and fully written (poisoned-before) outputs.

Inputs come from the `gen` fixture (conftest.py), seeded with the test's seed: a failure
report names it, and ANYEXPERTS_TEST_SEED=<seed> replays it.
"""
from __future__ import annotations

import pytest
import torch

import anyexperts_ops as ae
from anyexperts_ops import reference as ref
from conftest import poisoned as _poisoned

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ops = torch.ops.anyexperts
DEV = "cuda"
NORMS = ref.NORMS
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
LOW = (torch.bfloat16, torch.float16)


# ---- seeds, inputs, comparisons --------------------------------------------------------

def _ints(gen, lo, hi, shape):
    """Uniform int32 in [lo, hi]."""
    return torch.randint(lo, hi + 1, tuple(shape), generator=gen, dtype=torch.int64).to(torch.int32)


def _logits(gen, T, E, dtype, ties=False):
    if ties:  # few distinct values: many equal logits per row
        return _ints(gen, -2, 2, (T, E)).to(dtype)
    return (torch.randn(T, E, generator=gen) * 2).to(dtype)


def _routing(gen, T, E, k_max, dtype=torch.float32, ties=False):
    """logits, and slots / max_virtual that also go out of range (the op clamps them)."""
    return (_logits(gen, T, E, dtype, ties), _ints(gen, -2, k_max + 2, (T,)),
            _ints(gen, -2, k_max + 2, (T,)))


def _ids(gen, T, K, num_real, masked=0.3):
    """Live ids plus slots the op must mask: -1, virtual, huge and negative ids."""
    ids = _ints(gen, 0, num_real - 1, (T, K))
    junk = torch.tensor([-1, -1, -1, -7, num_real, num_real + 3, 2**31 - 1, -2**31],
                        dtype=torch.int32)
    pick = junk[torch.randint(0, len(junk), (T, K), generator=gen)]
    return torch.where(torch.rand(T, K, generator=gen) < masked, pick, ids)


def _slot_rows(gen, T, K, R, masked=0.3):
    """Distinct live rows (as permute makes them) plus -1 and out-of-range rows."""
    rows = torch.randperm(max(R, T * K), generator=gen)[:T * K].to(torch.int32).view(T, K)
    junk = torch.tensor([-1, -1, -5, R, R + 7, 2**31 - 1], dtype=torch.int32)
    pick = junk[torch.randint(0, len(junk), (T, K), generator=gen)]
    live = (torch.rand(T, K, generator=gen) >= masked) & (rows < R)
    return torch.where(live, rows, pick)


def _cuda(*ts):
    return tuple(t.to(DEV) for t in ts)


def _close(out, expected, what, rtol=1e-5, scale=0.0):
    """Elementwise to rtol, with atol = rtol * max(max|expected|, scale) for values near
    zero (`scale`: the result's natural size when it may cancel to ~0 altogether)."""
    out, expected = out.detach().cpu(), expected.detach().cpu().to(out.dtype)
    finite = expected[torch.isfinite(expected)]
    scale = max(float(finite.abs().max()) if finite.numel() else 0.0, scale)
    torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol * max(scale, 1e-30),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def _rel_norm_ok(out, expected64, what, tol=1e-2):
    out, expected64 = out.detach().cpu().double(), expected64.detach().cpu().double()
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    den = float(expected64.norm())
    err = float((out - expected64).norm()) / (den if den > 0 else 1.0)
    assert err < tol, f"{what}: relative norm error {err:.3e}"


def _check_float(out, expected, expected64, what, scale=0.0):
    """fp64 to 1e-10, fp32 to 1e-5 (vs a same-precision reference), bf16/fp16 by relative
    norm < 1e-2 against an fp64 reference. `scale` as in _close."""
    if out.dtype == torch.float64:
        _close(out, expected64, what, rtol=1e-10, scale=scale)
    elif out.dtype == torch.float32:
        _close(out, expected, what, scale=scale)
    else:
        _rel_norm_ok(out, expected64, what)


def _exact(out, expected, what):
    out, expected = out.detach().cpu(), expected.detach().cpu()
    assert out.dtype == expected.dtype and out.shape == expected.shape, (
        f"{what}: {out.dtype}{tuple(out.shape)} vs {expected.dtype}{tuple(expected.shape)}")
    ne = out != expected
    if out.is_floating_point():
        ne &= ~(torch.isnan(out) & torch.isnan(expected))
    assert not ne.any(), (f"{what}: {int(ne.sum())} mismatches, first at "
                          f"{tuple(ne.nonzero()[0].tolist())}")


def _has_cpu(op):
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"anyexperts::{op}", "CPU")


def _needs_cpu(*names):
    return pytest.mark.skipif(not all(_has_cpu(n) for n in names),
                              reason="CPU kernel not built")


# ---- segmented_topk --------------------------------------------------------------------

# (T, num_real, num_virtual, k_max, ties): the first ones take the warp fast path, the
# last ones the general block path (E > 512, k_max > 32, k_max > E).
TOPK_SHAPES = [(1, 6, 2, 4, False), (97, 64, 16, 8, True), (64, 128, 32, 12, False),
               (33, 480, 32, 32, False), (40, 30, 0, 8, True), (24, 600, 40, 8, False),
               (24, 64, 16, 40, True), (8, 20, 4, 48, False)]


def _ref_topk(logits, slots, mv, k_max, num_real, norm):
    return ref.segmented_topk(logits.cpu(), slots.cpu(), mv.cpu(), k_max, num_real, norm)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_topk_matches_reference(gen, dtype, norm):
    for T, N, M, k, ties in TOPK_SHAPES:
        logits, slots, mv = _routing(gen, T, N + M, k, dtype, ties)
        ids, w = _poisoned(ops.segmented_topk, *_cuda(logits, slots, mv), k, N, norm)
        rids, rw = _ref_topk(logits, slots, mv, k, N, norm)
        what = f"T={T} E={N + M} k={k}"
        _exact(ids, rids, f"ids {what}")
        assert w.dtype == rw.dtype
        _close(w, rw, f"weights {what}", rtol=1e-10 if dtype == torch.float64 else 1e-5)


def _edge_topk_cases(gen):
    """(name, logits, slots, max_virtual, k_max, num_real)."""
    T, N, M, k = 16, 12, 4, 6
    E = N + M
    full = torch.full((T,), k, dtype=torch.int32)
    virt_first = _logits(gen, T, E, torch.float32)
    virt_first[:, N:] += 20  # every ranking starts with the virtual candidates
    nan = _logits(gen, T, E, torch.float32)
    nan[torch.rand(T, E, generator=gen) < 0.2] = float("nan")
    nan[0] = float("nan")
    nan[1, :3] = float("-inf")
    nan_slots = full.clone()
    nan[2, 0] = float("nan")
    nan_slots[2] = 0  # a NaN row that takes no slot
    far = _logits(gen, T, E, torch.float32)
    far[:, N:] += 110  # past the cap, yet so far ahead that every taken p underflows to 0
    yield "T=0", torch.zeros(0, E), torch.zeros(0, dtype=torch.int32), \
        torch.zeros(0, dtype=torch.int32), k, N
    yield "k_max=0", _logits(gen, T, E, torch.float32), full * 0, full * 0, 0, N
    yield "T=1", _logits(gen, 1, E, torch.float32), full[:1], full[:1] // 2, k, N
    yield "zero slots", _logits(gen, T, E, torch.float32), full * 0, full, k, N
    yield "max_virtual=0", virt_first, full, full * 0, k, N
    yield "all-virtual ranking", virt_first, full, _ints(gen, 0, k, (T,)), k, N
    yield "no real candidates", _logits(gen, T, E, torch.float32), full, full // 2, k, 0
    yield "no virtual candidates", _logits(gen, T, N, torch.float32), full, full, k, N
    yield "all ties", torch.zeros(T, E), full, full // 2, k, N
    yield "NaN and -inf", nan, nan_slots, full // 3, k, N
    yield "E=1", torch.randn(T, 1, generator=gen), full, full, k, 1
    yield "k_max>E, general path", _logits(gen, T, E, torch.float32), full * 9, full, 40, N
    yield "capped virtual far ahead", far, full, _ints(gen, 0, 1, (T,)), k, N
    yield "capped virtual far ahead, general path", far, full * 9, _ints(gen, 0, 1, (T,)), 40, N


@pytest.mark.parametrize("norm", NORMS)
def test_topk_edge_cases(gen, norm):
    for name, logits, slots, mv, k, N in _edge_topk_cases(gen):
        ids, w = _poisoned(ops.segmented_topk, *_cuda(logits, slots, mv), k, N, norm)
        rids, rw = _ref_topk(logits, slots, mv, k, N, norm)
        _exact(ids, rids, f"ids [{name}]")
        _close(w, rw, f"weights [{name}]")


@_needs_cpu("segmented_topk", "segmented_topk_backward")
@pytest.mark.parametrize("norm", NORMS)
def test_topk_backward_edge_cases_match_cpu(gen, norm):
    """Backward on the edge cases (NaN rows with and without slots among them): CUDA = CPU,
    a NaN gradient only in the rows with a NaN logit."""
    for name, logits, slots, mv, k, N in _edge_topk_cases(gen):
        ids, _ = ops.segmented_topk(logits, slots, mv, k, N, norm)
        gw = torch.randn(logits.shape[0], k, generator=gen)
        got = _poisoned(ops.segmented_topk_backward, *_cuda(gw, logits, ids), N, norm)
        want = ops.segmented_topk_backward(gw, logits, ids, N, norm)
        _close(got, want, f"grad_logits [{name}]")
        nan_rows = torch.isnan(logits).any(dim=1)
        assert not torch.isnan(got.cpu()[~nan_rows]).any(), f"NaN outside NaN rows [{name}]"


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_topk_backward_matches_reference(gen, dtype, norm):
    for T, N, M, k, ties in TOPK_SHAPES:
        logits, slots, mv = _routing(gen, T, N + M, k, dtype, ties)
        gw = torch.randn(T, k, generator=gen, dtype=ref._opmath(dtype))
        x = logits.detach().to(DEV).requires_grad_()
        ids, w = ae.segmented_topk(x, slots.to(DEV), mv.to(DEV), k, N, norm)
        w.backward(gw.to(DEV))
        direct = _poisoned(ops.segmented_topk_backward, gw.to(DEV), logits.to(DEV), ids, N, norm)
        _exact(direct, x.grad, "backward op vs autograd")
        grads = {}
        for rdtype in {ref._opmath(dtype), torch.float64}:
            xr = logits.detach().to(rdtype).requires_grad_()
            rids, rw = _ref_topk(xr, slots, mv, k, N, norm)
            _exact(ids, rids, "ids")
            if rw.requires_grad:  # not when no token takes a slot
                rw.backward(gw.to(rw.dtype))
            grads[rdtype] = xr.grad if xr.grad is not None else torch.zeros_like(xr)
        assert x.grad.dtype == dtype
        # A token whose normalised set holds one slot has a constant weight (1): its true
        # gradient is 0 and the computed one rounding noise of the size of gw.
        gw_scale = float(gw.abs().amax()) if gw.numel() else 0.0
        _check_float(x.grad, grads[ref._opmath(dtype)], grads[torch.float64],
                     f"grad_logits T={T} E={N + M} k={k}", scale=gw_scale)


@_needs_cpu("segmented_topk", "segmented_topk_backward")
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_topk_matches_cpu(gen, dtype):
    for norm in NORMS:
        for T, N, M, k, ties in TOPK_SHAPES:
            logits, slots, mv = _routing(gen, T, N + M, k, dtype, ties)
            ids, w = ops.segmented_topk(*_cuda(logits, slots, mv), k, N, norm)
            cids, cw = ops.segmented_topk(logits, slots, mv, k, N, norm)
            _exact(ids, cids, "ids")
            _close(w, cw, "weights")
            gw = torch.randn(T, k, generator=gen, dtype=cw.dtype)
            g = ops.segmented_topk_backward(gw.to(DEV), logits.to(DEV), ids, N, norm)
            cg = ops.segmented_topk_backward(gw, logits, cids, N, norm)
            if dtype in LOW:  # both round the same fp32 value; allow one ulp of rounding
                _close(g.float(), cg.float(), "grad_logits", rtol=1e-2)
            else:
                _close(g, cg, "grad_logits")


@_needs_cpu("segmented_topk", "segmented_topk_backward")
def test_topk_large_T_matches_cpu(gen):
    T, N, M, k = 262144, 128, 32, 12
    logits, slots, mv = _routing(gen, T, N + M, k)
    norm = "real"
    ids, w = ops.segmented_topk(*_cuda(logits, slots, mv), k, N, norm)
    cids, cw = ops.segmented_topk(logits, slots, mv, k, N, norm)
    _exact(ids, cids, "ids")
    _close(w, cw, "weights")
    gw = torch.randn(T, k, generator=gen)
    g = ops.segmented_topk_backward(gw.to(DEV), logits.to(DEV), ids, N, norm)
    _close(g, ops.segmented_topk_backward(gw, logits, cids, N, norm), "grad_logits")


@pytest.mark.parametrize("E", [4096, 32768])
def test_topk_wide_rows_softmax_accuracy(gen, E):
    """fp32 weights within 1e-5 of the fp64 softmax on wide rows with many equal logits."""
    logits = torch.randn(16, E, generator=gen)
    logits[torch.rand(16, E, generator=gen) < 1 / 3] = 0.5
    slots = torch.full((16,), 8, dtype=torch.int32)
    ids, w = ops.segmented_topk(*_cuda(logits, slots, slots * 0), 8, E, "none")
    exact = torch.softmax(logits.double(), dim=-1).gather(1, ids.cpu().long())
    assert float(((w.cpu().double() - exact).abs() / exact).max()) < 1e-5


# ---- permute ---------------------------------------------------------------------------

# (T, K, num_real, H): H = 130 rows are not 16-byte multiples (element-wise copy path).
PERMUTE_SHAPES = [(1, 1, 1, 8), (37, 4, 8, 64), (120, 12, 16, 130), (64, 8, 64, 256)]


def _check_permute(x, ids, N, align, what):
    xp, off, sr = _poisoned(ops.permute, x.to(DEV), ids.to(DEV), N, align)
    rxp, roff, rsr = ref.permute(x.cpu(), ids.cpu(), N, align)
    _exact(off, roff, f"offsets {what}")
    _exact(sr, rsr, f"slot_rows {what}")
    _exact(xp, rxp, f"x_perm {what}")


@pytest.mark.parametrize("align", (1, 8, 16, 128))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_permute_matches_reference(gen, dtype, align):
    for T, K, N, H in PERMUTE_SHAPES:
        x = torch.randn(T, H, generator=gen).to(dtype)
        _check_permute(x, _ids(gen, T, K, N), N, align, f"T={T} K={K} N={N} H={H}")


def test_permute_edge_cases(gen):
    T, K, N, H = 40, 6, 8, 32
    x = torch.randn(T, H, generator=gen, dtype=torch.bfloat16)
    flat = torch.randn(T * H + 1, generator=gen, dtype=torch.bfloat16)
    cases = {
        "T=0": (x[:0], torch.zeros(0, K, dtype=torch.int32)),
        "K=0": (x, torch.zeros(T, 0, dtype=torch.int32)),
        "T=1": (x[:1], _ids(gen, 1, K, N)),
        "all masked": (x, torch.full((T, K), -1, dtype=torch.int32)),
        "all on one expert": (x, torch.full((T, K), 3, dtype=torch.int32)),
        "empty experts": (x, _ints(gen, 2, 4, (T, K))),
        "misaligned x": (flat[1:].view(T, H), _ids(gen, T, K, N)),
        "non-contiguous x": (x.t().contiguous().t(), _ids(gen, T, K, N)),
    }
    for name, (xx, ids) in cases.items():
        for align in (1, 16):
            _check_permute(xx, ids, N, align, f"[{name}] align={align}")
    _check_permute(x, _ids(gen, T, K, 1), 1, 8, "[N=1]")
    _check_permute(x, _ids(gen, T, K, 1), 0, 8, "[N=0: no slot is live]")


@_needs_cpu("permute", "unpermute")
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_permute_matches_cpu(gen, dtype):
    for T, K, N, H in PERMUTE_SHAPES:
        for align in (1, 16):
            x = torch.randn(T, H, generator=gen).to(dtype)
            ids = _ids(gen, T, K, N)
            xg = x.detach().to(DEV).requires_grad_()
            outs = ae.permute(xg, ids.to(DEV), N, align)
            xc = x.clone().requires_grad_()
            couts = ae.permute(xc, ids, N, align)
            for o, c, name in zip(outs, couts, ("x_perm", "offsets", "slot_rows")):
                _exact(o, c, name)
            g = torch.randn(outs[0].shape, generator=gen).to(dtype)
            outs[0].backward(g.to(DEV))
            couts[0].backward(g)
            _close(xg.grad.float(), xc.grad.float(), "grad_x",
                   rtol=1e-2 if dtype in LOW else 1e-5)


@_needs_cpu("permute")
def test_permute_large_T_matches_cpu(gen):
    T, K, N, H = 262144, 8, 64, 16
    x = torch.randn(T, H, generator=gen, dtype=torch.bfloat16)
    ids = _ids(gen, T, K, N)
    for align in (1, 128):
        outs = ops.permute(x.to(DEV), ids.to(DEV), N, align)
        couts = ops.permute(x, ids, N, align)
        for o, c, name in zip(outs, couts, ("x_perm", "offsets", "slot_rows")):
            _exact(o, c, f"{name} align={align}")


# ---- unpermute -------------------------------------------------------------------------

# (T, K, R, H)
UNPERMUTE_SHAPES = [(1, 1, 4, 8), (50, 4, 300, 64), (100, 12, 1500, 130), (64, 8, 600, 2048)]


def _weights_for(gen, T, K, dtype):
    """fp32 weights, fp64 with fp64 y (fp32 with fp64 y is covered in the edge cases)."""
    return torch.randn(T, K, generator=gen, dtype=ref._opmath(dtype))


def _ref_unpermute_grads(y, rows, w, go):
    """Reference (grad_y, grad_w) by autograd; zeros where the output does not depend on
    them (no live slot, or K = 0)."""
    y, w = y.detach().requires_grad_(), w.detach().requires_grad_()
    out = ref.unpermute(y, rows, w)
    if out.requires_grad:
        out.backward(go.to(out.dtype))
    return (y.grad if y.grad is not None else torch.zeros_like(y),
            w.grad if w.grad is not None else torch.zeros_like(w))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unpermute_matches_reference(gen, dtype):
    for T, K, R, H in UNPERMUTE_SHAPES:
        y = torch.randn(R, H, generator=gen).to(dtype)
        rows = _slot_rows(gen, T, K, R)
        w = _weights_for(gen, T, K, dtype)
        what = f"T={T} K={K} R={R} H={H}"
        out = _poisoned(ops.unpermute, *_cuda(y, rows, w))
        assert out.dtype == dtype
        _check_float(out, ref.unpermute(y, rows, w), ref.unpermute(y.double(), rows, w.double()),
                     f"out {what}")

        yg, wg = y.detach().to(DEV).requires_grad_(), w.detach().to(DEV).requires_grad_()
        go = torch.randn(T, H, generator=gen).to(dtype)
        ae.unpermute(yg, rows.to(DEV), wg).backward(go.to(DEV))
        direct = _poisoned(ops.unpermute_backward, *_cuda(go, y, rows, w))
        _exact(direct[0], yg.grad, "grad_y op vs autograd")
        _exact(direct[1], wg.grad, "grad_w op vs autograd")
        grads = {rdtype: _ref_unpermute_grads(y.to(rdtype), rows, w.to(rdtype), go)
                 for rdtype in {ref._opmath(dtype), torch.float64}}
        acc = ref._opmath(dtype)
        _check_float(yg.grad, grads[acc][0], grads[torch.float64][0], f"grad_y {what}")
        # grad_w is fp32 (fp64) whatever y's dtype: a dot over H of y-precision values.
        _close(wg.grad, grads[acc][1].to(wg.grad.dtype), f"grad_w {what}",
               rtol=1e-10 if dtype == torch.float64 else 1e-5)


def test_unpermute_edge_cases(gen):
    T, K, R, H = 24, 5, 150, 64
    y = torch.randn(R, H, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(T, K, generator=gen)
    flat = torch.randn(R * H + 1, generator=gen, dtype=torch.bfloat16)
    rows = _slot_rows(gen, T, K, R)
    cases = {
        "T=0": (y, rows[:0], w[:0]),
        "K=0": (y, rows[:, :0], w[:, :0]),
        "R=0": (y[:0], torch.full((T, K), -1, dtype=torch.int32), w),
        "all masked": (y, torch.full((T, K), -1, dtype=torch.int32), w),
        "misaligned y": (flat[1:].view(R, H), rows, w),
        "non-contiguous weights": (y, rows, w.t().contiguous().t()),
        "fp64 y, fp32 weights": (y.double(), rows, w),
    }
    for name, (yy, rr, ww) in cases.items():
        out = _poisoned(ops.unpermute, *_cuda(yy, rr, ww))
        expected64 = ref.unpermute(yy.double(), rr, ww.double())
        if out.numel():
            _check_float(out, ref.unpermute(yy, rr, ww), expected64, f"out [{name}]")
        else:
            _exact(out, expected64.to(out.dtype), f"out [{name}]")
        go = torch.randn(rr.shape[0], H, generator=gen).to(yy.dtype)
        gy, gw = _poisoned(ops.unpermute_backward, *_cuda(go, yy, rr, ww))
        gy64, gw64 = _ref_unpermute_grads(yy.double(), rr, ww.double(), go)
        if gy.numel():
            _check_float(gy, gy64.to(gy.dtype), gy64, f"grad_y [{name}]")
        _close(gw, gw64.to(gw.dtype), f"grad_w [{name}]")


@_needs_cpu("unpermute", "unpermute_backward")
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unpermute_matches_cpu(gen, dtype):
    for T, K, R, H in UNPERMUTE_SHAPES:
        y = torch.randn(R, H, generator=gen).to(dtype)
        rows = _slot_rows(gen, T, K, R)
        w = _weights_for(gen, T, K, dtype)
        go = torch.randn(T, H, generator=gen).to(dtype)
        rtol = 1e-2 if dtype in LOW else 1e-5
        _close(ops.unpermute(*_cuda(y, rows, w)).float(), ops.unpermute(y, rows, w).float(),
               "out", rtol=rtol)
        gy, gw = ops.unpermute_backward(*_cuda(go, y, rows, w))
        cgy, cgw = ops.unpermute_backward(go, y, rows, w)
        _exact(gy, cgy, "grad_y")  # the same single product, rounded once
        _close(gw, cgw, "grad_w")


def _shared_slot_rows(gen, T, K, R, kind):
    """slot_rows with rows that several slots share: "dense" (most rows shared, the last 4
    referenced by none, a whole token on row 3) or "mixed" (distinct rows, as permute makes
    them, with a few slots sent to rows other slots already use)."""
    if kind == "dense":
        rows = _ints(gen, -2, R + 1, (T, K))       # -2, -1, R and R + 1 are masked
        rows[(rows >= R - 4) & (rows < R)] = -1    # the last 4 rows: no slot refers to them
        rows[0] = 3
        return rows
    rows = _slot_rows(gen, T, K, R)
    flat = rows.view(-1)
    live = ((flat >= 0) & (flat < R)).nonzero().view(-1)
    pick = live[torch.randperm(len(live), generator=gen)[:8]]
    flat[pick[4:]] = flat[pick[:4]]                # 4 slots join the rows of 4 others
    return rows


@_needs_cpu("unpermute_backward")
@pytest.mark.parametrize("kind", ("dense", "mixed"))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_unpermute_backward_sums_shared_rows(gen, dtype, kind):
    """Rows that several slots refer to (permute never makes them, the contract allows them):
    grad_y is the sum over those slots in ascending slot order, bit for bit the CPU's, the
    same on every run; rows no slot refers to are zero, or left alone with
    zero_unreferenced=False."""
    T, K, R = (64, 6, 40) if kind == "dense" else (50, 4, 300)
    for H in (72, 65):                             # 16-byte vectors, and the scalar path
        y = torch.randn(R, H, generator=gen).to(dtype)
        rows = _shared_slot_rows(gen, T, K, R, kind)
        w = _weights_for(gen, T, K, dtype)
        go = torch.randn(T, H, generator=gen).to(dtype)
        what = f"{kind}, H={H}"
        gy, gw = _poisoned(ops.unpermute_backward, *_cuda(go, y, rows, w))
        for _ in range(2):
            again = ops.unpermute_backward(*_cuda(go, y, rows, w))
            _exact(again[0], gy, f"grad_y run to run ({what})")
            _exact(again[1], gw, f"grad_w run to run ({what})")
        cgy, cgw = ops.unpermute_backward(go, y, rows, w)
        _exact(gy, cgy, f"grad_y vs CPU ({what})")   # the same fp32 sums, in the same order
        _close(gw, cgw, f"grad_w vs CPU ({what})", rtol=1e-12 if dtype == torch.float64 else 1e-5)
        gy64, _ = _ref_unpermute_grads(y.double(), rows, w.double(), go)
        _check_float(gy, gy64.to(gy.dtype), gy64, f"grad_y vs reference ({what})")
        live = (rows >= 0) & (rows < R)
        referenced = torch.zeros(R, dtype=torch.bool)
        referenced[rows[live].long()] = True
        assert not referenced.all()
        assert (gy.cpu()[~referenced] == 0).all(), f"rows no slot refers to ({what})"
        gy_dead, gw_dead = ops.unpermute_backward(*_cuda(go, y, rows, w), zero_unreferenced=False)
        _exact(gy_dead.cpu()[referenced], gy.cpu()[referenced], f"zero_unreferenced=False ({what})")
        _exact(gw_dead, gw, f"grad_w, zero_unreferenced=False ({what})")


@_needs_cpu("permute", "unpermute", "unpermute_backward")
def test_permute_unpermute_large_T_matches_cpu(gen):
    T, K, N, H = 262144, 8, 64, 16
    x = torch.randn(T, H, generator=gen)
    ids = _ids(gen, T, K, N)
    _, _, rows = ops.permute(x, ids, N, 16)
    y = torch.randn(rows.numel() + N * 15, H, generator=gen)
    w = torch.rand(T, K, generator=gen)
    _close(ops.unpermute(*_cuda(y, rows, w)), ops.unpermute(y, rows, w), "out")
    go = torch.randn(T, H, generator=gen)
    gy, gw = ops.unpermute_backward(*_cuda(go, y, rows, w))
    cgy, cgw = ops.unpermute_backward(go, y, rows, w)
    _exact(gy, cgy, "grad_y")
    _close(gw, cgw, "grad_w")


# ---- opcheck ---------------------------------------------------------------------------

def _opcheck_samples(gen):
    logits, slots, mv = _routing(gen, 9, 10, 4)
    lg = logits.to(DEV).requires_grad_()
    for norm in NORMS:
        yield ops.segmented_topk.default, (lg, *_cuda(slots, mv), 4, 7, norm)
    yield ops.segmented_topk.default, (_logits(gen, 5, 600, torch.bfloat16).to(DEV)
                                       .requires_grad_(), *_cuda(slots[:5], mv[:5]), 40, 500,
                                       "selected")
    ids, _ = ops.segmented_topk(*_cuda(logits, slots, mv), 4, 7, "real")
    yield ops.segmented_topk_backward.default, (torch.randn(9, 4, device=DEV), logits.to(DEV),
                                                ids, 7, "real")
    for align in (1, 8):
        x = torch.randn(10, 16, device=DEV, requires_grad=True)
        yield ops.permute.default, (x, _ids(gen, 10, 3, 5).to(DEV), 5, align)
    rows = _slot_rows(gen, 8, 3, 30).to(DEV)
    for dtype in (torch.float32, torch.bfloat16):
        y = torch.randn(30, 16, device=DEV, dtype=dtype, requires_grad=True)
        w = torch.randn(8, 3, device=DEV, requires_grad=True)
        yield ops.unpermute.default, (y, rows, w)
        yield ops.unpermute_backward.default, (torch.randn(8, 16, device=DEV, dtype=dtype),
                                               y.detach(), rows, w.detach())


def test_opcheck(gen):
    checks = ("test_schema", "test_autograd_registration", "test_faketensor",
              "test_aot_dispatch_dynamic")
    for op, args in _opcheck_samples(gen):
        if op is ops.segmented_topk.default:
            # opcheck's AOT backward check sums all outputs starting from the first, and
            # ids (int32) come first, so the harness itself fails: check AOT dispatch
            # without grad (test_cuda_graph_replay and the backward tests cover the rest).
            torch.library.opcheck(op, args, test_utils=checks[:3])
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(op, args, test_utils=checks[3:])
        else:
            torch.library.opcheck(op, args, test_utils=checks)


# ---- graphs and determinism -------------------------------------------------------------

def _pipeline(logits, slots, mv, x, gw, go, *, k, N, align, norm):
    """Every routing kernel once, forward and backward, as a training step would run them."""
    ids, w = ops.segmented_topk(logits, slots, mv, k, N, norm)
    x_perm, offsets, rows = ops.permute(x, ids, N, align)
    y = x_perm * 2  # stands in for the expert FFNs
    out = ops.unpermute(y, rows, w)
    gy, gwt = ops.unpermute_backward(go, y, rows, w)
    gl = ops.segmented_topk_backward(gw, logits, ids, N, norm)
    gx = ops.unpermute(gy, rows, torch.ones_like(w))  # permute's backward
    return ids, w, x_perm, offsets, rows, out, gy, gwt, gl, gx


def _pipeline_inputs(gen, T, N, M, k, H):
    logits, slots, mv = _routing(gen, T, N + M, k, torch.bfloat16)
    x = torch.randn(T, H, generator=gen, dtype=torch.bfloat16)
    gw = torch.randn(T, k, generator=gen)
    go = torch.randn(T, H, generator=gen, dtype=torch.bfloat16)
    return _cuda(logits, slots, mv, x, gw, go)


@pytest.mark.parametrize("E_big", (False, True), ids=("fast", "general"))
def test_cuda_graph_replay(gen, E_big):
    T, N, M, k, H = 256, (600 if E_big else 64), 16, 8, 128
    cfg = dict(k=k, N=N, align=16, norm="selected")
    static = _pipeline_inputs(gen, T, N, M, k, H)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _pipeline(*static, **cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _pipeline(*static, **cfg)
    for _ in range(2):
        fresh = _pipeline_inputs(gen, T, N, M, k, H)
        for s, f in zip(static, fresh):
            s.copy_(f)
        graph.replay()
        eager = _pipeline(*fresh, **cfg)
        torch.cuda.synchronize()
        for name, a, b in zip(("ids", "w", "x_perm", "offsets", "rows", "out", "grad_y",
                               "grad_w", "grad_logits", "grad_x"), captured, eager):
            _exact(a, b, f"graph replay vs eager: {name}")


def test_repeated_runs_bitwise_identical(gen):
    T, N, M, k, H = 8192, 128, 32, 12, 256
    cfg = dict(k=k, N=N, align=128, norm="real")
    inputs = _pipeline_inputs(gen, T, N, M, k, H)
    first = _pipeline(*inputs, **cfg)
    for _ in range(3):
        again = _pipeline(*inputs, **cfg)
        for i, (a, b) in enumerate(zip(first, again)):
            _exact(a, b, f"pipeline output {i} across runs")
