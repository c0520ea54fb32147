"""swiglu and swiglu_backward on CPU vs reference.py: h = silu(gate) * up on the rows
before the last group's end, zeros after, and rows after it never read."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import anyexperts_ops as ae
from anyexperts_ops import reference as ref
from conftest import FLOAT_DTYPES, assert_close, assert_exact, check_float, random_offsets

ops = torch.ops.anyexperts
INF, NAN = float("inf"), float("nan")


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


# (R, F, G)
SHAPES = [(40, 6, 4), (1, 1, 1), (0, 5, 3), (7, 0, 2), (64, 16, 8), (33, 24, 1), (9, 3, 0)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_F{}_G{}".format(*s))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_reference(shape, dtype):
    R, F_, G = shape
    gu = (torch.randn(R, 2 * F_, dtype=torch.float64) * 3).to(dtype)
    offsets = random_offsets(G, R)
    h = ops.swiglu(gu, offsets)
    assert h.shape == (R, F_) and h.dtype == dtype
    expected = ref.swiglu(gu.double(), offsets)
    check_float(h, expected, dtype, "swiglu")
    live = ref.live_rows(offsets, R)
    assert_exact(h[live:], torch.zeros(R - live, F_, dtype=dtype), "rows past the last group")


def test_matches_silu_times_up_in_fp32():
    """On the live rows, the op is the layer's former `F.silu(gate) * up`, in fp32."""
    gu = torch.randn(50, 32)
    offsets = i32([10, 10, 41])
    h = ops.swiglu(gu, offsets)
    g, u = gu.split(16, dim=-1)
    assert_close(h[:41], F.silu(g[:41]) * u[:41], "live rows", rtol=1e-6)
    assert_exact(h[41:], torch.zeros(9, 16), "dead rows")


@pytest.mark.parametrize("offsets,live", [
    ([0, 0, 0], 0),           # every group empty
    ([5, 3, 8], 8),           # non-monotone: clamped to the running max
    ([-4, 6, 2], 6),          # negative
    ([3, 100, 7], 20),        # past R: clamped to R
    ([20, 20, 20], 20),       # all rows live
], ids=["all-empty", "non-monotone", "negative", "past-R", "all-live"])
def test_offsets_clamped_by_rule(offsets, live):
    R, F_ = 20, 5
    gu = torch.randn(R, 2 * F_, dtype=torch.float64)
    off = i32(offsets)
    h = ops.swiglu(gu, off)
    assert ref.live_rows(off, R) == live
    assert_close(h, ref.swiglu(gu, off), "swiglu")
    assert_exact(h[live:], torch.zeros(R - live, F_, dtype=torch.float64), "dead rows")
    assert bool((h[:live] != 0).any()) == (live > 0)


def test_no_groups_means_no_live_rows():
    gu = torch.randn(6, 4)
    assert_exact(ops.swiglu(gu, torch.zeros(0, dtype=torch.int32)), torch.zeros(6, 2), "G = 0")


def test_dead_rows_are_not_read():
    """NaN/inf in the rows past the last group reach neither the output nor the gradient."""
    R, F_, live = 16, 4, 9
    gu = torch.randn(R, 2 * F_)
    gu[live:] = torch.tensor([NAN, INF, -INF, NAN] * 2)
    dh = torch.randn(R, F_)
    dh[live:] = NAN
    off = i32([3, live])
    h = ops.swiglu(gu, off)
    d = ops.swiglu_backward(dh, gu, off)
    assert torch.isfinite(h).all() and torch.isfinite(d).all()
    assert_exact(h[live:], torch.zeros(R - live, F_), "h dead rows")
    assert_exact(d[live:], torch.zeros(R - live, 2 * F_), "grad dead rows")


def test_nan_in_live_rows_propagates():
    gu = torch.randn(4, 6)
    gu[1, 0] = NAN
    h = ops.swiglu(gu, i32([4]))
    assert torch.isnan(h[1, 0]) and torch.isfinite(h[[0, 2, 3]]).all()


def test_extreme_gates_match_torch():
    """Large |gate| (exp overflow) behaves as F.silu: silu(-100) = -0, silu(100) = 100."""
    g = torch.tensor([[-100.0, -20.0, 0.0, 20.0, 100.0, -88.0, 89.0, 1e-30]])
    gu = torch.cat([g, torch.ones_like(g)], dim=1)
    assert_close(ops.swiglu(gu, i32([1])), F.silu(g), "extreme gates", rtol=1e-6)
    gd = ops.swiglu_backward(torch.ones_like(g), gu, i32([1]))
    gr = g.clone().requires_grad_()
    F.silu(gr).sum().backward()
    assert_close(gd[:, :8], gr.grad, "d gate", rtol=1e-6)
    assert torch.isfinite(gd).all()


def test_non_contiguous_inputs():
    base = torch.randn(30, 20)
    gu = base[:, 2:14]                       # [30, 12], row stride 20
    off = i32([7, 25])
    assert not gu.is_contiguous()
    assert_close(ops.swiglu(gu, off), ref.swiglu(gu, off), "strided gu")
    dh = torch.randn(6, 30).t()              # [30, 6] transposed
    assert_close(ops.swiglu_backward(dh, gu, off),
                 ops.swiglu_backward(dh.contiguous(), gu.contiguous(), off), "strided grad_h")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_reference_autograd(dtype):
    R, F_ = 48, 12
    gu = (torch.randn(R, 2 * F_) * 2).to(dtype)
    off = random_offsets(5, R)
    dh = torch.randn(R, F_).to(dtype)
    got = ops.swiglu_backward(dh, gu, off)
    gu64 = gu.double().requires_grad_()
    ref.swiglu(gu64, off).backward(dh.double())
    assert got.shape == gu.shape and got.dtype == dtype
    check_float(got, gu64.grad, dtype, "grad_gu")
    live = ref.live_rows(off, R)
    assert_exact(got[live:], torch.zeros(R - live, 2 * F_, dtype=dtype),
                 "grad rows past the last group")


def test_gradcheck_fp64():
    gu = (torch.randn(14, 10, dtype=torch.float64) * 2).requires_grad_()
    off = i32([2, 2, 11])
    assert torch.autograd.gradcheck(lambda t: ae.swiglu(t, off), (gu,))


def test_autograd_wrapper_matches_reference():
    gu0 = torch.randn(25, 16, dtype=torch.float64)
    off = random_offsets(4, 25)
    dh = torch.randn(25, 8, dtype=torch.float64)
    grads = []
    for fn in (ae.swiglu, ref.swiglu):
        gu = gu0.clone().requires_grad_()
        fn(gu, off).backward(dh)
        grads.append(gu.grad)
    assert_close(grads[0], grads[1], "grad through autograd")


def test_deterministic():
    gu = torch.randn(200, 64, dtype=torch.bfloat16)
    off = random_offsets(6, 200)
    assert_exact(ops.swiglu(gu, off), ops.swiglu(gu, off), "repeat")


def test_compile_fullgraph():
    gu = torch.randn(40, 12, requires_grad=True)
    off = random_offsets(3, 40)

    def fn(t):
        return ae.swiglu(t, off).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    (g_eager,) = torch.autograd.grad(fn(gu), gu)
    (g_comp,) = torch.autograd.grad(compiled(gu), gu)
    assert_close(g_comp, g_eager, "compiled grad")
