"""The layer with PyTorch's training machinery: meta-device construction, state_dict loads,
dtype conversion, activation checkpointing."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from anyexperts_ops import presets
from anyexperts_ops.layer import AnyExpertsMoE
from test_layer import FFN, H, _close, _layer


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def _on_meta(config):
    with torch.device("meta"):
        return AnyExpertsMoE(copy.deepcopy(config))


def test_meta_then_to_empty_and_reset_parameters_is_a_fresh_layer():
    ref = _layer(target_avg_k=3.0)
    m = _on_meta(ref.config).to_empty(device="cpu")
    for name in ("_virtual_sources", "_virtual_caps", "importance_bias", "avg_real_ema"):
        getattr(m, name).fill_(1000)  # what to_empty may leave there
    m.reset_parameters()
    assert _tables(m) == _tables(ref)
    assert float(m.importance_bias) == 0.0 and float(m.avg_real_ema) == 0.0
    assert float(m.budget_target) == 3.0
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


def test_dtype_conversion_keeps_the_controller_state_exact():
    m = _trained()
    m.set_budget(3.3)
    before = {n: b.clone() for n, b in m.named_buffers()}
    order = list(dict(m.named_buffers()))
    for convert in (lambda l: l.to(torch.bfloat16), lambda l: l.half(), lambda l: l.double()):
        c = convert(copy.deepcopy(m))
        assert list(dict(c.named_buffers())) == order
        for n, b in c.named_buffers():
            assert b.dtype == before[n].dtype and torch.equal(b, before[n]), n
        assert c.w_gate_up.dtype != torch.float32


def _step(m, x, wrap):
    out, aux = wrap(m, x)
    target = torch.sin(torch.arange(out.numel(), dtype=out.dtype)).view_as(out)
    ((out * target).sum() + aux.loss).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_routes_as_the_first_run(use_reentrant):
    """The recompute runs after the controller moved the bias: it must route with the bias
    the first run used, and not step the controller again."""
    m = _trained()
    with torch.no_grad():
        m.importance_bias.fill_(0.3)  # far from the target: the controller takes a big step
    m_ckpt = copy.deepcopy(m)
    x = torch.randn(64, H, requires_grad=True)

    def plain(layer, x):
        return layer(x)

    def ckpt(layer, x):
        return checkpoint(layer, x, use_reentrant=use_reentrant)

    g = _step(m, x, plain)
    g_ckpt = _step(m_ckpt, x, ckpt)
    assert g.keys() == g_ckpt.keys()
    for n in g:
        # the same routing; reentrant checkpointing sums the gradients in another order
        _close(g_ckpt[n], g[n], n, rtol=1e-4)
    assert float(m.importance_bias) != 0.3  # the controller did step
    for n in ("importance_bias", "avg_real_ema"):
        assert torch.equal(getattr(m_ckpt, n), getattr(m, n)), n


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
