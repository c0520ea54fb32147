"""Routing statistics and the auxiliary record of an AnyExperts layer.

Everything here is computed with static shapes and returns tensors, so that a layer's
forward never synchronises with the host (no ``.item()``): CUDA-graph safe and
``torch.compile(fullgraph=True)`` friendly. Turning the tensors into Python numbers is left
to the caller, off the hot path: :meth:`RoutingStats.to_dict`, or :class:`StatsMeter` to
average over many steps with one synchronisation at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

__all__ = ["RoutingRecord", "RoutingStats", "MoEAux", "StatsMeter",
           "slot_counts", "expert_counts", "routing_stats", "load_balance_loss", "router_z_loss"]


@dataclass
class RoutingRecord:
    """The per-token routing decision of one forward (flattened tokens, T = tokens).

    ids/weights are the outputs of ``segmented_topk``: ids[T, k_max] int32 (real experts
    in [0, N), virtual experts in [N, N+M), -1 for unused slots), weights[T, k_max] fp32.
    """
    ids: Tensor             # [T, k_max] int32
    weights: Tensor         # [T, k_max] fp32
    slots: Tensor           # [T] int32: K_i, total slots asked for
    max_virtual: Tensor     # [T] int32: V_i, the virtual cap
    importance: Optional[Tensor]  # [T] fp32 in (0,1): w_i (None without a predictor)
    logits: Tensor          # [T, N+M] fp32 router logits (after IAR)
    offsets: Optional[Tensor] = None  # [N] int32 end offsets of the GEMM groups


@dataclass
class RoutingStats:
    """Routing statistics of one forward; all tensors (0-dim unless noted), no host sync."""
    tokens: Tensor              # int64: T, the tokens routed
    real_per_token: Tensor      # mean real slots per token (the paper's Avg-K)
    virtual_per_token: Tensor   # mean virtual slots per token
    slots_per_token: Tensor     # mean slots asked per token (mean K_i)
    virtual_share: Tensor       # virtual / (real + virtual) over all taken slots
    expert_load: Tensor         # [N] fraction of real slots per real expert (sums to 1)
    load_imbalance: Tensor      # max expert load / mean expert load (1 = perfectly even)
    importance_mean: Tensor     # mean w_i, NaN w left out (0 without a predictor or a number)
    importance_hist: Tensor     # [bins] fraction of tokens per w bin over [0, 1] (NaN w: none)
    real_slots: Tensor          # int64: total real slots (= live GEMM rows before padding)
    gemm_rows: Tensor           # int64: rows the GEMMs compute (real slots + align padding)
    gemm_rows_capacity: int     # the static row count R = T*k_max + N*(align-1)
    modality_tokens: Optional[Tensor] = None   # [num_modalities] token counts
    modality_real: Optional[Tensor] = None     # [num_modalities] mean real slots per token
    modality_virtual: Optional[Tensor] = None  # [num_modalities] mean virtual slots per token

    def to_dict(self) -> dict:
        """Python numbers and lists (synchronises with the device: not for the hot path)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                v = v.detach().cpu()
                v = v.item() if v.dim() == 0 else v.tolist()
            out[f.name] = v
        return out


@dataclass
class MoEAux:
    """Second output of :class:`AnyExpertsMoE.forward`.

    ``loss`` is the weighted sum of the auxiliary losses, ready to add to the task loss;
    the unweighted terms are kept for logging. ``stats`` is None when the layer's config
    sets ``compute_stats=False``.
    """
    loss: Tensor
    load_balance_loss: Tensor
    z_loss: Tensor
    budget_loss: Tensor
    stats: Optional[RoutingStats]
    routing: RoutingRecord


# As pytree nodes, the layer's outputs pass through torch.export (an exported layer returns
# (out, MoEAux) like the eager one, and saves and loads) and through the tree maps of
# other wrappers, instead of being opaque leaves.
for _cls in (RoutingRecord, RoutingStats, MoEAux):
    torch.export.register_dataclass(_cls, serialized_type_name=f"{__name__}.{_cls.__name__}")


def slot_counts(ids: Tensor, num_real: int) -> tuple[Tensor, Tensor]:
    """Per-token counts of real and virtual slots (int64 [T] each)."""
    real = ((ids >= 0) & (ids < num_real)).sum(dim=1)
    virt = (ids >= num_real).sum(dim=1)
    return real, virt


def bucket_sums(index: Tensor, values: Tensor, n: int) -> Tensor:
    """Sums of values [T] per bucket index in [0, n); other indices are dropped (into a
    bucket n that is cut off). Static shape and no bincount, so no host sync."""
    idx = torch.where((index >= 0) & (index < n), index, n)
    return values.new_zeros(n + 1).scatter_add(0, idx, values)[:n]


def expert_counts(ids: Tensor, num_real: int) -> Tensor:
    """Live real slots per real expert, float32 [N]."""
    flat = ids.reshape(-1).long()
    return bucket_sums(flat, torch.ones(flat.shape, dtype=torch.float32, device=ids.device),
                       num_real)


def acc(t: Tensor) -> Tensor:
    """Routing math in fp32 (fp64 for an fp64 layer, so gradcheck can run)."""
    return t if t.dtype == torch.float64 else t.float()


def load_balance_loss(ids: Tensor, logits: Tensor, num_real: int,
                      counts: Optional[Tensor] = None) -> Tensor:
    """Switch-style N * sum_e f_e * P_e over the real experts only.

    f_e: fraction of the live real slots that went to expert e (no gradient);
    P_e: mean over tokens of softmax over the *real* logits (the gradient path).
    Equals 1 when routing is perfectly even. ``counts`` ([N] live real slots per expert)
    saves counting them again when the caller has them.
    """
    T = logits.shape[0]
    if T == 0 or num_real == 0:
        return logits.new_zeros((), dtype=torch.float32)
    if counts is None:
        counts = expert_counts(ids, num_real)
    f = counts / counts.sum().clamp(min=1.0)
    P = torch.softmax(acc(logits[:, :num_real]), dim=-1).mean(dim=0)
    return num_real * (f * P).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return torch.logsumexp(acc(logits), dim=-1).square().mean()


def routing_stats(record: RoutingRecord, num_real: int, *, gemm_rows_capacity: int,
                  bins: int = 10, modality: Optional[Tensor] = None,
                  num_modalities: int = 0, counts: Optional[Tensor] = None,
                  real_virtual: Optional[tuple[Tensor, Tensor]] = None) -> RoutingStats:
    """Statistics of one routing decision; tensors only, static shapes. ``counts`` (live
    real slots per expert) and ``real_virtual`` (:func:`slot_counts`) are reused when given."""
    ids = record.ids
    T = ids.shape[0]
    dev = ids.device
    f32 = torch.float32
    real, virt = real_virtual if real_virtual is not None else slot_counts(ids, num_real)
    denom = max(T, 1)  # an int (a SymInt under export): float() would specialise T
    real_total = real.sum()
    virt_total = virt.sum()
    if counts is None:
        counts = expert_counts(ids, num_real)
    load = counts / counts.sum().clamp(min=1.0)
    mean_load = 1.0 / max(num_real, 1)
    imbalance = load.max() / mean_load if num_real > 0 else torch.zeros((), device=dev)
    if record.importance is not None and T > 0:
        w = record.importance.detach().float()
        # A NaN w (a NaN token) falls in no bin; .long() of NaN is undefined, hence the where.
        b = torch.where(w.isnan(), bins, (w * bins).long().clamp(0, bins - 1))
        hist = bucket_sums(b, torch.ones_like(w), bins) / denom
        imp_mean = torch.nan_to_num(w.nanmean(), nan=0.0)  # 0 where no w is a number
    else:
        hist = torch.zeros(bins, dtype=f32, device=dev)
        imp_mean = torch.zeros((), dtype=f32, device=dev)
    if record.offsets is not None and record.offsets.numel() > 0:
        gemm_rows = record.offsets[-1].long()
    else:
        gemm_rows = real_total.new_zeros(())
    out = RoutingStats(
        tokens=real.new_full((), T),
        real_per_token=real_total.to(f32) / denom,
        virtual_per_token=virt_total.to(f32) / denom,
        slots_per_token=record.slots.to(f32).sum() / denom,
        virtual_share=virt_total.to(f32) / (real_total + virt_total).clamp(min=1).to(f32),
        expert_load=load,
        load_imbalance=imbalance,
        importance_mean=imp_mean,
        importance_hist=hist,
        real_slots=real_total,
        gemm_rows=gemm_rows,
        gemm_rows_capacity=gemm_rows_capacity,
    )
    if modality is not None and num_modalities > 0:
        # Values outside [0, num_modalities) are counted nowhere: checking them would need
        # a host sync, and clamping would count them in a wrong modality.
        m = modality.reshape(-1).long()
        n = bucket_sums(m, torch.ones(T, dtype=f32, device=dev), num_modalities)
        out.modality_tokens = n
        out.modality_real = bucket_sums(m, real.to(f32), num_modalities) / n.clamp(min=1.0)
        out.modality_virtual = bucket_sums(m, virt.to(f32), num_modalities) / n.clamp(min=1.0)
    return out


class StatsMeter:
    """Averages :class:`RoutingStats` over forwards on the device; one host sync in summary().

    The result is that of one batch holding every token seen: the per-token means, the
    importance histogram, the per-modality means and ``load_imbalance`` are weighted by
    tokens, ``virtual_share`` by taken slots, ``expert_load`` by real slots; ``tokens``,
    ``real_slots``, ``gemm_rows`` and ``modality_tokens`` are totals. So a prefill and the
    decode steps after it count each token once, and an empty forward counts for nothing.
    """

    # field -> the summed field that weights it (None: a sum itself); taken_slots is the
    # meter's own, for virtual_share
    _WEIGHTS = {"tokens": None, "real_slots": None, "gemm_rows": None, "modality_tokens": None,
                "taken_slots": None,
                "real_per_token": "tokens", "virtual_per_token": "tokens",
                "slots_per_token": "tokens", "importance_mean": "tokens",
                "importance_hist": "tokens", "load_imbalance": "tokens",
                "virtual_share": "taken_slots", "expert_load": "real_slots",
                "modality_real": "modality_tokens", "modality_virtual": "modality_tokens"}

    def __init__(self):
        self.steps = 0
        self._sums: dict[str, Tensor] = {}

    @torch.no_grad()
    def update(self, stats: RoutingStats) -> None:
        self.steps += 1
        values = {f.name: getattr(stats, f.name) for f in fields(stats)}
        values["taken_slots"] = stats.tokens * (stats.real_per_token + stats.virtual_per_token)
        for name, by in self._WEIGHTS.items():
            v = values[name]
            if v is None:
                continue
            # integer counts stay exact integers; everything else sums in fp64
            v = v.detach() if by is None else v.detach() * values[by].detach().double()
            if v.is_floating_point():
                v = v.double()
            self._sums[name] = self._sums[name] + v if name in self._sums else v

    def summary(self) -> dict:
        if self.steps == 0:
            return {}
        out = {}
        for name, by in self._WEIGHTS.items():
            if name not in self._sums or name == "taken_slots":
                continue
            v = self._sums[name]
            if by is not None:
                v = v / self._sums[by].double().clamp(min=1)
            v = v.cpu()
            out[name] = v.item() if v.dim() == 0 else v.tolist()
        return out
