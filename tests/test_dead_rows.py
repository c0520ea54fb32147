"""The dead-row flags: zero_tail=False (permute, grouped_mm, swiglu and their gradients) and
zero_unreferenced=False (unpermute's backward) leave rows unwritten that no op of the
layer's chain reads. What must hold: every row the flags keep specified is bit-identical to
the default call, and no op reads a dead row, forward or backward, which is checked by
filling the dead rows with NaN (inputs, and gradients through hooks) and requiring the
same results. Runs on the CPU, and on CUDA when present (bf16 there, so that an H100 runs
the SM90 kernels)."""
from __future__ import annotations

import copy
from fractions import Fraction

import pytest
import torch

import anyexperts_ops.ops as ae_ops
from anyexperts_ops import AnyExpertsMoE, presets
from anyexperts_ops import reference as ref
from conftest import (assert_exact, assert_rel_norm, poison_allocator, random_ids,
                      random_offsets)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def _nan_rows_from(t: torch.Tensor, live: int) -> torch.Tensor:
    t = t.detach().clone()
    t[live:] = float("nan")
    return t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("align", [1, 8])
def test_permute(device, align):
    T, K, N, H = 300, 6, 16, 64
    x = torch.randn(T, H, device=device, dtype=_dtype(device))
    ids = random_ids(T, K, N, masked=0.5).to(device)
    want = ae_ops.permute(x, ids, N, align)
    poison_allocator((want[0].shape, x.dtype), device=device)
    got = ae_ops.permute(x, ids, N, align, zero_tail=False)
    live = ref.live_rows(want[1], want[0].shape[0])
    assert live < want[0].shape[0], "the sample must have dead rows"
    assert_exact(got[0][:live], want[0][:live], "x_perm live and padding rows")
    assert_exact(got[1], want[1], "offsets")
    assert_exact(got[2], want[2], "slot_rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transposed_b", [False, True], ids=["b", "bT"])
def test_grouped_mm_forward_and_gradients(device, transposed_b):
    R, Kd, Nd, G = 400, 64, 48, 5
    dt = _dtype(device)
    offsets = random_offsets(G, R).to(device)
    live = ref.live_rows(offsets, R)
    assert live < R
    a = torch.randn(R, Kd, device=device, dtype=dt)
    b = (torch.randn(G, Nd, Kd, device=device, dtype=dt).transpose(1, 2) if transposed_b
         else torch.randn(G, Kd, Nd, device=device, dtype=dt))
    dout = torch.randn(R, Nd, device=device, dtype=dt)

    def run(a, dout, zero_tail):
        a = a.clone().requires_grad_(True)
        bb = b.detach().clone().requires_grad_(True)
        out = ae_ops.grouped_mm(a, bb, offsets, zero_tail=zero_tail)
        out.backward(dout)
        return out.detach(), a.grad, bb.grad

    want = run(a, dout, True)
    poison_allocator(((R, Nd), dt), ((R, Kd), dt), device=device)
    got = run(_nan_rows_from(a, live), _nan_rows_from(dout, live), False)
    assert_exact(got[0][:live], want[0][:live], "out live rows")
    assert_exact(got[1][:live], want[1][:live], "grad a live rows")
    assert_exact(got[2], want[2], "grad b (reads live rows only)")


@pytest.mark.parametrize("device", DEVICES)
def test_swiglu_forward_and_gradient(device):
    R, F, G = 333, 40, 4
    dt = _dtype(device)
    offsets = random_offsets(G, R).to(device)
    live = ref.live_rows(offsets, R)
    gu = torch.randn(R, 2 * F, device=device, dtype=dt)
    dh = torch.randn(R, F, device=device, dtype=dt)

    def run(gu, dh, zero_tail):
        gu = gu.clone().requires_grad_(True)
        h = ae_ops.swiglu(gu, offsets, zero_tail=zero_tail)
        h.backward(dh)
        return h.detach(), gu.grad

    want = run(gu, dh, True)
    poison_allocator(((R, F), dt), ((R, 2 * F), dt), device=device)
    got = run(_nan_rows_from(gu, live), _nan_rows_from(dh, live), False)
    assert_exact(got[0][:live], want[0][:live], "h live rows")
    assert_exact(got[1][:live], want[1][:live], "grad gu live rows")


@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_backward(device):
    T, K, N, H = 200, 4, 8, 32
    dt = _dtype(device)
    x = torch.randn(T, H, device=device, dtype=dt)
    _, _, slot_rows = ae_ops.permute(x, random_ids(T, K, N, masked=0.4).to(device), N, 1)
    R = T * K
    y = torch.randn(R, H, device=device, dtype=dt)
    w = torch.rand(T, K, device=device)
    g = torch.randn(T, H, device=device, dtype=dt)
    want = torch.ops.anyexperts.unpermute_backward(g, y, slot_rows, w)
    poison_allocator(((R, H), dt), device=device)
    got = torch.ops.anyexperts.unpermute_backward(g, y, slot_rows, w, zero_unreferenced=False)
    referenced = slot_rows[slot_rows >= 0].long()
    assert referenced.numel() < R
    assert_exact(got[0][referenced], want[0][referenced], "grad y referenced rows")
    assert_exact(got[1], want[1], "grad weights")
    # forward: the flag concerns the backward only
    assert_exact(ae_ops.unpermute(y, slot_rows, w, zero_unreferenced=False),
                 ae_ops.unpermute(y, slot_rows, w), "forward")


class _Backend:
    """The layer's op backend (AnyExpertsMoE._B) with the dead-row flags forced on
    (``zero=True``: the contract's zeros, the reference run), or with ``poison=True``
    every dead row of the expert chain set to NaN: the outputs of permute, both grouped_mm
    and swiglu past the last group, and, through hooks, the gradients that flow back into
    those ops past it (what an unwritten gradient row may hold). A chain that read any of
    them would turn the layer's results into NaN. The hook on y also checks that the rows
    of grad y that the GEMMs read but no slot refers to (align > 1 padding) are zero."""

    def __init__(self, zero=False, poison=False):
        self.zero, self.poison = zero, poison
        self.live = self.slot_rows = None
        self._gemm = 0

    def __getattr__(self, name):
        return getattr(ae_ops, name)

    def _kw(self, kw):
        return {k: True for k in kw} if self.zero else kw

    def _poison(self, t, check_padding=False):
        if not self.poison:
            return t
        live, slot_rows = self.live, self.slot_rows

        def grad_hook(g):
            if check_padding:
                unreferenced = torch.ones(live, dtype=torch.bool, device=g.device)
                rows = slot_rows[slot_rows >= 0].long()
                unreferenced[rows[rows < live]] = False
                assert not g[:live][unreferenced].any(), "padding rows of grad y not zero"
            g = g.clone()
            g[live:] = float("nan")
            return g

        if t.requires_grad:
            t.register_hook(grad_hook)
        mask = torch.arange(t.shape[0], device=t.device).unsqueeze(1) >= live
        return torch.where(mask, torch.full_like(t, float("nan")), t)

    def permute(self, x, ids, num_real, align, **kw):
        x_perm, offsets, slot_rows = ae_ops.permute(x, ids, num_real, align, **self._kw(kw))
        self.live, self.slot_rows = ref.live_rows(offsets, x_perm.shape[0]), slot_rows
        self._gemm = 0
        return self._poison(x_perm), offsets, slot_rows

    def grouped_mm(self, a, b, offsets, **kw):
        self._gemm += 1
        return self._poison(ae_ops.grouped_mm(a, b, offsets, **self._kw(kw)),
                            check_padding=self._gemm == 2)

    def swiglu(self, gu, offsets, **kw):
        return self._poison(ae_ops.swiglu(gu, offsets, **self._kw(kw)))

    def unpermute(self, y, slot_rows, weights, **kw):
        return ae_ops.unpermute(y, slot_rows, weights, **self._kw(kw))


def _small_layer(device, align):
    cfg = presets.anyexperts(64, 96, 8, num_virtual=2, virtual_kinds=("zero", "copy"),
                             k_min=1, k_max=6, align=align, rho_max=Fraction(1, 2),
                             target_avg_k=None)
    m = AnyExpertsMoE(cfg).to(device=device, dtype=_dtype(device))
    with torch.no_grad():
        m.importance.net[-1].weight.mul_(8.0)   # K_i over the whole range: many dead rows
    return m


def _fwd_bwd(layer, x0):
    x = x0.clone().requires_grad_(True)
    out, aux = layer(x)
    (out.float().sin().sum() + aux.loss).backward()
    return [out.detach(), x.grad] + [p.grad for p in layer.parameters()]


def _with_backend(layer, backend, monkeypatch):
    monkeypatch.setattr(AnyExpertsMoE, "_B", property(lambda self: backend))
    try:
        return _fwd_bwd(layer, layer._x0)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("align", [1, 4])
def test_layer_same_results_and_never_reads_dead_rows(device, align, monkeypatch):
    m = _small_layer(device, align)
    m._x0 = torch.randn(150, 64, device=device, dtype=_dtype(device))
    zeroed = _with_backend(copy.deepcopy(m), _Backend(zero=True), monkeypatch)
    default = _fwd_bwd(m, m._x0)
    poison = _Backend(poison=True)
    poisoned = _with_backend(copy.deepcopy(m), poison, monkeypatch)
    assert poison.live is not None and poison.live < 150 * 6, "no dead rows were poisoned"
    for run, results in (("default flags", default), ("poisoned dead rows", poisoned)):
        for i, (g, w) in enumerate(zip(results, zeroed)):
            what = f"{run}, result {i} (0: out, 1: grad x, then parameter grads)"
            if device == "cpu":
                assert_exact(g, w, what)
            else:  # a NaN read anywhere would show; atomics in torch ops may reorder sums
                assert_rel_norm(g, w, what, tol=1e-3)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_layer_zeroes_dead_rows_under_anomaly_mode(monkeypatch):
    """Anomaly mode checks every gradient for NaN, unwritten rows included."""
    seen = []

    class Recorder(_Backend):
        def grouped_mm(self, a, b, offsets, **kw):
            seen.append(kw)
            return super().grouped_mm(a, b, offsets, **kw)

    m = _small_layer("cpu", 1)
    m._x0 = torch.randn(20, 64)
    with torch.autograd.detect_anomaly():
        _with_backend(m, Recorder(), monkeypatch)
    _with_backend(m, Recorder(), monkeypatch)
    assert seen == [dict(zero_tail=True)] * 2 + [dict(zero_tail=False)] * 2


@pytest.mark.parametrize("op,flag", [("permute", "zero_tail"), ("grouped_mm", "zero_tail"),
                                     ("swiglu", "zero_tail"), ("swiglu_backward", "zero_tail"),
                                     ("unpermute", "zero_unreferenced"),
                                     ("unpermute_backward", "zero_unreferenced")])
def test_flags_are_keyword_only_and_default_to_the_contract(op, flag):
    """The dead-row flags are keyword-only and default to true: a caller that passes nothing
    gets DESIGN.md's zeros (the CPU kernels zero some of them regardless, so the schema is
    where a wrong default would show on every device)."""
    (arg,) = [a for a in getattr(torch.ops.anyexperts, op).default._schema.arguments
              if a.name == flag]
    assert arg.kwarg_only and arg.default_value is True
