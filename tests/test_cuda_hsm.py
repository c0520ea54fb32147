"""CUDA hsm and hsm_backward against reference.py and the CPU kernel: dtypes, the 16-byte
and the scalar path (H not a multiple of a vector, H = 1, odd pointer offsets), empty
shapes, large T, gradcheck, opcheck, CUDA-graph replay and bitwise repeatability."""
from __future__ import annotations

import pytest
import torch

import anyexperts_ops as ae
from anyexperts_ops import reference as ref
from conftest import check_float

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ops = torch.ops.anyexperts
DEV = "cuda"
FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _inputs(gen, T, H, dtype):
    x = (torch.randn(T, H, generator=gen, dtype=torch.float64) * 3).to(dtype)
    a = (torch.rand(T, generator=gen, dtype=torch.float64) - 0.5).to(
        torch.float64 if dtype == torch.float64 else torch.float32)
    g = torch.randn(T, H, generator=gen, dtype=torch.float64).to(dtype)
    return x, a, g


# (T, H): H % 8 == 0 takes the 16-byte path for bf16/fp16 (H % 4 for fp32, % 2 for fp64);
# 2050 and 257 are not whole vectors, H = 1 is one element per row
SHAPES = [(300, 2048), (1, 8), (0, 16), (7, 0), (257, 2050), (64, 257), (33, 1), (5, 6)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_H{}".format(*s))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_forward_and_backward_match_reference_and_cpu(gen, shape, dtype):
    x, a, g = _inputs(gen, *shape, dtype)
    out = ops.hsm(x.to(DEV), a.to(DEV))
    grad_x, grad_a = ops.hsm_backward(g.to(DEV), x.to(DEV), a.to(DEV))
    assert out.dtype == dtype and out.shape == shape and out.is_contiguous()
    assert grad_x.dtype == dtype and grad_x.shape == shape
    assert grad_a.dtype == a.dtype and grad_a.shape == (shape[0],)
    x64, a64 = x.double().clone().requires_grad_(), a.double().clone().requires_grad_()
    expected = ref.hsm(x64, a64)
    expected.backward(g.double())
    check_float(out, expected.detach(), dtype, "out")
    check_float(grad_x, x64.grad, dtype, "grad_x")
    # grad_a sums exact products in fp32 (fp64): fp32-close to fp64 for every dtype
    check_float(grad_a, a64.grad, a.dtype, "grad_a")
    # CUDA = CPU kernel (the same per-element rule in rules.h; an FMA may move the last bit)
    cpu_x, cpu_a = ops.hsm_backward(g, x, a)
    check_float(out, ops.hsm(x, a).double(), dtype, "out vs CPU")
    check_float(grad_x, cpu_x.double(), dtype, "grad_x vs CPU")
    check_float(grad_a, cpu_a.double(), a.dtype, "grad_a vs CPU")


def test_sliced_input_at_an_odd_offset(gen):
    """x[:, 1:]: a strided view two bytes past an aligned start (copied to contiguous), and
    a contiguous tensor at a 2-byte storage offset, which no 16-byte access can read."""
    T, H = 100, 64
    x_h, a_h, g_h = _inputs(gen, T, H + 1, torch.bfloat16)
    x = x_h.to(DEV)[:, 1:]
    g = g_h.to(DEV)[:, 1:]
    a = a_h.to(DEV)
    x64 = x_h[:, 1:].double().requires_grad_()
    a64 = a_h.double().requires_grad_()
    expected = ref.hsm(x64, a64)
    expected.backward(g_h[:, 1:].double())
    check_float(ops.hsm(x, a), expected.detach(), torch.bfloat16, "strided out")
    grad_x, grad_a = ops.hsm_backward(g, x, a)
    check_float(grad_x, x64.grad, torch.bfloat16, "strided grad_x")
    check_float(grad_a, a64.grad, torch.float32, "strided grad_a")

    xm = torch.empty(T * H + 1, dtype=torch.bfloat16, device=DEV)[1:].view(T, H)
    gm = torch.empty(T * H + 1, dtype=torch.bfloat16, device=DEV)[1:].view(T, H)
    xm.copy_(x_h[:, 1:])
    gm.copy_(g_h[:, 1:])
    assert xm.is_contiguous() and xm.data_ptr() % 16 != 0
    check_float(ops.hsm(xm, a), expected.detach(), torch.bfloat16, "misaligned out")
    grad_x, grad_a = ops.hsm_backward(gm, xm, a)
    check_float(grad_x, x64.grad, torch.bfloat16, "misaligned grad_x")
    check_float(grad_a, a64.grad, torch.float32, "misaligned grad_a")


def test_empty_rows_have_zero_grad_a():
    grad_x, grad_a = ops.hsm_backward(torch.randn(6, 0, device=DEV),
                                      torch.randn(6, 0, device=DEV), torch.randn(6, device=DEV))
    assert grad_x.shape == (6, 0)
    assert torch.equal(grad_a.cpu(), torch.zeros(6))


def test_fp32_coefficients_with_fp64_data(gen):
    x, _, g = _inputs(gen, 12, 40, torch.float64)
    a = torch.rand(12, generator=gen) - 0.5
    out = ops.hsm(x.to(DEV), a.to(DEV))
    grad_x, grad_a = ops.hsm_backward(g.to(DEV), x.to(DEV), a.to(DEV))
    assert grad_a.dtype == torch.float32
    check_float(out, ref.hsm(x, a.double()), torch.float64, "fp64 x, fp32 a")
    check_float(grad_x, g + a.double()[:, None] * g, torch.float64, "grad_x")
    check_float(grad_a, (g * x).sum(1), torch.float32, "grad_a")


def test_large_rows(gen):
    T, H = 1 << 18, 64                     # more rows than warps in the grid: grid-stride loop
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(DEV)
    a = (torch.rand(T, generator=gen) - 0.5).to(DEV)
    g = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(DEV)
    xf = x.float()
    exp = (xf + a[:, None] * xf).to(torch.bfloat16)
    assert (ops.hsm(x, a).float() - exp.float()).abs().max() <= 1e-2 * exp.float().abs().max()
    _, grad_a = ops.hsm_backward(g, x, a)
    dot = (g.float() * xf).sum(1)
    torch.testing.assert_close(grad_a, dot, rtol=1e-4, atol=1e-4 * float(dot.abs().max()))


def test_gradcheck_and_opcheck(gen):
    x = torch.randn(9, 37, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    a = torch.randn(9, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(ae.hsm, (x, a))
    torch.library.opcheck(ops.hsm.default, (x, a))
    torch.library.opcheck(ops.hsm_backward.default,
                          (torch.randn(9, 37, dtype=torch.float64, device=DEV), x.detach(),
                           a.detach()))


def test_cuda_graph_replay_and_repeatability(gen):
    x, a, g = (t.to(DEV) for t in _inputs(gen, 512, 256, torch.bfloat16))
    first = ops.hsm(x, a).clone()
    first_grad = [t.clone() for t in ops.hsm_backward(g, x, a)]
    assert torch.equal(first, ops.hsm(x, a))
    for t, u in zip(first_grad, ops.hsm_backward(g, x, a)):
        assert torch.equal(t, u)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.hsm(x, a)                      # warm-up outside capture
        ops.hsm_backward(g, x, a)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.hsm(x, a)
        grad_x, grad_a = ops.hsm_backward(g, x, a)
    x.copy_(torch.randn(512, 256, generator=gen).to(torch.bfloat16))
    a.copy_(torch.rand(512, generator=gen) - 0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.hsm(x, a))
    expected = ops.hsm_backward(g, x, a)
    assert torch.equal(grad_x, expected[0]) and torch.equal(grad_a, expected[1])
    assert not torch.equal(out, first)
