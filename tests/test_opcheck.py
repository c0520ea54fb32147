"""torch.library.opcheck on every op, forward and backward ops, on CPU: schema, fake
(meta) implementation, autograd registration and AOT dispatch with dynamic shapes."""
from __future__ import annotations

import pytest
import torch

from conftest import random_ids, random_offsets, randint, routing_inputs, virtual_inputs

ops = torch.ops.anyexperts


def _topk_samples():
    for norm in ("none", "selected", "real"):
        logits, slots, mv = routing_inputs(9, 8, 4, wild=True)
        yield f"fp32-{norm}", (logits.requires_grad_(), slots, mv, 4, 6, norm)
    logits, slots, mv = routing_inputs(5, 6, 3, dtype=torch.bfloat16)
    yield "bf16", (logits.requires_grad_(), slots, mv, 3, 6, "selected")
    logits, slots, mv = routing_inputs(6, 5, 7, dtype=torch.float64)
    yield "fp64-kmax>E", (logits.requires_grad_(), slots, mv, 7, 3, "real")
    logits, slots, mv = routing_inputs(0, 5, 2)
    yield "T0", (logits, slots, mv, 2, 5, "none")


def _topk_backward_samples():
    for norm in ("none", "selected", "real"):
        logits, slots, mv = routing_inputs(7, 8, 4)
        ids, _ = ops.segmented_topk(logits, slots, mv, 4, 6, norm)
        yield norm, (torch.randn(7, 4), logits, ids, 6, norm)
    # non-contiguous logits: the output is contiguous all the same (the fake must say so)
    yield "strided-logits", (torch.randn(7, 4), logits.t().contiguous().t(), ids, 6, "selected")


def _permute_samples():
    for align in (1, 8):
        x = torch.randn(10, 6, requires_grad=True)
        yield f"align{align}", (x, random_ids(10, 3, 5), 5, align)
    yield "bf16", (torch.randn(4, 8, dtype=torch.bfloat16), random_ids(4, 2, 3), 3, 16)
    yield "T0", (torch.randn(0, 4), torch.zeros(0, 3, dtype=torch.int32), 2, 4)
    yield "no-real-experts", (torch.randn(5, 4, requires_grad=True), random_ids(5, 2, 1), 0, 4)


def _grouped_mm_samples():
    a = torch.randn(20, 8, requires_grad=True)
    b = torch.randn(3, 8, 5, requires_grad=True)
    yield "plain", (a, b, random_offsets(3, 20))
    bT = torch.randn(3, 5, 8, requires_grad=True).transpose(1, 2)
    yield "b-transposed-view", (torch.randn(20, 8, requires_grad=True), bT,
                                torch.tensor([4, 4, 15], dtype=torch.int32))
    yield "bf16", (torch.randn(16, 8, dtype=torch.bfloat16, requires_grad=True),
                   torch.randn(2, 8, 8, dtype=torch.bfloat16, requires_grad=True),
                   torch.tensor([8, 16], dtype=torch.int32))
    # one operand frozen: the other is then not saved (ops.py)
    yield "b-frozen", (torch.randn(20, 8, requires_grad=True), torch.randn(3, 8, 5),
                       random_offsets(3, 20))
    yield "a-frozen", (torch.randn(20, 8), torch.randn(3, 8, 5, requires_grad=True),
                       random_offsets(3, 20))


def _wgrad_samples():
    yield "plain", (torch.randn(20, 8), torch.randn(20, 5), random_offsets(3, 20))
    yield "empty", (torch.randn(6, 3), torch.randn(6, 2), torch.zeros(4, dtype=torch.int32))
    yield "a-needs-grad", (torch.randn(20, 8, requires_grad=True), torch.randn(20, 5),
                           random_offsets(3, 20))
    yield "dout-needs-grad", (torch.randn(20, 8), torch.randn(20, 5, requires_grad=True),
                              random_offsets(3, 20))


def _swiglu_samples():
    yield "fp32", (torch.randn(20, 8, requires_grad=True), random_offsets(3, 20))
    yield "bf16", (torch.randn(16, 16, dtype=torch.bfloat16, requires_grad=True),
                   torch.tensor([4, 4, 11], dtype=torch.int32))
    yield "fp64-no-groups-live", (torch.randn(6, 4, dtype=torch.float64, requires_grad=True),
                                  torch.zeros(2, dtype=torch.int32))


def _swiglu_backward_samples():
    yield "fp32", (torch.randn(20, 4), torch.randn(20, 8), random_offsets(3, 20))
    yield "bf16", (torch.randn(16, 8, dtype=torch.bfloat16),
                   torch.randn(16, 16, dtype=torch.bfloat16), torch.tensor([16], dtype=torch.int32))
    yield "strided-gu", (torch.randn(20, 4), torch.randn(8, 20).t(), random_offsets(3, 20))


def _hsm_samples():
    yield "fp32", (torch.randn(10, 6, requires_grad=True), torch.randn(10, requires_grad=True))
    yield "bf16", (torch.randn(8, 16, dtype=torch.bfloat16, requires_grad=True),
                   torch.randn(8, requires_grad=True))
    yield "fp64-x-fp32-a", (torch.randn(5, 7, dtype=torch.float64, requires_grad=True),
                            torch.randn(5, requires_grad=True))
    yield "strided-x", (torch.randn(9, 11)[:, 1:].requires_grad_(), torch.randn(9))
    yield "x-frozen", (torch.randn(10, 6), torch.randn(10, requires_grad=True))
    yield "T0", (torch.randn(0, 4), torch.randn(0))
    yield "H0", (torch.randn(3, 0), torch.randn(3))


def _hsm_backward_samples():
    yield "fp32", (torch.randn(10, 6), torch.randn(10, 6), torch.randn(10))
    yield "fp16", (torch.randn(4, 24, dtype=torch.float16), torch.randn(4, 24, dtype=torch.float16),
                   torch.randn(4))
    yield "fp64-x-fp32-a", (torch.randn(5, 7, dtype=torch.float64),
                            torch.randn(5, 7, dtype=torch.float64), torch.randn(5))
    yield "strided", (torch.randn(6, 10).t(), torch.randn(10, 8)[:, 2:], torch.randn(20)[::2])


def _unpermute_samples():
    rows = randint(-1, 29, (8, 3))
    yield "fp32", (torch.randn(30, 6, requires_grad=True), rows,
                   torch.randn(8, 3, requires_grad=True))
    yield "bf16", (torch.randn(30, 6, dtype=torch.bfloat16, requires_grad=True), rows,
                   torch.randn(8, 3, requires_grad=True))
    yield "fp64", (torch.randn(30, 6, dtype=torch.float64, requires_grad=True), rows,
                   torch.randn(8, 3, dtype=torch.float64, requires_grad=True))
    yield "weights-frozen", (torch.randn(30, 6, requires_grad=True), rows, torch.randn(8, 3))


def _unpermute_backward_samples():
    rows = randint(-1, 29, (8, 3))
    yield "fp32", (torch.randn(8, 6), torch.randn(30, 6), rows, torch.randn(8, 3))
    yield "bf16", (torch.randn(8, 6, dtype=torch.bfloat16),
                   torch.randn(30, 6, dtype=torch.bfloat16), rows, torch.randn(8, 3))
    yield "strided", (torch.randn(8, 6), torch.randn(6, 30).t(), rows, torch.randn(3, 8).t())


def _grad_args(args, which):
    return tuple(a.requires_grad_() if i in which else a for i, a in enumerate(args))


def _add_virtual_samples():
    yield "fp32", _grad_args(virtual_inputs(9, 6, 3, 4), (0, 1, 3, 6))
    yield "bf16", virtual_inputs(5, 8, 4, 3, dtype=torch.bfloat16)
    out, x, ids, w, n, src, cv = virtual_inputs(6, 5, 2, 4)
    yield "no-const", (out, x, ids, w, n, src, cv[:0])
    yield "fp16", virtual_inputs(5, 8, 3, 3, dtype=torch.float16)
    out, x, ids, w, n, src, cv = virtual_inputs(6, 5, 3, 4, dtype=torch.float64)
    yield "fp64-fp32-weights", _grad_args((out, x, ids, w.float(), n, src, cv), (0, 1, 3, 6))
    yield "weights-frozen", _grad_args(virtual_inputs(9, 6, 3, 4), (0, 1, 6))
    yield "T0", virtual_inputs(0, 4, 3, 2)
    yield "H0", virtual_inputs(4, 0, 3, 2)
    yield "K0", virtual_inputs(4, 6, 0, 2)


def _add_virtual_backward_samples():
    yield "fp32", virtual_inputs(9, 6, 3, 4)
    yield "bf16", virtual_inputs(5, 8, 4, 3, dtype=torch.bfloat16)
    out, x, ids, w, n, src, cv = virtual_inputs(6, 5, 3, 4)
    yield "strided", (out.t().contiguous().t(), x, ids, w, n, src, cv)
    out, x, ids, w, n, src, cv = virtual_inputs(6, 5, 3, 4, dtype=torch.float64)
    yield "fp64-fp32-weights", (out, x, ids, w.float(), n, src, cv)
    yield "T0", virtual_inputs(0, 4, 3, 2)


SAMPLERS = {
    "segmented_topk": _topk_samples,
    "segmented_topk_backward": _topk_backward_samples,
    "permute": _permute_samples,
    "grouped_mm": _grouped_mm_samples,
    "grouped_mm_wgrad": _wgrad_samples,
    "swiglu": _swiglu_samples,
    "swiglu_backward": _swiglu_backward_samples,
    "hsm": _hsm_samples,
    "hsm_backward": _hsm_backward_samples,
    "unpermute": _unpermute_samples,
    "unpermute_backward": _unpermute_backward_samples,
    "add_virtual": _add_virtual_samples,
    "add_virtual_backward": _add_virtual_backward_samples,
}


ALL_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
             "test_aot_dispatch_dynamic")


def _opcheck(name, label, args, test_utils=ALL_UTILS, kwargs=None):
    try:
        torch.library.opcheck(getattr(ops, name).default, args, kwargs,
                              test_utils=test_utils)
    except Exception as e:  # name the sample that failed
        raise AssertionError(f"opcheck {name} [{label}]: {e}") from e


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_opcheck(name):
    n = 0
    for label, args in SAMPLERS[name]():
        grad = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        if name == "segmented_topk" and grad:
            # opcheck's AOT backward check sums all outputs into one tensor starting from
            # the first; ids (int32) come first, so it fails in the harness itself
            # ("result type Float can't be cast to ... Long"). Run the other checks with
            # grad, AOT dispatch without grad; test_aot_autograd_segmented_topk covers
            # the backward under AOT.
            _opcheck(name, label, args, ALL_UTILS[:3])
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            _opcheck(name, label + "-nograd", args, ALL_UTILS[3:])
        else:
            _opcheck(name, label, args)
        n += 1
    assert n > 0


def _dead_row_samples():
    """(op, label, args, kwargs, dead rows?) with the dead-row flags off. Where every row is
    live the outputs are fully specified and every check runs, AOT dispatch included; where
    dead rows exist they are unspecified (eager and AOT may differ there), so AOT dispatch,
    which compares the two, is left out."""
    off_all = torch.tensor([5, 5, 12], dtype=torch.int32)          # R = 12: no dead row
    off_dead = torch.tensor([5, 5, 9], dtype=torch.int32)          # rows 9..11 dead
    ids_all = randint(0, 3, (6, 2))                                 # every slot live
    for label, ids in (("all-live", ids_all), ("dead", random_ids(6, 2, 4))):
        yield ("permute", label, (torch.randn(6, 5, requires_grad=True), ids, 4, 1),
               dict(zero_tail=False), label == "dead")
    for label, off in (("all-live", off_all), ("dead", off_dead)):
        dead = label == "dead"
        yield ("grouped_mm", label, (torch.randn(12, 8, requires_grad=True),
                                     torch.randn(3, 6, 8, requires_grad=True).transpose(1, 2),
                                     off), dict(zero_tail=False), dead)
        yield ("swiglu", label, (torch.randn(12, 8, requires_grad=True), off),
               dict(zero_tail=False), dead)
        yield ("swiglu_backward", label, (torch.randn(12, 4), torch.randn(12, 8), off),
               dict(zero_tail=False), dead)
    perm = torch.randperm(12, dtype=torch.int32).view(6, 2)             # every row referenced
    for label, rows in (("all-referenced", perm), ("dead", randint(-1, 11, (6, 2)))):
        dead = label == "dead"
        yield ("unpermute", label, (torch.randn(12, 5, requires_grad=True), rows,
                                    torch.randn(6, 2, requires_grad=True)),
               dict(zero_unreferenced=False), dead)
        yield ("unpermute_backward", label, (torch.randn(6, 5), torch.randn(12, 5), rows,
                                             torch.randn(6, 2)),
               dict(zero_unreferenced=False), dead)


def test_opcheck_dead_row_flags():
    seen = set()
    for name, label, args, kwargs, dead in _dead_row_samples():
        _opcheck(name, label + "-flag-off", args, ALL_UTILS[:3] if dead else ALL_UTILS, kwargs)
        seen.add(name)
    assert seen == {"permute", "grouped_mm", "swiglu", "swiglu_backward", "unpermute",
                    "unpermute_backward"}


@pytest.mark.parametrize("norm", ["none", "selected", "real"])
def test_aot_autograd_segmented_topk(norm):
    """The backward of segmented_topk through AOTAutograd with dynamic shapes equals eager."""
    logits0, slots, mv = routing_inputs(9, 8, 4, wild=True)
    # Rows with several real slots keep the gradient nonzero for every norm (with one real
    # slot, "real" and "selected" weights are the constant 1).
    slots[:3], mv[:3] = 4, 0
    gw = torch.randn(9, 4)

    def fn(logits, slots, mv):
        ids, w = ops.segmented_topk(logits, slots, mv, 4, 6, norm)
        return ids, (w * gw).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=True)
    res = []
    for f in (fn, compiled):
        logits = logits0.clone().requires_grad_()
        ids, loss = f(logits, slots, mv)
        loss.backward()
        res.append((ids, loss.detach(), logits.grad))
    assert torch.equal(res[0][0], res[1][0])
    torch.testing.assert_close(res[1][1], res[0][1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(res[1][2], res[0][2], rtol=1e-6, atol=1e-7)
    assert res[0][2].abs().sum() > 0


def test_compile_with_data_dependent_sizes():
    """Rows picked by a mask have sizes known only at run time (unbacked): the fakes' shape
    checks must become runtime asserts, not guards that fail to trace."""
    import anyexperts_ops as ae
    m1 = torch.tensor([True, False, True, True])
    m2 = torch.tensor([True, True, False, True])

    def fn(y, rows, w, out, x, ids, src, cv):
        a = ae.unpermute(y, rows[m1], w[m2])
        b = ae.add_virtual(out[m1], x[m2], ids[m1], w[m1], 4, src, cv)
        return a, b, ae.hsm(x[m1], w[m2][:, 0].contiguous())

    args = (torch.randn(6, 3), randint(0, 6, (4, 2)), torch.rand(4, 2), torch.randn(4, 3),
            torch.randn(4, 3), randint(0, 6, (4, 2)), torch.tensor([-2, 0], dtype=torch.int32),
            torch.randn(1, 3))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    for g, e in zip(got, fn(*args)):
        torch.testing.assert_close(g, e)


def test_every_op_is_checked():
    names = {op.split("::")[1] for op in torch._C._dispatch_get_all_op_names()
             if op.startswith("anyexperts::")}
    assert names == set(SAMPLERS), f"ops without opcheck samples: {names - set(SAMPLERS)}"
