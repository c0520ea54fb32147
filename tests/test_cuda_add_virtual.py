"""add_virtual and its backward on CUDA against the CPU kernel and reference.py: every
dtype, unaligned rows (the scalar path), an odd pointer offset, the layer's shape, CUDA
graph replay, run-to-run determinism and fully written (poisoned-before) outputs."""
from __future__ import annotations

import pytest
import torch

from anyexperts_ops import ops, reference
from conftest import assert_close, assert_exact, poisoned, rel_norm, virtual_inputs

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ADD = torch.ops.anyexperts.add_virtual.default
BWD = torch.ops.anyexperts.add_virtual_backward.default
FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _cuda(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("T,H,K", [(300, 64, 6), (37, 2050, 12), (5, 1, 3), (64, 24, 40)])
def test_matches_cpu(T, H, K, dtype):
    """Forward: the same sums in the same order as the CPU kernel, so equal bit for bit.
    Backward: grad_x likewise; grad_weights are dot products reduced in another order."""
    args = virtual_inputs(T, H, K, 5, dtype=dtype)
    cargs = _cuda(args)
    assert_exact(poisoned(ADD, *cargs).cpu(), ADD(*args), "out")
    g = torch.randn(T, H, dtype=dtype)
    gx, gw = poisoned(BWD, g.cuda(), *cargs[1:])
    ex, ew = BWD(g, *args[1:])
    assert_exact(gx.cpu(), ex, "grad_x")
    assert_close(gw.cpu(), ew, "grad_weights", rtol=1e-12 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_shape_matches_reference(dtype):
    """T = 4096, H = 2048 as in the benchmark layers; a few percent of tokens with a source."""
    out, x, ids, w, n, src, cv = virtual_inputs(4096, 2048, 12, 128, dtype=dtype)
    ids = torch.where(torch.rand(ids.shape) < 0.97, ids % 128, ids)
    args = _cuda((out, x, ids, w, n, src, cv))
    exact = reference.add_virtual(*[a.double() if isinstance(a, torch.Tensor) and
                                    a.is_floating_point() else a for a in args])
    assert rel_norm(ADD(*args).double(), exact) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_odd_pointer_offset_takes_the_scalar_path():
    """A contiguous x whose base is 4 bytes past a 16-byte boundary: the op must take the
    one-element path (H = 64 alone would allow 16-byte vectors)."""
    out, x, ids, w, n, src, cv = _cuda(virtual_inputs(40, 64, 5, 4))
    x_odd = torch.randn(40 * 64 + 1, device="cuda")[1:].view(40, 64)
    assert x_odd.is_contiguous() and x_odd.data_ptr() % 16 != 0
    args = (out, x_odd, ids, w, n, src, cv)
    assert_exact(ADD(*args).cpu(), ADD(*[a.cpu() if isinstance(a, torch.Tensor) else a
                                         for a in args]), "out")
    g = torch.randn(40, 64, device="cuda")
    for got, want, what in zip(BWD(g, *args[1:]),
                               BWD(g.cpu(), *[a.cpu() if isinstance(a, torch.Tensor) else a
                                              for a in args[1:]]), ("grad_x", "grad_weights")):
        assert_close(got.cpu(), want, what, rtol=1e-4)


def test_nan_grad_matches_cpu():
    """A NaN grad row reaches grad_x only through a copy slot: CUDA = CPU bit for bit."""
    args = virtual_inputs(64, 40, 6, 4)
    out, x, ids, w, n, src, cv = args
    copied = (reference.virtual_codes(ids, n, src, cv.shape[0]) == reference.VIRTUAL_COPY).any(1)
    assert copied[::3].any() and (~copied[::3]).any()  # NaN rows with and without a copy slot
    g = torch.randn(64, 40)
    g[::3] = float("nan")
    got, _ = BWD(g.cuda(), *_cuda(args)[1:])
    want, _ = BWD(g, *args[1:])
    assert_exact(got.cpu(), want, "grad_x", equal_nan=True)


def test_autograd_matches_reference_autograd():
    args = virtual_inputs(200, 96, 8, 6, dtype=torch.bfloat16)
    grads = []
    for fn in (ops.add_virtual, reference.add_virtual):
        leaves = [a.detach().clone().cuda().requires_grad_(i in (0, 1, 3, 6))
                  if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))
        grads.append([leaves[i].grad for i in (0, 1, 3, 6)])
    for name, a, b in zip(("out", "x", "weights", "const_vectors"), *grads):
        assert rel_norm(a.double(), b.double()) < 2e-2, name


def test_cuda_graph_replay_and_determinism():
    """Run-to-run bitwise equality, and a captured graph replayed on new inputs (written into
    the captured tensors) equal to eager on those inputs."""
    args = _cuda(virtual_inputs(500, 128, 8, 6, dtype=torch.bfloat16))
    g = torch.randn(500, 128, dtype=torch.bfloat16, device="cuda")
    eager = (ADD(*args), *BWD(g, *args[1:]))
    for _ in range(2):
        again = (ADD(*args), *BWD(g, *args[1:]))
        for a, b in zip(again, eager):
            assert_exact(a, b, "run to run")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture
        ADD(*args), BWD(g, *args[1:])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = (ADD(*args), *BWD(g, *args[1:]))
    fresh = _cuda(virtual_inputs(500, 128, 8, 6, dtype=torch.bfloat16))
    for dst, src in zip((*args, g), (*fresh, torch.randn_like(g))):
        if isinstance(dst, torch.Tensor):
            dst.copy_(src)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, (ADD(*args), *BWD(g, *args[1:]))):
        assert_exact(a, b, "graph replay on new inputs")


def test_empty_shapes():
    for T, H, K in ((0, 8, 3), (4, 0, 3), (4, 8, 0)):
        args = _cuda(virtual_inputs(T, H, K, 3))
        out = ADD(*args)
        gx, gw = BWD(torch.randn(T, H, device="cuda"), *args[1:])
        assert out.shape == (T, H) and gx.shape == (T, H) and gw.shape == (T, K)
        if K == 0:
            assert_exact(out, args[0], "nothing to add")
            assert (gx == 0).all()
