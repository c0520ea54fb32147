"""The layer with PyTorch's training machinery: meta-device construction, state_dict loads,
dtype conversion, activation checkpointing."""
from __future__ import annotations

import copy
import warnings
from fractions import Fraction

import pytest
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from anyexperts_ops import presets
from anyexperts_ops.layer import AnyExpertsMoE
from anyexperts_ops.stats import slot_counts
from test_layer import FFN, H, _close, _layer


DEVICES = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])


pytestmark = pytest.mark.usefixtures("one_thread")


def _tables(m):
    return m._virtual_sources.tolist(), m._virtual_caps.tolist()


def _assert_same_layer(m, ref):
    for (k, v), (k2, v2) in zip(m.state_dict().items(), ref.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    assert _tables(m) == _tables(ref)
    m.eval(), ref.eval()
    x = torch.randn(40, H)
    with torch.no_grad():
        out, aux = m(x)
        out_ref, aux_ref = ref(x)
    assert torch.equal(aux.routing.ids, aux_ref.routing.ids)
    assert torch.equal(out, out_ref)


def _trained(**kw):
    """A layer whose buffers have all moved away from their initial values."""
    m = _layer(target_avg_k=3.0, **kw)
    for _ in range(2):
        out, aux = m(torch.randn(32, H))
        (out.square().mean() + aux.loss).backward()
    m.zero_grad(set_to_none=True)
    return m


def _grads_close(got, want):
    """fp64 gradients within 1e-9 of the largest: summed in another order, a sum over tokens
    that cancels (the importance net's last bias) moves by its terms' rounding. A different
    routing moves gradients by percents."""
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    for n in want:
        _close(got[n], want[n], n, rtol=1e-9, scale=scale)


def _checkpoint(layer, x, use_reentrant):
    """torch.utils.checkpoint, its recompute running the whole forward (PyTorch's default
    non-reentrant mode stops once the saved tensors are back, before the controller code)."""
    with set_checkpoint_early_stop(False):
        return checkpoint(layer, x, use_reentrant=use_reentrant)


def _on_meta(config):
    with torch.device("meta"):
        return AnyExpertsMoE(copy.deepcopy(config))


def test_meta_then_to_empty_and_reset_parameters_is_a_fresh_layer():
    ref = _layer(target_avg_k=3.0)
    m = _on_meta(ref.config).to_empty(device="cpu")
    for name in ("_virtual_sources", "_virtual_caps", "importance_bias", "avg_real_ema",
                 "_routed_bias", "_budget_pending"):
        getattr(m, name).fill_(1000)  # what to_empty may leave there
    m.reset_parameters()
    assert _tables(m) == _tables(ref)
    assert float(m.importance_bias) == 0.0 and float(m.avg_real_ema) == 0.0
    assert float(m.budget_target) == 3.0
    assert float(m._routed_bias) == 0.0 and not m._budget_pending.any()
    # every parameter freshly drawn, with the default init's bounds (importance net included)
    for (n, p), (_, p_ref) in zip(m.named_parameters(), ref.named_parameters()):
        assert torch.isfinite(p).all(), n
        if n.endswith("weight") and "importance" in n:
            bound = 1.0 / p.shape[1] ** 0.5
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, n


@pytest.mark.parametrize("assign", [False, True])
def test_meta_then_load_state_dict_is_the_saved_layer(assign):
    ref = _trained()
    sd = copy.deepcopy(ref.state_dict())
    m = _on_meta(ref.config)
    if not assign:
        m = m.to_empty(device="cpu")
        for name in ("_virtual_sources", "_virtual_caps"):
            getattr(m, name).fill_(1 << 20)  # garbage a load alone must fix
    m.load_state_dict(sd, assign=assign)
    _assert_same_layer(m, ref)
    assert not m._budget_pending.any()  # to_empty from meta leaves the counts zero
    # the unsaved controller state exists on the weights' device: a checkpointed training
    # step runs, and routes as the saved layer
    m, ref = m.double().train(), ref.double().train()
    x = torch.randn(32, H, dtype=torch.float64)
    g = _step(m, x, lambda layer, x: checkpoint(layer, x, use_reentrant=False))
    _grads_close(g, _step(ref, x, lambda layer, x: layer(x)))


def test_dtype_conversion_keeps_the_controller_state_exact():
    m = _trained()
    m.set_budget(3.3)
    before = {n: b.clone() for n, b in m.named_buffers()}
    order = list(dict(m.named_buffers()))
    for convert in (lambda l: l.to(torch.bfloat16), lambda l: l.half(), lambda l: l.double(),
                    lambda l: l.type(torch.bfloat16)):
        c = convert(copy.deepcopy(m))
        assert list(dict(c.named_buffers())) == order
        for n, b in c.named_buffers():
            assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
        assert c.w_gate_up.dtype != torch.float32
        with torch.no_grad():  # and it runs (int32 tables included)
            c.eval()(torch.randn(4, H, dtype=c.w_gate_up.dtype))


def _step(m, x, wrap, with_aux=True):
    out, aux = wrap(m, x)
    target = torch.sin(torch.arange(out.numel(), dtype=out.dtype, device=out.device))
    target = target.view_as(out)
    loss = (out * target).sum()
    (loss + aux.loss if with_aux else loss).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
@DEVICES
def test_activation_checkpointing_routes_as_the_first_run(use_reentrant, device):
    """The recompute runs after the controller moved the bias: it must route with the bias
    the first run used, and not step the controller again."""
    m = _trained().double().to(device)  # fp64: the gradients differ by the sums' order alone
    with torch.no_grad():
        m.importance_bias.fill_(0.3)  # far from the target: the controller takes a big step
    m_ckpt = copy.deepcopy(m)
    x = torch.randn(64, H, dtype=torch.float64, device=device, requires_grad=True)

    def plain(layer, x):
        return layer(x)

    def ckpt(layer, x):
        return _checkpoint(layer, x, use_reentrant)

    # reentrant checkpointing gives a graph to tensor outputs only: aux.loss comes back
    # without one (README), so compare the output's gradients
    g = _step(m, x, plain, with_aux=not use_reentrant)
    g_ckpt = _step(m_ckpt, x, ckpt, with_aux=not use_reentrant)
    if use_reentrant:
        probe = copy.deepcopy(m_ckpt).eval()
        assert not checkpoint(probe, x, use_reentrant=True)[1].loss.requires_grad
    # the same routing; reentrant checkpointing sums the gradients in another order
    _grads_close(g_ckpt, g)
    assert float(m.importance_bias) != 0.3  # the controller did step
    for n in ("importance_bias", "avg_real_ema"):
        assert torch.equal(getattr(m_ckpt, n), getattr(m, n)), n


@pytest.mark.parametrize("use_reentrant", [False, True])
@DEVICES
def test_manual_controller_survives_interleaved_forwards(use_reentrant, device):
    """controller_step="manual": the bias moves only in step_budget, so micro-batches whose
    forwards all run before their backwards (pipeline schedules), and a train-mode forward
    under no_grad in between, recompute exactly; then one step on all their tokens."""
    m = _trained(controller_step="manual").double().to(device)
    m.step_budget()  # of the training so far
    with torch.no_grad():
        m.importance_bias.fill_(0.3)
    m_ckpt = copy.deepcopy(m)
    xs = [torch.randn(40, H, dtype=torch.float64, device=device, requires_grad=True)
          for _ in range(3)]

    def loss(out, aux):
        target = torch.sin(torch.arange(out.numel(), dtype=out.dtype, device=out.device))
        target = target.view_as(out)
        # reentrant checkpointing returns aux without a graph (README)
        return (out * target).sum() + (0 if use_reentrant else aux.loss)

    for x in xs:
        loss(*m(x)).backward()
    losses = [loss(*_checkpoint(m_ckpt, x, use_reentrant)) for x in xs]
    logged = torch.randn(8, H, dtype=torch.float64, device=device)
    with torch.no_grad():
        m_ckpt(logged)  # a train-mode forward, logged: counted, routes with the same bias
    for l in reversed(losses):
        l.backward()
    # every forward counted once, none of the recomputes
    real_logged = int(slot_counts(m.route(logged).ids, m.config.num_experts)[0].sum())
    assert m._budget_pending[1] == 120 and m_ckpt._budget_pending[1] == 128
    assert m_ckpt._budget_pending[0] == m._budget_pending[0] + real_logged
    grads = {n: p.grad for n, p in m.named_parameters()}
    _grads_close({n: p.grad for n, p in m_ckpt.named_parameters()}, grads)
    assert float(m.importance_bias) == float(m_ckpt.importance_bias) == pytest.approx(0.3)

    # the step: the same as the forward controller's on the concatenated batch
    fwd = copy.deepcopy(m)
    fwd.config.controller_step = "forward"
    with torch.no_grad():
        fwd(torch.cat(xs))
    m.step_budget()
    assert torch.equal(m.importance_bias, fwd.importance_bias)
    assert torch.equal(m.avg_real_ema, fwd.avg_real_ema)
    before = m.importance_bias.clone()
    m.step_budget()  # nothing seen since: no step
    assert torch.equal(m.importance_bias, before)
    with pytest.raises(RuntimeError, match="controller_step"):
        fwd.step_budget()


def test_calibration_out_of_reach_warns_once():
    """A target the config allows but the batch cannot reach gets one warning, not a
    second one blaming the batch's resolution."""
    m = _layer(k_min=1, k_max=6, rho_max=Fraction(1, 5))
    N = m.config.num_experts
    with torch.no_grad():  # virtual experts rank first for every token
        m.router.weight[:N] = 0.0
        m.router.weight[N:] = 1.0
    x = torch.ones(64, H)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m.set_budget(6.0, x)  # at K = 6 a token takes its one virtual slot: 5 real at most
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "outside what this batch reaches" in msgs[0], msgs


def test_predictor_without_gradient_warns():
    with pytest.warns(UserWarning, match="no gradient"):
        presets.make_layer("anyexperts", H, FFN, 8, k_min=1, k_max=4, hsm_alpha=0.0,
                           iar_scale=0.0)
    with pytest.warns(UserWarning, match="no gradient"):
        presets.make_layer("anyexperts", H, FFN, 8, k_min=1, k_max=4, num_virtual=0,
                           hsm_alpha=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        presets.make_layer("anyexperts", H, FFN, 8, k_min=1, k_max=4, hsm_alpha=0.0,
                           budget_loss_coef=0.1)
        presets.make_layer("anyexperts", H, FFN, 8, k_min=1, k_max=4)
        presets.make_layer("static_topk", H, FFN, 8, k=2)


def test_budget_loss_without_target_warns_and_is_zero_until_set():
    with pytest.warns(UserWarning, match="without target_avg_k"):
        m = presets.make_layer("anyexperts", H, FFN, 8, k_min=1, k_max=4, target_avg_k=None,
                               budget_loss_coef=0.1)
    m.train()
    x = torch.randn(32, H)
    assert float(m(x)[1].budget_loss.detach()) == 0.0
    m.set_budget(3.5)
    assert float(m(x)[1].budget_loss.detach()) > 0.0
