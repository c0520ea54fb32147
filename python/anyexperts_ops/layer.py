"""The AnyExperts MoE layer (DESIGN.md sections 1-2) on the anyexperts ops.

Data flow for T tokens (hidden H, FFN width F, N real + M virtual experts)::

    x -> importance predictor -> s, w = sigmoid(s)        (w: token importance)
    x' = x + alpha * w * x                                  (HSM)
    logits = router(x'); logits[:, N:] += iar * (1 - 2w)    (IAR)
    K_i = clamp(round(K_min + sigmoid(s + b) * (K_max - K_min)))   (b: budget bias buffer)
    V_i = floor(rho_max * K_i)                              (exact: a table over K)
    ids, weights = segmented_topk(logits, K, V, K_max, N, norm)
    x_perm, offsets, slot_rows = permute(x', ids, N, align)
    y = grouped_mm(swiglu([g|u], offsets), W_down^T), [g|u] = grouped_mm(x_perm, W_gate_up^T)
    out = unpermute(y, slot_rows, weights) + virtual terms (zero / copy / const)

Shapes are static throughout (no host synchronisation in forward), so the layer runs
under CUDA graphs and ``torch.compile(fullgraph=True)`` when on the ``"ops"`` backend.
The ``"reference"`` backend runs the very same layer on the pure-PyTorch reference
(slow; parity tests only).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import struct
import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils import checkpoint as _checkpoint

from . import reference as _reference
from .config import BACKENDS, IMPORTANCE_KINDS, SLOT_MODES, VIRTUAL_KINDS, AnyExpertsConfig
from .stats import (MoEAux, RoutingRecord, acc as _acc, expert_counts, load_balance_loss,
                    router_z_loss, routing_stats, slot_counts)

__all__ = ["AnyExpertsConfig", "AnyExpertsMoE", "ImportancePredictor", "VIRTUAL_KINDS",
           "SLOT_MODES", "IMPORTANCE_KINDS", "BACKENDS"]


class Router(nn.Linear):
    """The router: an nn.Linear without bias whose product writes rows padded to a multiple
    of 8 elements, sliced back to N+M columns. cuBLAS takes its fast kernels only for
    16-byte aligned rows: at N+M = 132 (128 experts plus 4 virtual) the unpadded product
    ran at half speed on an H100 (0.117 against 0.060 ms forward, 0.25 against 0.12 ms
    backward: bench/results/profile_e128_anyexperts.txt at commits f2b29bc and c2b9f6a).
    The padding rows are zeros appended to the weight on the fly (N+M rows of H: a few
    hundred KB), not parameters."""

    def __init__(self, in_features: int, out_features: int, **kw):
        super().__init__(in_features, out_features, bias=False, **kw)

    def forward(self, x: Tensor) -> Tensor:
        pad = -self.out_features % 8
        if pad == 0:
            return super().forward(x)
        return F.linear(x, F.pad(self.weight, (0, 0, 0, pad)))[..., :self.out_features]


class ImportancePredictor(nn.Module):
    """Token importance score s_i (a logit; w_i = sigmoid(s_i)).

    ``mlp``: H -> d -> 1; ``wide``: H -> 4d -> 1; ``deep``: H -> d -> d -> d -> 1
    (GELU between layers), d = ``hidden`` (default max(16, H // 4)).
    """

    def __init__(self, hidden_size: int, kind: str = "mlp", hidden: Optional[int] = None):
        super().__init__()
        d = hidden or max(16, hidden_size // 4)
        if kind == "mlp":
            dims = [hidden_size, d, 1]
        elif kind == "wide":
            dims = [hidden_size, 4 * d, 1]
        elif kind == "deep":
            dims = [hidden_size, d, d, d, 1]
        else:
            raise ValueError(f"unknown importance predictor {kind!r}")
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return _acc(self.net(x).squeeze(-1))


def _recomputing() -> bool:
    """True while activation checkpointing re-runs a forward inside the backward pass (the
    only forward that runs there in training)."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


# recompute_activations: the backward makes the grouped GEMMs' activation operands again
# (x_perm by a permute, h by a SwiGLU pass: passes over memory, cheap beside the GEMMs)
# instead of keeping them; everything else is kept, so no GEMM runs twice. Under autocast the
# GEMMs cast those operands (2-D), which is made again too, while the weights' casts (3-D)
# are kept, as without recompute. Two mechanisms state that rule: in eager mode saved-tensor
# hooks around each GEMM (_remade: a few Python calls), under torch.compile, where such hooks
# do not trace, a selective checkpoint per GEMM with this policy (PyTorch's dispatch-mode
# machinery, which costs over a millisecond of Python per layer and step in eager mode).
def _recompute_policy(ctx, func, *args, **kwargs):
    ops = torch.ops.anyexperts
    if (func is ops.permute.default or func is ops.swiglu.default
            or (func is torch.ops.aten._to_copy.default and args[0].dim() == 2)):
        return _checkpoint.CheckpointPolicy.PREFER_RECOMPUTE
    return _checkpoint.CheckpointPolicy.MUST_SAVE


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are on (eager; invisible under torch.compile). A private
    query of torch.utils.checkpoint's: where a torch release lacks it or takes other
    arguments, the answer is no."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    enabled = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", lambda: True)
    if torch.compiler.is_compiling() or top is None:
        return False
    if not enabled():  # disable_saved_tensors_hooks: none may be pushed
        return True
    try:
        return top(False) is not None
    except (TypeError, RuntimeError):
        return False


_recompute_contexts = functools.partial(_checkpoint.create_selective_checkpoint_contexts,
                                        _recompute_policy)


class _Remade:
    """What a saved activation leaves behind: how to make it again, in which dtype, and the
    versions of the tensors it is made from."""
    __slots__ = ("make", "dtype", "sources")

    def __init__(self, make, dtype, sources):
        self.make, self.dtype, self.sources = make, dtype, sources


def _versioned(t: Tensor):
    return t, t._version


def _check_version(t: Tensor, version: int) -> Tensor:
    # autograd checks a saved tensor's version only where no saved-tensor hooks are on: its
    # error, for what these hooks keep and for what a dropped tensor is made from
    if t._version != version:
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: [{t.type()} {list(t.shape)}] is at version {t._version}; "
            f"expected version {version} instead (anyexperts recompute_activations)")
    return t


def _remade(make, *sources):
    """Saved-tensor hooks for one grouped_mm call: of the tensors it saves (a, b, offsets),
    the 2-D one, its activation operand a (or a's autocast cast), is dropped and made again by
    make() from ``sources`` when the backward unpacks it (each time: a retained graph
    backpropagates again)."""
    def pack(t):
        if t.dim() == 2:
            return _Remade(make, t.dtype, [_versioned(s) for s in sources])
        return _versioned(t)

    def unpack(saved):
        if not isinstance(saved, _Remade):
            return _check_version(*saved)
        for source in saved.sources:
            _check_version(*source)
        with torch.no_grad():
            return saved.make().to(saved.dtype)
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _kept(make, *sources):
    return contextlib.nullcontext()


def _shortest_fp32_decimal(value: float) -> float:
    """The shortest decimal that rounds to the same fp32 as ``value``: a target saved as
    fp32 6.3 reads back as 6.3, not 6.300000190734863."""
    as_fp32 = struct.unpack("f", struct.pack("f", value))[0]
    for digits in range(1, 10):  # 9 significant digits always round-trip an fp32
        short = float(f"{as_fp32:.{digits}g}")
        if struct.unpack("f", struct.pack("f", short))[0] == as_fp32:
            return short
    return as_fp32


def _counts(real_total: Tensor, T) -> Tensor:
    """The controller's measurement: (real slots, tokens), fp64 (exact to 2^53 tokens)."""
    return torch.stack([real_total.to(torch.float64),
                        real_total.new_full((), T, dtype=torch.float64)])


def _same_dtype(fn, t: Tensor) -> Tensor:
    """fn(t) (an nn.Module._apply conversion), or t moved to its device where fn would
    change the dtype."""
    moved = fn(t)
    return moved if moved.dtype == t.dtype else t.to(moved.device)


_HALF = (torch.float16, torch.bfloat16)


def _not_below_fp32(fn, t: Tensor) -> Tensor:
    """fn(t) (an nn.Module._apply conversion), in fp32 where fn would make it fp16/bf16:
    config.router_dtype="float32" keeps the routing modules at fp32 or above (.double()
    still gives an fp64 layer)."""
    moved = fn(t)
    if moved.dtype in _HALF and t.is_floating_point():
        return t.to(device=moved.device, dtype=torch.float32)
    return moved


def _keep_router_dtype(layer: "AnyExpertsMoE", incompatible_keys) -> None:
    """load_state_dict(assign=True) takes the saved tensors' dtype: a router saved in bf16
    comes back to fp32 under config.router_dtype."""
    if layer.config.router_dtype is None:
        return
    for module in (layer.router, layer.importance):
        if module is not None and any(p.dtype in _HALF for p in module.parameters()):
            module.float()


def _backend_module(name: str):
    if name == "ops":
        from . import ops
        return ops
    if name == "reference":
        return _reference
    raise ValueError(f"backend must be in {BACKENDS}, got {name!r}")


class AnyExpertsMoE(nn.Module):
    """AnyExperts Mixture-of-Experts layer; returns ``(out, aux)`` (see :class:`MoEAux`).

    Parameters (nn.Linear layout, used through transposed views, never copied):
      ``w_gate_up`` [N, 2F, H] (rows [0, F) gate, [F, 2F) up), ``w_down`` [N, H, F],
      ``router.weight`` [N+M, H], ``const_vectors`` [#const, H], ``importance.*``.
    Buffers: ``importance_bias`` (the budget bias b, updated by the controller and by
    :meth:`calibrate_budget`), ``budget_target`` (target Avg-K; 0 = off),
    ``avg_real_ema`` (running mean real slots per token, training only).
    ``budget_group``: the process group ``config.budget_sync`` reduces over (None: the
    default group).

    ``forward(x, modality=None)``: x [..., H] in the layer's dtype (under torch.autocast, x
    and the layer may mix float32, bfloat16 and float16; the expert GEMMs and the output are
    then in the region's dtype); modality (optional) int with x's leading shape (or
    flattened to [T]), values in [0, config.num_modalities), for per-modality statistics (a
    token with a value outside that range is counted in no modality).
    """

    def __init__(self, config: AnyExpertsConfig, *, device=None, dtype=None, budget_group=None):
        super().__init__()
        config.validate()
        # a copy: set_budget writes target_avg_k, which must not reach other layers built
        # from the same config object
        self.config = c = dataclasses.replace(config)
        fk = {"device": device, "dtype": dtype}
        # the routing modules (router, importance predictor): not below fp32 with
        # config.router_dtype
        rk = (fk if c.router_dtype is None or dtype not in _HALF
              else {"device": device, "dtype": torch.float32})
        H, Fd, N, M = c.hidden_size, c.ffn_size, c.num_experts, c.num_virtual
        self.importance = (ImportancePredictor(H, c.importance, c.importance_hidden).to(**rk)
                           if c.importance is not None else None)
        self.router = Router(H, N + M, **rk)
        self.w_gate_up = nn.Parameter(torch.empty(N, 2 * Fd, H, **fk))
        self.w_down = nn.Parameter(torch.empty(N, H, Fd, **fk))
        kinds = c.virtual_kinds
        self._copy_cols = [m for m, k in enumerate(kinds) if k == "copy"]
        self._const_cols = [m for m, k in enumerate(kinds) if k == "const"]
        self.const_vectors = (nn.Parameter(torch.zeros(len(self._const_cols), H, **fk))
                              if self._const_cols else None)
        bdev = device
        self.register_buffer("importance_bias", torch.zeros((), dtype=torch.float32, device=bdev))
        self.register_buffer("budget_target", torch.tensor(
            float(c.target_avg_k or 0.0), dtype=torch.float32, device=bdev))
        self.register_buffer("avg_real_ema", torch.zeros((), dtype=torch.float32, device=bdev))
        for name, value in self._virtual_tables().items():
            self.register_buffer(name, value.to(device=bdev), persistent=False)
        for name, value in self._TRANSIENT.items():
            setattr(self, name, value().to(device=bdev))
        self.backend = c.backend
        self.budget_group = budget_group
        self.register_load_state_dict_post_hook(_keep_router_dtype)
        self.reset_parameters()
        if self.importance is not None and c.hsm_alpha == 0.0 and c.budget_loss_coef == 0.0 \
                and (c.iar_scale == 0.0 or M == 0):
            warnings.warn("AnyExpertsMoE: the importance predictor gets no gradient (no HSM, no "
                          "IAR shift, no budget loss), so it never trains, and DDP (with "
                          "find_unused_parameters=False) fails on it; freeze it "
                          "(layer.importance.requires_grad_(False)) if that is meant")
        if c.budget_loss_coef > 0 and c.target_avg_k is None:
            warnings.warn("AnyExpertsMoE: budget_loss_coef > 0 without target_avg_k: the budget "
                          "loss is 0 until set_budget or a state_dict load sets a target")

    # ---- setup ---------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        """Every parameter and buffer as construction leaves them: nn.Linear's default init
        for the experts, the router and the importance predictor, const vectors zero, budget
        bias and running mean zero, budget target from the config. This initialises a layer
        built on the meta device, after ``to_empty``."""
        with torch.no_grad():
            for w in (self.w_gate_up, self.w_down):
                bound = 1.0 / math.sqrt(w.shape[-1])
                w.uniform_(-bound, bound)
            self.router.reset_parameters()
            if self.importance is not None:
                for mod in self.importance.modules():
                    if isinstance(mod, nn.Linear):
                        mod.reset_parameters()
            if self.const_vectors is not None:
                self.const_vectors.zero_()
            for name in ("importance_bias", "avg_real_ema", *self._TRANSIENT):
                getattr(self, name).zero_()
            self.budget_target.fill_(float(self.config.target_avg_k or 0.0))
        self._write_virtual_tables()

    def _virtual_tables(self) -> dict:
        """The non-persistent int32 tables, which follow from the config alone (on the CPU,
        or the meta device under a meta device context)."""
        c = self.config
        # add_virtual's code of each virtual expert: -1 zero, -2 copy, c: const_vectors[c]
        codes = [-2 if k == "copy" else -1 for k in c.virtual_kinds]
        for row, m in enumerate(self._const_cols):
            codes[m] = row
        # V(K) = floor(rho_max * K) for K in [0, K_max], in Python integers: the product
        # rho_num * K overflows int32 (and int64) for a float rho such as 0.123456789012, read
        # as 123456789012/10^12
        return {"_virtual_sources": torch.tensor(codes, dtype=torch.int32),
                "_virtual_caps": torch.tensor([c.virtual_cap(k) for k in range(c.k_max + 1)],
                                              dtype=torch.int32)}

    def _write_virtual_tables(self) -> None:
        # In place where they exist (a captured CUDA graph keeps reading the same memory);
        # made beside the weights where they are still meta (load_state_dict(assign=True)).
        device = self.w_gate_up.device
        with torch.no_grad():
            for name, value in self._virtual_tables().items():
                buf = getattr(self, name)
                if not buf.is_meta:
                    buf.copy_(value)
                elif device.type != "meta":
                    setattr(self, name, value.to(device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the tables are not saved: after to_empty they hold garbage, and a load must write
        # them too, or the virtual cap and kinds are silently wrong; the transient state
        # follows the loaded buffers off the meta device (assign=True)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._write_virtual_tables()
        self._transient()
        # the config's target follows the loaded one, as it follows set_budget, so that
        # reset_parameters and config.to_dict() do not bring back the constructed target
        if prefix + "budget_target" in state_dict and not self.budget_target.is_meta:
            target = float(self.budget_target)
            self.config.target_avg_k = _shortest_fp32_decimal(target) if target > 0 else None

    # The controller's transient state: plain tensor attributes, not buffers, because DDP
    # broadcasts every buffer from rank 0 before a forward, which would replace each rank's
    # own counts. _apply moves them; _transient() also follows movers that only see buffers.
    _TRANSIENT = {
        # the bias the last training forward routed with, for its recompute under activation
        # checkpointing (the per-forward controller has moved importance_bias since)
        "_routed_bias": lambda: torch.zeros((), dtype=torch.float32),
        # (real slots, tokens) of the training forwards since the last step_budget()
        "_budget_pending": lambda: torch.zeros(2, dtype=torch.float64),
    }
    # buffers whose dtype is part of their meaning: .to(bf16) and .type(torch.bfloat16)
    # leave them alone
    _STATE_BUFFERS = ("importance_bias", "budget_target", "avg_real_ema", "_virtual_sources",
                      "_virtual_caps")

    def _apply(self, fn, *args, **kwargs):
        # .to(bf16)/.half() must neither cast nor round the controller's state: it leaves
        # the conversion and only follows the device change. With config.router_dtype the
        # routing modules' parameters follow every conversion but one below fp32.
        order = list(self._buffers)
        kept = {name: self._buffers.pop(name) for name in self._STATE_BUFFERS}
        modules = list(self._modules)
        fixed = ({name: self._modules.pop(name) for name in ("router", "importance")
                  if name in self._modules} if self.config.router_dtype is not None else {})
        try:
            super()._apply(fn, *args, **kwargs)
            for module in fixed.values():
                module._apply(functools.partial(_not_below_fp32, fn), *args, **kwargs)
            for name, t in kept.items():
                kept[name] = _same_dtype(fn, t)
            for name, make in self._TRANSIENT.items():
                t = getattr(self, name)  # from meta (to_empty): zero, not garbage
                setattr(self, name, make().to(fn(t).device) if t.is_meta else _same_dtype(fn, t))
        finally:
            rest = dict(self._buffers)
            self._buffers.clear()
            self._buffers.update((name, kept[name] if name in kept else rest[name])
                                 for name in order)
            rest = dict(self._modules)
            self._modules.clear()
            self._modules.update((name, fixed[name] if name in fixed else rest[name])
                                 for name in modules)
        return self

    def _transient(self) -> tuple[Tensor, Tensor]:
        """(_routed_bias, _budget_pending) on the buffers' device: FSDP2 moves buffers
        without _apply."""
        device = self.importance_bias.device
        for name, make in self._TRANSIENT.items():
            t = getattr(self, name)
            if t.device != device:
                setattr(self, name, make().to(device) if t.is_meta else t.to(device))
        return self._routed_bias, self._budget_pending

    @property
    def budget_group(self):
        """The process group ``config.budget_sync`` reduces over (None: the default group)."""
        return self._budget_group

    @budget_group.setter
    def budget_group(self, group) -> None:
        if group is not None and not self.config.budget_sync:
            raise ValueError("AnyExpertsMoE: a budget_group needs config.budget_sync=True")
        self._budget_group = group

    def __getstate__(self):
        if self.budget_group is not None:
            raise TypeError("AnyExpertsMoE: a layer with a budget_group cannot be pickled (a "
                            "process group is a handle of this process); save its "
                            "state_dict, or set budget_group = None first")
        return super().__getstate__()

    def __deepcopy__(self, memo):
        # a process group is a handle, not state: the copy shares it
        if self._budget_group is not None:
            memo[id(self._budget_group)] = self._budget_group
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(nn.Module.__getstate__(self), memo))
        return new

    @property
    def backend(self) -> str:
        return self._backend_name

    @backend.setter
    def backend(self, name: str) -> None:
        _backend_module(name)  # validates
        self._backend_name = name

    @property
    def _B(self):
        return _backend_module(self._backend_name)

    def extra_repr(self) -> str:
        c = self.config
        return (f"H={c.hidden_size}, F={c.ffn_size}, N={c.num_experts}, M={c.num_virtual} "
                f"{list(c.virtual_kinds)}, K=[{c.k_min},{c.k_max}], rho_max={c.rho_max}, "
                f"slots={c.slot_mode}, importance={c.importance}, norm={c.norm}, "
                f"align={c.align}, backend={self.backend}"
                + (f", router_dtype={c.router_dtype}" if c.router_dtype else "")
                + (", recompute_activations" if c.recompute_activations else ""))

    # ---- routing -------------------------------------------------------------------------

    def _slots(self, score: Optional[Tensor], logits: Tensor, bias: Tensor) -> Tensor:
        c = self.config
        T = logits.shape[0]
        if c.slot_mode == "static":
            return torch.full((T,), c.k_max, dtype=torch.int32, device=logits.device)
        if c.slot_mode == "top_p":
            p = torch.softmax(logits, dim=-1)
            ps, _ = torch.sort(p, dim=-1, descending=True)
            before = torch.cumsum(ps, dim=-1) - ps        # mass strictly before each rank
            k = (before < c.top_p).sum(dim=-1)
            return k.clamp(c.k_min, c.k_max).to(torch.int32)
        wb = torch.sigmoid(score.detach() + bias)
        k = torch.round(c.k_min + wb * (c.k_max - c.k_min))
        # a NaN importance (a NaN token) gets K_min slots; its NaN logits make its output NaN
        return torch.nan_to_num(k, nan=float(c.k_min)).clamp(c.k_min, c.k_max).to(torch.int32)

    def _caps(self, slots: Tensor) -> Tensor:
        """V_i = floor(rho_max * K_i), int32, for slots already in [K_min, K_max]."""
        return self._virtual_caps[slots.long()]

    def _route(self, x: Tensor, bias: Optional[Tensor] = None):
        """(x', record, score): the routing of flattened tokens x [T, H]."""
        c = self.config
        N, M = c.num_experts, c.num_virtual
        xr = self._routing_input(x)
        score = w = None
        if self.importance is not None:
            score = self._score(xr)
            w = torch.sigmoid(score)
        xh = x
        if w is not None and c.hsm_alpha != 0.0:
            # one pass over [T, H] each way; alpha w stays fp32 (fp64), not x's dtype
            xh = self._B.hsm(x, c.hsm_alpha * w)
            # the router reads x' unrounded, as a layer in its dtype would
            xr = xh if xr is x else self._B.hsm(xr, c.hsm_alpha * w)
        with self._routing_precision(xr):
            logits = _acc(self.router(xr))
        if M > 0 and w is not None and c.iar_scale != 0.0:
            shift = (c.iar_scale * (1.0 - 2.0 * w)).unsqueeze(-1)
            logits = torch.cat([logits[:, :N], logits[:, N:] + shift], dim=-1)
        slots = self._slots(score, logits, self.importance_bias if bias is None else bias)
        max_virtual = self._caps(slots)
        ids, weights = self._B.segmented_topk(logits, slots, max_virtual, c.k_max, N, c.norm)
        rec = RoutingRecord(ids=ids, weights=weights, slots=slots, max_virtual=max_virtual,
                            importance=w, logits=logits)
        return xh, rec, score

    def _autocast_decides(self, x: Tensor) -> bool:
        """Whether autocast sets the routing modules' compute dtype: in an autocast region,
        without config.router_dtype."""
        return self.config.router_dtype is None and _reference.autocast_enabled(x.device.type)

    def _routing_input(self, x: Tensor) -> Tensor:
        """Tokens x as the router takes them: in its parameters' dtype (fp32 or above with
        config.router_dtype), unless autocast decides."""
        dtype = self.router.weight.dtype
        return x if x.dtype == dtype or self._autocast_decides(x) else x.to(dtype)

    def _routing_precision(self, x: Tensor):
        """With config.router_dtype, autocast off around the routing modules, so that they
        compute in their own dtype (as Megatron's and DeepSeek's fp32 routers do)."""
        if self.config.router_dtype is None or not _reference.autocast_enabled(x.device.type):
            return contextlib.nullcontext()
        return torch.autocast(x.device.type, enabled=False)

    def _score(self, xr: Tensor) -> Tensor:
        """The importance predictor's score s (fp32) of the routing input xr [T, H]."""
        dtype = next(self.importance.parameters()).dtype
        if xr.dtype != dtype and not self._autocast_decides(xr):
            xr = xr.to(dtype)
        with self._routing_precision(xr):
            return self.importance(xr)

    @torch.no_grad()
    def route(self, x: Tensor) -> RoutingRecord:
        """The routing decision alone (no experts run; no gradient)."""
        _, rec, _ = self._route(self._tokens(x))
        return rec

    def _tokens(self, x: Tensor) -> Tensor:
        """x [..., H] as [T, H], after the checks that would otherwise fail deep inside
        (or, for a wrong width that still divides, not at all)."""
        c = self.config
        if x.dim() < 1 or x.shape[-1] != c.hidden_size:
            raise ValueError(f"AnyExpertsMoE: x must be [..., {c.hidden_size}], got "
                             f"{list(x.shape)}")
        dtype = self.w_gate_up.dtype
        if x.dtype != dtype and not (_reference.autocast_enabled(x.device.type) and
                                     {x.dtype, dtype} <= set(_reference.AUTOCAST_DTYPES)):
            raise ValueError(f"AnyExpertsMoE: x must have the layer's dtype {dtype} (under "
                             f"autocast, x and the layer may mix float32, bfloat16 and "
                             f"float16), got {x.dtype}")
        return x.reshape(-1, c.hidden_size)

    # ---- forward -------------------------------------------------------------------------

    def _experts(self, xh: Tensor, ids: Tensor, weights: Tensor):
        """The expert FFNs on the live slots. Of the R = T*K_max rows, those past the last
        group (T*K_max - real slots: most of them at a low Avg-K) are read by no op of this
        chain, forward or backward, so none writes them (zero_tail=False). The rows no slot
        refers to are exactly those when align is 1; with align > 1 they include the groups'
        padding rows, which the GEMMs read, so grad y keeps them zero. Under autograd's anomaly
        mode (eager), which checks every gradient for NaN, dead rows included, they are
        zeroed.

        With ``config.recompute_activations`` (ops backend, grad enabled) the backward makes
        x_perm [R, H] and h [R, F] again when it reaches their GEMM (see _recompute_policy),
        so each lives only while its own GEMM's backward runs. Not where saved-tensor hooks
        are on (an enclosing non-reentrant checkpoint, offloading to the CPU): they would not
        see what the layer's own hooks keep (the weights, the offsets, and the x' and
        [gate | up] a recompute reads), which they are there to drop or move."""
        c = self.config
        zero = (not torch.compiler.is_compiling() and torch.is_anomaly_enabled()
                and torch.is_anomaly_check_nan_enabled())
        recompute = (c.recompute_activations and self.backend == "ops"
                     and torch.is_grad_enabled() and not _saved_tensors_hooked())
        if recompute and torch.compiler.is_compiling():
            region = functools.partial(_checkpoint.checkpoint, use_reentrant=False,
                                       context_fn=_recompute_contexts,
                                       preserve_rng_state=False)
            gu, offsets, slot_rows = region(functools.partial(self._gate_up, zero=zero),
                                            xh, ids, self.w_gate_up)
            y = region(functools.partial(self._down, zero=zero), gu, offsets, self.w_down)
        else:
            remade = _remade if recompute else _kept
            gu, offsets, slot_rows = self._gate_up(xh, ids, self.w_gate_up, zero=zero,
                                                   remade=remade)
            y = self._down(gu, offsets, self.w_down, zero=zero, remade=remade)
        out = self._B.unpermute(y, slot_rows, weights, zero_unreferenced=zero or c.align > 1)
        return out, offsets

    def _gate_up(self, xh: Tensor, ids: Tensor, w_gate_up: Tensor, *, zero: bool,
                 remade=_kept):
        c = self.config

        def permute():
            return self._B.permute(xh, ids, c.num_experts, c.align, zero_tail=zero)
        x_perm, offsets, slot_rows = permute()
        with remade(lambda: permute()[0], xh, ids):
            gu = self._B.grouped_mm(x_perm, w_gate_up.transpose(1, 2), offsets, zero_tail=zero)
        return gu, offsets, slot_rows

    def _down(self, gu: Tensor, offsets: Tensor, w_down: Tensor, *, zero: bool, remade=_kept):
        def swiglu():
            return self._B.swiglu(gu, offsets, zero_tail=zero)
        h = swiglu()
        if not gu.requires_grad:
            remade = _kept  # nothing else keeps gu [R, 2F]: keeping h [R, F] costs less
        with remade(swiglu, gu, offsets):
            return self._B.grouped_mm(h, w_down.transpose(1, 2), offsets, zero_tail=zero)

    def _virtual(self, out: Tensor, xh: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """out plus the virtual experts' terms (copy adds weight * x', const weight * v_j,
        zero nothing): one ``add_virtual`` pass over [T, H], so virtual slots stay near-free
        next to the expert GEMMs."""
        c = self.config
        if not (self._copy_cols or self._const_cols):
            return out  # only zero experts (or none): they add nothing
        const = (self.const_vectors.to(out.dtype) if self.const_vectors is not None
                 else out.new_empty((0, c.hidden_size)))
        return self._B.add_virtual(out, xh.to(out.dtype), ids, weights, c.num_experts,
                                   self._virtual_sources, const)

    def forward(self, x: Tensor, modality: Optional[Tensor] = None
                ) -> tuple[Tensor, MoEAux]:
        c = self.config
        N = c.num_experts
        x2 = self._tokens(x)
        lead = x.shape[:-1]
        T = x2.shape[0]
        if modality is not None:  # checked even when no statistics read it
            if c.num_modalities == 0:
                raise ValueError("modality given but config.num_modalities is 0")
            if (modality.shape not in (lead, (T,)) or modality.is_floating_point()
                    or modality.is_complex()):
                raise ValueError(f"AnyExpertsMoE: modality must be an integer tensor of x's "
                                 f"leading shape {list(lead)} (or flattened, [{T}]), got "
                                 f"{modality.dtype} {list(modality.shape)}")
        # The controller steers in training. A forward re-run by activation checkpointing
        # leaves it alone and, where it stepped in forward, routes with the bias the first run
        # used. With budget_sync every rank takes part, an empty batch too: a collective.
        forward_step = c.controller_step == "forward"
        steer = self.training and c.slot_mode == "importance" and (T > 0 or c.budget_sync)
        recompute = steer and _recomputing()
        bias = self._transient()[0] if recompute and forward_step else self.importance_bias
        xh, rec, score = self._route(x2, bias)
        out, offsets = self._experts(xh, rec.ids, rec.weights)
        rec.offsets = offsets
        out = self._virtual(out, xh, rec.ids, rec.weights)

        # losses
        zero = x2.new_zeros((), dtype=torch.float32)
        # Live real slots per expert: with align 1 the GEMM groups are exactly those.
        counts = (torch.diff(offsets, prepend=offsets.new_zeros(1)).float() if c.align == 1
                  else expert_counts(rec.ids, N))
        lb = load_balance_loss(rec.ids, rec.logits, N, counts=counts)
        zl = router_z_loss(rec.logits) if c.z_loss_coef > 0 else zero
        real, virt = slot_counts(rec.ids, N)
        on = (self.budget_target > 0).float()
        if c.budget_loss_coef > 0 and score is not None and T > 0:
            wb = torch.sigmoid(score + bias)
            soft_real = (c.k_min + wb * (c.k_max - c.k_min)).mean() - virt.float().mean()
            bl = on * ((soft_real - self.budget_target) / c.k_max).square()
        else:
            bl = zero
        # a coefficient of 0 leaves its term out, so that a NaN token's NaN losses do not
        # reach aux.loss through 0 * NaN; it stays a graph over the logits (zero gradients)
        loss = (c.load_balance_coef * lb if c.load_balance_coef > 0
                else _reference._connected(torch.zeros_like(lb), rec.logits))
        if c.z_loss_coef > 0:
            loss = loss + c.z_loss_coef * zl
        if c.budget_loss_coef > 0:
            loss = loss + c.budget_loss_coef * bl

        # budget controller: integral control of the importance bias, no gradient; no host
        # sync (with budget_sync and the per-forward controller: one collective)
        if steer and not recompute:
            routed_bias, pending = self._transient()
            with torch.no_grad():
                seen = _counts(real.sum(), T)
                if forward_step:
                    routed_bias.copy_(self.importance_bias)
                    self._controller_step(self._reduce_counts(seen))
                else:
                    pending.add_(seen)

        stats = None
        if c.compute_stats:
            stats = routing_stats(
                rec, N, gemm_rows_capacity=T * c.k_max + N * (c.align - 1),
                bins=c.importance_bins,
                modality=None if modality is None else modality.reshape(-1),
                num_modalities=c.num_modalities, counts=counts, real_virtual=(real, virt))
        aux = MoEAux(loss=loss, load_balance_loss=lb, z_loss=zl, budget_loss=bl,
                     stats=stats, routing=rec)
        return out.reshape(*lead, c.hidden_size), aux

    # ---- budget --------------------------------------------------------------------------

    def _reduce_counts(self, counts: Tensor) -> Tensor:
        """(real slots, tokens), fp64, summed over the ranks of ``budget_group`` when
        ``config.budget_sync`` is on and torch.distributed is initialised."""
        if not (self.config.budget_sync and torch.distributed.is_available()
                and torch.distributed.is_initialized()):
            return counts
        group = self._budget_group
        if group is not None and torch.distributed.get_rank(group) < 0:
            raise RuntimeError("AnyExpertsMoE: this rank is not in the layer's budget_group")
        counts = counts.clone()
        torch.distributed.all_reduce(counts, group=group)
        return counts

    def _controller_step(self, counts: Tensor) -> None:
        """One integral step of the bias toward the target on the mean real slots per
        token of ``counts`` (none when it holds no token)."""
        c = self.config
        seen = (counts[1] > 0).float()
        mean = (counts[0] / counts[1].clamp(min=1)).float()
        on = (self.budget_target > 0).float()
        err = (self.budget_target - mean) / max(c.k_max - c.k_min, 1)
        self.importance_bias.add_(seen * on * c.controller_rate * err)
        self.avg_real_ema.add_(seen * 0.1 * (mean - self.avg_real_ema))

    @torch.no_grad()
    def step_budget(self) -> None:
        """``controller_step="manual"``: one controller step on the Avg-K of the training
        forwards since the last call (of every rank, with budget_sync: a collective), after
        which that count restarts. Call it once the backward passes are done (beside
        ``optimizer.step()``): the bias then stays put from a forward to its recompute under
        activation checkpointing, whatever runs in between. No host sync (with budget_sync, one
        collective)."""
        if self.config.controller_step != "manual":
            raise RuntimeError('AnyExpertsMoE.step_budget needs config.controller_step="manual" '
                               "(the default steps in every training forward)")
        pending = self._transient()[1]
        self._controller_step(self._reduce_counts(pending))
        pending.zero_()

    def set_budget(self, avg_real: Optional[float], x: Optional[Tensor] = None, *,
                   tol: float = 0.01) -> Optional[float]:
        """Sets the target Avg-K (mean real slots per token; None turns control off).

        With ``x``, also calibrates the budget bias on that batch (see
        :meth:`calibrate_budget`) and returns the Avg-K reached; otherwise the training
        controller moves the bias toward the target step by step.
        """
        c = self.config
        if avg_real is not None:
            if c.slot_mode != "importance":
                raise ValueError('budget control needs slot_mode "importance"')
            lo = c.min_avg_real()
            if not lo <= avg_real <= c.k_max:
                raise ValueError(f"avg_real {avg_real} outside the reachable [{lo}, {c.k_max}]")
        # calibrate first: a batch it rejects leaves the target (and the bias) as they were
        reached = (self.calibrate_budget(x, avg_real, tol=tol)
                   if x is not None and avg_real is not None else None)
        self.budget_target.fill_(float(avg_real or 0.0))
        c.target_avg_k = avg_real
        return reached

    @torch.no_grad()
    def calibrate_budget(self, x: Tensor, avg_real: float, *, tol: float = 0.01,
                         max_iter: int = 64) -> float:
        """Sets the budget bias so that the mean real slots per token on ``x`` is
        ``avg_real`` within ``tol`` (relative). Bisection: the routing logits do not
        depend on the bias, and the real-slot count of a token never decreases when its
        K_i grows, so the mean is monotone in the bias. Synchronises with the host (an
        inference-time setup step, not the hot path). Returns the Avg-K reached.
        """
        c = self.config
        if c.slot_mode != "importance":
            raise ValueError('calibrate_budget needs slot_mode "importance"')
        if not 0 < tol < math.inf:
            raise ValueError(f"calibrate_budget: tol must be > 0 (relative), got {tol}")
        x2 = self._tokens(x)
        T = x2.shape[0]
        def counts(real_total):
            return self._reduce_counts(_counts(real_total, T))

        _, rec, score = self._route(x2)  # score, logits and cap rule as in forward
        logits = rec.logits

        # A token with a non-finite hidden state, score or logit (a finite x can overflow)
        # gets the same slots whatever the bias, and would pull the bias toward whatever
        # makes up for it; one collective counts them on every rank, so all raise.
        finite = (x2.isfinite().all(dim=1) & score.isfinite()
                  & logits.isfinite().all(dim=1))
        nonfinite, tokens = (int(n) for n in counts((~finite).sum()))
        if tokens == 0:
            raise ValueError("calibrate_budget needs at least one token")
        if nonfinite:
            raise ValueError(f"calibrate_budget: {nonfinite} of {tokens} tokens (over the "
                             "ranks with budget_sync) have a non-finite hidden state, "
                             "importance score or router logit; calibrate on finite tokens")

        def measure(b: float) -> float:
            bias = torch.tensor(b, dtype=torch.float32, device=x2.device)
            slots = self._slots(score, logits, bias)
            ids, _ = self._B.segmented_topk(logits, slots, self._caps(slots), c.k_max,
                                            c.num_experts, c.norm)
            real, _ = slot_counts(ids, c.num_experts)
            return counts(real.sum())[0].item() / tokens

        lo, hi = -40.0, 40.0
        f_lo, f_hi = measure(lo), measure(hi)
        best_b, best_f = (lo, f_lo) if abs(f_lo - avg_real) < abs(f_hi - avg_real) else (hi, f_hi)
        reachable = f_lo <= avg_real <= f_hi  # an end that hits it exactly is no miss
        if not f_lo < avg_real < f_hi:
            if not reachable:
                warnings.warn(f"Avg-K {avg_real} is outside what this batch reaches "
                              f"([{f_lo:.3f}, {f_hi:.3f}]); using the nearest end")
        else:
            for _ in range(max_iter):
                mid = 0.5 * (lo + hi)
                f = measure(mid)
                if abs(f - avg_real) < abs(best_f - avg_real):
                    best_b, best_f = mid, f
                if abs(best_f - avg_real) <= 0.25 * tol * avg_real:
                    break
                if f < avg_real:
                    lo = mid
                else:
                    hi = mid
        if reachable and abs(best_f - avg_real) > tol * avg_real:
            warnings.warn(f"calibrated Avg-K {best_f:.4f} misses {avg_real} by more than "
                          f"{tol:.1%} (too few tokens for that resolution?)")
        self.importance_bias.fill_(best_b)
        return best_f
