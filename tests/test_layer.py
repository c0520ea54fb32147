"""The AnyExperts layer (python/anyexperts_ops/layer.py), its presets and statistics.

Self-contained: helpers live in this file (tests/conftest.py only seeds each test).
Shapes stay small so that the file runs in a few tens of seconds on 2 CPU cores.
"""
from __future__ import annotations

import copy
import dataclasses
import io
import math
import os
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import anyexperts_ops  # noqa: F401  (registers torch.ops.anyexperts)
from anyexperts_ops import presets
from anyexperts_ops.layer import AnyExpertsConfig, AnyExpertsMoE
from anyexperts_ops.stats import RoutingStats, StatsMeter

H, FFN = 16, 24


pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(**kw) -> AnyExpertsMoE:
    """A small AnyExperts layer with every feature on: three virtual kinds, HSM, IAR, a
    virtual share large enough to be used (rho 1/2), const vectors and router rows for the
    virtual experts scaled up so virtual slots actually get picked."""
    base = dict(num_virtual=3, virtual_kinds=("zero", "copy", "const"), k_min=1, k_max=6,
                rho_max=Fraction(1, 2), target_avg_k=None)
    base.update(kw)
    m = AnyExpertsMoE(presets.anyexperts(H, FFN, base.pop("num_experts", 8), **base))
    with torch.no_grad():
        N = m.config.num_experts
        m.router.weight[N:] *= 4.0
        if m.const_vectors is not None:
            m.const_vectors.normal_()
        # spread the importance scores so K_i covers the whole range
        m.importance.net[-1].weight.mul_(8.0)
    return m


def _fwd_bwd(m: AnyExpertsMoE, x: torch.Tensor, modality=None):
    """(out, aux, grad x, parameter grads, the importance score's grad per token, or None
    for a layer without an importance predictor)."""
    x = x.detach().clone().requires_grad_(True)
    scores = [None]

    def keep(_module, _inputs, score):
        score.retain_grad()
        scores[0] = score

    hook = m.importance.net.register_forward_hook(keep) if m.importance is not None else None
    try:
        out, aux = m(x, modality)
    finally:
        if hook is not None:
            hook.remove()
    target = torch.sin(torch.arange(out.numel(), dtype=out.dtype, device=out.device))
    ((out * target.view_as(out)).sum() + aux.loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}
    score_grad = scores[0].grad.detach() if scores[0] is not None else None
    return out.detach(), aux, x.grad.detach(), grads, score_grad


def _param_grads_close(g1, g2, score_grad, what, rtol=1e-4):
    """Parameter gradients sum over every token and slot, so they get 1e-4 (seen: 3e-5 on
    the H100 machine's CPU BLAS). The importance net's last bias is a single sum over
    tokens of the score's gradient, which can cancel to far below its terms: its rounding
    is measured against the sum of the terms' magnitudes (fp32 has been seen 7e-5 off
    relative to the sum itself, from either backend)."""
    assert g1.keys() == g2.keys()
    for n in g1:
        scale = float(score_grad.abs().sum()) if n.startswith("importance.net.") and \
            n.endswith(".bias") and g1[n].numel() == 1 else None
        _close(g1[n], g2[n], f"{what} {n}", rtol=rtol, scale=scale)


def _close(a, b, what, rtol=1e-5, scale=None):
    """Within rtol, relative to b's largest value (or to `scale`, where given)."""
    a, b = a.detach(), b.detach()
    if scale is None:
        scale = float(b.abs().max()) if b.numel() else 0.0
    scale = max(scale, 1e-12)
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def _swiglu(x, w_gate_up_e, w_down_e):
    g, u = (x @ w_gate_up_e.T).chunk(2, dim=-1)
    return (F.silu(g) * u) @ w_down_e.T


# ---- backend parity -------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["selected", "real", "none"])
@pytest.mark.parametrize("align", [1, 4])
def test_ops_matches_reference_fwd_bwd(norm, align):
    m = _layer(norm=norm, align=align, z_loss_coef=1e-3, budget_loss_coef=0.1,
               target_avg_k=3.0, num_modalities=2)
    r = copy.deepcopy(m)
    r.backend = "reference"
    x = torch.randn(37, H)
    mod = torch.randint(0, 2, (37,))
    o1, a1, gx1, g1, s1 = _fwd_bwd(m, x, mod)
    o2, a2, gx2, g2, s2 = _fwd_bwd(r, x, mod)
    assert torch.equal(a1.routing.ids, a2.routing.ids)
    assert torch.equal(a1.routing.offsets, a2.routing.offsets)
    _close(o1, o2, "out")
    _close(a1.loss, a2.loss, "aux loss")
    _close(gx1, gx2, "grad x")
    _close(s1, s2, "grad importance score", rtol=1e-4)
    assert "importance.net.0.weight" in g1
    _param_grads_close(g1, g2, s2, "grad")
    # the controller moved both budget biases the same way
    torch.testing.assert_close(m.importance_bias, r.importance_bias)


def test_bf16_layer_close_to_fp32():
    m = _layer(align=8)
    mb = copy.deepcopy(m).to(torch.bfloat16)
    assert mb.w_gate_up.dtype == torch.bfloat16
    assert mb.importance_bias.dtype == torch.float32  # controller state stays fp32
    x = torch.randn(80, H)
    m.eval(), mb.eval()
    with torch.no_grad():
        o, a = m(x)
        ob, ab = mb(x.bfloat16())
    assert ob.dtype == torch.bfloat16
    same = (ab.routing.ids == a.routing.ids).all(1)  # bf16 may flip near-ties in routing
    assert same.float().mean() >= 0.75  # typically 0.9; 0.8 of 40 tokens failed 1 seed in 2500
    err = (ob.float() - o)[same].norm() / o[same].norm()
    assert err < 2e-2, err
    ob, ab = mb.train()(x.bfloat16())
    (ob.float().square().mean() + ab.loss).backward()
    assert mb.w_gate_up.grad.dtype == torch.bfloat16 and torch.isfinite(mb.w_gate_up.grad).all()


@pytest.mark.parametrize("backend", ["ops", "reference"])
def test_layer_gradcheck_fp64(backend):
    """fp64 gradcheck of out and the aux loss with respect to x (through the importance MLP,
    HSM, IAR and the copy term) and to the const vectors. Routing is piecewise constant, so
    the check needs no near-tie within eps (1e-6 on fp64 scores: a chance of about 1e-4)."""
    m = _layer(backend=backend, hsm_alpha=0.5).double()
    N = m.config.num_experts
    # About 2% of draws leave the copy or the const expert unpicked, which would leave its
    # gradient path unchecked: draw again (a bounded number of times) until both are taken.
    for _ in range(20):
        x = torch.randn(12, H, dtype=torch.float64)
        with torch.no_grad():
            ids = m(x)[1].routing.ids
        if (ids == N + 1).any() and (ids == N + 2).any():
            break
    assert (ids == N + 1).any() and (ids == N + 2).any(), "copy and const slots must be taken"
    names = ("const_vectors",)
    params = {n: p for n, p in m.named_parameters() if n not in names}

    def f(xx, const_vectors):
        out, aux = torch.func.functional_call(m, {**params, "const_vectors": const_vectors},
                                              (xx,))
        return out, aux.loss

    xx = x.clone().requires_grad_(True)
    cv = m.const_vectors.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(f, (xx, cv), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("out_features", [8, 13, 132])
def test_router_matches_linear(out_features):
    """The padded router is nn.Linear(bias=False) to the rounding of the product, with the
    same parameter (name and shape) and a gradient only on the real rows."""
    from anyexperts_ops.layer import Router
    r = Router(H, out_features).double()
    assert [n for n, _ in r.named_parameters()] == ["weight"]
    assert r.weight.shape == (out_features, H)
    x = torch.randn(5, H, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(r(x), F.linear(x, r.weight))
    assert torch.autograd.gradcheck(r, (x,))


@pytest.mark.parametrize("x_dtype,layer_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32), (torch.float32, torch.bfloat16)], ids=str)
def test_autocast_runs_experts_in_region_dtype(x_dtype, layer_dtype):
    """Under CPU autocast x and the layer may mix float32/bfloat16/float16: the expert GEMMs
    run in the region's dtype (so does the output), every parameter gets a finite gradient in
    its own dtype, and the reference backend gives the same output."""
    outs = []
    for backend in ("ops", "reference"):
        torch.manual_seed(0)
        m = _layer(backend=backend).to(layer_dtype)
        torch.manual_seed(1)
        x = torch.randn(30, H, dtype=x_dtype, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, aux = m(x)
        assert out.dtype == torch.bfloat16
        (out.float().square().mean() + aux.loss).backward()
        assert x.grad.dtype == x_dtype and torch.isfinite(x.grad).all()
        for n, p in m.named_parameters():
            assert p.grad is not None and p.grad.dtype == p.dtype, n
            assert torch.isfinite(p.grad).all(), n
        outs.append(out.detach())
    # the same routing and casts; the GEMMs' fp32 sums may differ in order: one bf16 rounding
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=1e-2,
                               atol=1e-2 * float(outs[1].float().abs().max()))


def test_autocast_rejects_float64_mixes():
    """Autocast leaves float64 alone, so a float64 x into a float32 layer cannot run."""
    m = _layer()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="dtype"):
        m(torch.randn(4, H, dtype=torch.float64))


# ---- static top-K against an independent plain MoE -------------------------------------

def _plain_topk_moe(x, router_w, w_gate_up, w_down, k):
    probs = torch.softmax(x @ router_w.T, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(router_w.shape[0]):
        tok, slot = (top_i == e).nonzero(as_tuple=True)
        if tok.numel():
            out = out.index_add(0, tok, top_p[tok, slot, None] * _swiglu(x[tok], w_gate_up[e],
                                                                      w_down[e]))
    return out


@pytest.mark.parametrize("backend", ["ops", "reference"])
def test_static_topk_matches_plain_moe(backend):
    N, k, T = 6, 2, 29
    m = AnyExpertsMoE(presets.static_topk(H, FFN, N, k, backend=backend,
                                          load_balance_coef=0.0))
    x = torch.randn(T, H)
    o1, aux, gx1, g1, _ = _fwd_bwd(m, x)
    params = [m.router.weight, m.w_gate_up, m.w_down]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    xr = x.clone().requires_grad_(True)
    o2 = _plain_topk_moe(xr, *leaves, k)
    target = torch.sin(torch.arange(o2.numel(), dtype=o2.dtype)).view_as(o2)
    (o2 * target).sum().backward()
    _close(o1, o2.detach(), "out")
    _close(gx1, xr.grad, "grad x")
    for name, leaf in zip(("router.weight", "w_gate_up", "w_down"), leaves):
        _close(g1[name], leaf.grad, f"grad {name}")
    s = aux.stats
    assert float(s.real_per_token) == k and float(s.virtual_per_token) == 0
    assert int(s.gemm_rows) == T * k


# ---- invariants -------------------------------------------------------------------------

@pytest.mark.parametrize("align", [1, 4])
def test_load_balance_loss_counts_live_real_slots(align):
    """N * sum_e f_e P_e with f from the live real slots (with align 1 the layer reads them
    off permute's offsets; with padding it counts ids)."""
    m = _layer(align=align)
    N = m.config.num_experts
    with torch.no_grad():
        _, aux = m(torch.randn(50, H))
    ids = aux.routing.ids.long()
    counts = torch.bincount(ids[(ids >= 0) & (ids < N)], minlength=N).float()
    P = torch.softmax(aux.routing.logits[:, :N], dim=-1).mean(0)
    _close(aux.load_balance_loss, N * (counts / counts.sum() * P).sum(), "load balance loss")


@pytest.mark.parametrize("align", [1, 3])
def test_routing_invariants(align):
    m = _layer(align=align, num_modalities=3)
    c = m.config
    N, M = c.num_experts, c.num_virtual
    T = 64
    x = torch.randn(T, H)
    mod = torch.randint(0, 3, (T,))
    with torch.no_grad():
        m.importance_bias.fill_(float(torch.randn(())))
        out, aux = m(x, mod)
    rec, st = aux.routing, aux.stats
    ids, w = rec.ids.long(), rec.weights
    slots = rec.slots.long()
    # K_i within range, and exactly the documented rule
    assert slots.min() >= c.k_min and slots.max() <= c.k_max
    score = m.importance(x)
    expect = torch.round(c.k_min + torch.sigmoid(score + m.importance_bias)
                         * (c.k_max - c.k_min)).clamp(c.k_min, c.k_max)
    assert torch.equal(slots, expect.long())
    # integer-exact virtual cap: floor(rho * K) with Fraction arithmetic
    cap = torch.tensor([math.floor(c.rho_max * int(k)) for k in slots])
    assert torch.equal(rec.max_virtual.long(), cap)
    real = ((ids >= 0) & (ids < N)).sum(1)
    virt = (ids >= N).sum(1)
    assert (virt <= cap).all()
    assert torch.equal(real + virt, slots)  # N >= k_max: every slot is filled
    assert int(virt.sum()) > 0, "test setup should exercise virtual slots"
    # masked slots: id -1 and weight 0, and all ids in range
    assert ((ids == -1) == (torch.arange(c.k_max)[None] >= slots[:, None])).all()
    assert (w[ids == -1] == 0).all() and (ids < N + M).all()
    # the output is exactly the live slots' terms: recompute per token, per slot
    imp = torch.sigmoid(score)
    xh = x + c.hsm_alpha * imp[:, None] * x
    expect_out = torch.zeros_like(x)
    for t in range(T):
        for j in range(c.k_max):
            e = int(ids[t, j])
            if e < 0:
                continue
            if e < N:
                term = _swiglu(xh[t:t + 1], m.w_gate_up[e], m.w_down[e])[0]
            else:
                kind = c.virtual_kinds[e - N]
                term = {"zero": torch.zeros(H), "copy": xh[t],
                        "const": m.const_vectors[0]}[kind]
            expect_out[t] += w[t, j] * term
    _close(out, expect_out.detach(), "out vs per-slot recomputation")
    # GEMM rows = real slots + alignment padding
    counts = torch.bincount(ids[(ids >= 0) & (ids < N)], minlength=N)
    padded = (counts + align - 1) // align * align
    assert torch.equal(rec.offsets.long(), torch.cumsum(padded, 0))
    assert int(st.gemm_rows) == int(padded.sum()) and int(st.real_slots) == int(real.sum())
    if align == 1:
        assert int(st.gemm_rows) == int(real.sum())
    assert st.gemm_rows_capacity == T * c.k_max + N * (align - 1)
    # statistics
    assert float(st.real_per_token) == pytest.approx(float(real.float().mean()))
    assert float(st.virtual_per_token) == pytest.approx(float(virt.float().mean()))
    torch.testing.assert_close(st.expert_load, counts.float() / counts.sum())
    assert float(st.importance_hist.sum()) == pytest.approx(1.0)
    for g in range(3):
        sel = mod == g
        if sel.any():
            assert float(st.modality_real[g]) == pytest.approx(float(real[sel].float().mean()))
            assert float(st.modality_virtual[g]) == pytest.approx(float(virt[sel].float().mean()))
    assert st.to_dict()["modality_tokens"] == [float((mod == g).sum()) for g in range(3)]


def test_masked_slots_never_reach_a_gemm():
    """Experts nobody picked may hold NaN weights: nothing changes, nothing turns NaN."""
    m = _layer(num_experts=12, k_min=1, k_max=3)
    with torch.no_grad():
        for _ in range(10):  # 1 draw in ~800 uses every expert: draw again
            x = torch.randn(8, H)
            out, aux = m(x)
            ids = aux.routing.ids
            unused = [e for e in range(12) if e not in set(ids[(ids >= 0) & (ids < 12)].tolist())]
            if unused:
                break
        assert unused, "setup: some expert should be unused"
        m.w_gate_up[unused] = float("nan")
        m.w_down[unused] = float("nan")
        out2, _ = m(x)
    assert torch.isfinite(out2).all()
    assert torch.equal(out, out2)


def test_zero_virtual_only_and_no_tokens():
    m = AnyExpertsMoE(presets.null_experts(H, FFN, 6, k=3, num_null=3))
    out, aux = m(torch.randn(0, H))
    assert out.shape == (0, H) and float(aux.loss) == 0.0
    out, aux = m(torch.randn(2, 5, H))  # leading dims are flattened and restored
    assert out.shape == (2, 5, H) and aux.routing.ids.shape == (10, 3)


# ---- presets ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_presets_run_fwd_bwd(name):
    kw = {"static_topk": dict(k=2), "top_p": dict(p=0.4, k_min=1, k_max=4),
          "moe_plus_plus": dict(k=3), "null_experts": dict(k=3, num_null=3),
          "anyexperts": dict(k_min=2, k_max=6, target_avg_k=4.0)}[name]
    m = presets.make_layer(name, H, FFN, 8, **kw)
    T = 33
    x = torch.randn(T, H)
    out, aux, gx, grads, _ = _fwd_bwd(m, x)
    assert torch.isfinite(out).all() and torch.isfinite(gx).all()
    c = m.config
    ids, slots = aux.routing.ids.long(), aux.routing.slots.long()
    real = ((ids >= 0) & (ids < c.num_experts)).sum(1)
    virt = (ids >= c.num_experts).sum(1)
    assert torch.equal(real + virt, slots)
    assert slots.min() >= c.k_min and slots.max() <= c.k_max
    if name == "static_topk":
        assert (real == kw["k"]).all()
    if name == "top_p":
        p = torch.softmax(aux.routing.logits, -1).sort(-1, descending=True).values
        need = ((p.cumsum(-1) - p) < kw["p"]).sum(-1).clamp(1, 4)
        assert torch.equal(slots, need)
    if name == "null_experts":
        # AdaMoE: any share of nulls, weights renormalised over the real experts taken
        w = aux.routing.weights
        assert (w[ids >= c.num_experts] == 0).all()
        assert torch.allclose(w.sum(1)[real > 0], torch.ones(int((real > 0).sum())))
    if name in ("moe_plus_plus", "anyexperts"):
        assert "const_vectors" in grads


def test_anyexperts_preset_paper_defaults():
    c = presets.anyexperts(64, 128)
    assert c.rho_max == Fraction(1, 5) and c.target_avg_k == 8.0
    assert c.k_min < 8 < c.k_max and c.num_experts == 64 and c.slot_mode == "importance"
    # the cap is integer-exact where float floor would not be: floor(0.2 * 10) == 2
    assert c.virtual_cap(10) == 2
    assert AnyExpertsConfig(8, 8, 4, k_max=2, rho_max=0.1).rho_max == Fraction(1, 10)
    assert AnyExpertsConfig(8, 8, 4, k_max=2, rho_max="1/4").rho_max == Fraction(1, 4)


@pytest.mark.parametrize("rho, held", [
    (0.2, Fraction(1, 5)), (0.29, Fraction(29, 100)), (0.143, Fraction(143, 1000)),
    (1 / 3, Fraction(1, 3)), (2 / 7, Fraction(2, 7)), (0.3333, Fraction(3333, 10000)),
    (0.1 + 0.2, Fraction("0.30000000000000004")), (0.80297879, Fraction("0.80297879")),
    (0.123456789012345, Fraction("0.123456789012345")), (7e-16, Fraction(7, 10**16)),
    ("0.3333333333333333", Fraction(3333333333333333, 10**16)),
])
def test_float_rho_read_as_the_fraction_meant(rho, held):
    """A float rho_max is the fraction of denominator <= 1000 that rounds to it, where there
    is one (1/3 as one third: its 16-digit decimal would give floor(3 * rho) = 0), else its
    shortest decimal, as written."""
    c = AnyExpertsConfig(8, 8, 6, k_min=3, k_max=6, rho_max=rho)
    assert c.rho_max == held
    assert [c.virtual_cap(k) for k in range(7)] == [math.floor(held * k) for k in range(7)]


@pytest.mark.parametrize("rho", [Fraction(3333333333333333, 10**16), 0.1 + 0.2, 0.123456789,
                                 Fraction(2, 7)])
def test_virtual_cap_exact_for_any_rho(rho):
    """V = floor(rho * K) exactly for the rho the config holds (numerators of 16+ digits: a
    product in int32 or int64 would wrap)."""
    k_max = 24
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, k_max, num_virtual=2, k_min=1, k_max=k_max,
                                       rho_max=rho))
    with torch.no_grad():
        m.importance.net[-1].weight.mul_(8.0)  # K over the whole range
    rec = m.route(torch.randn(200, H))
    exact = m.config.rho_max
    assert float(exact) == float(rho)
    want = torch.tensor([math.floor(exact * int(k)) for k in rec.slots], dtype=torch.int32)
    assert torch.equal(rec.max_virtual, want)
    assert len(set(rec.slots.tolist())) > 5 and int(want.max()) > 0


def test_nan_token_gets_k_min_slots_and_a_nan_output():
    m = _layer()
    x = torch.randn(5, H)
    x[2] = float("nan")
    out, aux = m(x)
    assert int(aux.routing.slots[2]) == m.config.k_min
    assert int(aux.routing.max_virtual[2]) == m.config.virtual_cap(m.config.k_min)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()
    assert torch.isnan(aux.load_balance_loss) and torch.isnan(aux.loss)
    # a coefficient of 0 turns its term off: no 0 * NaN in aux.loss
    off = _layer(load_balance_coef=0.0)
    _, aux = off(x)
    assert torch.isnan(aux.load_balance_loss) and float(aux.loss.detach()) == 0.0
    _, aux = off(x[[0, 1, 3, 4]])
    aux.loss.backward()  # still a graph over the logits, with zero gradients
    assert float(aux.loss.detach()) == 0.0 and not off.router.weight.grad.any()


def test_nan_importance_left_out_of_its_statistics():
    """A NaN token's importance falls in no histogram bin and out of the mean, so one such
    forward does not make a StatsMeter's importance mean NaN for good."""
    m = _layer()
    x = torch.randn(8, H)
    x[3] = float("nan")
    _, aux = m(x)
    w = aux.routing.importance
    finite = w[torch.isfinite(w)]
    assert torch.isnan(w[3]) and finite.numel() == 7
    want = torch.histc(finite, bins=10, min=0.0, max=1.0) / 8
    torch.testing.assert_close(aux.stats.importance_hist, want)
    torch.testing.assert_close(aux.stats.importance_mean, finite.mean())
    _, lone = m(x[3:4])  # a forward whose only importance is NaN
    assert float(lone.stats.importance_mean) == 0.0
    meter = StatsMeter()
    for stats in (aux.stats, lone.stats, m(torch.randn(8, H))[1].stats):
        meter.update(stats)
    assert math.isfinite(meter.summary()["importance_mean"])


def test_bad_inputs_fail_before_any_state_changes():
    m = _layer(target_avg_k=3.0, num_modalities=2).train()
    for x, msg in [(torch.randn(4, H // 2), r"x must be \[\.\.\., 16\], got \[4, 8\]"),
                   (torch.randn(4, H, dtype=torch.float64), "x must have the layer's dtype"),
                   (torch.ones(4, H, dtype=torch.int64), "x must have the layer's dtype")]:
        with pytest.raises(ValueError, match=msg):
            m(x)
    x = torch.randn(4, H)
    for mod in (torch.zeros(2, dtype=torch.int64), torch.zeros(4), torch.zeros(1, 4).long()):
        with pytest.raises(ValueError, match="modality must be an integer tensor"):
            m(x, mod)
    with pytest.raises(ValueError, match=r"leading shape \[2, 2\] \(or flattened, \[4\]\)"):
        m(x.view(2, 2, H), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must be"):
        m.route(torch.randn(4, H + 1))
    assert float(m.importance_bias) == 0.0 and float(m.avg_real_ema) == 0.0
    # a batch set_budget cannot calibrate on leaves the target where it was
    for x_bad in (torch.randn(0, H), torch.randn(4, H + 1)):
        with pytest.raises(ValueError):
            m.set_budget(4.0, x_bad)
        assert float(m.budget_target) == 3.0 and m.config.target_avg_k == 3.0
        assert float(m.importance_bias) == 0.0


def test_modality_checked_without_statistics():
    m = _layer(num_modalities=2, compute_stats=False)
    with pytest.raises(ValueError, match="modality must be an integer tensor"):
        m(torch.randn(6, H), torch.zeros(5, dtype=torch.int64))


def test_modality_in_x_leading_shape_or_flattened():
    m = _layer(num_modalities=2).eval()
    x = torch.randn(2, 3, H)
    mod = torch.tensor([[0, 1, 1], [0, 0, 1]])
    with torch.no_grad():
        a = m(x, mod)[1].stats.modality_tokens
        b = m(x, mod.reshape(-1))[1].stats.modality_tokens
    assert a.tolist() == b.tolist() == [3.0, 3.0]


def test_modality_out_of_range_counted_nowhere():
    m = _layer(num_modalities=2)
    x = torch.randn(6, H)
    _, aux = m(x, torch.tensor([0, 1, 1, 5, -1, 0]))
    real = aux.stats.modality_tokens
    assert real.tolist() == [2.0, 2.0]
    r = ((aux.routing.ids >= 0) & (aux.routing.ids < m.config.num_experts)).sum(1).float()
    want = torch.stack([r[[0, 5]].mean(), r[[1, 2]].mean()])
    torch.testing.assert_close(aux.stats.modality_real, want)


def test_empty_batch_leaves_the_controller_alone():
    m = _layer(target_avg_k=3.0).train()
    m(torch.randn(0, H))
    assert float(m.importance_bias) == 0.0 and float(m.avg_real_ema) == 0.0


def test_budget_bounds_count_the_virtual_experts():
    """The fewest real slots per token is K_min less its cap, but no more virtual slots than
    M exist: with M = 0 nothing is below K_min, in the config and in set_budget."""
    with pytest.raises(ValueError, match="reachable"):
        AnyExpertsConfig(H, FFN, 8, num_virtual=0, k_min=5, k_max=8, rho_max=Fraction(1, 5),
                         target_avg_k=4.0)
    c = AnyExpertsConfig(H, FFN, 8, num_virtual=1, k_min=5, k_max=8, rho_max=1,
                         target_avg_k=4.0)
    assert c.min_avg_real() == 4
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, 8, k_min=5, k_max=8, rho_max=Fraction(1, 5)))
    with pytest.raises(ValueError, match="reachable"):
        m.set_budget(4.0)


def test_calibrating_to_a_reachable_end_does_not_warn():
    """Without virtual experts every token takes K_max real slots at the top of the bias
    range: asking for K_max is met exactly, with no warning."""
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, 8, k_min=2, k_max=6)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.set_budget(6.0, torch.randn(50, H)) == 6.0
        assert m.set_budget(2.0, torch.randn(50, H)) == 2.0


@pytest.mark.parametrize("bad", [
    dict(k_min=3, k_max=2), dict(k_max=9), dict(num_virtual=2, virtual_kinds=("zero",)),
    dict(num_virtual=1, virtual_kinds="nope"), dict(norm="softmax"), dict(align=0),
    dict(backend="triton"), dict(slot_mode="importance", importance=None),
    dict(rho_max=1.5), dict(target_avg_k=20.0), dict(rho_max=float("nan")),
    dict(rho_max=float("inf")), dict(rho_max="x"), dict(k_min=1.5), dict(k_max=True),
    dict(hsm_alpha=float("nan")), dict(iar_scale=float("inf")), dict(load_balance_coef=-0.1),
    dict(z_loss_coef=float("nan")), dict(controller_rate=-1.0),
])
def test_config_validation(bad):
    with pytest.raises(ValueError, match="AnyExpertsConfig: "):
        AnyExpertsConfig(8, 8, 8, **{"k_min": 1, "k_max": 4, **bad})


def test_layers_do_not_share_their_config():
    cfg = presets.anyexperts(H, FFN, 8, k_min=2, k_max=6, target_avg_k=4.0)
    a, b = AnyExpertsMoE(cfg), AnyExpertsMoE(cfg)
    a.set_budget(3.0)
    assert a.config.target_avg_k == 3.0
    assert b.config.target_avg_k == 4.0 and cfg.target_avg_k == 4.0


@pytest.mark.parametrize("num_virtual", [0, 1, 2, 4, 6])
def test_anyexperts_preset_kinds_follow_num_virtual(num_virtual):
    c = presets.anyexperts(H, FFN, 8, num_virtual=num_virtual, k_min=2, k_max=6)
    want = ("zero", "copy", "const", "const", "const", "const")[:num_virtual]
    assert c.virtual_kinds == want


# ---- budget control ---------------------------------------------------------------------

def test_stats_meter_counts_every_token_once():
    """A prefill, decode steps of one token and empty forwards average to the statistics of
    one batch of all their tokens (eval routing is per token, so that batch routes alike)."""
    m = _layer(num_modalities=2).double().eval()
    sizes = [300] + [1] * 20 + [0] * 3 + [7]
    xs = [torch.randn(n, H, dtype=torch.float64) for n in sizes]
    mods = [torch.randint(0, 2, (n,)) for n in sizes]
    meter = StatsMeter()
    with torch.no_grad():
        for x, mod in zip(xs, mods):
            meter.update(m(x, mod)[1].stats)
        whole = m(torch.cat(xs), torch.cat(mods))[1].stats.to_dict()
    got = meter.summary()
    assert meter.steps == len(sizes)
    for k in ("tokens", "real_slots", "real_per_token", "virtual_per_token", "slots_per_token",
              "virtual_share", "expert_load", "importance_mean", "importance_hist",
              "modality_tokens", "modality_real", "modality_virtual"):
        assert got[k] == pytest.approx(whole[k], rel=1e-6, abs=1e-7), k  # fp32 statistics
    assert got["tokens"] == sum(sizes) and isinstance(got["tokens"], int)


def test_stats_meter_weights_every_statistic():
    """Every tensor field of RoutingStats has its rule in StatsMeter (a new field must say
    how it averages, not vanish from summary())."""
    tensor_fields = {f.name for f in dataclasses.fields(RoutingStats)} - {"gemm_rows_capacity"}
    assert tensor_fields == set(StatsMeter._WEIGHTS) - {"taken_slots"}


def test_training_lowers_loss_and_controller_holds_avg_k():
    """A toy regression: 300 Adam steps. The task loss must fall and the controller must
    hold the mean real slots per token within 3% of the target (it starts ~15% above)."""
    T, target = 64, 3.5
    m = AnyExpertsMoE(presets.anyexperts(H, 32, 8, num_virtual=2, virtual_kinds=("zero", "copy"),
                                         k_min=2, k_max=6, target_avg_k=target))
    A, B = torch.randn(H, 32) / H ** 0.5, torch.randn(32, H) / 32 ** 0.5
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    meter = StatsMeter()
    losses, reals = [], []
    for step in range(300):
        x = torch.randn(T, H)
        y = torch.tanh(x @ A) @ B
        out, aux = m(x)
        loss = (out - y).square().mean()
        opt.zero_grad()
        (loss + aux.loss).backward()
        opt.step()
        losses.append(loss.detach())
        reals.append(aux.stats.real_per_token)
        if step >= 200:
            meter.update(aux.stats)
    losses, reals = torch.stack(losses), torch.stack(reals)
    assert float(losses[-20:].mean()) < 0.5 * float(losses[:20].mean())
    held = float(reals[-100:].mean())
    assert abs(held - target) < 0.03 * target, f"Avg-K {held:.3f} vs target {target}"
    assert abs(float(m.avg_real_ema) - target) < 0.03 * target
    assert meter.summary()["real_per_token"] == pytest.approx(held, rel=1e-5)
    assert float(m.importance_bias) != 0.0


@pytest.mark.parametrize("poison", ["nan", "inf", "overflow"])
def test_calibrating_on_non_finite_tokens_raises_and_moves_nothing(poison):
    """A NaN token takes K_min at every bias: calibrating on it used to leave the ends of the
    bisection equal and set the bias to +40 (every finite token at K_max). Finite hidden
    states that overflow in the importance MLP or the router count too."""
    m = _layer(num_experts=8, k_min=2, k_max=6, rho_max=Fraction(1, 5)).eval()
    m.set_budget(4.0, torch.randn(200, H))
    bias, target = m.importance_bias.clone(), m.budget_target.clone()
    x = torch.randn(200, H)
    if poison == "overflow":
        x[[5, 17]] = 3e38 * torch.randn(2, H).sign()
        assert torch.isfinite(x).all()
    else:
        x[[5, 17], 0] = float(poison)
    with pytest.raises(ValueError, match="2 of 200 tokens .*have a non-finite"):
        m.set_budget(5.0, x)
    assert torch.equal(m.importance_bias, bias) and torch.equal(m.budget_target, target)


@pytest.mark.parametrize("tol", [0.0, -1.0, float("nan"), float("inf")])
def test_calibration_tolerance_must_be_positive(tol):
    m = _layer(num_experts=8, k_min=2, k_max=6).eval()
    with pytest.raises(ValueError, match="tol must be > 0"):
        m.set_budget(4.0, torch.randn(50, H), tol=tol)
    assert float(m.importance_bias) == 0.0


@pytest.mark.parametrize("avg_k", [3.0, 4.3])
def test_calibrate_budget_hits_avg_k(avg_k):
    m = _layer(num_experts=8, k_min=2, k_max=6, rho_max=Fraction(1, 5)).eval()
    x = torch.randn(400, H)
    reached = m.set_budget(avg_k, x)
    assert abs(reached - avg_k) <= 0.01 * avg_k
    with torch.no_grad():
        _, aux = m(x)
    assert abs(float(aux.stats.real_per_token) - avg_k) <= 0.01 * avg_k
    assert float(m.budget_target) == pytest.approx(avg_k)
    with pytest.raises(ValueError):
        m.set_budget(100.0)


# ---- torch.compile, state_dict ----------------------------------------------------------

@pytest.mark.parametrize("preset", ["anyexperts", "null_experts"])
def test_export_with_dynamic_token_count(preset):
    """torch.export of the layer itself with a dynamic token count: nothing in the layer
    specialises T (statistics included), the program returns (out, MoEAux) like the eager
    layer, survives torch.export.save/load, and equals the eager layer at another T."""
    m = presets.make_layer(preset, H, FFN, 16).eval()
    T = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(m, (torch.randn(12, H),), dynamic_shapes={"x": {0: T}})
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    x = torch.randn(37, H)
    want_out, want_aux = m(x)
    for program in (ep, loaded):
        out, aux = program.module()(x)
        # the export may decompose an op differently: fp32 rounding
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
        assert type(aux) is type(want_aux) and int(aux.stats.tokens) == 37
        assert aux.stats.gemm_rows_capacity == want_aux.stats.gemm_rows_capacity
        assert torch.equal(aux.routing.ids, want_aux.routing.ids)
        torch.testing.assert_close(aux.stats.real_per_token, want_aux.stats.real_per_token)


def test_compile_fullgraph_matches_eager():
    """fullgraph=True compiles the whole layer (no graph breaks, no host syncs). CPU CI uses
    the aot_eager backend (the graph capture, functionalisation and fake kernels under test;
    inductor's C++ codegen takes over a minute on 2 cores): set ANYEXPERTS_TEST_INDUCTOR=1,
    or run on CUDA, to use inductor."""
    backend = ("inductor" if os.environ.get("ANYEXPERTS_TEST_INDUCTOR") == "1"
               or torch.cuda.is_available() else "aot_eager")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.reset()
    m = _layer(num_modalities=2, align=2, target_avg_k=3.0, z_loss_coef=1e-3).to(dev)
    x = torch.randn(24, H, device=dev)
    mod = torch.randint(0, 2, (24,), device=dev)
    cm = torch.compile(m, fullgraph=True, backend=backend)
    m.eval()
    with torch.no_grad():
        o1, a1 = cm(x, mod)
        o0, a0 = m(x, mod)
    _close(o1, o0, "compiled out")
    assert torch.equal(a1.routing.ids, a0.routing.ids)
    _close(a1.loss, a0.loss, "compiled aux loss")
    _close(a1.stats.modality_real, a0.stats.modality_real, "modality means")  # inductor reorders the sums
    # training mode: the controller's buffer update happens inside the compiled graph
    m.train()
    m2 = copy.deepcopy(m)
    o1, a1 = cm(x, mod)
    (o1.sum() + a1.loss).backward()
    o0, a0 = m2(x, mod)
    (o0.sum() + a0.loss).backward()
    _close(o1.detach(), o0.detach(), "compiled out (train)")
    torch.testing.assert_close(m.importance_bias, m2.importance_bias)
    # the controller ran inside the compiled graph. Its bias step is 0 when this batch's
    # Avg-K hits the target exactly (it can, at 24 tokens), but the running mean always moves.
    torch.testing.assert_close(m.avg_real_ema, m2.avg_real_ema)
    assert float(m.avg_real_ema) > 0.0
    _close(m.w_gate_up.grad, m2.w_gate_up.grad, "compiled grad")
    torch._dynamo.reset()


def test_state_dict_round_trip():
    m = _layer(target_avg_k=3.0)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        out, aux = m(torch.randn(32, H))
        opt.zero_grad()
        (out.square().mean() + aux.loss).backward()
        opt.step()
    sd = m.state_dict()
    assert {"importance_bias", "budget_target", "avg_real_ema", "const_vectors",
            "w_gate_up", "w_down", "router.weight"} <= set(sd)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    m2 = AnyExpertsMoE(copy.deepcopy(m.config))
    m2.load_state_dict(torch.load(buf))
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    m.eval(), m2.eval()
    x = torch.randn(20, H)
    with torch.no_grad():
        assert torch.equal(m(x)[0], m2(x)[0])


@pytest.mark.parametrize("saved", [5.5, 4.3, None])
def test_loaded_target_reaches_the_config(saved):
    """A load sets the config's target to the loaded one (as set_budget does), so that
    reset_parameters keeps it instead of bringing back the constructed one; the fp32 buffer's
    value reads back as the decimal that was set (4.3, not 4.300000190734863)."""
    src = _layer(k_min=2, k_max=6, rho_max=Fraction(1, 5), target_avg_k=4.0)
    src.set_budget(saved)
    dst = _layer(k_min=2, k_max=6, rho_max=Fraction(1, 5), target_avg_k=4.0)
    dst.load_state_dict(src.state_dict())
    assert dst.config.target_avg_k == saved
    dst.reset_parameters()
    assert float(dst.budget_target) == float(torch.tensor(saved or 0.0))


# ---- CUDA: no host synchronisation in forward/backward -----------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_no_host_sync_and_matches_cpu():
    m = _layer(num_modalities=2, align=8, target_avg_k=3.0)
    x = torch.randn(50, H)
    mod = torch.randint(0, 2, (50,))
    # 1) forward + backward in training mode (controller update included) never syncs
    ms = copy.deepcopy(m).cuda()
    xc, modc = x.cuda().requires_grad_(True), mod.cuda()
    out, aux = ms(xc, modc)  # warm-up (lazy initialisation may sync)
    (out.sum() + aux.loss).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, aux = ms(xc, modc)
        (out.sum() + aux.loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # 2) CUDA matches CPU, forward and backward, from the same state
    mc = copy.deepcopy(m).cuda()
    o_cpu, a_cpu, gx_cpu, g_cpu, s_cpu = _fwd_bwd(m, x, mod)
    o, a, gx, g, _ = _fwd_bwd(mc, x.cuda(), modc)
    assert torch.equal(a.routing.ids.cpu(), a_cpu.routing.ids)
    _close(o.cpu(), o_cpu, "cuda out", rtol=1e-4)
    _close(gx.cpu(), gx_cpu, "cuda grad x", rtol=1e-4)
    _param_grads_close({n: t.cpu() for n, t in g.items()}, g_cpu, s_cpu, "cuda grad")
    torch.testing.assert_close(mc.importance_bias.cpu(), m.importance_bias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_matches_reference_backend():
    """An fp32 layer given bf16 tokens under CUDA autocast runs its expert GEMMs in bf16 (the
    CUTLASS kernels where they apply) and equals the reference backend on the same device."""
    x = torch.randn(40, H, device="cuda").to(torch.bfloat16)
    res = []
    for backend in ("ops", "reference"):
        torch.manual_seed(0)
        m = _layer(backend=backend).cuda()
        xd = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, aux = m(xd)
        assert out.dtype == torch.bfloat16
        (out.float().square().mean() + aux.loss).backward()
        res.append((aux.routing.ids, out.detach().float(), xd.grad.float(), m.w_down.grad))
    assert torch.equal(res[0][0], res[1][0]), "routing"
    for got, want, what in zip(res[0][1:], res[1][1:], ("out", "grad x", "grad w_down")):
        err = float((got - want).norm() / want.norm().clamp_min(1e-30))
        assert err < 1e-2, f"{what}: relative norm error {err:.3e}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"recompute_activations": True,
                                          "router_dtype": "float32"}])
def test_cuda_graph_training_step_replays_eager(dtype, options):
    """The whole training step (forward, aux loss, backward, budget controller) captured
    once in a CUDA graph and replayed on new tokens equals the eager step on those tokens.
    The routing, and with it every group size, changes between replays: a kernel that took
    its sizes from the host at capture time would replay stale ones. bf16 runs the SM90
    grouped GEMM on Hopper (H and F multiples of 8 for its 16-byte rows). The options'
    checkpoint regions and fp32 routing must capture too."""
    torch.manual_seed(0)
    Hg, Fg, T = 64, 32, 192
    cfg = presets.anyexperts(Hg, Fg, 8, num_virtual=3, virtual_kinds=("zero", "copy", "const"),
                             k_min=1, k_max=6, rho_max=Fraction(1, 2), target_avg_k=3.0,
                             **options)
    m = AnyExpertsMoE(cfg).to("cuda", dtype).train()
    with torch.no_grad():
        m.router.weight[8:] *= 4.0
        m.const_vectors.normal_()
        m.importance.net[-1].weight.mul_(8.0)
    static_x = torch.randn(T, Hg, device="cuda", dtype=dtype, requires_grad=True)
    dy = torch.randn(T, Hg, device="cuda", dtype=dtype)
    params = list(m.parameters())

    def step(model, x):
        out, aux = model(x)
        torch.autograd.backward([out, aux.loss], [dy, torch.ones_like(aux.loss)])
        return out, aux.routing.ids

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # warm-up off the capture stream (lazy inits, workspaces)
        for _ in range(3):
            step(m, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for t in [static_x, *params]:
        t.grad = None               # the captured backward allocates them in the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out, g_ids = step(m, static_x)
    ref = copy.deepcopy(m)          # capture ran nothing: m's state is the warm-up's
    rtol = 1e-5 if dtype == torch.float32 else 1e-3
    seen = []
    for i in range(3):
        x = torch.randn(T, Hg, device="cuda", dtype=dtype) * (1 + i)
        with torch.no_grad():
            static_x.copy_(x)
        graph.replay()
        xr = x.clone().requires_grad_(True)
        for p in ref.parameters():
            p.grad = None
        r_out, r_ids = step(ref, xr)
        torch.cuda.synchronize()
        assert torch.equal(g_ids, r_ids), f"replay {i}: routing"
        _close(g_out, r_out, f"replay {i}: out", rtol=rtol)
        _close(static_x.grad, xr.grad, f"replay {i}: grad x", rtol=rtol)
        for (n, p), pr in zip(m.named_parameters(), ref.parameters()):
            _close(p.grad, pr.grad, f"replay {i}: grad {n}", rtol=rtol)
        torch.testing.assert_close(m.importance_bias, ref.importance_bias)
        seen.append(g_ids.clone())
    assert not torch.equal(seen[0], seen[1]), "the replays must route differently"
