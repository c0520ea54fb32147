"""Second derivatives: right where the backward is made of differentiable ops (grouped_mm,
grouped_mm_wgrad, permute), a clear error where it is not, and never a gradient that
silently treats a backward kernel's output as a constant."""
from __future__ import annotations

import re
import warnings

import pytest
import torch

import anyexperts_ops as ae
from conftest import random_ids, random_offsets, requires_cuda, virtual_inputs

F64 = torch.float64
# The CPU grouped GEMM is made of ATen products, which torch's fallback happens to trace
# through; the CUDA kernels are opaque, so only there does a missing formula show.
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _b(G, K, N, layout, device):
    """b as [G, K, N], or as the transposed view of [G, N, K] storage (nn.Linear)."""
    if layout == "kn":
        return torch.randn(G, K, N, dtype=F64, device=device, requires_grad=True)
    return torch.randn(G, N, K, dtype=F64, device=device).transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["kn", "nk"])
def test_grouped_mm_gradgradcheck(layout, device):
    """Empty groups and rows past the last offset included (random_offsets)."""
    R, G, K, N = 13, 4, 3, 5
    offsets = random_offsets(G, R).to(device)
    a = torch.randn(R, K, dtype=F64, device=device, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: ae.grouped_mm(a, b, offsets),
                                        (a, _b(G, K, N, layout, device)))


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_mm_wgrad_gradcheck(device):
    R, G, K, N = 13, 4, 3, 5
    offsets = random_offsets(G, R).to(device)
    a = torch.randn(R, K, dtype=F64, device=device, requires_grad=True)
    dout = torch.randn(R, N, dtype=F64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, d: ae.grouped_mm_wgrad(a, d, offsets), (a, dout))


def test_permute_gradgradcheck():
    T, K, N, H = 6, 3, 4, 5
    ids = random_ids(T, K, N)
    x = torch.randn(T, H, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: ae.permute(x, ids, N, 2)[0], (x,))


def _i32(*v):
    return torch.tensor(v, dtype=torch.int32)


def _needs_grad(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


def _add_virtual(x, w):
    out, _, ids, _, n, sources, const_vectors = virtual_inputs(6, 5, 3, 4, dtype=F64)
    return ae.add_virtual(out, x, ids, w, n, sources, const_vectors)


NOT_TWICE = {
    "segmented_topk": (lambda z: ae.segmented_topk(z, _i32(2, 3), _i32(1, 1), 3, 3,
                                                   "selected")[1], (_needs_grad(2, 5),)),
    "swiglu": (lambda gu: ae.swiglu(gu, _i32(2, 5)), (_needs_grad(6, 4),)),
    "hsm": (ae.hsm, (_needs_grad(4, 3), _needs_grad(4))),
    "unpermute": (lambda y, w: ae.unpermute(y, _i32(0, 1, -1, 2, 4, 3).view(3, 2), w),
                  (_needs_grad(5, 4), _needs_grad(3, 2))),
    "add_virtual": (_add_virtual, (_needs_grad(6, 5), _needs_grad(6, 3))),
}


@pytest.mark.parametrize("op", list(NOT_TWICE))
def test_double_backward_raises(op):
    """The first derivative (with create_graph) works without a warning; asking for the
    second raises, naming the op, for every input the gradient depends on."""
    fn, inputs = NOT_TWICE[op]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, torch.randn_like(out), create_graph=True)
    message = f"anyexperts::{op}_backward: double backward through anyexperts::{op}"
    for inp in inputs:
        for g in grads:
            with pytest.raises(RuntimeError, match=re.escape(message)):
                torch.autograd.grad(g.sum(), inp, allow_unused=True)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's forward AD scripts a helper
def test_torch_func_transforms_as_documented():
    """README: torch.func.grad raises for these ops (torch.library.register_autograd gives no
    functorch support), forward mode gives no tangent (zeros under torch.func.jvp: silently
    wrong, hence documented), and vmap runs them through the batching fallback, entry by
    entry. If a torch release changes any of it, this test says so and the README must."""
    a = torch.randn(10, 4, dtype=F64)
    b = torch.randn(3, 2, 4, 5, dtype=F64)
    offsets = torch.tensor([4, 10], dtype=torch.int32)
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda bb: ae.grouped_mm(a, bb, offsets).sum())(b[0])
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(b[0], torch.ones_like(b[0]))
        out = ae.grouped_mm(a, dual, offsets)
        assert torch.autograd.forward_ad.unpack_dual(out).tangent is None
    _, tangent = torch.func.jvp(lambda bb: ae.grouped_mm(a, bb, offsets), (b[0],),
                                (torch.ones_like(b[0]),))
    assert (tangent == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batched = torch.func.vmap(lambda bb: ae.grouped_mm(a, bb, offsets))(b)
    torch.testing.assert_close(batched, torch.stack([ae.grouped_mm(a, bb, offsets) for bb in b]))
