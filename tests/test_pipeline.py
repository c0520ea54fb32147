"""The op pipeline of one MoE layer on CPU, forward and backward, vs reference.py:
segmented_topk -> permute -> grouped_mm (gate/up) -> SwiGLU -> grouped_mm (down) -> unpermute.
"""
from __future__ import annotations

import os
import types

import anyexperts_ops as ae

import pytest
import torch
import torch.nn.functional as F

from anyexperts_ops import reference as ref
from conftest import (assert_close, assert_exact, assert_rel_norm, distinct_logits, randint,
                      routing_inputs)

OPS = types.SimpleNamespace(**{n: getattr(torch.ops.anyexperts, n) for n in (
    "segmented_topk", "permute", "grouped_mm", "unpermute")})
NORMS = ("none", "selected", "real")


def pipeline(api, x, logits, w1_store, w2, slots, mv, k_max, num_real, align, norm):
    """w1_store is [N, 2F, H] (nn.Linear layout), used as the transposed view [N, H, 2F]."""
    ids, weights = api.segmented_topk(logits, slots, mv, k_max, num_real, norm)
    x_perm, offsets, slot_rows = api.permute(x, ids, num_real, align)
    gu = api.grouped_mm(x_perm, w1_store.transpose(1, 2), offsets)
    g, u = gu.chunk(2, dim=-1)
    h = F.silu(g) * u
    y = api.grouped_mm(h, w2, offsets)
    out = api.unpermute(y, slot_rows, weights)
    return out, ids, offsets, slot_rows, weights


def make_layer(T, H, Fw, N, M, k_max, scenario="random", dtype=torch.float32):
    logits, slots, mv = routing_inputs(T, N + M, k_max)
    if scenario == "one_expert":        # one slot per token, always expert 1
        logits[:, 1] += 50
        slots = slots.clamp(max=1)
        mv = torch.zeros_like(mv)
    elif scenario == "all_virtual":     # every virtual candidate outranks every real one
        logits[:, N:] += 50
        mv = randint(0, k_max, (T,))
    elif scenario == "zero_slots":
        slots[::2] = 0
    x = torch.randn(T, H)
    w1 = torch.randn(N, 2 * Fw, H) / H ** 0.5
    w2 = torch.randn(N, Fw, H) / Fw ** 0.5
    return [t.to(dtype) for t in (x, logits, w1, w2)] + [slots, mv]


def run_with_grads(api, x0, l0, w10, w20, slots, mv, gout, *cfg):
    """(out, ids, offsets, slot_rows, grads of x, logits, w1, w2, grad of the weights)."""
    leaves = [t.clone().requires_grad_() for t in (x0, l0, w10, w20)]
    out, ids, offsets, slot_rows, weights = pipeline(api, *leaves, slots, mv, *cfg)
    weights.retain_grad()
    out.backward(gout)
    return out.detach(), ids, offsets, slot_rows, [t.grad for t in leaves], weights.grad


def _max(t):
    return float(t.abs().max()) if t.numel() else 0.0


def check_against_reference(got, x, logits, w1, w2, slots, mv, gout, *cfg):
    """Integer outputs exactly as reference.py's; out and the gradients within 1e-5 of their
    largest value in reference.py run in fp64 (not fp32: fp32 autograd's own rounding is
    what differs where a gradient cancels to zero, e.g. one slot under "selected" has
    weight 1 whatever its logit). The logits' gradient is softmax-Jacobian times the
    weights' gradient, so its fp32 rounding is relative to that larger gradient (seen:
    2e-8 where fp64 gives 1e-17, with the logits' gradient itself at most 1e-3): its scale
    is the larger of the two."""
    out, ids, off, rows, grads, _ = got
    r32 = run_with_grads(ref, x, logits, w1, w2, slots, mv, gout, *cfg)
    assert_exact(ids, r32[1], "ids")
    assert_exact(off, r32[2], "offsets")
    assert_exact(rows, r32[3], "slot_rows")
    rout, _, _, _, rgrads, rgw = run_with_grads(
        ref, *(t.double() for t in (x, logits, w1, w2)), slots, mv, gout.double(), *cfg)
    for name, g, r in zip(("out", "x", "logits", "w1", "w2"), (out, *grads), (rout, *rgrads)):
        scale = max(_max(r), _max(rgw) if name == "logits" else 0.0, 1e-30)
        assert_close(g.double(), r, name if name == "out" else f"grad {name}", atol=1e-5 * scale)


@pytest.mark.parametrize("scenario", ["random", "one_expert", "all_virtual", "zero_slots"])
@pytest.mark.parametrize("norm", NORMS)
def test_forward_backward_matches_reference(norm, scenario):
    T, H, Fw, N, M, k_max, align = 24, 16, 12, 6, 2, 4, 8
    x, logits, w1, w2, slots, mv = make_layer(T, H, Fw, N, M, k_max, scenario)
    gout = torch.randn(T, H)
    cfg = (k_max, N, align, norm)
    got = run_with_grads(OPS, x, logits, w1, w2, slots, mv, gout, *cfg)
    check_against_reference(got, x, logits, w1, w2, slots, mv, gout, *cfg)
    off = got[2]
    if scenario == "one_expert":
        assert (off[:1] == 0).all() and (off[1:] == off[1]).all(), "only expert 1 has rows"


def test_gradcheck_pipeline():
    T, H, Fw, N, M, k_max, align = 4, 3, 2, 3, 1, 2, 2
    x = torch.randn(T, H, dtype=torch.float64, requires_grad=True)
    logits = distinct_logits(T, N + M).requires_grad_()
    w1 = torch.randn(N, 2 * Fw, H, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(N, Fw, H, dtype=torch.float64, requires_grad=True)
    slots = torch.tensor([2, 1, 0, 2], dtype=torch.int32)
    mv = torch.tensor([1, 0, 0, 1], dtype=torch.int32)

    def fn(x, logits, w1, w2):
        return pipeline(OPS, x, logits, w1, w2, slots, mv, k_max, N, align, "selected")[0]

    assert torch.autograd.gradcheck(fn, (x, logits, w1, w2), eps=1e-6, atol=1e-7)


def test_bf16_pipeline_vs_fp64_reference():
    T, H, Fw, N, M, k_max, align = 32, 32, 32, 4, 2, 3, 16
    x, logits, w1, w2, slots, mv = make_layer(T, H, Fw, N, M, k_max, dtype=torch.bfloat16)
    out, ids, _, _, _ = pipeline(OPS, x, logits, w1, w2, slots, mv, k_max, N, align, "real")
    rout, rids, _, _, _ = pipeline(ref, x.double(), logits.double(), w1.double(), w2.double(),
                                   slots, mv, k_max, N, align, "real")
    assert out.dtype == torch.bfloat16
    assert_exact(ids, rids, "ids")
    # Every intermediate is rounded to bf16, yet the whole layer stays within 1e-2 (~5e-3).
    assert_rel_norm(out, rout, "bf16 pipeline")


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_T_forward_backward(T):
    H, Fw, N, M, k_max, align = 8, 6, 4, 2, 3, 16
    x, logits, w1, w2, slots, mv = make_layer(T, H, Fw, N, M, k_max)
    slots[:] = 3
    gout = torch.randn(T, H)
    cfg = (k_max, N, align, "selected")
    out, ids, off, rows, grads, gw = run_with_grads(OPS, x, logits, w1, w2, slots, mv, gout,
                                                    *cfg)
    assert out.shape == (T, H)
    if T == 0:
        # reference.py's outputs at T = 0 are not connected to the autograd graph, so
        # there is no reference backward to compare with: the gradients must be zero.
        assert_exact(off, torch.zeros(N, dtype=torch.int32), "offsets")
        for name, g, t in zip(("x", "logits", "w1", "w2"), grads, (x, logits, w1, w2)):
            assert g is not None and g.shape == t.shape, name
            assert (g == 0).all(), f"grad {name} at T = 0"
        return
    check_against_reference((out, ids, off, rows, grads, gw), x, logits, w1, w2, slots, mv,
                            gout, *cfg)


def test_larger_T_forward_matches_reference():
    """Through the Python wrappers (anyexperts_ops.*) rather than torch.ops."""
    T, H, Fw, N, M, k_max, align = 256, 16, 16, 8, 3, 6, 16
    x, logits, w1, w2, slots, mv = make_layer(T, H, Fw, N, M, k_max)
    out = pipeline(ae, x, logits, w1, w2, slots, mv, k_max, N, align, "selected")
    rout = pipeline(ref, x, logits, w1, w2, slots, mv, k_max, N, align, "selected")
    for name, a, b in zip(("ids", "offsets", "slot_rows"), out[1:], rout[1:]):
        assert_exact(a, b, name)
    assert_close(out[0], rout[0], "out")


def test_torch_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of the pipeline, forward and backward, equals eager.
    Backend aot_eager by default (graph capture, functionalisation, fakes and the autograd
    formulas, ~7 s); inductor's C++ codegen takes ~55 s cold on 2 cores, so it runs with
    ANYEXPERTS_TEST_INDUCTOR=1 (it passes there too)."""
    backend = "inductor" if os.environ.get("ANYEXPERTS_TEST_INDUCTOR") == "1" else "aot_eager"
    T, H, Fw, N, M, k_max, align = 12, 8, 8, 4, 2, 3, 8
    x, logits, w1, w2, slots, mv = make_layer(T, H, Fw, N, M, k_max)
    gout = torch.randn(T, H)

    def fn(x, logits, w1, w2, slots, mv):
        return pipeline(OPS, x, logits, w1, w2, slots, mv, k_max, N, align, "selected")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    res = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, logits, w1, w2)]
        out, ids, off, rows, _ = f(*leaves, slots, mv)
        out.backward(gout)
        res.append((out.detach(), ids, off, rows, [t.grad for t in leaves]))
    (e_out, e_ids, e_off, e_rows, e_g), (c_out, c_ids, c_off, c_rows, c_g) = res
    assert_exact(c_ids, e_ids, "ids")
    assert_exact(c_off, e_off, "offsets")
    assert_exact(c_rows, e_rows, "slot_rows")
    assert_close(c_out, e_out, "out")
    for name, c, e in zip(("x", "logits", "w1", "w2"), c_g, e_g):
        assert_close(c, e, f"grad {name}")
    # And it is the right answer, not just self-consistent.
    rout = pipeline(ref, x, logits, w1, w2, slots, mv, k_max, N, align, "selected")[0]
    assert_close(c_out, rout, "compiled vs reference")


def test_signed_zeros_kept_by_ops_and_reference():
    """A -0.0 that an op passes through or computes stays -0.0, in the kernels and in the
    reference (whose autograd links must not add +0.0): permute copies rows bit for bit,
    silu(-100) is -0.0 as torch writes it, add_virtual leaves a token without a source as is."""
    x = torch.tensor([[-0.0, 1.0], [2.0, -0.0]])
    ids = torch.tensor([[0], [1]], dtype=torch.int32)
    gu = torch.tensor([[-100.0, 1.0], [0.0, -0.0]])
    offsets = torch.tensor([2], dtype=torch.int32)
    out = torch.full((2, 2), -0.0)
    no_source = torch.tensor([[-1], [5]], dtype=torch.int32)
    for api in (ae, ref):
        x_perm, _, _ = api.permute(x, ids, 2, 1)
        assert torch.signbit(x_perm).tolist() == [[True, False], [False, True]], api
        assert torch.signbit(api.swiglu(gu, offsets)).tolist() == [[True], [True]], api
        added = api.add_virtual(out, x, no_source, torch.ones(2, 1), 1,
                                torch.tensor([-2], dtype=torch.int32), torch.zeros(0, 2))
        assert torch.signbit(added).all(), api
