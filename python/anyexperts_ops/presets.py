"""Presets: the systems users compare AnyExperts against, all on the same layer and kernels.

Each function returns an :class:`AnyExpertsConfig`; extra keyword arguments override any
field (e.g. ``backend="reference"``, ``align=8``, ``load_balance_coef=0``). Build the layer
with ``AnyExpertsMoE(cfg)`` or in one step with :func:`make_layer`.

Choices the source papers leave open, or that differ from them, are marked "ours".
"""
from __future__ import annotations

from fractions import Fraction
from typing import Sequence, Union

from .layer import AnyExpertsConfig, AnyExpertsMoE

__all__ = ["static_topk", "top_p", "moe_plus_plus", "null_experts", "anyexperts",
           "PRESETS", "make_config", "make_layer"]


def static_topk(hidden_size: int, ffn_size: int, num_experts: int, k: int, **kw
                ) -> AnyExpertsConfig:
    """Plain top-K MoE (Mixtral/Switch style): K_i = k, no virtual experts, no importance
    predictor, weights renormalised over the k selected experts."""
    base = dict(num_virtual=0, k_min=k, k_max=k, slot_mode="static", importance=None,
                hsm_alpha=0.0, iar_scale=0.0, norm="selected")
    return AnyExpertsConfig(hidden_size, ffn_size, num_experts, **{**base, **kw})


def top_p(hidden_size: int, ffn_size: int, num_experts: int, p: float = 0.5,
          k_min: int = 1, k_max: int = 4, **kw) -> AnyExpertsConfig:
    """Top-p (dynamic K from cumulative router probability, as in Huang et al. 2024):
    K_i = the fewest experts whose probabilities reach p, clamped to [k_min, k_max]."""
    base = dict(num_virtual=0, k_min=k_min, k_max=k_max, slot_mode="top_p", top_p=p,
                importance=None, hsm_alpha=0.0, iar_scale=0.0, norm="selected")
    return AnyExpertsConfig(hidden_size, ffn_size, num_experts, **{**base, **kw})


def moe_plus_plus(hidden_size: int, ffn_size: int, num_experts: int, k: int = 2,
                  num_zero: int = 1, num_copy: int = 1, num_const: int = 2, **kw
                  ) -> AnyExpertsConfig:
    """MoE++-style zero-computation experts (Jin et al. 2024): top-k over N real + zero /
    copy / constant experts, no cap on their share, softmax weights not renormalised.
    Ours: the constant expert adds weight * v_j (MoE++ also mixes in the input with a
    learned gate); MoE++'s gating residuals are left out."""
    kinds = ("zero",) * num_zero + ("copy",) * num_copy + ("const",) * num_const
    base = dict(num_virtual=len(kinds), virtual_kinds=kinds, k_min=k, k_max=k,
                rho_max=Fraction(1, 1), slot_mode="static", importance=None, hsm_alpha=0.0,
                iar_scale=0.0, norm="none")
    return AnyExpertsConfig(hidden_size, ffn_size, num_experts, **{**base, **kw})


def null_experts(hidden_size: int, ffn_size: int, num_experts: int, k: int = 4,
                 num_null: int = 4, **kw) -> AnyExpertsConfig:
    """AdaMoE-style null experts (Zeng et al. 2024): top-k over N real + num_null null
    (zero) experts, any share of null; weights renormalised over the real experts taken.
    Ours: our load-balance loss covers the real experts only (AdaMoE balances nulls too)."""
    base = dict(num_virtual=num_null, virtual_kinds="zero", k_min=k, k_max=k,
                rho_max=Fraction(1, 1), slot_mode="static", importance=None, hsm_alpha=0.0,
                iar_scale=0.0, norm="real")
    return AnyExpertsConfig(hidden_size, ffn_size, num_experts, **{**base, **kw})


def anyexperts(hidden_size: int, ffn_size: int, num_experts: int = 64, *,
               num_virtual: int = 4,
               virtual_kinds: Union[Sequence[str], str, None] = None,
               k_min: int = 4, k_max: int = 12,
               target_avg_k: Union[float, None, str] = "auto", **kw) -> AnyExpertsConfig:
    """AnyExperts (arXiv 2511.18314). Paper: rho_max = 0.2, importance MLP, HSM, IAR,
    Avg-K 8 (7.2 reduced). Ours: the K range [4, 12] around the target, the virtual kinds
    (by default one zero, one copy, the rest const: zero, copy, const, const for the
    default 4), alpha = 0.05 (one of the paper's ablation points), iar_scale = 1, norm
    "selected", the budget controller on. ``target_avg_k="auto"``: 8.0 when
    [k_min, k_max] allows it, else (k_min + k_max) / 2; None turns budget control off."""
    if target_avg_k == "auto":
        target_avg_k = 8.0 if k_min <= 8 <= k_max else (k_min + k_max) / 2
    if virtual_kinds is None:
        virtual_kinds = (("zero", "copy") + ("const",) * num_virtual)[:num_virtual]
    elif isinstance(virtual_kinds, str):
        virtual_kinds = (virtual_kinds,) * num_virtual
    base = dict(num_virtual=num_virtual, virtual_kinds=tuple(virtual_kinds), k_min=k_min,
                k_max=k_max, rho_max=Fraction(1, 5), slot_mode="importance",
                importance="mlp", hsm_alpha=0.05, iar_scale=1.0, norm="selected",
                target_avg_k=target_avg_k)
    return AnyExpertsConfig(hidden_size, ffn_size, num_experts, **{**base, **kw})


PRESETS = {
    "static_topk": static_topk,
    "top_p": top_p,
    "moe_plus_plus": moe_plus_plus,
    "null_experts": null_experts,
    "anyexperts": anyexperts,
}


def make_config(name: str, *args, **kw) -> AnyExpertsConfig:
    try:
        fn = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
    return fn(*args, **kw)


def make_layer(name: str, *args, device=None, dtype=None, **kw) -> AnyExpertsMoE:
    return AnyExpertsMoE(make_config(name, *args, **kw), device=device, dtype=dtype)
