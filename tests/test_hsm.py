"""hsm and hsm_backward on CPU vs reference.py: out = x + a[t] * x in fp32 (fp64 for fp64)
rounded once, grad_x = g + a[t] * g, grad_a[t] = the row's dot product of g and x.
Invalid inputs are in test_errors.py, opcheck in test_opcheck.py."""
from __future__ import annotations

import pytest
import torch

import anyexperts_ops as ae
from anyexperts_ops import reference as ref
from conftest import FLOAT_DTYPES, assert_close, assert_exact, check_float

ops = torch.ops.anyexperts

# (T, H)
SHAPES = [(40, 24), (1, 1), (0, 16), (9, 0), (0, 0), (33, 257), (5, 2050)]


def _coef_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inputs(T, H, dtype, a_dtype=None):
    x = (torch.randn(T, H, dtype=torch.float64) * 3).to(dtype)
    # |a| < 1/2 keeps x + a x away from cancellation, so relative tolerances hold everywhere
    a = (torch.rand(T, dtype=torch.float64) - 0.5).to(a_dtype or _coef_dtype(dtype))
    return x, a


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}".format(*s))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_forward_matches_reference(shape, dtype):
    x, a = _inputs(*shape, dtype)
    out = ops.hsm(x, a)
    assert out.shape == shape and out.dtype == dtype and out.is_contiguous()
    check_float(out, ref.hsm(x.double(), a.double()), dtype, "hsm")
    # rounded once from fp32: within one unit of x's dtype of the reference in that dtype
    # (an FMA, where the compiler contracts x + a*x, may round the fp32 value differently)
    rtol = torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 1e-6
    assert_close(out, ref.hsm(x, a), "hsm vs reference in x's dtype", rtol=rtol, atol=0)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}".format(*s))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_backward_matches_reference_autograd(shape, dtype):
    x, a = _inputs(*shape, dtype)
    g = torch.randn(shape, dtype=torch.float64).to(dtype)
    grad_x, grad_a = ops.hsm_backward(g, x, a)
    assert grad_x.shape == shape and grad_x.dtype == dtype and grad_x.is_contiguous()
    assert grad_a.shape == (shape[0],) and grad_a.dtype == a.dtype
    x64, a64 = x.double().clone().requires_grad_(), a.double().clone().requires_grad_()
    ref.hsm(x64, a64).backward(g.double())
    check_float(grad_x, x64.grad, dtype, "grad_x")
    # grad_a is accumulated in fp32 from the exact products of x's dtype: fp32-close to fp64
    assert_close(grad_a, a64.grad.to(grad_a.dtype), "grad_a")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_cpu_rounds_as_the_reference(dtype):
    """On the CPU (built with -ffp-contract=off) out = x + a*x and grad_x = g + a*g are the
    reference's two roundings in fp32 (fp64 for fp64), then one to x's dtype: bitwise equal
    (a (1 + a) * x form rounds differently)."""
    x, a = _inputs(64, 96, dtype)
    a = a * 8                                  # |a| up to 4: wider spread of roundings
    g = torch.randn(64, 96, dtype=torch.float64).to(dtype)
    assert_exact(ops.hsm(x, a), ref.hsm(x, a), f"hsm {dtype}")
    xr = x.clone().requires_grad_()
    ref.hsm(xr, a).backward(g)
    assert_exact(ops.hsm_backward(g, x, a)[0], xr.grad, f"grad_x {dtype}")


def test_empty_rows_have_zero_grad_a():
    grad_x, grad_a = ops.hsm_backward(torch.randn(6, 0), torch.randn(6, 0), torch.randn(6))
    assert grad_x.shape == (6, 0)
    assert_exact(grad_a, torch.zeros(6), "grad_a of H = 0")


def test_fp32_coefficients_with_fp64_data():
    """fp64 x accepts fp32 a (the weights' rule): math in fp64, grad_a returned in fp32."""
    x, a = _inputs(12, 20, torch.float64, torch.float32)
    assert_close(ops.hsm(x, a), ref.hsm(x, a.double()), "fp64 x, fp32 a", rtol=1e-12)
    g = torch.randn(12, 20, dtype=torch.float64)
    grad_x, grad_a = ops.hsm_backward(g, x, a)
    assert grad_a.dtype == torch.float32
    assert_close(grad_x, g + a.double()[:, None] * g, "grad_x", rtol=1e-12)
    assert_close(grad_a, (g * x).sum(1).float(), "grad_a")


def test_matches_the_layers_former_addcmul_in_fp32():
    x, a = _inputs(30, 64, torch.float32)
    assert_close(ops.hsm(x, a), torch.addcmul(x, x, a[:, None]), "addcmul", rtol=1e-6)


def test_non_contiguous_inputs():
    base = torch.randn(30, 21)
    x = base[:, 1:]                                   # [30, 20], row stride 21, offset 1
    a = torch.randn(60)[::2]
    assert not x.is_contiguous() and not a.is_contiguous()
    out = ops.hsm(x, a)
    assert out.is_contiguous()
    assert_close(out, ref.hsm(x, a), "strided x and a", rtol=1e-6)
    g = torch.randn(20, 30).t()                       # [30, 20] transposed
    got = ops.hsm_backward(g, x, a)
    want = ops.hsm_backward(g.contiguous(), x.contiguous(), a.contiguous())
    for i, what in enumerate(("grad_x", "grad_a")):
        assert_exact(got[i], want[i], f"strided {what}")


def test_nan_and_inf_stay_in_their_row():
    x = torch.randn(4, 8)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    a = torch.tensor([0.1, 0.2, 0.3, 0.4])
    out = ops.hsm(x, a)
    assert torch.isnan(out[1, 3]) and out[2, 0] == float("inf")
    assert torch.isfinite(out[[0, 3]]).all()
    _, grad_a = ops.hsm_backward(torch.ones(4, 8), x, a)
    assert torch.isnan(grad_a[1]) and grad_a[2] == float("inf")
    assert torch.isfinite(grad_a[[0, 3]]).all()


def test_gradcheck_fp64():
    x = torch.randn(7, 13, dtype=torch.float64, requires_grad=True)
    a = torch.randn(7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ae.hsm, (x, a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autograd_wrapper_matches_reference(dtype):
    x0, a0 = _inputs(25, 48, dtype)
    g = torch.randn(25, 48).to(dtype)
    grads = []
    for fn in (ae.hsm, ref.hsm):
        x, a = x0.clone().requires_grad_(), a0.clone().requires_grad_()
        fn(x, a).backward(g)
        grads.append((x.grad, a.grad))
    check_float(grads[0][0], grads[1][0].double(), dtype, "grad x through autograd")
    assert_close(grads[0][1], grads[1][1], "grad a through autograd", rtol=1e-4)


@pytest.mark.parametrize("needs", ["x", "a"])
def test_gradient_only_for_inputs_that_need_it(needs):
    x, a = _inputs(6, 10, torch.float32)
    x.requires_grad_(needs == "x")
    a.requires_grad_(needs == "a")
    ae.hsm(x, a).sum().backward()
    assert (x.grad is not None) == (needs == "x")
    assert (a.grad is not None) == (needs == "a")


def test_deterministic():
    x, a = _inputs(200, 320, torch.bfloat16)
    g = torch.randn(200, 320).to(torch.bfloat16)
    assert_exact(ops.hsm(x, a), ops.hsm(x, a), "forward repeat")
    for i, what in enumerate(("grad_x", "grad_a")):
        assert_exact(ops.hsm_backward(g, x, a)[i], ops.hsm_backward(g, x, a)[i], what)


def test_compile_fullgraph():
    x, a = _inputs(40, 12, torch.float32)
    x.requires_grad_()
    a.requires_grad_()

    def fn(x, a):
        return ae.hsm(x, a).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(fn(x, a), (x, a))
    comp = torch.autograd.grad(compiled(x, a), (x, a))
    for e, c, what in zip(eager, comp, ("grad x", "grad a")):
        assert_close(c, e, f"compiled {what}")
