"""config.router_dtype="float32": the router and the importance predictor keep fp32
parameters and compute in fp32 in a bf16/fp16 layer and under autocast, so the routing is
that of an fp32 layer on the same hidden states."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch._functorch.config

from anyexperts_ops import presets
from anyexperts_ops.layer import AnyExpertsConfig, AnyExpertsMoE

DEVICES = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])

H, F, N = 64, 48, 16


def _anyexperts(**kw):
    return presets.anyexperts(H, F, N, num_virtual=4, k_min=2, k_max=8, target_avg_k=4.0,
                              **kw)


def _routing_dtypes(m):
    mods = [m.router] + ([m.importance] if m.importance is not None else [])
    return {p.dtype for mod in mods for p in mod.parameters()}


def test_routing_modules_stay_at_fp32_or_above_through_conversions():
    def build(convert=None, **kw):
        m = AnyExpertsMoE(_anyexperts(router_dtype="float32"), **kw)
        return convert(m) if convert else m

    for m in (build(dtype=torch.bfloat16), build(lambda m: m.to(torch.bfloat16)),
              build(lambda m: m.half()), build(lambda m: m.type(torch.bfloat16)),
              build(lambda m: m.double().half())):
        assert _routing_dtypes(m) == {torch.float32}
        assert m.w_gate_up.dtype in (torch.bfloat16, torch.float16)
        assert m.const_vectors.dtype == m.w_gate_up.dtype
        assert list(dict(m.named_modules())) == list(dict(
            AnyExpertsMoE(_anyexperts()).named_modules()))  # order kept
    # fp64 layers route in fp64 (an fp64 gradcheck goes through the router)
    for m in (build(dtype=torch.float64), build(lambda m: m.double())):
        assert _routing_dtypes(m) == {torch.float64} and m.w_gate_up.dtype == torch.float64
    plain = AnyExpertsMoE(_anyexperts()).to(torch.bfloat16)  # without it, as before
    assert _routing_dtypes(plain) == {torch.bfloat16}


def test_fp64_layer_gradcheck_through_the_router():
    torch.manual_seed(0)
    m = AnyExpertsMoE(presets.static_topk(8, 6, 4, 2, router_dtype="float32",
                                          load_balance_coef=0.0)).double()
    x = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    w = m.router.weight
    assert torch.autograd.gradcheck(
        lambda x, w: torch.func.functional_call(m, {"router.weight": w}, (x,))[0], (x, w))


@DEVICES
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", sorted(presets.PRESETS))
def test_half_layer_routes_as_fp32(config, dtype, device):
    """The routing (importance, slots, logits, ids, weights) of a half-precision layer is the
    fp32 layer's on the same inputs, bit for bit: the router reads x' = x + alpha w x
    unrounded. A half-precision router picks other experts for some tokens (which is what
    the option is for)."""
    torch.manual_seed(0)
    cfg = (_anyexperts() if config == "anyexperts" else
           presets.make_config(config, H, F, N, **({"k": 4} if config == "static_topk" else {})))
    m32 = AnyExpertsMoE(cfg).to(device).eval()
    x = torch.randn(4096, H, device=device).to(dtype)
    with torch.no_grad():
        want = m32(x.float())[1].routing
        fixed = copy.deepcopy(m32)
        fixed.config.router_dtype = "float32"
        got = fixed.to(dtype)(x)[1].routing
        low = copy.deepcopy(m32).to(dtype)(x)[1].routing
    assert got.logits.dtype == torch.float32
    for name in ("importance", "slots", "logits", "ids", "weights"):
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert not torch.equal(low.ids, want.ids)


@DEVICES
def test_fp32_routing_under_autocast(device):
    """Under autocast the routing modules run with autocast off: fp32 logits and scores,
    bit for bit; the expert GEMMs still follow autocast."""
    torch.manual_seed(0)
    m = AnyExpertsMoE(_anyexperts(router_dtype="float32")).to(device)
    plain = copy.deepcopy(m)
    plain.config.router_dtype = None
    x = torch.randn(300, H, device=device)
    with torch.no_grad():
        want = m(x)[1].routing
        with torch.autocast(device, dtype=torch.bfloat16):
            out, aux = m(x)
            low = plain(x)[1].routing
    assert out.dtype == torch.bfloat16
    assert torch.equal(aux.routing.importance, want.importance)
    assert torch.equal(aux.routing.logits, want.logits)
    assert not torch.equal(low.logits, want.logits)


@DEVICES
def test_gradients_reach_each_parameter_in_its_dtype(device):
    torch.manual_seed(0)
    m = AnyExpertsMoE(_anyexperts(router_dtype="float32"), device=device, dtype=torch.bfloat16)
    ref = AnyExpertsMoE(_anyexperts(), device=device, dtype=torch.float64)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(200, H, device=device)
    inputs = (x.bfloat16().requires_grad_(True), x.double().requires_grad_(True))
    for layer, inp in zip((m, ref), inputs):
        out, aux = layer(inp)
        (out.float().square().sum() + aux.loss).backward()
    assert inputs[0].grad.dtype == torch.bfloat16 and m.w_gate_up.grad.dtype == torch.bfloat16
    for name, p in m.named_parameters():
        assert p.grad.dtype == p.dtype, name
    # the router's gradient is near the fp64 layer's (bf16 experts: ~1e-2)
    g, g_ref = m.router.weight.grad.double(), ref.router.weight.grad
    assert float((g - g_ref).norm() / g_ref.norm()) < 5e-2


def test_state_dict_round_trip_and_assign_load():
    torch.manual_seed(0)
    m = AnyExpertsMoE(_anyexperts(router_dtype="float32"), dtype=torch.bfloat16)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert sd["router.weight"].dtype == torch.float32
    # a checkpoint saved all in bf16, loaded with assign=True into a meta-built layer: the
    # routing modules come back to fp32
    low = {k: v.bfloat16() if v.is_floating_point() and v.dim() > 0 else v
           for k, v in sd.items()}
    with torch.device("meta"):
        meta = AnyExpertsMoE(_anyexperts(router_dtype="float32"), dtype=torch.bfloat16)
    meta.load_state_dict(low, assign=True)
    assert _routing_dtypes(meta) == {torch.float32}
    assert torch.equal(meta.router.weight, low["router.weight"].float())
    out, _ = meta.eval()(torch.randn(10, H, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_calibration_and_compile_with_fp32_routing():
    torch.manual_seed(0)
    m = AnyExpertsMoE(_anyexperts(router_dtype="float32"), dtype=torch.bfloat16)
    x = torch.randn(512, H, dtype=torch.bfloat16)
    reached = m.eval().set_budget(4.0, x)
    assert abs(reached - 4.0) <= 0.04
    torch._dynamo.reset()
    m.train()
    twin = copy.deepcopy(m)
    xg = x.clone().requires_grad_(True)
    out, aux = torch.compile(m, fullgraph=True, backend="aot_eager")(xg)
    (out.float().sum() + aux.loss).backward()
    out0, aux0 = twin(xg)
    (out0.float().sum() + aux0.loss).backward()
    assert torch.equal(out, out0)
    assert torch.equal(m.router.weight.grad, twin.router.weight.grad)
    torch._dynamo.reset()


def test_compile_under_autocast_with_eager_backward_autocast():
    """torch.compile runs the backward under the forward's autocast by default
    (backward_pass_autocast="same_as_forward"), which puts the fp32 routing modules' backward
    GEMMs in bf16; with "off" (README) the compiled layer's gradients are the eager ones."""
    torch.manual_seed(0)
    m = AnyExpertsMoE(_anyexperts(router_dtype="float32"))
    twin = copy.deepcopy(m)
    x = torch.randn(256, H)
    torch._dynamo.reset()
    with torch._functorch.config.patch(backward_pass_autocast="off"):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        for layer in (compiled, twin):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, aux = layer(x)
            (out.float().sum() + aux.loss).backward()
    torch._dynamo.reset()
    for (n, p), (_, q) in zip(m.named_parameters(), twin.named_parameters()):
        assert torch.equal(p.grad, q.grad), n


def test_routing_follows_the_routers_dtype_whatever_the_config():
    """An fp32 router in a layer built without router_dtype (assign-loaded from a checkpoint
    saved with it, or sharded under another precision) routes in its own dtype instead of
    failing on mixed dtypes."""
    torch.manual_seed(0)
    saved = AnyExpertsMoE(_anyexperts(router_dtype="float32"), dtype=torch.bfloat16)
    with torch.device("meta"):
        m = AnyExpertsMoE(_anyexperts(), dtype=torch.bfloat16)
    m.load_state_dict(saved.state_dict(), assign=True)
    assert _routing_dtypes(m) == {torch.float32}
    x = torch.randn(64, H, dtype=torch.bfloat16)
    with torch.no_grad():
        got, want = m.eval()(x)[1].routing, saved.eval()(x)[1].routing
    assert torch.equal(got.logits, want.logits) and torch.equal(got.ids, want.ids)


def test_router_dtype_values():
    with pytest.raises(ValueError, match="router_dtype must be in"):
        AnyExpertsConfig(H, F, N, router_dtype="bfloat16")
