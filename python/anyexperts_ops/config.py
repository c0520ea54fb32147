"""AnyExpertsConfig: the AnyExperts MoE layer's configuration, and the values its fields
take. Validated on construction; ``presets`` builds the usual systems."""
from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Optional, Sequence, Union

__all__ = ["AnyExpertsConfig", "VIRTUAL_KINDS", "SLOT_MODES", "IMPORTANCE_KINDS", "BACKENDS",
           "CONTROLLER_STEPS", "NORMS", "ROUTER_DTYPES"]

VIRTUAL_KINDS = ("zero", "copy", "const")
SLOT_MODES = ("importance", "static", "top_p")
IMPORTANCE_KINDS = ("mlp", "wide", "deep")
BACKENDS = ("ops", "reference")
CONTROLLER_STEPS = ("forward", "manual")
NORMS = ("none", "selected", "real")
ROUTER_DTYPES = (None, "float32")


def _float_to_fraction(x: float) -> Fraction:
    """The fraction a float was meant as: the one with a denominator of at most 1000 that
    rounds to x where there is one (0.2 -> 1/5, 0.29 -> 29/100, 1/3 -> 1/3, not the 16-digit
    decimal whose floor(3 * rho) is 0), else x's shortest decimal repr (0.123456789 as
    written, never 0.1234567889999999973...). Fractions of denominators up to 1000 lie
    at least 1e-6 apart, so at most one rounds to x."""
    small = Fraction(x).limit_denominator(1000)  # raises on NaN and inf
    return small if float(small) == x else Fraction(repr(x))


def _to_fraction(x) -> Fraction:
    """rho_max as an exact fraction: Fraction, (num, den), "1/5", int, or a float
    (_float_to_fraction)."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, (tuple, list)):
        return Fraction(int(x[0]), int(x[1]))
    if isinstance(x, float):
        return _float_to_fraction(x)
    return Fraction(x)


@dataclass
class AnyExpertsConfig:
    """Configuration of :class:`AnyExpertsMoE`. See ``presets`` for the usual systems.

    Slot policy (``slot_mode``):
      * ``"importance"`` (AnyExperts): K_i = clamp(round(K_min + w~_i (K_max - K_min))),
        w~_i = sigmoid(s_i + b) with b the budget bias (a buffer, no gradient).
      * ``"static"``: K_i = K_max for every token (top-K; with null experts: AdaMoE).
      * ``"top_p"``: K_i = the fewest candidates whose probability reaches ``top_p``,
        clamped to [K_min, K_max].
    Virtual cap: V_i = floor(rho_max * K_i), exact: a table of floor(rho_num * K //
    rho_den) over K in [0, K_max] in Python integers, which do not overflow for any rho.

    Precision and memory, neither changing the layer's function:
      * ``router_dtype="float32"``: the router and importance predictor never drop below
        fp32 (through dtype conversions and loads) and run with autocast off, so a bf16 or
        fp16 layer routes bitwise as the fp32 layer does. Read at construction and
        conversion.
      * ``recompute_activations``: the backward makes the expert GEMMs' inputs x_perm
        [R, H] and h [R, F] again instead of keeping them from the forward (R = T*K_max +
        N*(align-1)):
        R*(H+F) elements less held per layer, a permute and a SwiGLU pass more.
    """
    hidden_size: int
    ffn_size: int
    num_experts: int                         # N real (SwiGLU) experts
    num_virtual: int = 0                     # M virtual experts
    virtual_kinds: Union[str, Sequence[str]] = "zero"  # one kind for all, or one per expert
    k_min: int = 1
    k_max: int = 2
    rho_max: Union[Fraction, float, str, tuple] = Fraction(1, 5)
    slot_mode: str = "importance"
    top_p: float = 0.5                       # slot_mode "top_p" only
    importance: Optional[str] = "mlp"        # "mlp" | "wide" | "deep" | None
    importance_hidden: Optional[int] = None  # width of the predictor (default max(16, H//4))
    hsm_alpha: float = 0.05                  # HSM: x' = x + alpha * w * x (0 disables)
    iar_scale: float = 1.0                   # IAR: virtual logits += iar * (1 - 2w) (0 disables)
    norm: str = "selected"                   # segmented_topk weight normalisation
    align: int = 1                           # GEMM group row alignment (permute's align)
    router_dtype: Optional[str] = None       # None: the layer's; "float32": routing never below fp32
    recompute_activations: bool = False      # backward recomputes x_perm and the SwiGLU output
    # losses (coefficients of MoEAux.loss)
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    budget_loss_coef: float = 0.0
    # budget control (slot_mode "importance")
    target_avg_k: Optional[float] = None     # target mean real slots per token (Avg-K)
    controller_rate: float = 2.0             # bias step = rate * (target - Avg-K) / (K_max - K_min)
    controller_step: str = "forward"         # "forward": step per training forward; "manual": step_budget()
    budget_sync: bool = False                # Avg-K over every rank (torch.distributed all-reduce)
    # statistics
    compute_stats: bool = True
    num_modalities: int = 0                  # >0 to get per-modality stats from `modality`
    importance_bins: int = 10
    backend: str = "ops"                     # "ops" (torch.ops.anyexperts) | "reference"

    def __post_init__(self):
        try:
            self.rho_max = _to_fraction(self.rho_max)
        except (ValueError, OverflowError, TypeError, ZeroDivisionError) as e:
            raise ValueError(f"AnyExpertsConfig: rho_max must be a fraction in [0, 1], got "
                             f"{self.rho_max!r}") from e
        if isinstance(self.virtual_kinds, str):
            self.virtual_kinds = (self.virtual_kinds,) * self.num_virtual
        self.virtual_kinds = tuple(self.virtual_kinds)
        self.validate()

    # integers of the virtual cap
    @property
    def rho_num(self) -> int:
        return self.rho_max.numerator

    @property
    def rho_den(self) -> int:
        return self.rho_max.denominator

    def virtual_cap(self, k: int) -> int:
        """floor(rho_max * k), exactly."""
        return (self.rho_num * k) // self.rho_den

    def min_avg_real(self) -> int:
        """The fewest real slots a token can have: K_min less its virtual cap, at most M
        (K - min(V(K), M) never decreases with K, since V grows by at most 1 per slot)."""
        return self.k_min - min(self.virtual_cap(self.k_min), self.num_virtual)

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(f"AnyExpertsConfig: {msg}")
        ints = ("hidden_size", "ffn_size", "num_experts", "num_virtual", "k_min", "k_max",
                "align", "num_modalities", "importance_bins")
        bad = [n for n in ints if not isinstance(getattr(self, n), numbers.Integral)
               or isinstance(getattr(self, n), bool)]
        need(not bad, f"{', '.join(bad)} must be integers")
        need(isinstance(self.budget_sync, bool) and isinstance(self.recompute_activations, bool),
             "budget_sync and recompute_activations must be bools")
        nonneg = ("load_balance_coef", "z_loss_coef", "budget_loss_coef", "controller_rate")
        bad = [n for n in nonneg if not (math.isfinite(getattr(self, n)) and getattr(self, n) >= 0)]
        need(not bad, f"{', '.join(bad)} must be finite and >= 0")
        need(math.isfinite(self.hsm_alpha) and math.isfinite(self.iar_scale),
             "hsm_alpha and iar_scale must be finite")
        need(self.hidden_size > 0 and self.ffn_size > 0, "hidden_size and ffn_size must be > 0")
        need(self.num_experts >= 1, "num_experts must be >= 1")
        need(self.num_virtual >= 0, "num_virtual must be >= 0")
        need(len(self.virtual_kinds) == self.num_virtual,
             f"virtual_kinds has {len(self.virtual_kinds)} entries for "
             f"{self.num_virtual} virtual experts")
        need(all(k in VIRTUAL_KINDS for k in self.virtual_kinds),
             f"virtual kinds must be in {VIRTUAL_KINDS}, got {self.virtual_kinds}")
        need(1 <= self.k_min <= self.k_max, "need 1 <= k_min <= k_max")
        need(self.k_max <= self.num_experts,
             "k_max must be <= num_experts (real candidates always fill a token's slots)")
        need(0 <= self.rho_max <= 1, "rho_max must be in [0, 1]")
        need(self.slot_mode in SLOT_MODES, f"slot_mode must be in {SLOT_MODES}")
        need(self.importance is None or self.importance in IMPORTANCE_KINDS,
             f"importance must be None or in {IMPORTANCE_KINDS}")
        need(self.slot_mode != "importance" or self.importance is not None,
             'slot_mode "importance" needs an importance predictor')
        need(0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]")
        need(self.norm in NORMS, f"norm must be in {NORMS}")
        need(self.align >= 1, "align must be >= 1")
        need(self.backend in BACKENDS, f"backend must be in {BACKENDS}")
        need(self.router_dtype in ROUTER_DTYPES, f"router_dtype must be in {ROUTER_DTYPES}")
        need(self.controller_step in CONTROLLER_STEPS,
             f"controller_step must be in {CONTROLLER_STEPS}")
        need(self.num_modalities >= 0 and self.importance_bins >= 1,
             "num_modalities >= 0 and importance_bins >= 1")
        if self.target_avg_k is not None:
            need(self.slot_mode == "importance",
                 'target_avg_k (budget control) needs slot_mode "importance"')
            lo = self.min_avg_real()
            need(lo <= self.target_avg_k <= self.k_max,
                 f"target_avg_k must be reachable: within [{lo}, {self.k_max}]")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rho_max"] = f"{self.rho_max.numerator}/{self.rho_max.denominator}"
        return d
