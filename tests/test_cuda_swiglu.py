"""CUDA swiglu and swiglu_backward against reference.py and the CPU kernel: dtypes, the
16-byte and the scalar path, offsets clamped by rule, dead rows zero and never read,
large R, opcheck, CUDA-graph replay and bitwise repeatability."""
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


def _offsets(gen, G, R):
    """Sorted end offsets with empty groups and a tail of rows past the last group."""
    if G == 0:
        return torch.zeros(0, dtype=torch.int32)
    ends = torch.sort(torch.randint(0, max(R - R // 5, 0) + 1, (G,), generator=gen)).values
    ends[torch.rand(G, generator=gen) < 0.3] = 0
    return torch.cummax(ends, 0).values.to(torch.int32)


# (R, F, G): F % 8 == 0 takes the 16-byte path for bf16/fp16, others the scalar one
SHAPES = [(300, 64, 8), (1, 8, 1), (0, 16, 2), (5, 0, 1), (257, 13, 5), (64, 768, 128),
          (33, 40, 0)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "R{}_F{}_G{}".format(*s))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_forward_and_backward_match_reference(gen, shape, dtype):
    R, F, G = shape
    gu = (torch.randn(R, 2 * F, generator=gen, dtype=torch.float64) * 3).to(dtype)
    dh = torch.randn(R, F, generator=gen, dtype=torch.float64).to(dtype)
    off = _offsets(gen, G, R)
    live = ref.live_rows(off, R)
    # poison the dead rows: they must be neither read nor passed through
    gu[live:] = float("nan")
    dh[live:] = float("nan")
    h = ops.swiglu(gu.to(DEV), off.to(DEV))
    d = ops.swiglu_backward(dh.to(DEV), gu.to(DEV), off.to(DEV))
    assert h.dtype == dtype and h.shape == (R, F) and d.shape == (R, 2 * F)
    gu64 = gu.double().requires_grad_()
    expected = ref.swiglu(gu64, off)
    expected.backward(torch.nan_to_num(dh.double(), nan=0.0))
    check_float(h[:live], expected[:live].detach(), dtype, "h")
    check_float(d[:live], gu64.grad[:live], dtype, "grad_gu")
    assert torch.equal(h[live:].cpu(), torch.zeros(R - live, F, dtype=dtype))
    assert torch.equal(d[live:].cpu(), torch.zeros(R - live, 2 * F, dtype=dtype))
    # CUDA = CPU kernel (the same per-element rule in rules.h)
    check_float(h[:live], ops.swiglu(gu, off)[:live].double(), dtype, "h vs CPU")


def test_misaligned_rows_take_the_scalar_path(gen):
    """A contiguous tensor at a 2-byte storage offset: no 16-byte access is possible."""
    R, F = 100, 64
    gu_h = torch.randn(R, 2 * F, generator=gen).to(torch.bfloat16)
    dh_h = torch.randn(R, F, generator=gen).to(torch.bfloat16)
    gu = torch.empty(R * 2 * F + 1, dtype=torch.bfloat16, device=DEV)[1:].view(R, 2 * F)
    dh = torch.empty(R * F + 1, dtype=torch.bfloat16, device=DEV)[1:].view(R, F)
    gu.copy_(gu_h)
    dh.copy_(dh_h)
    assert gu.is_contiguous() and gu.data_ptr() % 16 != 0
    off = torch.tensor([10, 90], dtype=torch.int32)
    h = ops.swiglu(gu, off.to(DEV))
    d = ops.swiglu_backward(dh, gu, off.to(DEV))
    gu64 = gu_h.double().requires_grad_()
    expected = ref.swiglu(gu64, off)
    expected.backward(dh_h.double())
    check_float(h, expected.detach(), torch.bfloat16, "misaligned h")
    check_float(d, gu64.grad, torch.bfloat16, "misaligned grad_gu")


@pytest.mark.parametrize("offsets,live", [([0, 0], 0), ([7, 3], 7), ([-5, 2], 2),
                                          ([4, 10**6], 50)],
                         ids=["all-empty", "non-monotone", "negative", "past-R"])
def test_offsets_clamped_by_rule(gen, offsets, live):
    gu = torch.randn(50, 32, generator=gen)
    off = torch.tensor(offsets, dtype=torch.int32)
    h = ops.swiglu(gu.to(DEV), off.to(DEV)).cpu()
    torch.testing.assert_close(h, ref.swiglu(gu, off), rtol=1e-5, atol=1e-6)
    assert torch.equal(h[live:], torch.zeros(50 - live, 16))


def test_large_rows(gen):
    R, F = 1 << 20, 64                     # more rows than warps in the grid: grid-stride loop
    gu = torch.randn(R, 2 * F, generator=gen, dtype=torch.bfloat16).to(DEV)
    off = torch.tensor([R // 3, R - 1000], dtype=torch.int32, device=DEV)
    h = ops.swiglu(gu, off)
    g, u = gu[: R - 1000].float().split(F, dim=-1)
    exp = (torch.nn.functional.silu(g) * u).to(torch.bfloat16)
    assert (h[: R - 1000].float() - exp.float()).abs().max() <= 1e-2 * exp.float().abs().max()
    assert not h[R - 1000:].any()


def test_gradcheck_and_opcheck(gen):
    gu = torch.randn(40, 48, generator=gen, dtype=torch.float64).to(DEV).requires_grad_()
    off = torch.tensor([5, 5, 31], dtype=torch.int32, device=DEV)
    assert torch.autograd.gradcheck(lambda t: ae.swiglu(t, off), (gu,))
    torch.library.opcheck(ops.swiglu.default, (gu, off))
    torch.library.opcheck(ops.swiglu_backward.default,
                          (torch.randn(40, 24, dtype=torch.float64, device=DEV), gu.detach(), off))


def test_cuda_graph_replay_and_repeatability(gen):
    gu = torch.randn(512, 256, generator=gen).to(torch.bfloat16).to(DEV)
    off = torch.tensor([100, 300, 400], dtype=torch.int32, device=DEV)
    first = ops.swiglu(gu, off).clone()
    assert torch.equal(first, ops.swiglu(gu, off))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        ops.swiglu(gu, off)                # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.swiglu(gu, off)
    off.copy_(torch.tensor([50, 60, 500], dtype=torch.int32))  # live end read on the device
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ops.swiglu(gu, off))
    assert out[500:].eq(0).all() and out[:500].ne(0).any()
