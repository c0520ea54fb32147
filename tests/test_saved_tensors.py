"""What the ops keep for the backward: an input is saved only where another input's gradient
reads it, so frozen experts keep no GEMM input alive, and routing weights that need no
gradient no expert output (ops.py, _grouped_mm_setup / _unpermute_setup); the gradients that
are asked for do not change.
"""
from __future__ import annotations

import anyexperts_ops as ae

import pytest
import torch

from anyexperts_ops import presets
from conftest import assert_close, routing_inputs


def saved_during(fn):
    """fn()'s result and the tensors autograd saved while it ran."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def holds(saved, t):
    return any(s.data_ptr() == t.data_ptr() and s.shape == t.shape for s in saved)


def routed(T=40, H=16, N=6, k_max=3, align=4):
    logits, slots, mv = routing_inputs(T, N + 2, k_max)
    ids, weights = ae.segmented_topk(logits, slots, mv, k_max, N, "selected")
    x = torch.randn(T, H, dtype=torch.float64)
    x_perm, offsets, slot_rows = ae.permute(x, ids, N, align)
    return x_perm, offsets, slot_rows, weights.double()


@pytest.mark.parametrize("b_linear", [False, True])
def test_grouped_mm_keeps_a_only_for_the_weight_gradient(b_linear):
    a, offsets, _, _ = routed()
    G, K, N = offsets.numel(), a.shape[1], 10
    store = torch.randn(G, N, K, dtype=a.dtype) if b_linear else torch.randn(G, K, N,
                                                                              dtype=a.dtype)
    grad = torch.randn(a.shape[0], N, dtype=a.dtype)
    want = {}
    for need_a, need_b in ((True, True), (True, False), (False, True)):
        a_in = a.clone().requires_grad_(need_a)
        s_in = store.clone().requires_grad_(need_b)
        b = s_in.transpose(1, 2) if b_linear else s_in
        out, saved = saved_during(lambda: ae.grouped_mm(a_in, b, offsets))
        assert holds(saved, a_in) == need_b and holds(saved, b) == need_a
        grads = torch.autograd.grad(out, [t for t in (a_in, s_in) if t.requires_grad], grad)
        got = dict(zip([n for n, t in (("a", a_in), ("b", s_in)) if t.requires_grad], grads))
        for name, g in got.items():  # each gradient as when both are asked for
            want.setdefault(name, g)
            assert_close(g, want[name], rtol=0, atol=0)


def test_grouped_mm_wgrad_keeps_each_input_only_for_the_other_gradient():
    a, offsets, _, _ = routed()
    dout = torch.randn(a.shape[0], 7, dtype=a.dtype)
    for need_a, need_d in ((True, False), (False, True)):
        a_in, d_in = a.clone().requires_grad_(need_a), dout.clone().requires_grad_(need_d)
        db, saved = saved_during(lambda: ae.grouped_mm_wgrad(a_in, d_in, offsets))
        assert holds(saved, a_in) == need_d and holds(saved, d_in) == need_a
    assert torch.autograd.gradcheck(lambda a_, d_: ae.grouped_mm_wgrad(a_, d_, offsets),
                                    (a.clone().requires_grad_(), dout.clone()))
    assert torch.autograd.gradcheck(lambda a_, d_: ae.grouped_mm_wgrad(a_, d_, offsets),
                                    (a.clone(), dout.clone().requires_grad_()))


def test_unpermute_under_frozen_weights_keeps_no_y():
    y, _, slot_rows, weights = routed()
    grad = torch.randn(slot_rows.shape[0], y.shape[1], dtype=y.dtype)
    y_all = y.clone().requires_grad_()
    w_all = weights.clone().requires_grad_()
    out, saved = saved_during(lambda: ae.unpermute(y_all, slot_rows, w_all))
    assert holds(saved, y_all)
    want_y, _ = torch.autograd.grad(out, (y_all, w_all), grad)

    y_in = y.clone().requires_grad_()
    out, saved = saved_during(lambda: ae.unpermute(y_in, slot_rows, weights))
    assert not holds(saved, y_in)
    (got_y,) = torch.autograd.grad(out, y_in, grad)
    assert_close(got_y, want_y, rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda y_: ae.unpermute(y_, slot_rows, weights),
                                    (y.clone().requires_grad_(),))


def saved_rows(layer, x):
    """The elements of the expert-row tensors ([R, *], R = the permuted rows) that the
    layer's forward saves, each storage once."""
    c = layer.config
    R = x.shape[0] * c.k_max + c.num_experts * (c.align - 1)
    _, saved = saved_during(lambda: layer(x))
    seen = {}
    for t in saved:
        if t.dim() == 2 and t.shape[0] == R:
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel()
    return sum(seen.values())


def test_layer_frozen_routing_or_experts_saves_fewer_rows():
    torch.manual_seed(0)
    H, Fw, T = 16, 24, 64
    layer = ae.AnyExpertsMoE(presets.anyexperts(H, Fw, num_experts=8, k_max=4, k_min=2,
                                                target_avg_k=None))
    layer.train()
    c = layer.config
    R = T * c.k_max + c.num_experts * (c.align - 1)
    x = torch.randn(T, H)  # needs no grad: with the router frozen, neither do the weights
    everything = saved_rows(layer, x)

    routing = [p for n, p in layer.named_parameters() if n.startswith(("router", "importance"))]
    for p in routing:
        p.requires_grad_(False)
    assert saved_rows(layer, x) == everything - R * H  # no expert output y

    for p in routing:
        p.requires_grad_(True)
    layer.w_gate_up.requires_grad_(False)
    layer.w_down.requires_grad_(False)
    assert saved_rows(layer, x) == everything - R * H - R * Fw  # no x_perm, no SwiGLU output


def test_hsm_under_a_frozen_importance_keeps_no_x():
    x = torch.randn(30, 12, dtype=torch.float64)
    a = torch.rand(30, dtype=torch.float64) * 0.1
    grad = torch.randn_like(x)
    x_all, a_all = x.clone().requires_grad_(), a.clone().requires_grad_()
    out, saved = saved_during(lambda: ae.hsm(x_all, a_all))
    assert holds(saved, x_all)
    want_x, _ = torch.autograd.grad(out, (x_all, a_all), grad)

    x_in = x.clone().requires_grad_()
    out, saved = saved_during(lambda: ae.hsm(x_in, a))
    assert not holds(saved, x_in)
    (got_x,) = torch.autograd.grad(out, x_in, grad)
    assert_close(got_x, want_x, rtol=0, atol=0)


def test_add_virtual_under_frozen_weights_keeps_no_x():
    T, H, N = 24, 8, 4
    logits, slots, mv = routing_inputs(T, N + 3, 4)
    ids, weights = ae.segmented_topk(logits, slots, mv, 4, N, "selected")
    sources = torch.tensor([-2, -1, 0], dtype=torch.int32)   # copy, zero, const 0
    const = torch.randn(1, H, dtype=torch.float64)
    out0, x = torch.randn(T, H, dtype=torch.float64), torch.randn(T, H, dtype=torch.float64)
    w = weights.double()
    ids, w[0, 0] = ids.clone(), 0.5
    ids[0, 0] = N   # token 0's first slot copies (source 0), whatever the routing drew
    grad = torch.randn(T, H, dtype=torch.float64)

    x_all, w_all = x.clone().requires_grad_(), w.clone().requires_grad_()
    out, saved = saved_during(lambda: ae.add_virtual(out0, x_all, ids, w_all, N, sources, const))
    assert holds(saved, x_all)
    want_x, _ = torch.autograd.grad(out, (x_all, w_all), grad)

    x_in = x.clone().requires_grad_()
    out, saved = saved_during(lambda: ae.add_virtual(out0, x_in, ids, w, N, sources, const))
    assert not holds(saved, x_in)
    (got_x,) = torch.autograd.grad(out, x_in, grad)
    assert_close(got_x, want_x, rtol=0, atol=0)
    assert (want_x[0] != 0).all()   # the copy slot's gradient reaches x


def test_stand_ins_trace_under_compile():
    """The zeros a backward op gets for an input not kept are made in the traced backward
    too, with dynamic shapes: compiled gradients equal eager ones."""
    H = 8

    def grads(T, compiled):
        gen = torch.Generator().manual_seed(T)
        x = torch.randn(T, H, generator=gen, requires_grad=True)
        a = torch.rand(T, generator=gen) * 0.1                       # frozen: no x kept
        y = torch.randn(2 * T, H, generator=gen, requires_grad=True)
        rows = torch.randperm(2 * T, generator=gen).reshape(T, 2).to(torch.int32)
        w = torch.rand(T, 2, generator=gen)                           # frozen: no y kept

        def f(x, y):
            return ae.hsm(x, a).square().sum() + ae.unpermute(y, rows, w).square().sum()
        if compiled:
            f = torch.compile(f, dynamic=True, fullgraph=True, backend="aot_eager")
        return torch.autograd.grad(f(x, y), (x, y))

    for T in (5, 9):
        for got, want in zip(grads(T, True), grads(T, False)):
            assert_close(got, want, rtol=0, atol=0)
