"""Comparison MoE implementations for the layer benchmark (bench/bench_layer.py).

Written here on purpose (not imported from transformers / torchtitan), so that the benchmark
pins exactly what it compares against. All take the expert weights in nn.Linear layout and
can share them with an :class:`anyexperts_ops.layer.AnyExpertsMoE` (no copies):

  router_weight [N, H], w_gate_up [N, 2F, H] (rows [0, F) gate, [F, 2F) up), w_down [N, H, F].

Every forward returns ``(out[T, H], aux_loss)`` where aux_loss is the same Switch-style load
balance term the layer computes (N * sum_e f_e * P_e over the real experts, times
``lb_coef``), so forward+backward does the same kind of work in every implementation.

* :class:`EagerLoopMoE` - the per-expert Python loop of Hugging Face transformers' sparse MoE
  blocks (MixtralSparseMoeBlock, Qwen2/3-MoE, OLMoE up to transformers 4.5x): softmax ->
  top-k -> renormalise -> one_hot expert mask -> for each hit expert: torch.where,
  index_select (``x[top_x]``), the expert FFN, scale by the routing weight, ``index_add_``.
  Each expert has its own parameters (as HF's nn.ModuleList of experts); here they are views
  of the shared 3-D weights, so no memory is duplicated. The gate and up projections are one
  fused GEMM per expert (HF Mixtral uses two; fused is the kinder case for the baseline).
* :class:`GroupedMMMoE` - the torchtitan-style pipeline: top-k, a stable sort of the flat
  expert ids (argsort), gather of the tokens in expert order, ``torch._grouped_mm`` for
  gate_up and down (fused SwiGLU between them), score scaling, scatter back by the inverse
  permutation and a sum over the k slots. Where ``torch._grouped_mm`` is unavailable (CPU by
  default, older torch, a probe call that fails) the two grouped GEMMs become a per-group
  Python loop over experts, and :attr:`GroupedMMMoE.label` says so.
* :class:`Weight0Backend` - "virtual slots handled the usual way": a stand-in for the
  anyexperts ops module that an AnyExpertsMoE layer routes through. It sends every virtual
  slot (and, with ``mode="all"``, every unused slot, i.e. every slot up to K_max) to a real
  expert with weight 0 instead of masking it in ``permute``: the result is numerically the
  layer's own output, but the GEMMs compute rows for those slots. The real expert a slot is
  sent to is spread round-robin ((t * K + j) mod N), the kindest (most balanced) choice.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EagerLoopMoE", "GroupedMMMoE", "Weight0Backend", "switch_load_balance",
           "torch_grouped_mm_probe"]


def switch_load_balance(counts: Tensor, probs: Tensor) -> Tensor:
    """N * sum_e f_e * P_e; counts[N] slots per expert (no grad), probs[T, N] softmax."""
    n = probs.shape[-1]
    f = counts.float() / counts.float().sum().clamp(min=1.0)
    return n * (f.detach() * probs.float().mean(dim=0)).sum()


def _topk_route(x: Tensor, router_weight: Tensor, k: int):
    """HF/Mixtral routing: fp32 softmax over all experts, top-k, renormalise."""
    logits = F.linear(x, router_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return probs, w, idx


def _expert_counts(idx: Tensor, n: int) -> Tensor:
    """Slots per expert without a host sync (scatter_add, static shape)."""
    flat = idx.reshape(-1)
    return torch.zeros(n, dtype=torch.int64, device=idx.device).scatter_add_(
        0, flat, torch.ones_like(flat))


class EagerLoopMoE(nn.Module):
    """Hugging Face-style eager per-expert loop (see the module docstring)."""

    label = "eager per-expert loop (HF transformers style)"

    def __init__(self, router_weight: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int,
                 lb_coef: float = 0.01):
        super().__init__()
        self.num_experts = w_gate_up.shape[0]
        self.ffn = w_down.shape[2]
        self.top_k = top_k
        self.lb_coef = lb_coef
        # Per-expert leaf parameters that are views of the shared storage (HF keeps one
        # nn.Linear per expert; indexing a 3-D parameter instead would make every expert's
        # backward materialise a full-size gradient).
        self.gate = nn.Parameter(router_weight.detach(), requires_grad=True)
        self.gate_up = nn.ParameterList(
            [nn.Parameter(w_gate_up.detach()[e]) for e in range(self.num_experts)])
        self.down = nn.ParameterList(
            [nn.Parameter(w_down.detach()[e]) for e in range(self.num_experts)])

    def forward(self, x: Tensor):
        H = x.shape[-1]
        x = x.reshape(-1, H)
        probs, routing_weights, selected = _topk_route(x, self.gate, self.top_k)
        routing_weights = routing_weights.to(x.dtype)
        final = torch.zeros_like(x)
        expert_mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            e = int(expert_idx)
            idx, top_x = torch.where(expert_mask[e])
            current = x[None, top_x].reshape(-1, H)
            gu = F.linear(current, self.gate_up[e])
            gate, up = gu.split(self.ffn, dim=-1)
            h = F.linear(F.silu(gate) * up, self.down[e])
            h = h * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, h.to(x.dtype))
        lb = switch_load_balance(expert_mask.sum(dim=(1, 2)), probs)
        return final, self.lb_coef * lb


_PROBE_CACHE: dict = {}


def torch_grouped_mm_probe(device: torch.device, dtype: torch.dtype, k_dim: int = 64,
                           n_dim: int = 64) -> tuple[Optional[int], Optional[str]]:
    """(align, None) when ``torch._grouped_mm`` runs forward and backward here with rows
    per group padded to ``align`` (1 = no padding needed), else (None, reason)."""
    key = (str(device), dtype, k_dim, n_dim)
    if key in _PROBE_CACHE:
        return _PROBE_CACHE[key]
    if not hasattr(torch, "_grouped_mm"):
        res = (None, f"torch {torch.__version__} has no torch._grouped_mm")
        _PROBE_CACHE[key] = res
        return res
    errors = []
    for align in (1, 16):
        try:
            g = 3
            sizes = [5, 0, 11] if align == 1 else [16, 0, 32]
            ends = torch.tensor(sizes, device=device).cumsum(0).to(torch.int32)
            a = torch.randn(int(ends[-1]) + 3, k_dim, device=device, dtype=dtype,
                            requires_grad=True)
            # nn.Linear layout [G, N, K] seen as [G, K, N], like the real weights.
            b = torch.randn(g, n_dim, k_dim, device=device, dtype=dtype).requires_grad_(True)
            out = torch._grouped_mm(a, b.transpose(-2, -1), offs=ends)
            out.float().square().sum().backward()
            ref = a.detach().float()[: sizes[0]] @ b.detach().float()[0].t()
            err = (out.detach().float()[: sizes[0]] - ref).norm() / ref.norm().clamp(min=1e-6)
            if not bool(torch.isfinite(err)) or float(err) > 2e-2:
                raise RuntimeError(f"probe result off by {float(err):.3g} (relative)")
            res = (align, None)
            _PROBE_CACHE[key] = res
            return res
        except Exception as e:  # noqa: BLE001 - any failure means "not usable here"
            errors.append(f"align {align}: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    res = (None, "; ".join(errors))
    _PROBE_CACHE[key] = res
    return res


def _loop_grouped_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """Per-group fallback: out[rows of g] = a[rows of g] @ b[g] (host sync on offsets)."""
    ends = offsets.tolist()
    pieces, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            pieces.append(a[start:end] @ b[g])
        start = max(start, end)
    if start < a.shape[0]:
        pieces.append(a.new_zeros((a.shape[0] - start, b.shape[2])))
    if not pieces:
        return a.new_zeros((a.shape[0], b.shape[2]))
    return torch.cat(pieces, dim=0)


class GroupedMMMoE(nn.Module):
    """torchtitan-style sort + torch._grouped_mm pipeline (see the module docstring).

    ``use_torch_grouped_mm``: True / False / None (auto: on for CUDA when a probe call
    succeeds, off on CPU). ``align``: rows per group padded to a multiple of it (None: the
    probe's choice, 1 when torch._grouped_mm takes any group size).
    """

    def __init__(self, router_weight: Tensor, w_gate_up: Tensor, w_down: Tensor, top_k: int,
                 lb_coef: float = 0.01, use_torch_grouped_mm: Optional[bool] = None,
                 align: Optional[int] = None):
        super().__init__()
        self.router_weight = router_weight
        self.w_gate_up = w_gate_up
        self.w_down = w_down
        self.num_experts = w_gate_up.shape[0]
        self.ffn = w_down.shape[2]
        self.top_k = top_k
        self.lb_coef = lb_coef
        dev, dt = w_gate_up.device, w_gate_up.dtype
        self.fallback_reason = None
        if use_torch_grouped_mm is None:
            use_torch_grouped_mm = dev.type == "cuda"
            if not use_torch_grouped_mm:
                self.fallback_reason = "CPU: torch._grouped_mm not used on CPU by default"
        probe_align = 1
        if use_torch_grouped_mm:
            probe_align, why = torch_grouped_mm_probe(dev, dt, w_gate_up.shape[2],
                                                      w_gate_up.shape[1])
            if probe_align is None:
                use_torch_grouped_mm = False
                self.fallback_reason = f"torch._grouped_mm unavailable: {why}"
        self.use_torch_grouped_mm = bool(use_torch_grouped_mm)
        self.align = int(align or probe_align or 1)

    @property
    def label(self) -> str:
        if self.use_torch_grouped_mm:
            pad = f", rows padded to {self.align}" if self.align > 1 else ""
            return f"torch._grouped_mm pipeline (sort-based permute, torchtitan style{pad})"
        return "sort-based pipeline, per-group loop fallback (no torch._grouped_mm)"

    def _gmm(self, a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
        if self.use_torch_grouped_mm:
            return torch._grouped_mm(a, b, offs=offsets)
        return _loop_grouped_mm(a, b, offsets)

    def forward(self, x: Tensor):
        H = x.shape[-1]
        x = x.reshape(-1, H)
        T, K, N, A = x.shape[0], self.top_k, self.num_experts, self.align
        probs, scores, idx = _topk_route(x, self.router_weight, K)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)          # slots in expert order
        counts = _expert_counts(idx, N)
        token = order // K
        if A > 1:
            # Pad each expert's group to a multiple of A, static shape (as torchtitan's
            # generate_permute_indices): destination row of each sorted slot.
            padded = (counts + A - 1) // A * A
            ends = torch.cumsum(padded, 0)
            first = torch.cumsum(counts, 0) - counts
            e_sorted = flat[order]
            rank = torch.arange(T * K, device=x.device) - first[e_sorted]
            dest = (ends - padded)[e_sorted] + rank
            rows = x.new_zeros((T * K + N * (A - 1), H)).index_copy(0, dest, x[token])
            offsets = ends.to(torch.int32)
        else:
            dest = None
            rows = x[token]
            offsets = torch.cumsum(counts, 0).to(torch.int32)
        gu = self._gmm(rows, self.w_gate_up.transpose(1, 2), offsets)
        gate, up = gu.split(self.ffn, dim=-1)
        y = self._gmm(F.silu(gate) * up, self.w_down.transpose(1, 2), offsets)
        if dest is not None:
            y = y.index_select(0, dest)
        w_sorted = scores.reshape(-1)[order]
        y = (y.float() * w_sorted[:, None]).to(x.dtype)
        unsorted = torch.empty_like(y).index_copy(0, order, y)  # back to (t, j) order
        out = unsorted.view(T, K, H).sum(dim=1)
        lb = switch_load_balance(counts, probs)
        return out, self.lb_coef * lb


class Weight0Backend:
    """Stand-in for ``anyexperts_ops.ops`` (an AnyExpertsMoE's op backend) that computes
    masked slots instead of skipping them (see the module docstring).

    ``mode="virtual"``: virtual slots (ids >= N) go to a real expert with weight 0.
    ``mode="all"``: virtual and unused (-1) slots do, so the GEMMs see T * K_max rows, as in
    a static-shape implementation without masking.
    Every other attribute is the wrapped backend's.
    """

    MODES = ("virtual", "all")

    def __init__(self, inner, mode: str = "all"):
        if mode not in self.MODES:
            raise ValueError(f"mode must be in {self.MODES}, got {mode!r}")
        self.inner = inner
        self.mode = mode
        self._keep: Optional[Tensor] = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def permute(self, x: Tensor, ids: Tensor, num_real: int, align: int = 1, **kw):
        T, K = ids.shape
        real = (ids >= 0) & (ids < num_real)
        swap = ids >= num_real if self.mode == "virtual" else ~real
        spread = (torch.arange(T * K, device=ids.device, dtype=torch.int64).view(T, K)
                  % num_real).to(ids.dtype)
        self._keep = real
        return self.inner.permute(x, torch.where(swap, spread, ids).contiguous(), num_real,
                                  align, **kw)

    def unpermute(self, y: Tensor, slot_rows: Tensor, weights: Tensor, **kw):
        keep, self._keep = self._keep, None
        if keep is not None:
            weights = torch.where(keep, weights, torch.zeros_like(weights))
        return self.inner.unpermute(y, slot_rows, weights.contiguous(), **kw)
