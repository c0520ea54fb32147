"""config.recompute_activations: the backward recomputes x_perm (a permute) and the SwiGLU
output instead of keeping them from the forward (eager: saved-tensor hooks; torch.compile:
selective checkpoints). Same numbers, less memory held between forward and backward, no GEMM
run twice."""
from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from anyexperts_ops import presets
from anyexperts_ops.layer import AnyExpertsConfig, AnyExpertsMoE

DEVICES = pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                         reason="needs a CUDA GPU"))])

H, F, N = 64, 48, 8
CONFIGS = {
    # importance slots with zero/copy/const virtual experts, the budget controller on
    "anyexperts": lambda **kw: presets.anyexperts(H, F, N, num_virtual=4, k_min=2, k_max=6,
                                                  target_avg_k=4.0, **kw),
    "static_topk": lambda **kw: presets.static_topk(H, F, N, 2, **kw),
    "null_experts": lambda **kw: presets.null_experts(H, F, N, k=3, num_null=2, **kw),
}


def _pair(name, dtype, device, **kw):
    """The same layer (same weights) without and with recompute_activations."""
    torch.manual_seed(0)
    plain = AnyExpertsMoE(CONFIGS[name](**kw)).to(device=device, dtype=dtype)
    rc = copy.deepcopy(plain)
    rc.config.recompute_activations = True
    return plain, rc


def _step(m, x, wrap=None):
    out, aux = (wrap or (lambda m, x: m(x)))(m, x)
    target = torch.sin(torch.arange(out.numel(), device=out.device)).view_as(out)
    loss = (out.float() * target).sum()
    if aux.loss.requires_grad:  # not under reentrant checkpointing (README)
        loss = loss + aux.loss
    leaves = [x] + list(m.parameters())
    for t in leaves:
        t.grad = None
    loss.backward()  # not autograd.grad: reentrant checkpointing refuses it
    return out.detach(), [None if t.grad is None else t.grad.clone() for t in leaves]


def _assert_equal(got, want):
    (out, grads), (out_w, grads_w) = got, want
    assert torch.equal(out, out_w)
    for i, (g, gw) in enumerate(zip(grads, grads_w)):
        assert (g is None) == (gw is None), i
        assert g is None or torch.equal(g, gw), i


@DEVICES
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("T", [0, 1, 300])
def test_recompute_gives_the_same_numbers(name, dtype, align, T, device):
    """The recomputed permute and SwiGLU are deterministic, so outputs, every gradient and
    the controller's buffers are bitwise those of the layer that keeps them."""
    plain, rc = _pair(name, dtype, device, align=align)
    x = torch.randn(T, H, dtype=dtype, device=device, requires_grad=True)
    _assert_equal(_step(rc, x), _step(plain, x))
    for (n, b), (_, b_w) in zip(rc.named_buffers(), plain.named_buffers()):
        assert torch.equal(b, b_w), n


@DEVICES
def test_recompute_under_autocast(device):
    """fp32 weights, bf16 GEMMs: the recomputed casts of the activation rows give the same
    bits as the kept ones."""
    plain, rc = _pair("anyexperts", torch.float32, device, align=4)
    x = torch.randn(200, H, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        _assert_equal(_step(rc, x), _step(plain, x))


@DEVICES
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_recompute_inside_activation_checkpointing(use_reentrant, device):
    """Inside a user's checkpoint of the layer: a non-reentrant one has the layer keep
    everything (its hooks are on), a reentrant one re-runs the layer with its own hooks."""
    plain, rc = _pair("anyexperts", torch.float64, device)
    x = torch.randn(64, H, dtype=torch.float64, device=device, requires_grad=True)

    def ckpt(m, x):
        return checkpoint(m, x, use_reentrant=use_reentrant)

    _assert_equal(_step(rc, x, ckpt), _step(plain, x, ckpt))


def test_recompute_under_torch_compile():
    """fullgraph=True traces the selective checkpoints (aot_eager: the capture and the
    partitioning under test, without inductor's minutes of C++ codegen on a CPU): the same
    numbers, and the compiled forward holds x_perm and h no longer either."""
    torch._dynamo.reset()
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    x = torch.randn(96, H, requires_grad=True)
    compiled = torch.compile(rc, fullgraph=True, backend="aot_eager")
    _assert_equal(_step(compiled, x), _step(plain, x))
    compiled_plain = torch.compile(plain, fullgraph=True, backend="aot_eager")
    _step(compiled_plain, x)
    freed = _held_after_forward(compiled_plain, x) - _held_after_forward(compiled, x)
    expected = x.shape[0] * rc.config.k_max * (H + F) * x.element_size()
    assert abs(freed - expected) <= 0.02 * expected, (freed, expected)
    torch._dynamo.reset()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "anyexperts":
            self.calls[func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _backward_calls(m, x):
    out, aux = m(x)
    with _OpCounter() as counter:
        (out.square().sum() + aux.loss).backward()
    return counter.calls


def test_recompute_reruns_permute_and_swiglu_only():
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    x = torch.randn(100, H, requires_grad=True)
    want, got = _backward_calls(plain, x), _backward_calls(rc, x)
    assert got - want == collections.Counter({"permute": 1, "swiglu": 1})
    assert want - got == collections.Counter()


def _held_after_forward(m, x):
    """Bytes allocated by the forward and still held when it returns (the output and what
    autograd keeps for the backward), from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out, aux = m(x)
    held = 0
    for e in prof.events():  # an op's own allocations, and frees (events of their own)
        held += e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
    del out, aux
    return held


@pytest.mark.parametrize("autocast", [False, True])
def test_recompute_holds_x_perm_and_h_no_longer(autocast):
    """What the forward leaves for the backward shrinks by x_perm [R, H] and h [R, F],
    R = T * K_max, in the GEMMs' dtype, and by nothing more (what else would be recomputed
    is kept). Under autocast (an fp32 layer, bf16 GEMMs) the bf16 casts of x_perm are what
    the GEMM kept; the recompute keeps the fp32 x' [T, H] it permutes instead (without
    autocast the virtual experts keep that tensor anyway)."""
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    T = 512
    x = torch.randn(T, H, requires_grad=True)
    R = T * rc.config.k_max
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        freed = _held_after_forward(plain, x) - _held_after_forward(rc, x)
    gemm_bytes = 2 if autocast else 4
    expected = R * (H + F) * gemm_bytes - (T * H * 4 if autocast else 0)
    assert abs(freed - expected) <= 0.02 * expected, (freed, expected)


@pytest.mark.parametrize("around", ["checkpoint", "saved_tensors_hooks"])
def test_recompute_steps_aside_under_saved_tensor_hooks(around):
    """An enclosing non-reentrant checkpoint drops everything the layer saves, and offloading
    hooks move it; the recompute's own hooks would keep tensors alive past both (the inputs
    they remake from), so the layer keeps everything there, as without the option."""
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    x = torch.randn(512, H, requires_grad=True)

    def held(m):
        if around == "checkpoint":
            return _held_after_forward(lambda x: checkpoint(m, x, use_reentrant=False), x)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            return _held_after_forward(m, x)

    assert held(rc) == held(plain)
    assert _held_after_forward(rc, x) < _held_after_forward(plain, x)  # and without: less
    wrap = ((lambda m, x: checkpoint(m, x, use_reentrant=False)) if around == "checkpoint"
            else None)
    _assert_equal(_step(rc, x, wrap), _step(plain, x, wrap))


def test_recompute_detects_inplace_changes():
    """Saved-tensor hooks turn off autograd's check of saved tensors' versions; the recompute
    checks them itself: a weight, or x' (which the recompute reads again), changed in place
    between forward and backward raises autograd's error instead of giving wrong gradients."""
    for change in ("weight", "input"):
        torch.manual_seed(0)
        # static top-K in bf16 with an fp32 router: nothing but the recompute keeps x
        m = AnyExpertsMoE(presets.static_topk(H, F, N, 2, recompute_activations=True,
                                              router_dtype="float32"), dtype=torch.bfloat16)
        x = torch.randn(30, H, dtype=torch.bfloat16, requires_grad=True).clone()
        out, _ = m(x)
        with torch.no_grad():
            (m.w_down if change == "weight" else x).mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.float().square().sum().backward()


def test_recompute_keeps_h_where_gu_is_kept_for_it_alone():
    """Only w_down trains: nothing keeps gate|up [R, 2F] but the recipe for h [R, F], so the
    layer keeps h, as without the option, and holds the same bytes."""
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    for m in (plain, rc):
        for name, p in m.named_parameters():
            p.requires_grad_(name == "w_down")
    x = torch.randn(256, H)
    assert _held_after_forward(rc, x) == _held_after_forward(plain, x)
    _assert_equal(_step(rc, x.requires_grad_(True)), _step(plain, x))


def test_recompute_under_disabled_saved_tensor_hooks():
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    x = torch.randn(40, H, requires_grad=True)
    with torch.autograd.graph.disable_saved_tensors_hooks("no hooks here"):
        _assert_equal(_step(rc, x), _step(plain, x))


@pytest.mark.parametrize("compiled", [False, True])
def test_recompute_backward_twice(compiled):
    """A retained graph backpropagates again: the dropped activations are made again each
    time (eager), or the compiled backward recomputes them again."""
    _, rc = _pair("anyexperts", torch.float32, "cpu")
    torch._dynamo.reset()
    m = torch.compile(rc, fullgraph=True, backend="aot_eager") if compiled else rc
    out, aux = m(torch.randn(20, H, requires_grad=True))
    loss = out.square().sum()
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in rc.parameters()]
    loss.backward()
    for p, g in zip(rc.parameters(), once):
        assert torch.equal(p.grad, 2 * g)
    torch._dynamo.reset()


def test_recompute_off_the_training_path():
    """No graph (no_grad, eval inference): nothing to recompute, nothing checkpointed; the
    reference backend keeps everything (its ops are not the ones the policy names)."""
    plain, rc = _pair("anyexperts", torch.float32, "cpu")
    x = torch.randn(50, H)
    with torch.no_grad():
        assert torch.equal(rc.eval()(x)[0], plain.eval()(x)[0])
    plain.train().backend = rc.train().backend = "reference"
    x.requires_grad_(True)
    _assert_equal(_step(rc, x), _step(plain, x))


def test_recompute_must_be_a_bool():
    with pytest.raises(ValueError, match="recompute_activations must be"):
        AnyExpertsConfig(H, F, N, recompute_activations=1)
