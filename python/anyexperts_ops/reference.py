"""Pure-PyTorch reference of the op contract (DESIGN.md section 3).

This module is the executable form of the contract: every kernel, CPU and CUDA, is
tested against it. It favours plain loops and obvious tensor code over speed, and never
calls ``torch.ops.anyexperts``. Autograd flows through it with ordinary PyTorch ops,
so it also serves as the gradient reference.

The ``zero_tail`` / ``zero_unreferenced`` flags are accepted and ignored: with them false
the kernels leave the dead rows unspecified, and zeros are one valid value of those rows;
tests compare only the rows the flags keep specified.
"""
from __future__ import annotations

import functools
import inspect

import torch

NORMS = ("none", "selected", "real")
# The dtypes autocast casts between (it leaves float64 alone): the rule of _autocast_rule,
# which ops.py registers for the kernels and the layer's input check follows.
AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def autocast_enabled(device_type: str) -> bool:
    """Whether a torch.autocast region is on for this device type (only cpu and cuda have one
    that the ops follow)."""
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    """Accumulation type: fp32, or fp64 for fp64 inputs (so gradcheck can run in fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _connected(out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """out - 0 drawn from empty slices of the inputs: the same values, but autograd links out
    to every input even when no element was used (T = 0, all slots masked), so backward
    yields zero gradients as the kernels do. Subtracting +0 keeps a -0.0 (adding would not)."""
    for t in inputs:
        out = out - t.flatten()[:0].sum().to(out.dtype)
    return out


def _autocast_rule(lower_precision: int = 0):
    """What the ops do in a torch.autocast region: the kernels do not consult autocast, so the
    op runs with it off, except that the grouped GEMMs first cast their float32, float16 and
    bfloat16 operands (the first `lower_precision` arguments) to the region's dtype, as
    torch.mm does (ops.py registers that rule; float64 is left alone)."""
    def wrap(fn):
        signature = inspect.signature(fn)
        operands = list(signature.parameters)[:lower_precision]

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            device = next(iter(bound.arguments.values())).device.type
            if not autocast_enabled(device):
                return fn(*args, **kwargs)
            dtype = torch.get_autocast_dtype(device)
            for name in operands:
                if bound.arguments[name].dtype in AUTOCAST_DTYPES:
                    bound.arguments[name] = bound.arguments[name].to(dtype)
            with torch.autocast(device, enabled=False):
                return fn(*bound.args, **bound.kwargs)
        return run
    return wrap


def padded_count(count: int, align: int) -> int:
    return (count + align - 1) // align * align


def ranking(row: torch.Tensor) -> list[int]:
    """Candidate order: logit descending, ties to the lower index, NaN below every number."""
    vals = row.tolist()

    def key(i: int):
        v = vals[i]
        is_nan = v != v
        return (is_nan, 0.0 if is_nan else -v, i)

    return sorted(range(len(vals)), key=key)


@_autocast_rule()
def segmented_topk(logits: torch.Tensor, slots: torch.Tensor, max_virtual: torch.Tensor,
                   k_max: int, num_real: int, norm: str = "none"):
    """ids[T,k_max] int32 and weights[T,k_max] (fp32; fp64 for fp64 logits)."""
    assert norm in NORMS, norm
    T, E = logits.shape
    lg = logits.to(_opmath(logits.dtype))
    p = torch.softmax(lg, dim=-1)
    ids = torch.full((T, k_max), -1, dtype=torch.int32)
    taken = []  # per token: list of (slot j, candidate)
    for t in range(T):
        want = min(max(int(slots[t]), 0), k_max)
        cap = min(max(int(max_virtual[t]), 0), want)
        chosen, n_virtual = [], 0
        for c in ranking(logits[t].detach().cpu().double()):
            if len(chosen) == want:
                break
            if c >= num_real:
                if n_virtual == cap:
                    continue
                n_virtual += 1
            chosen.append(c)
        for j, c in enumerate(chosen):
            ids[t, j] = c
        taken.append(chosen)

    rows = []
    zero = p.new_zeros(())
    for t in range(T):
        chosen = taken[t]
        if norm == "none":
            w = [p[t, c] for c in chosen]
        else:
            # p / (sum of p over the set: the taken slots, or the taken real ones), written as
            # a softmax of the logits over the set: it stays exact where a capped virtual
            # candidate leads the whole set so far that every p of it underflows (a softmax of
            # log p would carry log p's rounding, |log p| ulps: 1e-5 relative at 100), and a
            # row whose softmax is NaN still gets NaN weights (and gradients), as p / sum p does.
            members = [j for j, c in enumerate(chosen) if norm == "selected" or c < num_real]
            cand = [chosen[j] for j in members]
            p_set = p[t, cand]
            share = torch.where(p_set.isnan(), p_set, torch.softmax(lg[t, cand], dim=0))
            w = [zero] * len(chosen)
            for i, j in enumerate(members):
                w[j] = share[i]
        w = w + [zero] * (k_max - len(chosen))
        rows.append(torch.stack(w) if w else p.new_zeros(0))
    weights = torch.stack(rows) if rows else p.new_zeros((0, k_max))
    return ids.to(logits.device), _connected(weights, logits)


@_autocast_rule()
def permute(x: torch.Tensor, ids: torch.Tensor, num_real: int, align: int, *,
            zero_tail: bool = True):
    """x_perm[R,H], offsets[num_real] int32 (end offsets), slot_rows[T,K] int32."""
    T, K = ids.shape
    H = x.shape[1]
    R = T * K + num_real * (align - 1)
    ids_cpu = ids.cpu().long()
    members = [[] for _ in range(num_real)]  # (t, j) in ascending order
    for t in range(T):
        for j in range(K):
            e = int(ids_cpu[t, j])
            if 0 <= e < num_real:
                members[e].append((t, j))
    offsets = torch.zeros(num_real, dtype=torch.int32)
    slot_rows = torch.full((T, K), -1, dtype=torch.int32)
    gather = []  # (row, t)
    start = 0
    for e in range(num_real):
        for i, (t, j) in enumerate(members[e]):
            slot_rows[t, j] = start + i
            gather.append((start + i, t))
        start += padded_count(len(members[e]), align)
        offsets[e] = start
    rows = torch.tensor([r for r, _ in gather], dtype=torch.long, device=x.device)
    toks = torch.tensor([t for _, t in gather], dtype=torch.long, device=x.device)
    x_perm = _connected(x.new_zeros((R, H)).index_copy(0, rows, x[toks]), x)
    return x_perm, offsets.to(x.device), slot_rows.to(x.device)


def group_spans(offsets: torch.Tensor, rows: int) -> list[tuple[int, int]]:
    """[start, end) of each group; offsets are clamped into [previous end, rows]."""
    spans, start = [], 0
    for end in offsets.cpu().tolist():
        end = min(max(end, start), rows)
        spans.append((start, end))
        start = end
    return spans


def live_rows(offsets: torch.Tensor, rows: int) -> int:
    """The first row past every group (the last group's clamped end): the tail starts here."""
    spans = group_spans(offsets, rows)
    return spans[-1][1] if spans else 0


@_autocast_rule(lower_precision=2)
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor, *,
               zero_tail: bool = True) -> torch.Tensor:
    """out[rows of g] = a[rows] @ b[g]; rows past the last group are zero."""
    acc = _opmath(a.dtype)
    out = a.new_zeros((a.shape[0], b.shape[2]), dtype=acc)
    for g, (s, e) in enumerate(group_spans(offsets, a.shape[0])):
        if e > s:
            out = out.index_copy(0, torch.arange(s, e, device=a.device),
                                 a[s:e].to(acc) @ b[g].to(acc))
    return _connected(out, a, b).to(a.dtype)


@_autocast_rule(lower_precision=2)
def grouped_mm_wgrad(a: torch.Tensor, dout: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """db[g] = a[rows of g]^T @ dout[rows of g]; zero for empty groups."""
    acc = _opmath(a.dtype)
    parts = []
    for s, e in group_spans(offsets, a.shape[0]):
        parts.append(a[s:e].to(acc).T @ dout[s:e].to(acc))
    db = torch.stack(parts) if parts else a.new_zeros((0, a.shape[1], dout.shape[1]), dtype=acc)
    return _connected(db, a, dout).to(a.dtype)


@_autocast_rule()
def swiglu(gu: torch.Tensor, offsets: torch.Tensor, *, zero_tail: bool = True) -> torch.Tensor:
    """h[R,F] = silu(gate) * up with gu = [gate | up], in fp32 (fp64 for fp64), for the rows
    before the last group's end (padding rows included); rows past it are zero."""
    R, F = gu.shape[0], gu.shape[1] // 2
    acc = _opmath(gu.dtype)
    live = live_rows(offsets, R)
    g, u = gu[:live, :F].to(acc), gu[:live, F:].to(acc)
    h = torch.nn.functional.silu(g) * u
    out = torch.cat([h, h.new_zeros((R - live, F))])
    return _connected(out, gu).to(gu.dtype)


@_autocast_rule()
def hsm(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """out[t] = x[t] + a[t] * x[t] in fp32 (fp64 for fp64), rounded once to x's dtype;
    a [T] is float32, or float64 with float64 x."""
    acc = _opmath(x.dtype)
    xa = x.to(acc)
    return (xa + a.to(acc).unsqueeze(1) * xa).to(x.dtype)


@_autocast_rule()
def unpermute(y: torch.Tensor, slot_rows: torch.Tensor, weights: torch.Tensor, *,
              zero_unreferenced: bool = True) -> torch.Tensor:
    """out[t] = sum over j ascending of weights[t,j] * y[slot_rows[t,j]], skipping -1.

    Rows outside [0, R) count as -1. A skipped slot takes no part, in the gradient either:
    both factors are masked before the product, so a NaN weight or row behind it stays out.
    """
    acc = _opmath(y.dtype)
    T, K = slot_rows.shape
    R = y.shape[0]
    out = y.new_zeros((T, y.shape[1]), dtype=acc)
    for j in range(K):
        r = slot_rows[:, j].long()
        live = (r >= 0) & (r < R)
        if R == 0:
            continue
        w = torch.where(live, weights[:, j].to(acc), 0.0).unsqueeze(1)
        rows = torch.where(live.unsqueeze(1), y[r.clamp(0, R - 1)].to(acc), 0.0)
        out = out + w * rows
    return _connected(out, y, weights).to(y.dtype)


VIRTUAL_ZERO, VIRTUAL_COPY = -1, -2  # codes of add_virtual's sources (const rows are >= 0)


def virtual_codes(ids: torch.Tensor, num_real: int, sources: torch.Tensor,
                  num_const: int) -> torch.Tensor:
    """[T, K] int64: what each slot adds (rules.h virtual_source). Ids outside
    [num_real, num_real + M) and codes that are neither VIRTUAL_COPY nor a row of the
    const vectors give VIRTUAL_ZERO."""
    M = sources.shape[0]
    m = ids.long() - num_real
    inside = (m >= 0) & (m < M)
    code = sources.long()[m.clamp(0, M - 1)] if M > 0 else torch.full_like(m, VIRTUAL_ZERO)
    code = torch.where(inside, code, VIRTUAL_ZERO)
    known = (code == VIRTUAL_COPY) | ((code >= 0) & (code < num_const))
    return torch.where(known, code, VIRTUAL_ZERO)


def virtual_const_weights(codes: torch.Tensor, weights: torch.Tensor,
                          num_const: int) -> torch.Tensor:
    """[T, C]: the sum of each token's slot weights per const vector."""
    T = codes.shape[0]
    is_const = codes >= 0
    col = torch.where(is_const, codes, num_const)  # column C: a dump for the others
    w = torch.where(is_const, weights, 0.0)
    return w.new_zeros((T, num_const + 1)).scatter_add(1, col, w)[:, :num_const]


@_autocast_rule()
def add_virtual(out: torch.Tensor, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                num_real: int, sources: torch.Tensor,
                const_vectors: torch.Tensor) -> torch.Tensor:
    """out[t] + sum over j ascending of weights[t,j] * (x[t] for a copy source,
    const_vectors[c] for const source c, nothing otherwise); sources[m] is virtual expert
    m's code (VIRTUAL_ZERO, VIRTUAL_COPY or a const row). In fp32 (fp64 for fp64), rounded
    once to out's dtype. A slot without a source takes no part, in the gradient either:
    both factors are masked, so a NaN behind it (a weight, an unused const row) stays out."""
    acc = _opmath(out.dtype)
    C = const_vectors.shape[0]
    codes = virtual_codes(ids, num_real, sources, C)
    res = out.to(acc)
    for j in range(codes.shape[1]):
        code = codes[:, j]
        used = (code != VIRTUAL_ZERO).unsqueeze(1)
        row = x.to(acc)
        if C > 0:
            row = torch.where((code >= 0).unsqueeze(1), const_vectors.to(acc)[code.clamp(min=0)], row)
        w = torch.where(used, weights[:, j:j + 1].to(acc), 0.0)
        res = torch.where(used, res + w * torch.where(used, row, 0.0), res)  # unused: as is (-0.0)
    return _connected(res, x, weights, const_vectors).to(out.dtype)
