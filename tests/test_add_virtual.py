"""add_virtual (the virtual experts' terms of a layer's output) on CPU against reference.py:
values, gradients (fp64 gradcheck through the op's autograd), the codes and ids it must
ignore, NaN behind unused sources, edge shapes and input errors."""
from __future__ import annotations

import pytest
import torch

from anyexperts_ops import ops, reference
from conftest import assert_close, assert_exact, dispatch_to, rel_norm, virtual_inputs

ADD = torch.ops.anyexperts.add_virtual.default
BWD = torch.ops.anyexperts.add_virtual_backward.default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T,H,K", [(17, 12, 4), (1, 1, 1), (8, 33, 9)])
def test_matches_reference(T, H, K, dtype):
    args = virtual_inputs(T, H, K, 5, dtype=dtype)
    assert_close(ADD(*args), reference.add_virtual(*args), "out",
                 rtol=1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_round_once(dtype):
    args = virtual_inputs(20, 64, 6, 4, dtype=dtype)
    got = ADD(*args)
    assert got.dtype == dtype
    exact = reference.add_virtual(*[a.double() if isinstance(a, torch.Tensor) and
                                    a.is_floating_point() else a for a in args])
    assert rel_norm(got.double(), exact) < 1e-2
    # rounded once from the fp32 sum: equal to the reference, which also sums in fp32
    assert_exact(got, reference.add_virtual(*args), "rounding")


def test_codes_and_ids_it_must_ignore():
    """Only ids num_real + m with a copy code or a const row in range add anything."""
    out, x, ids, w, n, src, cv = virtual_inputs(30, 8, 5, 4)
    # every case below present whatever the draw: a token without a source, a copy, a const
    ids[0], ids[1, 0], ids[2, 0] = -1, n + 1, n + 2
    codes = reference.virtual_codes(ids, n, src, cv.shape[0])
    assert (codes == reference.VIRTUAL_COPY).any() and (codes >= 0).any()
    got = ADD(out, x, ids, w, n, src, cv)
    none = (codes == reference.VIRTUAL_ZERO).all(dim=1)
    assert none.any()
    assert_exact(got[none], out[none], "tokens without a source")
    for t in range(ids.shape[0]):
        want = out[t].double()
        for j in range(ids.shape[1]):
            m = int(ids[t, j]) - n
            if not 0 <= m < src.shape[0]:
                continue
            code = int(src[m])
            if code == -2:
                want = want + float(w[t, j]) * x[t].double()
            elif 0 <= code < cv.shape[0]:
                want = want + float(w[t, j]) * cv[code].double()
        assert_close(got[t].double(), want, f"token {t}")


def test_nan_behind_unused_sources_stays_out():
    out, x, ids, w, n, src, cv = virtual_inputs(12, 6, 4, 3)
    codes = reference.virtual_codes(ids, n, src, cv.shape[0])
    w = torch.where(codes == reference.VIRTUAL_ZERO, float("nan"), w)   # weights of no source
    no_copy = ~(codes == reference.VIRTUAL_COPY).any(dim=1)
    x = torch.where(no_copy.unsqueeze(1), float("nan"), x)                # x nobody copies
    cv = torch.cat([cv, torch.full_like(cv[:1], float("nan"))])           # row 2: no code uses it
    src = torch.where(src == 2, -1, src)
    args = (out, x, ids, w, n, src, cv)
    got = ADD(*args)
    assert torch.isfinite(got).all()
    assert_close(got, reference.add_virtual(*args), "out")
    gx, gw = BWD(torch.randn_like(out), x, ids, w, n, src, cv)
    assert torch.isfinite(gw).all() and torch.isfinite(gx[~no_copy]).all()


def test_nan_grad_reaches_only_copied_x():
    """grad_x[t] is exactly 0 for a token without a copy slot, even where grad[t] is NaN
    (x[t] took no part), and NaN where a copy slot carries the NaN: as reference autograd."""
    out, x, ids, w, n, src, cv = virtual_inputs(16, 5, 4, 3)
    codes = reference.virtual_codes(ids, n, src, cv.shape[0])
    copied = (codes == reference.VIRTUAL_COPY).any(dim=1)
    assert copied.any() and (~copied).any()
    nan_rows = torch.arange(16) % 2 == 0
    nan_rows[copied.nonzero()[0]] = nan_rows[(~copied).nonzero()[0]] = True  # one of each
    g = torch.where(nan_rows.unsqueeze(1), float("nan"), torch.randn_like(out))
    gx, _ = BWD(g, x, ids, w, n, src, cv)
    xr = x.clone().requires_grad_()
    reference.add_virtual(out, xr, ids, w, n, src, cv).backward(g)
    assert_close(gx, xr.grad, "grad_x", equal_nan=True)
    assert (gx[~copied] == 0).all()
    assert torch.isnan(gx[copied & nan_rows]).all()


def test_gradcheck_fp64():
    out, x, ids, w, n, src, cv = virtual_inputs(7, 5, 4, 3, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (out, x, w, cv)]

    def f(o, xx, ww, vv):
        return ops.add_virtual(o, xx, ids, ww, n, src, vv)

    assert torch.autograd.gradcheck(f, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference_autograd(dtype):
    args = virtual_inputs(25, 16, 5, 4, dtype=dtype)
    grads = []
    for fn in (ops.add_virtual, reference.add_virtual):
        out, x, ids, w, n, src, cv = [a.detach().clone().requires_grad_(i in (0, 1, 3, 6))
                                      if isinstance(a, torch.Tensor) else a
                                      for i, a in enumerate(args)]
        y = fn(out, x, ids, w, n, src, cv)
        g = torch.sin(torch.arange(y.numel(), dtype=torch.float32)).view_as(y).to(dtype)
        y.backward(g)
        grads.append([out.grad, x.grad, w.grad, cv.grad])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b in zip(("out", "x", "weights", "const_vectors"), *grads):
        assert a.dtype == b.dtype, name
        assert rel_norm(a.double(), b.double()) < tol, name


@pytest.mark.parametrize("need", [(0,), (1,), (3,), (6,), (3, 6), (1, 3), (0, 1, 3, 6)])
def test_gradient_only_for_inputs_that_need_it(need):
    """Each gradient asked for is the reference's, whichever others are asked for (the
    weights' gradient with x frozen included: a frozen importance predictor leaves x' without
    gradient while the router's weights still need theirs)."""
    args = virtual_inputs(20, 8, 5, 4, dtype=torch.float64)
    g = torch.randn(20, 8, dtype=torch.float64)
    grads = []
    for fn in (ops.add_virtual, reference.add_virtual):
        leaves = [a.detach().clone().requires_grad_(i in need) if isinstance(a, torch.Tensor)
                  else a for i, a in enumerate(args)]
        fn(*leaves).backward(g)
        grads.append([leaves[i].grad for i in (0, 1, 3, 6)])
    for i, a, b in zip((0, 1, 3, 6), *grads):
        if i in need:
            assert a is not None, f"argument {i}: no gradient"
            assert_close(a, b, f"grad of argument {i}", rtol=1e-10)
        else:
            assert a is None, f"argument {i}: a gradient nobody asked for"


@pytest.mark.parametrize("T,H,K,M,C", [(0, 4, 3, 7, 2), (5, 0, 3, 7, 2), (5, 4, 0, 7, 2),
                                       (5, 4, 3, 0, 2), (5, 4, 3, 7, 0)])
def test_empty_dims(T, H, K, M, C):
    out, x = torch.randn(T, H), torch.randn(T, H)
    ids = torch.full((T, K), 4, dtype=torch.int32)
    w = torch.rand(T, K)
    src = torch.tensor([-2, 0, 1, -1, -2, 1, 0][:M], dtype=torch.int32)
    cv = torch.randn(C, H)
    got = ADD(out, x, ids, w, 3, src, cv)
    assert_close(got, reference.add_virtual(out, x, ids, w, 3, src, cv), "out")
    gx, gw = BWD(torch.randn(T, H), x, ids, w, 3, src, cv)
    assert gx.shape == (T, H) and gw.shape == (T, K) and gw.dtype == torch.float32
    if M == 0 or K == 0:
        assert_exact(got, out, "nothing to add")
        assert (gx == 0).all()


def test_non_contiguous_inputs():
    out, x, ids, w, n, src, cv = virtual_inputs(9, 7, 4, 3)
    x_strided = torch.randn(9, 14)[:, ::2].copy_(x)
    assert not x_strided.is_contiguous()
    args = (out.t().contiguous().t(), x_strided, ids.t().contiguous().t(),
            w.t().contiguous().t(), n, src, cv.t().contiguous().t())
    assert_exact(ADD(*args), ADD(out, x, ids, w, n, src, cv), "strided")


def _bad(**change):
    args = dict(zip(("out", "x", "ids", "weights", "num_real", "sources", "const_vectors"),
                    virtual_inputs(4, 6, 3, 2)))
    args.update(change)
    return tuple(args.values())


@pytest.mark.parametrize("change,match", [
    (dict(x=torch.randn(4, 5)), "x must have out's shape"),
    (dict(x=torch.randn(4, 6, dtype=torch.float64)), "x and const_vectors must have out's dtype"),
    (dict(const_vectors=torch.randn(2, 5)), r"const_vectors must be \[C, 6\]"),
    (dict(const_vectors=torch.randn(2, 7)), r"const_vectors must be \[C, 6\]"),
    (dict(ids=torch.zeros(4, 3)), "ids must be int32"),
    (dict(ids=torch.zeros(5, 3, dtype=torch.int32)), "one row per token"),
    (dict(weights=torch.rand(4, 2)), "weights must have the shape of ids"),
    (dict(weights=torch.rand(4, 3, dtype=torch.float16)), "weights must be float32"),
    (dict(sources=torch.zeros(3)), "sources must be int32"),
    (dict(sources=torch.zeros(3, 1, dtype=torch.int32)), "sources must be 1-D"),
    (dict(out=torch.randn(4, 6).int()), "out must be float16, bfloat16, float32 or float64"),
    (dict(num_real=-1), "num_real must be in"),
    (dict(num_real=2**31), "num_real must be in"),
])
@pytest.mark.parametrize("to", ["kernel", "fake"])
def test_errors(change, match, to):
    """The kernel's checks, and message for message the fake implementation's (what
    torch.compile and meta tensors run), as tests/test_errors.py does for the other ops."""
    with pytest.raises(RuntimeError, match=match), dispatch_to(to):
        ADD(*_bad(**change))


def test_backward_errors_name_the_op():
    args = list(_bad())
    args[0] = torch.randn(4, 5)
    with pytest.raises(RuntimeError, match="add_virtual_backward: x must have grad's shape"):
        BWD(*args)
