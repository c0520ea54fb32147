"""The layer's documented rules checked against hand-computed values (DESIGN.md section 1, the
README's configuration table, the docstrings of config.py, layer.py, presets.py and
stats.py): the config's defaults and bounds, the slot policies, the budget controller's step,
the auxiliary losses, the statistics and the presets. Independent of reference.py: each
expectation is written out here, not computed by the code under test."""
from __future__ import annotations

import math
import warnings
from fractions import Fraction

import pytest
import torch

from anyexperts_ops import presets
from anyexperts_ops.config import AnyExpertsConfig
from anyexperts_ops.layer import AnyExpertsMoE, ImportancePredictor
from anyexperts_ops.stats import (RoutingRecord, StatsMeter, load_balance_loss, router_z_loss,
                                  routing_stats)
from test_layer import FFN, H, _layer


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- config -----------------------------------------------------------------------------

def test_config_defaults_are_the_documented_ones():
    """The README's table of AnyExpertsConfig defaults (rho_max 1/5 is the paper's)."""
    c = AnyExpertsConfig(H, FFN, 4)
    assert (c.num_virtual, c.virtual_kinds, c.k_min, c.k_max) == (0, (), 1, 2)
    assert c.rho_max == Fraction(1, 5) and isinstance(c.rho_max, Fraction)
    assert (c.slot_mode, c.top_p, c.importance, c.importance_hidden) == ("importance", 0.5,
                                                                         "mlp", None)
    assert (c.hsm_alpha, c.iar_scale, c.norm, c.align) == (0.05, 1.0, "selected", 1)
    assert (c.router_dtype, c.recompute_activations) == (None, False)
    assert (c.load_balance_coef, c.z_loss_coef, c.budget_loss_coef) == (0.01, 0.0, 0.0)
    assert (c.target_avg_k, c.controller_rate, c.controller_step) == (None, 2.0, "forward")
    assert (c.budget_sync, c.compute_stats, c.num_modalities, c.importance_bins,
            c.backend) == (False, True, 0, 10, "ops")


def test_config_accepts_the_ends_of_its_ranges():
    """rho_max in [0, 1], top_p in (0, 1], target_avg_k in [K_min - min(V(K_min), M), K_max]:
    the closed ends are valid values."""
    c = AnyExpertsConfig(H, FFN, 6, num_virtual=2, k_min=2, k_max=6, rho_max=0)
    assert c.rho_max == 0 and [c.virtual_cap(k) for k in range(7)] == [0] * 7
    assert AnyExpertsConfig(H, FFN, 6, k_max=4, rho_max=1).virtual_cap(4) == 4
    assert AnyExpertsConfig(H, FFN, 6, slot_mode="top_p", top_p=1.0).top_p == 1.0
    # K_min = 5, V(5) = 1 with rho 1/5 and M = 2: Avg-K reaches [4, 8]
    for target in (4.0, 8.0):
        c = AnyExpertsConfig(H, FFN, 8, num_virtual=2, k_min=5, k_max=8, target_avg_k=target)
        assert c.min_avg_real() == 4 and c.target_avg_k == target
    with pytest.raises(ValueError, match="AnyExpertsConfig: need 1 <= k_min <= k_max"):
        AnyExpertsConfig(H, FFN, 6, k_min=0, k_max=2)


@pytest.mark.parametrize("rho", [(1, 5), [2, 7], (0, 3), (3, 3)])
def test_rho_max_as_numerator_and_denominator(rho):
    assert AnyExpertsConfig(H, FFN, 6, k_max=6, rho_max=rho).rho_max == Fraction(*rho)


@pytest.mark.parametrize("held", [Fraction(1, 997), Fraction(101, 103), Fraction(499, 1000),
                                  Fraction(7, 150)])
def test_float_rho_read_with_denominators_up_to_1000(held):
    """README: a float rho_max is read as the fraction of denominator <= 1000 that rounds to
    it (not only the small ones), so floor(rho * K) is exact at K = its denominator."""
    c = AnyExpertsConfig(H, FFN, 6, k_max=6, rho_max=float(held))
    assert c.rho_max == held
    assert c.virtual_cap(held.denominator) == held.numerator
    assert c.virtual_cap(held.denominator - 1) == held.numerator - 1


@pytest.mark.parametrize("rho", [Fraction(1, 1001), Fraction(2, 7), Fraction(333, 1000)])
def test_to_dict_keeps_rho_max_exact(rho):
    """to_dict() writes rho_max as "num/den", so a config rebuilt from it holds the same
    fraction and the same caps (a float would come back as another fraction: 1/1001 is no
    fraction of denominator <= 1000, so its float reads back as a 19-digit decimal)."""
    c = AnyExpertsConfig(H, FFN, 6, num_virtual=1, k_max=6, rho_max=rho)
    d = c.to_dict()
    assert Fraction(d["rho_max"]) == rho
    back = AnyExpertsConfig(**d)
    assert back.rho_max == rho and back == c


# ---- slots ------------------------------------------------------------------------------

def test_static_slot_mode_gives_every_token_k_max():
    """slot_mode "static": K_i = K_max whatever K_min is (README table)."""
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, 6, k_min=1, k_max=4, slot_mode="static",
                                       importance=None, hsm_alpha=0.0, iar_scale=0.0))
    rec = m.route(torch.randn(9, H))
    assert rec.slots.tolist() == [4] * 9
    assert ((rec.ids >= 0) & (rec.ids < 6)).sum(1).tolist() == [4] * 9


@pytest.mark.parametrize("top_p, k", [(0.25, 1), (0.5, 2), (0.5000001, 3), (0.75, 3), (1.0, 4)])
def test_top_p_takes_the_fewest_candidates_reaching_p(top_p, k):
    """With a zero router every one of N = 4 candidates has p = 1/4 exactly: the fewest whose
    probabilities reach top_p is ceil(4 * top_p) (reaching it exactly counts)."""
    m = presets.make_layer("top_p", H, FFN, 4, p=top_p, k_min=1, k_max=4)
    with torch.no_grad():
        m.router.weight.zero_()
    rec = m.route(torch.randn(5, H))
    assert rec.slots.tolist() == [k] * 5


def test_importance_slots_round_to_nearest_and_caps_are_floors():
    """K_i = clamp(round(K_min + sigmoid(s + b) (K_max - K_min))), V_i = floor(rho_max K_i):
    scores set by hand through the predictor's last bias (its weight zeroed)."""
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, 8, num_virtual=2, k_min=1, k_max=8,
                                       rho_max=Fraction(1, 5)))
    with torch.no_grad():
        m.importance.net[-1].weight.zero_()
    # w~ such that 1 + 7 w~ is ~1, 2.4 (-> 2), 3.6 (-> 4), 5.7 (-> 6), ~8
    for w, k in [(1e-6, 1), (1.4 / 7, 2), (2.6 / 7, 4), (4.7 / 7, 6), (1 - 1e-6, 8)]:
        with torch.no_grad():
            m.importance.net[-1].bias.fill_(math.log(w / (1 - w)))
        rec = m.route(torch.randn(3, H))
        assert rec.slots.tolist() == [k] * 3, (w, k)
        assert rec.max_virtual.tolist() == [k // 5] * 3



# ---- HSM and IAR ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["ops", "reference"])
def test_router_reads_hsm_output_and_iar_shifts_virtual_logits(backend):
    """DESIGN.md 1-2: w = sigmoid(s), x' = x + alpha w x, logits = router(x'), and only the
    virtual candidates' logits move, by iar_scale * (1 - 2w): important tokens (w > 1/2) get
    lower virtual logits. fp64, so the comparison is tight."""
    alpha, iar = 0.5, 3.0
    m = _layer(hsm_alpha=alpha, iar_scale=iar, backend=backend).double()
    N, M = m.config.num_experts, m.config.num_virtual
    x = torch.randn(64, H, dtype=torch.float64)
    with torch.no_grad():
        rec = m.route(x)
        w = torch.sigmoid(m.importance(x))
    assert (w > 0.5).any() and (w < 0.5).any(), "setup: importances on both sides of 1/2"
    torch.testing.assert_close(rec.importance, w)
    xh = x + alpha * w[:, None] * x
    plain = xh @ m.router.weight.detach().T
    torch.testing.assert_close(rec.logits[:, :N], plain[:, :N], rtol=1e-12, atol=1e-12)
    shift = rec.logits[:, N:] - plain[:, N:]
    torch.testing.assert_close(shift, (iar * (1 - 2 * w))[:, None].expand(-1, M),
                               rtol=1e-12, atol=1e-12)
    assert (shift[w > 0.5] < 0).all() and (shift[w < 0.5] > 0).all()

# ---- importance predictor -------------------------------------------------------------

@pytest.mark.parametrize("kind, hidden, widths", [
    ("mlp", None, [64, 16, 1]),        # d = max(16, H // 4) = 16
    ("mlp", 8, [64, 8, 1]),
    ("wide", None, [64, 64, 1]),       # H -> 4d -> 1
    ("deep", None, [64, 16, 16, 16, 1]),
])
def test_importance_predictor_shapes(kind, hidden, widths):
    p = ImportancePredictor(64, kind, hidden)
    linears = [mod for mod in p.net if isinstance(mod, torch.nn.Linear)]
    assert [lin.in_features for lin in linears] + [linears[-1].out_features] == widths
    assert sum(isinstance(mod, torch.nn.GELU) for mod in p.net) == len(linears) - 1
    assert ImportancePredictor(256, kind).net[0].out_features == \
        {"mlp": 64, "wide": 256, "deep": 64}[kind]
    assert p(torch.randn(3, 64)).shape == (3,)


# ---- virtual experts ------------------------------------------------------------------

def test_const_vectors_start_at_zero():
    """const vectors are zero at construction and after reset_parameters (layer.py)."""
    m = _layer()
    assert m.const_vectors.abs().sum() > 0  # _layer draws them
    m.reset_parameters()
    assert torch.equal(m.const_vectors, torch.zeros_like(m.const_vectors))
    fresh = AnyExpertsMoE(presets.anyexperts(H, FFN, 8, num_virtual=4, k_min=2, k_max=6))
    assert fresh.const_vectors.shape == (2, H) and not fresh.const_vectors.any()


def test_each_const_expert_adds_its_own_row():
    """The j-th const expert adds weight * const_vectors[j] (rows in the order of the const
    experts among virtual_kinds), the copy expert weight * x', the zero expert nothing. The
    real experts are zeroed, so the output is the virtual terms alone."""
    kinds = ("const", "zero", "copy", "const")
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, 6, num_virtual=4, virtual_kinds=kinds, k_min=1,
                                       k_max=6, rho_max=1, hsm_alpha=0.3, iar_scale=0.0))
    N = 6
    with torch.no_grad():
        m.w_down.zero_()
        m.router.weight[N:] += 3.0 * m.router.weight[N:].sign()
        m.const_vectors.copy_(torch.randn(2, H))
        m.importance.net[-1].weight.mul_(8.0)
    x = torch.randn(40, H)
    with torch.no_grad():
        out, aux = m.eval()(x)
    ids, w = aux.routing.ids.long(), aux.routing.weights
    xh = x + 0.3 * aux.routing.importance[:, None] * x
    rows = {N: m.const_vectors[0], N + 3: m.const_vectors[1]}
    want = torch.zeros_like(x)
    for t in range(40):
        for j in range(6):
            e = int(ids[t, j])
            if e in rows:
                want[t] += w[t, j] * rows[e]
            elif e == N + 2:
                want[t] += w[t, j] * xh[t]
    assert all((ids == e).any() for e in (N, N + 2, N + 3)), "setup: virtual slots taken"
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


# ---- budget controller ------------------------------------------------------------------

def _real_per_token(aux, N):
    ids = aux.routing.ids
    return float(((ids >= 0) & (ids < N)).sum()) / ids.shape[0]


def test_controller_step_is_rate_times_error_over_k_range():
    """One training forward: bias += rate * (target - Avg-K) / (K_max - K_min), and the
    running mean avg_real_ema += 0.1 * (Avg-K - ema) (README)."""
    m = _layer(k_min=2, k_max=6, target_avg_k=3.01, controller_rate=1.5).train()
    N = m.config.num_experts
    with torch.no_grad():
        _, aux = m(torch.randn(50, H))
    avg = _real_per_token(aux, N)  # a multiple of 1/50: never the target
    assert float(m.importance_bias) == pytest.approx(1.5 * (3.01 - avg) / 4, rel=1e-5)
    assert float(m.avg_real_ema) == pytest.approx(0.1 * avg, rel=1e-5)
    # a second step: from the moved bias, on that forward's Avg-K
    bias, ema = float(m.importance_bias), float(m.avg_real_ema)
    with torch.no_grad():
        _, aux = m(torch.randn(50, H))
    avg2 = _real_per_token(aux, N)
    # fp32 sums (the bias can come back near 0): absolute tolerances
    assert float(m.importance_bias) == pytest.approx(bias + 1.5 * (3.01 - avg2) / 4, abs=1e-6)
    assert float(m.avg_real_ema) == pytest.approx(ema + 0.1 * (avg2 - ema), abs=1e-6)


def test_controller_without_target_leaves_the_bias_alone():
    """No target (control off): training forwards keep the bias at 0; the running mean still
    follows Avg-K."""
    m = _layer(k_min=2, k_max=6, target_avg_k=None).train()
    for _ in range(3):
        with torch.no_grad():
            _, aux = m(torch.randn(30, H))
    assert float(m.importance_bias) == 0.0
    assert float(m.avg_real_ema) > 0.0


def test_eval_forward_moves_no_controller_state():
    """In eval mode the bias stays put (README, Serving) and so does the running mean."""
    m = _layer(k_min=2, k_max=6, target_avg_k=3.0).eval()
    with torch.no_grad():
        m.importance_bias.fill_(0.25)
        m(torch.randn(30, H))
    assert float(m.importance_bias) == 0.25 and float(m.avg_real_ema) == 0.0


def test_calibration_reaches_k_min_and_k_max_with_large_scores():
    """Scores far from 0 (here s = 12 for every token) must not put K_min out of the
    calibration's reach: the bias range has to cover them."""
    m = AnyExpertsMoE(AnyExpertsConfig(H, FFN, 8, k_min=2, k_max=6)).eval()
    with torch.no_grad():
        m.importance.net[-1].weight.zero_()
        m.importance.net[-1].bias.fill_(12.0)
    x = torch.randn(50, H)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert m.set_budget(2.0, x) == 2.0
        assert m.set_budget(6.0, x) == 6.0
        with torch.no_grad():
            m.importance.net[-1].bias.fill_(-12.0)
        assert m.set_budget(6.0, x) == 6.0


# ---- auxiliary losses -------------------------------------------------------------------

def test_z_loss_is_the_mean_squared_logsumexp():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -math.inf, 0.0]])
    # logsumexp: log 4 and log(3 + 1 + 1) = log 5
    want = (math.log(4.0) ** 2 + math.log(5.0) ** 2) / 2
    assert float(router_z_loss(logits)) == pytest.approx(want, rel=1e-6)
    assert float(router_z_loss(torch.zeros(0, 4))) == 0.0


def test_layer_z_loss_covers_every_router_logit():
    """The layer's z-loss is router_z_loss over all N + M logits (after IAR), the virtual
    candidates' included: the router scores them all."""
    m = _layer(z_loss_coef=0.1, load_balance_coef=0.0)
    with torch.no_grad():
        _, aux = m.eval()(torch.randn(20, H))
    lg = aux.routing.logits.double()
    assert lg.shape[1] == m.config.num_experts + m.config.num_virtual
    want = torch.logsumexp(lg, dim=-1).square().mean()
    assert float(aux.z_loss) == pytest.approx(float(want), rel=1e-5)
    assert float(aux.loss) == pytest.approx(0.1 * float(want), rel=1e-5)


def test_load_balance_loss_hand_computed():
    """N * sum_e f_e P_e, P over the real logits only (the virtual logit here would change
    every P if it took part)."""
    ids = torch.tensor([[0, 1, 2], [0, -1, 2]], dtype=torch.int32)  # 2 real experts, id 2 virtual
    logits = torch.tensor([[0.0, 0.0, 5.0], [math.log(3.0), 0.0, 5.0]])
    f = torch.tensor([2 / 3, 1 / 3])
    P = torch.tensor([(0.5 + 0.75) / 2, (0.5 + 0.25) / 2])
    want = 2 * float((f * P).sum())
    assert float(load_balance_loss(ids, logits, 2)) == pytest.approx(want, rel=1e-6)


def test_budget_loss_hand_computed():
    """budget loss = ((mean_t (K_min + sigmoid(s_t + b) (K_max - K_min)) - mean virtual
    slots - target) / K_max)^2: a soft Avg-K (real slots = slots less virtual ones)."""
    m = _layer(k_min=2, k_max=6, target_avg_k=3.0, budget_loss_coef=0.5,
               load_balance_coef=0.0, rho_max=Fraction(1, 2)).eval()
    scores = []
    hook = m.importance.net.register_forward_hook(lambda _m, _i, s: scores.append(s))
    with torch.no_grad():
        m.importance_bias.fill_(-0.3)
        _, aux = m(torch.randn(60, H))
    hook.remove()
    s = scores[0].squeeze(-1).double()
    N = m.config.num_experts
    virt = (aux.routing.ids >= N).sum(1).double()
    assert virt.sum() > 0, "setup: virtual slots taken"
    soft = (2 + torch.sigmoid(s - 0.3) * 4).mean() - virt.mean()
    want = float(((soft - 3.0) / 6) ** 2)
    assert float(aux.budget_loss) == pytest.approx(want, rel=1e-4, abs=1e-8)
    assert float(aux.loss) == pytest.approx(0.5 * want, rel=1e-4, abs=1e-8)


# ---- statistics -------------------------------------------------------------------------

def _record():
    # N = 3 real (0..2), virtual 3, 4. Token 0: 0, 1, 3 (K 3); token 1: 0, 4 and an unused
    # slot (K 3); token 2: 2 (K 1); token 3: 0, 1 (K 2).
    ids = torch.tensor([[0, 1, 3], [0, 4, -1], [2, -1, -1], [0, 1, -1]], dtype=torch.int32)
    return RoutingRecord(ids=ids, weights=torch.rand(4, 3), slots=torch.tensor([3, 3, 1, 2]),
                         max_virtual=torch.tensor([1, 1, 0, 0]),
                         importance=torch.tensor([0.05, 0.15, 0.95, 1.0]),
                         logits=torch.zeros(4, 5))


def test_routing_stats_hand_computed():
    st = routing_stats(_record(), 3, gemm_rows_capacity=12, bins=4)
    # real slots 2 + 1 + 1 + 2 = 6 (expert 0: 3, 1: 2, 2: 1), virtual 2, asked 9
    assert int(st.tokens) == 4 and int(st.real_slots) == 6
    assert float(st.real_per_token) == 1.5 and float(st.virtual_per_token) == 0.5
    assert float(st.slots_per_token) == 2.25
    assert float(st.virtual_share) == pytest.approx(2 / 8)
    torch.testing.assert_close(st.expert_load, torch.tensor([0.5, 1 / 3, 1 / 6]))
    assert float(st.load_imbalance) == pytest.approx(0.5 / (1 / 3))  # max / mean load
    # w * 4 = 0.2, 0.6, 3.8, 4 (the last bin is closed): bins 0, 0, 3, 3
    torch.testing.assert_close(st.importance_hist, torch.tensor([0.5, 0.0, 0.0, 0.5]))
    assert float(st.importance_mean) == pytest.approx(0.5375)


def test_stats_meter_weights_load_imbalance_by_tokens():
    """load_imbalance: the token-weighted mean of each forward's (README)."""
    a = routing_stats(_record(), 3, gemm_rows_capacity=12)          # 4 tokens, imbalance 1.5
    rec = _record()
    rec.ids = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rec.slots, rec.max_virtual = torch.tensor([3]), torch.tensor([0])
    rec.importance, rec.logits = torch.tensor([0.5]), torch.zeros(1, 5)
    b = routing_stats(rec, 3, gemm_rows_capacity=3)                  # 1 token, imbalance 1
    meter = StatsMeter()
    meter.update(a)
    meter.update(b)
    got = meter.summary()
    assert got["load_imbalance"] == pytest.approx((4 * 1.5 + 1 * 1.0) / 5)
    assert got["slots_per_token"] == pytest.approx((9 + 3) / 5)


# ---- presets ----------------------------------------------------------------------------

def test_anyexperts_preset_auto_target():
    """target_avg_k="auto": 8.0 when [k_min, k_max] holds 8, else the middle of the range."""
    assert presets.anyexperts(H, FFN, 16, k_min=4, k_max=10).target_avg_k == 8.0
    assert presets.anyexperts(H, FFN, 16, k_min=8, k_max=16).target_avg_k == 8.0
    assert presets.anyexperts(H, FFN, 16, k_min=2, k_max=6).target_avg_k == 4.0
    assert presets.anyexperts(H, FFN, 16, k_min=9, k_max=12).target_avg_k == 10.5
    assert presets.anyexperts(H, FFN, 16, k_min=2, k_max=6, target_avg_k=None).target_avg_k is None


def test_preset_defaults():
    """The README's preset defaults and each baseline's weight rule."""
    c = presets.top_p(H, FFN, 8)
    assert (c.top_p, c.k_min, c.k_max, c.slot_mode, c.num_virtual) == (0.5, 1, 4, "top_p", 0)
    c = presets.static_topk(H, FFN, 8, 3)
    assert (c.k_min, c.k_max, c.slot_mode, c.norm, c.num_virtual) == (3, 3, "static",
                                                                      "selected", 0)
    c = presets.moe_plus_plus(H, FFN, 8)
    assert (c.k_min, c.k_max, c.norm, c.rho_max) == (2, 2, "none", 1)
    assert c.virtual_kinds == ("zero", "copy", "const", "const")
    c = presets.null_experts(H, FFN, 8)
    assert (c.k_min, c.k_max, c.norm, c.rho_max, c.virtual_kinds) == (4, 4, "real", 1,
                                                                      ("zero",) * 4)


def test_moe_plus_plus_weights_are_the_softmax_not_renormalised():
    """MoE++: top-k over real and zero-computation experts with plain softmax weights."""
    m = presets.make_layer("moe_plus_plus", H, FFN, 6, k=3)
    rec = m.route(torch.randn(20, H))
    p = torch.softmax(rec.logits, dim=-1)
    torch.testing.assert_close(rec.weights, p.gather(1, rec.ids.long()))
    assert (rec.weights.sum(1) < 1).all()
