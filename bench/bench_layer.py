#!/usr/bin/env python3
"""Benchmark of the full AnyExperts MoE layer: compute that follows the real expert slots.

One run per shape measures, side by side (same input, same expert weights):
  * ``anyexperts``          the layer (anyexperts_ops.layer.AnyExpertsMoE, importance slots,
                            virtual experts) calibrated to each Avg-K real target
                            (``set_budget(avg, x)`` on the benchmark batch);
  * ``anyexperts_tight_k``  the same layer and weights with K in [top_k/4, top_k] at the
                            lowest Avg-K: what the configured K_max's static rows cost;
  * ``anyexperts_recompute`` the layer at the lowest Avg-K with ``recompute_activations``:
                            the backward recomputes x_perm and the SwiGLU output (time and
                            peak memory of that trade);
  * ``anyexperts_router_fp32`` the same layer and weights with ``router_dtype="float32"``
                            (router and importance predictor in fp32) at the lowest Avg-K;
  * ``static_topk``         the same layer class and kernels at static top-K (K = top_k);
  * ``weight0_virtual``     the AnyExperts routing with virtual slots sent to a real expert
                            with weight 0 instead of masked (bench/baselines.py);
  * ``weight0_all``         ... virtual and unused slots too (every token computes K_max rows);
  * ``grouped_mm_pipeline`` sort + torch._grouped_mm, torchtitan style, static top-K
                            (per-group loop fallback on CPU / without torch._grouped_mm);
  * ``eager_loop``          the Hugging Face per-expert loop, static top-K;
  * ``static_topk_compiled``, ``anyexperts_compiled`` (lowest Avg-K): the same layers under
                            ``torch.compile(fullgraph=True)`` (``--compile-backend``), which
                            fuses the routing's elementwise work around our ops; their
                            ``time_ratio_vs_static_topk`` is to the compiled static layer.
Each in two modes: ``fwd`` (forward under torch.no_grad) and ``fwd_bwd`` (forward with
autograd + backward of the output and the auxiliary loss; the input needs grad, as inside a
model). Time: median over repetitions after warm-up (CUDA events; CPU: perf_counter). Peak
memory: torch.cuda.max_memory_allocated over one step (absolute, and above what was allocated
before the step); null on CPU. The headline ratio, AnyExperts at the lowest Avg-K against
static top-K, is also measured with the two timed in turns (``*_in_turns`` fields,
bench/timing.py), which a drift of the GPU's clock during the run reaches alike.

For the layer rows, the two grouped GEMMs and the SwiGLU activation are also timed alone, on
the very rows that layer's permute produced (same ops, same run), and
``routing_overhead = layer time - (gemm1 + activation + gemm2)``.

Output: JSON {"gpu", "torch", "cuda", "date", "rows": [...], ...} to --out (default
bench/results/layer.json; with --quick a file in the temporary folder, so a smoke run never
replaces the committed results) and a markdown table beside it (.md). The JSON is rewritten after
every variant, so a run cut short keeps what it measured. A variant that fails records its
error in its row and the run goes on.

    python bench/bench_layer.py                    # the three issue shapes (GPU, bf16)
    python bench/bench_layer.py --quick            # tiny shapes, CPU-friendly (~1 min)
    python bench/bench_layer.py --shapes e128,e8   # a subset; or E16:H64:F32:T256:k8
    python bench/bench_layer.py --variants static,anyexperts,compiled   # layer rows only
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from fractions import Fraction
from typing import Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

import torch  # noqa: E402

try:
    import anyexperts_ops  # noqa: F401
except ImportError:  # running from a checkout without PYTHONPATH=python
    sys.path.append(os.path.join(REPO, "python"))
    import anyexperts_ops  # noqa: F401
from anyexperts_ops import ops as ae_ops  # noqa: E402
from anyexperts_ops import presets  # noqa: E402
from anyexperts_ops.layer import AnyExpertsMoE  # noqa: E402
from anyexperts_ops.stats import slot_counts  # noqa: E402

if HERE not in sys.path:
    sys.path.append(HERE)  # appended, never first: bench/profile.py must not shadow stdlib
from baselines import EagerLoopMoE, GroupedMMMoE, Weight0Backend  # noqa: E402
from provenance import code_commit  # noqa: E402
from timing import (interleaved_rounds_ms, medians, quartile_range,  # noqa: E402
                    round_ratio_quartiles)

# ---- shapes ---------------------------------------------------------------------------

STAGES = ("importance", "router", "segmented_topk", "permute", "gemm1", "activation",
          "gemm2", "unpermute", "losses")
BWD_PREFIX = "bwd:"

SHAPES = {  # issue 4's shapes
    "e128": dict(E=128, H=2048, F=768, T=32768, top_k=8),    # fine-grained, Qwen3-MoE-like
    "e64": dict(E=64, H=2048, F=1024, T=16384, top_k=8),     # OLMoE-like
    "e8": dict(E=8, H=4096, F=14336, T=8192, top_k=2),       # Mixtral-like
}
QUICK_SHAPES = {
    "q16": dict(E=16, H=64, F=32, T=256, top_k=8),
    "q4": dict(E=4, H=64, F=64, T=128, top_k=2),
}
AVGK_BASE = (4.8, 6.4, 7.2, 8.0)   # the issue's Avg-K real targets for top-8
AVGK_SCALING = ("Avg-K targets = {4.8, 6.4, 7.2, 8.0} * top_k / 8 (top-8: as given; top-2: "
                "1.2, 1.6, 1.8, 2.0); AnyExperts K range [max(1, top_k // 2), "
                "min(N, top_k + top_k // 2)] (top-8: [4, 12], the preset's default; top-2: "
                "[1, 3]); rho_max = 1/5 throughout, so tokens with K_i < 5 get no virtual slot")


def shape_name(s: dict) -> str:
    return f"E{s['E']}_H{s['H']}_F{s['F']}_T{s['T']}_top{s['top_k']}"


def parse_shape(spec: str) -> tuple[str, dict]:
    """A named shape (e128, e64, e8, q16, q4, or a full E.._H.. name) or E16:H64:F32:T256:k8."""
    spec = spec.strip()
    table = {**SHAPES, **QUICK_SHAPES}
    if spec in table:
        return spec, dict(table[spec])
    for key, s in table.items():
        if spec == shape_name(s):
            return key, dict(s)
    parts = spec.replace("_", ":").replace(",", ":").split(":")
    keys = {"E": "E", "H": "H", "F": "F", "T": "T", "K": "top_k", "TOP": "top_k"}
    out = {}
    for p in parts:
        p = p.strip()
        if not p:
            continue
        head = p.rstrip("0123456789")
        if head.upper() not in keys or head == p:
            raise ValueError(f"bad shape {spec!r}: use a name ({', '.join(table)}) or "
                             "E16:H64:F32:T256:k8")
        out[keys[head.upper()]] = int(p[len(head):])
    missing = {"E", "H", "F", "T", "top_k"} - set(out)
    if missing:
        raise ValueError(f"shape {spec!r} lacks {sorted(missing)}")
    return shape_name(out), out


def tight_k_range(s: dict) -> tuple[int, int]:
    """A tighter AnyExperts K range for the lowest budget: K_max = top-k (so the layer's
    static rows R = T*K_max equal static top-K's), K_min = top-k / 4."""
    k = s["top_k"]
    return max(1, k // 4), min(s["E"], k)


def k_plan(s: dict, base=AVGK_BASE) -> dict:
    """AnyExperts K range and Avg-K targets for a shape (see AVGK_SCALING)."""
    k, n = s["top_k"], s["E"]
    k_min = max(1, k // 2)
    k_max = min(n, k + k // 2)
    targets = [round(a * k / 8.0, 4) for a in base]
    rho = Fraction(1, 5)
    lo = k_min - (rho.numerator * k_min) // rho.denominator
    targets = [min(max(t, lo), k_max) for t in targets]
    return dict(k_min=k_min, k_max=k_max, targets=targets,
                virtual_possible=(rho.numerator * k_max) // rho.denominator > 0)


# ---- stage ranges (NVTX + record_function), placed from outside the layer -------------

def _nvtx_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.nvtx.range_push("probe")
        torch.cuda.nvtx.range_pop()
        return True
    except Exception:  # noqa: BLE001
        return False


class StageMarker:
    """Flat, per-thread stage ranges: ``switch(name)`` closes the thread's open range and
    opens ``name`` as both an NVTX range (when CUDA is present) and a
    torch.profiler.record_function range, so that the names show in nsys and torch.profiler
    alike. Forward ranges run on the calling thread; backward ranges (prefix "bwd:") on the
    autograd engine's thread, each closed on the thread that opened it."""

    def __init__(self, nvtx: Optional[bool] = None, record_function: bool = True):
        self.nvtx = _nvtx_usable() if nvtx is None else nvtx
        self.rf = record_function
        self._tls = threading.local()

    def switch(self, name: str) -> None:
        cur = getattr(self._tls, "cur", None)
        if cur is not None and cur[0] == name:
            return
        self.close()
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        rf = None
        if self.rf:
            rf = torch.autograd.profiler.record_function(name)
            rf.__enter__()
        self._tls.cur = (name, rf)

    def close(self) -> None:
        cur = getattr(self._tls, "cur", None)
        if cur is None:
            return
        self._tls.cur = None
        if cur[1] is not None:
            cur[1].__exit__(None, None, None)
        if self.nvtx:
            torch.cuda.nvtx.range_pop()

    @contextlib.contextmanager
    def range(self, name: str):
        """A nested (not flat) range, for whole steps."""
        if self.nvtx:
            torch.cuda.nvtx.range_push(name)
        rf = torch.autograd.profiler.record_function(name) if self.rf else None
        if rf is not None:
            rf.__enter__()
        try:
            yield
        finally:
            if rf is not None:
                rf.__exit__(None, None, None)
            if self.nvtx:
                torch.cuda.nvtx.range_pop()


class StageBackend:
    """Stand-in for the layer's op backend (``layer._B``): calls the wrapped backend and,
    with a marker, opens the stage ranges around each op (forward) and registers autograd
    pre-hooks that open the matching "bwd:" ranges (backward). With ``capture``, keeps the
    last permute's (x_perm, offsets) for timing the GEMMs alone."""

    def __init__(self, inner, marker: Optional[StageMarker] = None, capture: bool = False):
        self.inner = inner
        self.marker = marker
        self.capture = capture
        self.captured: dict = {}
        self._gemm = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _sw(self, name):
        if self.marker is not None:
            self.marker.switch(name)

    def _bwd(self, t, name):
        if self.marker is None or not isinstance(t, torch.Tensor) or t.grad_fn is None:
            return
        m = self.marker
        t.grad_fn.register_prehook(lambda grads, _n=BWD_PREFIX + name: m.switch(_n))

    def segmented_topk(self, logits, *args, **kw):
        self._bwd(logits, "router")        # router backward starts at the logits' grad
        self._sw("segmented_topk")
        ids, w = self.inner.segmented_topk(logits, *args, **kw)
        self._bwd(w, "segmented_topk")
        return ids, w

    def permute(self, x, *args, **kw):
        self._bwd(x, "importance")         # HSM (x' = x + a*w*x) belongs to importance
        self._sw("permute")
        out = self.inner.permute(x, *args, **kw)
        self._bwd(out[0], "permute")
        self._gemm = 0
        if self.capture:
            self.captured = dict(x_perm=out[0].detach(), offsets=out[1].detach())
        return out

    def grouped_mm(self, a, b, offsets, **kw):
        self._gemm += 1
        name = "gemm1" if self._gemm == 1 else "gemm2"
        if name == "gemm2":
            self._bwd(a, "activation")
        self._sw(name)
        out = self.inner.grouped_mm(a, b, offsets, **kw)
        self._bwd(out, name)
        if name == "gemm1":
            self._sw("activation")
        return out

    def unpermute(self, y, slot_rows, weights, **kw):
        self._sw("unpermute")
        out = self.inner.unpermute(y, slot_rows, weights, **kw)
        self._bwd(out, "unpermute")
        return out

    def add_virtual(self, out, *args, **kw):
        res = self.inner.add_virtual(out, *args, **kw)
        self._bwd(res, "unpermute")  # the virtual terms' backward, like their forward
        return res


_PROBED_CLASSES: dict = {}


def install_backend(layer, backend) -> Callable[[], None]:
    """Makes ``layer._B`` (the op backend AnyExpertsMoE calls) return ``backend``; returns
    the undo. A plain attribute is set; a read-only property is overridden for this one
    instance by a per-class subclass whose ``_B`` reads the instance's ``_bench_backend``."""
    try:
        had = "_B" in layer.__dict__
        old = layer.__dict__.get("_B")
        layer._B = backend
        if layer._B is backend:
            def undo():
                if had:
                    layer.__dict__["_B"] = old
                else:
                    layer.__dict__.pop("_B", None)
            return undo
    except AttributeError:
        pass
    cls = type(layer)
    sub = _PROBED_CLASSES.get(cls)
    if sub is None:
        sub = type(cls.__name__, (cls,), {
            "_B": property(lambda self: self.__dict__["_bench_backend"]),
            "__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _PROBED_CLASSES[cls] = sub
    layer.__dict__["_bench_backend"] = backend
    layer.__class__ = sub

    def undo():
        layer.__class__ = cls
        layer.__dict__.pop("_bench_backend", None)
    return undo


class LayerProbe:
    """Context manager: routes an AnyExpertsMoE through a StageBackend (optionally over
    another backend, e.g. baselines.Weight0Backend) and, with a marker, places the stage
    ranges with module hooks: importance and router (pre-hooks), the virtual-expert terms
    (kept in the unpermute range), losses (after them, up to the end of forward).

    Only public module hooks and the layer's backend attribute ``_B`` are touched; nothing
    changes what the layer computes."""

    def __init__(self, layer, marker: Optional[StageMarker] = None, capture: bool = False,
                 inner=None):
        self.layer, self.marker, self.capture, self.inner = layer, marker, capture, inner
        self.backend: Optional[StageBackend] = None
        self._handles = []
        self._saved_virtual = None

    def __enter__(self):
        layer = self.layer
        if not hasattr(layer, "_B"):
            raise RuntimeError("AnyExpertsMoE has no `_B` backend attribute any more: "
                               "bench/bench_layer.py's LayerProbe needs updating")
        self._orig = layer._B
        self.backend = StageBackend(self.inner if self.inner is not None else self._orig,
                                    self.marker, self.capture)
        self._restore_backend = install_backend(layer, self.backend)
        m = self.marker
        if m is not None:
            first = "importance" if getattr(layer, "importance", None) is not None else "router"
            self._handles.append(layer.register_forward_pre_hook(lambda mod, a: m.switch(first)))
            self._handles.append(layer.register_forward_hook(lambda mod, a, o: m.close()))
            if getattr(layer, "importance", None) is not None:
                self._handles.append(layer.importance.register_forward_pre_hook(
                    lambda mod, a: m.switch("importance")))
            if getattr(layer, "router", None) is not None:
                self._handles.append(layer.router.register_forward_pre_hook(
                    lambda mod, a: m.switch("router")))
            fn = getattr(layer, "_virtual", None)
            if callable(fn):
                self._saved_virtual = "_virtual" in layer.__dict__, layer.__dict__.get("_virtual")

                def _virtual(*a, _fn=fn, **k):
                    try:
                        return _fn(*a, **k)
                    finally:
                        m.switch("losses")
                layer._virtual = _virtual
            else:  # no hook for the virtual terms: losses start after unpermute
                orig_unpermute = self.backend.unpermute

                def unpermute(*a, _u=orig_unpermute, **k):
                    out = _u(*a, **k)
                    m.switch("losses")
                    return out
                self.backend.unpermute = unpermute
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._saved_virtual is not None:
            had, val = self._saved_virtual
            if had:
                self.layer._virtual = val
            else:
                del self.layer._virtual
            self._saved_virtual = None
        self._restore_backend()
        if self.marker is not None:
            self.marker.close()
        return False

    def mark_backward(self, roots, x=None):
        """Before backward: the loss terms' backward opens "bwd:losses"; the input's
        gradient accumulation closes the backward range on the engine's thread."""
        m = self.marker
        if m is None:
            return
        for r in roots:
            if isinstance(r, torch.Tensor) and r.grad_fn is not None:
                r.grad_fn.register_prehook(lambda g: m.switch(BWD_PREFIX + "losses"))
        if x is not None and x.requires_grad and x.grad_fn is None:
            x.register_post_accumulate_grad_hook(lambda t: m.close())


# ---- timing ---------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, device, *, warmup: int, budget_s: float, min_reps: int,
            max_reps: int) -> dict:
    """Median/min time in ms after warm-up; reps chosen from a pilot run to fit budget_s."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    pilot = time.perf_counter() - t0
    reps = int(max(min_reps, min(max_reps, math.ceil(budget_s / max(pilot, 1e-6)))))
    times = []
    if device.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
               for _ in range(reps)]
        for a, b in evs:
            a.record()
            fn()
            b.record()
        torch.cuda.synchronize(device)
        times = [a.elapsed_time(b) for a, b in evs]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return dict(time_ms=statistics.median(times), time_ms_min=min(times), reps=reps,
                warmup=warmup)


def forward_step(call: Callable, x) -> Callable:
    """call(x) under no_grad."""
    def fwd():
        with torch.no_grad():
            return call(x)
    return fwd


def training_step(call: Callable, params, x, dy, probe_factory=None):
    """(step, clear): step() runs call on a copy of x that needs grad, as inside a model,
    and backward of the output (cotangent dy) and of the auxiliary loss, with the grads of
    x and of params reset first; clear() drops the grads it leaves."""
    probe_factory = probe_factory or contextlib.nullcontext
    xr = x.detach().clone().requires_grad_(True)
    plist = [p for p in params if p.requires_grad]

    def clear():
        xr.grad = None
        for p in plist:
            p.grad = None

    def step():
        clear()
        with probe_factory() as pr:
            out, loss = call(xr)
            roots, grads = [out], [dy]
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                roots.append(loss)
                grads.append(torch.ones_like(loss))
            if isinstance(pr, LayerProbe):
                pr.mark_backward(roots, xr)
            torch.autograd.backward(roots, grads)
    return step, clear


def peak_memory(fn: Callable, device) -> dict:
    if device.type != "cuda":
        return dict(peak_mem_bytes=None, peak_mem_extra_bytes=None)
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    return dict(peak_mem_bytes=int(peak), peak_mem_extra_bytes=int(peak - base))


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _err(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) < 600 else msg[:600] + "..."


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    den = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / (den if den > 0 else 1.0)


# ---- the suite ------------------------------------------------------------------------

def build_layers(s: dict, plan: dict, device, dtype, *, seed: int = 0, stats: bool = False,
                 align: int = 1) -> dict:
    """The benchmark batch and layers of one shape: x[T,H], dy[T,H], the AnyExperts layer
    (presets.anyexperts over plan's K range, eval mode) and the static top-K layer sharing
    its expert weights (and the real rows of its router)."""
    E, H, Fd, T, k = s["E"], s["H"], s["F"], s["T"], s["top_k"]
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(T, H, generator=gen).to(device=device, dtype=dtype)
    dy = (torch.randn(T, H, generator=gen) * 0.1).to(device=device, dtype=dtype)
    cfg = presets.anyexperts(H, Fd, E, k_min=plan["k_min"], k_max=plan["k_max"],
                             target_avg_k=plan["targets"][-1], compute_stats=stats,
                             align=align)
    layer = AnyExpertsMoE(cfg, device=device, dtype=dtype).eval()
    st_cfg = presets.static_topk(H, Fd, E, k, compute_stats=stats, align=align)
    static = AnyExpertsMoE(st_cfg, device=device, dtype=dtype).eval()
    static.w_gate_up = layer.w_gate_up          # same experts, no copy
    static.w_down = layer.w_down
    with torch.no_grad():
        static.router.weight.copy_(layer.router.weight[:E])
    return dict(layer=layer, static=static, x=x, dy=dy, cfg=cfg, static_cfg=st_cfg)


class Suite:
    def __init__(self, args):
        self.args = args
        self.compile_label = (f"torch.compile(fullgraph=True, backend={args.compile_backend!r}"
                              + (f", mode={args.compile_mode!r})" if args.compile_mode else ")"))
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.rows: list[dict] = []
        self.shapes: list[dict] = []
        self.t_start = time.perf_counter()
        self.marker = StageMarker() if args.nvtx else None
        self.avgk_base = tuple(float(v) for v in args.avgk.split(",")) if args.avgk else (
            (AVGK_BASE[0], AVGK_BASE[-1]) if args.quick else AVGK_BASE)
        self.weight0_at = args.weight0_at or ("lowest" if args.quick else "all")
        if args.quick:
            self.warmup, self.min_reps, self.max_reps = 1, 2, 3
            self.budget, self.sub_budget = 0.05, 0.02
            self.rounds, self.iters = 2, 1
        else:
            self.warmup, self.min_reps, self.max_reps = args.warmup, args.min_reps, args.max_reps
            self.budget, self.sub_budget = args.budget_s, args.budget_s / 2
            self.rounds, self.iters = args.rounds, args.iters

    # -- helpers --
    def out_of_time(self) -> bool:
        return bool(self.args.max_seconds) and (
            time.perf_counter() - self.t_start > self.args.max_seconds)

    def measure(self, fn, slow: bool = False, sub: bool = False) -> dict:
        warm = 1 if slow else self.warmup
        return time_fn(fn, self.device, warmup=warm,
                       budget_s=self.sub_budget if sub else self.budget,
                       min_reps=min(self.min_reps, 3) if slow else self.min_reps,
                       max_reps=min(self.max_reps, 5) if slow else self.max_reps)

    def write(self):
        write_results(self.args.out, self.meta(), self.shapes, self.rows)

    def meta(self) -> dict:
        if not hasattr(self, "_meta"):
            self._meta = environment(self.device)
        return self._meta

    # -- measuring one model (both modes) --
    def _row(self, base: dict, mode: str, measure: Callable[[dict], None]) -> dict:
        """One result row: measure(row) fills it; a failure, or --max-seconds running out, is
        recorded in the row instead of stopping the run."""
        row = dict(base, mode=mode)
        try:
            if self.out_of_time():
                raise TimeoutError("skipped: --max-seconds reached")
            measure(row)
            row["error"] = None
        except Exception as e:  # noqa: BLE001
            row["error"] = _err(e)
            if self.args.verbose:
                traceback.print_exc()
        _free(self.device)
        return row

    def bench_model(self, base: dict, call: Callable, params, x, dy, *, slow=False,
                    probe_factory=None) -> list[dict]:
        """call(x) -> (out, loss). Returns the fwd and fwd_bwd rows."""
        def measure_fwd(row):
            fwd = forward_step(call, x)
            with (probe_factory or contextlib.nullcontext)():
                row.update(self.measure(fwd, slow=slow))
                row.update(peak_memory(fwd, self.device))

        def measure_fwd_bwd(row):
            step, clear = training_step(call, params, x, dy, probe_factory)
            row.update(self.measure(step, slow=slow))
            row.update(peak_memory(step, self.device))
            clear()

        return [self._row(base, "fwd", measure_fwd), self._row(base, "fwd_bwd", measure_fwd_bwd)]

    def in_turns(self, rows: list[dict], static, layer, x, dy, layer_call) -> None:
        """The headline ratio measured once more, the static top-K layer and `layer` (at
        its current budget) timed in turns (timing.interleaved_rounds_ms), into `rows`
        (layer's fwd and fwd_bwd rows): time_ratio_vs_static_topk_in_turns, and its 25th-75th
        percentile over the rounds (time_ratio_in_turns_round_quartiles). One after the
        other, as the other rows are timed, a change of the GPU's clock between the two
        reaches one of them only (about +-0.02 on the ratio between runs)."""
        steps = {"fwd": lambda m: forward_step(layer_call(m), x),
                 "fwd_bwd": lambda m: training_step(layer_call(m), list(m.parameters()), x,
                                                    dy)[0]}
        for r in rows:
            if r.get("error"):
                continue
            fns = {"static": steps[r["mode"]](static), "layer": steps[r["mode"]](layer)}
            by_round, errors = interleaved_rounds_ms(fns, self.warmup, self.rounds, self.iters,
                                                     self.device)
            if errors:
                r["in_turns_error"] = "; ".join(f"{k}: {v}" for k, v in errors.items())
                continue
            times = medians(by_round)
            r.update(in_turns_ms=times["layer"], in_turns_static_ms=times["static"],
                     in_turns_rounds=self.rounds, in_turns_iters=self.iters,
                     time_ratio_vs_static_topk_in_turns=times["layer"] / times["static"],
                     time_ratio_in_turns_round_quartiles=round_ratio_quartiles(
                         by_round, "layer", "static"))
        for p in (*static.parameters(), *layer.parameters()):
            p.grad = None
        _free(self.device)
        self.write()

    def expert_compute(self, layer, x, dy_rows_seed: int, inner=None) -> dict:
        """Times gemm1 + activation + gemm2 alone on the rows the layer's permute produced
        (same ops and dead-row flags as AnyExpertsMoE._experts). Returns per-mode fields."""
        with torch.no_grad(), LayerProbe(layer, capture=True, inner=inner) as pr:
            layer(x)
            cap = pr.backend.captured
        if not cap:
            raise RuntimeError("layer did not call permute through its backend")
        x_perm, offsets = cap["x_perm"], cap["offsets"]
        wgu = layer.w_gate_up.transpose(1, 2)
        wd = layer.w_down.transpose(1, 2)
        gemm_rows = int(offsets[-1]) if offsets.numel() else 0
        T = x.shape[0]

        dead = dict(zero_tail=False)

        def chain(a):
            gu = ae_ops.grouped_mm(a, wgu, offsets, **dead)
            return ae_ops.grouped_mm(ae_ops.swiglu(gu, offsets, **dead), wd, offsets, **dead)

        res = {"fwd": {}, "fwd_bwd": {}}
        with torch.no_grad():
            gu = ae_ops.grouped_mm(x_perm, wgu, offsets, **dead)
            h = ae_ops.swiglu(gu, offsets, **dead)
            t1 = self.measure(lambda: ae_ops.grouped_mm(x_perm, wgu, offsets, **dead), sub=True)
            ta = self.measure(lambda: ae_ops.swiglu(gu, offsets, **dead), sub=True)
            t2 = self.measure(lambda: ae_ops.grouped_mm(h, wd, offsets, **dead), sub=True)
            tc = self.measure(lambda: chain(x_perm), sub=True)
            del gu, h
        res["fwd"] = dict(gemm1_ms=t1["time_ms"], activation_ms=ta["time_ms"],
                          gemm2_ms=t2["time_ms"], expert_compute_ms=tc["time_ms"],
                          gemm_rows_capacity=x_perm.shape[0])
        gen = torch.Generator(device=x_perm.device).manual_seed(dy_rows_seed)
        dyp = torch.randn(x_perm.shape, generator=gen, device=x_perm.device,
                          dtype=x_perm.dtype) * 0.1
        a = x_perm.clone().requires_grad_(True)
        ws = [layer.w_gate_up, layer.w_down]

        def step():
            a.grad = None
            for w in ws:
                w.grad = None
            chain(a).backward(dyp)
        tb = self.measure(step, sub=True)
        a.grad = None
        for w in ws:
            w.grad = None
        res["fwd_bwd"] = dict(expert_compute_ms=tb["time_ms"])
        for m in res.values():
            m["gemm_rows"] = gemm_rows
            m["gemm_rows_per_token"] = gemm_rows / max(T, 1)
        return res

    # -- one shape --
    def run_shape(self, key: str, s: dict):
        args, dev, dt = self.args, self.device, self.dtype
        E, H, Fd, T, k = s["E"], s["H"], s["F"], s["T"], s["top_k"]
        plan = k_plan(s, self.avgk_base)
        sname = shape_name(s)
        print(f"== {sname} ({key}) on {dev} {dt}: K range [{plan['k_min']}, {plan['k_max']}], "
              f"Avg-K targets {plan['targets']}", flush=True)
        shape_info = dict(name=sname, key=key, E=E, H=H, F=Fd, T=T, top_k=k,
                          k_min=plan["k_min"], k_max=plan["k_max"],
                          avg_k_targets=plan["targets"], avg_k_scaling=AVGK_SCALING,
                          virtual_slots_possible=plan["virtual_possible"])
        self.shapes.append(shape_info)
        built = build_layers(s, plan, dev, dt, seed=args.seed, stats=args.stats,
                             align=args.align)
        layer, static, x, dy = built["layer"], built["static"], built["x"], built["dy"]
        cfg = built["cfg"]
        shape_info["anyexperts_config"] = cfg.to_dict()
        shape_info["static_config"] = built["static_cfg"].to_dict()
        del built
        base = dict(shape=sname, E=E, H=H, F=Fd, T=T, top_k=k, dtype=args.dtype,
                    device=dev.type)
        _free(dev)

        def layer_call(m):
            def call(inp):
                out, aux = m(inp)
                return out, aux.loss
            return call

        wanted = set(args.variants.split(","))
        with torch.no_grad():
            ref_static = static(x)[0]

        # static top-K on the same layer and kernels
        if "static" in wanted:
            b = dict(base, name=f"static top-{k} (same layer)", variant="static_topk",
                     impl="anyexperts_ops layer, static top-K preset",
                     target_avg_k=None, avg_real_experts=float(k), avg_virtual_experts=0.0)
            self.layer_rows(b, static, x, dy, layer_call(static))
        if "compiled" in wanted:
            b = dict(base, name=f"static top-{k}, torch.compile", variant="static_topk_compiled",
                     impl=f"static top-K layer under {self.compile_label}",
                     target_avg_k=None, avg_real_experts=float(k), avg_virtual_experts=0.0)
            self.compiled_rows(b, static, x, dy, layer_call)

        # AnyExperts at each Avg-K, and the weight-0 handling of its masked slots
        for target in plan["targets"]:
            if not ({"anyexperts", "weight0", "compiled"} & wanted):
                break
            b = dict(base, name=f"anyexperts avg-k {target:g}", variant="anyexperts",
                     impl=f"anyexperts_ops layer, importance slots K in "
                          f"[{plan['k_min']}, {plan['k_max']}], {cfg.num_virtual} virtual",
                     target_avg_k=target)
            try:
                with warnings.catch_warnings(record=True) as wlist:
                    warnings.simplefilter("always")
                    achieved = layer.set_budget(target, x)
                rec = layer.route(x)
                real, virt = slot_counts(rec.ids, E)
                b.update(avg_real_experts=float(real.float().mean()),
                         avg_virtual_experts=float(virt.float().mean()),
                         avg_slots=float(rec.slots.float().mean()),
                         calibrated_avg_real=achieved)
                if wlist:
                    b["note"] = "; ".join(str(w.message) for w in wlist)[:400]
            except Exception as e:  # noqa: BLE001
                err = f"calibration failed: {_err(e)}"
                for mode in ("fwd", "fwd_bwd"):
                    self.rows.append(dict(b, mode=mode, error=err))
                self.write()
                continue
            if "anyexperts" in wanted:
                any_rows = self.layer_rows(b, layer, x, dy, layer_call(layer))
                if "static" in wanted and target == min(plan["targets"]):
                    self.in_turns(any_rows, static, layer, x, dy, layer_call)
            else:
                any_rows = []
            if "recompute" in wanted and target == min(plan["targets"]):
                rb = dict(b, name=f"anyexperts avg-k {target:g}, recompute_activations",
                          variant="anyexperts_recompute",
                          impl=f"{b['impl']}, x_perm and h recomputed in backward")
                layer.config.recompute_activations = True
                try:
                    self.layer_rows(rb, layer, x, dy, layer_call(layer))
                finally:
                    layer.config.recompute_activations = False
            if "router32" in wanted and target == min(plan["targets"]):
                self.router_fp32_rows(b, layer, x, dy, layer_call)
            if "compiled" in wanted and target == min(plan["targets"]):
                cb = dict(b, name=f"anyexperts avg-k {target:g}, torch.compile",
                          variant="anyexperts_compiled",
                          impl=f"{b['impl']}, under {self.compile_label}")
                self.compiled_rows(cb, layer, x, dy, layer_call)
            if "weight0" in wanted and (self.weight0_at == "all" or
                                        target == min(plan["targets"])):
                with torch.no_grad():
                    ref_any = layer(x)[0]
                for mode in ("virtual", "all"):
                    if mode == "virtual" and b["avg_virtual_experts"] == 0.0:
                        continue   # nothing to send anywhere: identical to the layer row
                    wb = dict(b, name=f"weight-0 {'virtual' if mode == 'virtual' else 'all'}"
                                      f" slots, avg-k {target:g}",
                              variant=f"weight0_{mode}",
                              impl=("AnyExperts routing, virtual slots sent to a real expert "
                                    "with weight 0" if mode == "virtual" else
                                    "AnyExperts routing, virtual and unused slots sent to a "
                                    "real expert with weight 0 (T*K_max GEMM rows)"))
                    wb.pop("note", None)
                    inner = Weight0Backend(layer._B, mode)
                    try:
                        with torch.no_grad(), LayerProbe(layer, inner=inner):
                            chk = rel_err(layer(x)[0], ref_any)
                        wb.update(check_rel_err=chk, check_against="anyexperts (same routing)")
                    except Exception as e:  # noqa: BLE001
                        wb["check_error"] = _err(e)
                    self.layer_rows(wb, layer, x, dy, layer_call(layer), inner=inner)
                del ref_any
            del any_rows
        if "tight" in wanted:
            self.tight_rows(base, s, plan, layer, x, dy, layer_call)
        layer.set_budget(None)

        # torchtitan-style torch._grouped_mm pipeline, static top-K
        if "gmm" in wanted:
            self.baseline_rows(base, "grouped_mm_pipeline", lambda: GroupedMMMoE(
                static.router.weight, static.w_gate_up, static.w_down, k,
                use_torch_grouped_mm={"auto": None, "on": True, "off": False}[args.torch_gmm]),
                x, dy, ref_static, slow=False)
        # Hugging Face eager per-expert loop, static top-K
        if "eager" in wanted:
            self.baseline_rows(base, "eager_loop", lambda: EagerLoopMoE(
                static.router.weight, static.w_gate_up, static.w_down, k), x, dy, ref_static,
                slow=True)
        del layer, static, ref_static, x, dy
        _free(dev)

    def compiled_rows(self, b: dict, layer, x, dy, layer_call) -> list[dict]:
        """The layer under torch.compile(fullgraph=True): a fresh compiled module per call
        (warm-up compiles it; forward under no_grad and forward+backward are two graphs).
        The GEMM chain is timed eagerly as for the eager rows: the same custom ops run
        either way, so the overhead is what the compiled routing costs."""
        try:
            cm = torch.compile(layer, fullgraph=True, backend=self.args.compile_backend,
                               mode=self.args.compile_mode)
            with torch.no_grad():
                b["check_rel_err"] = rel_err(cm(x)[0], layer(x)[0])
            b["check_against"] = "eager layer (same weights and routing)"
        except Exception as e:  # noqa: BLE001
            rows = [dict(b, mode=m, error=f"compile failed: {_err(e)}")
                    for m in ("fwd", "fwd_bwd")]
            if self.args.verbose:
                traceback.print_exc()
            self._finish(rows)
            return rows
        rows = self.layer_rows(b, layer, x, dy, layer_call(cm), probe=False)
        del cm
        torch._dynamo.reset()
        return rows

    def layer_rows(self, b: dict, layer, x, dy, call, inner=None, probe=True) -> list[dict]:
        """fwd and fwd_bwd rows of call (the layer or a compiled layer), with the GEMM chain
        timed alone on the layer's rows. probe=False: no stage ranges (they would break a
        compiled graph)."""
        print(f"  {b['name']} ...", flush=True)
        marker = self.marker
        factory = (lambda: LayerProbe(layer, marker=marker, inner=inner)) if probe and (
            marker is not None or inner is not None) else None
        rows = self.bench_model(b, call, list(layer.parameters()), x, dy,
                                probe_factory=factory)
        try:
            if self.out_of_time():
                raise TimeoutError("skipped: --max-seconds reached")
            ec = self.expert_compute(layer, x, self.args.seed + 1, inner=inner)
            for r in rows:
                r.update(ec[r["mode"]])
                if r.get("time_ms") is not None and r.get("expert_compute_ms") is not None:
                    r["routing_overhead_ms"] = r["time_ms"] - r["expert_compute_ms"]
                    r["routing_overhead_frac"] = r["routing_overhead_ms"] / r["time_ms"]
        except Exception as e:  # noqa: BLE001
            for r in rows:
                r["expert_compute_error"] = _err(e)
            if self.args.verbose:
                traceback.print_exc()
        _free(self.device)
        self._finish(rows)
        return rows

    def router_fp32_rows(self, b, layer, x, dy, layer_call):
        """The layer (same weights, a copy) with router_dtype="float32": its router and
        importance predictor in fp32 (their weights converted up from the benchmark dtype), the
        bias calibrated again to the same target."""
        rb = dict(b, name=f"{b['name']}, router_dtype float32", variant="anyexperts_router_fp32",
                  impl=f"{b['impl']}, router and importance predictor in fp32")
        rb.pop("note", None)

        def build():
            fp32 = copy.deepcopy(layer)
            fp32.config.router_dtype = "float32"
            fp32.router.float()
            if fp32.importance is not None:
                fp32.importance.float()
            return fp32
        self.calibrated_rows(rb, build, x, dy, layer_call)

    def tight_rows(self, base, s, plan, layer, x, dy, layer_call):
        """The AnyExperts layer (same weights) with K in tight_k_range at the lowest Avg-K
        target: what the static rows R = T*K_max cost, beside the configured range's row.
        Informative only; the issue's rows use the configured K range."""
        k_min, k_max = tight_k_range(s)
        target = min(plan["targets"])
        b = dict(base, name=f"anyexperts avg-k {target:g}, K in [{k_min}, {k_max}]",
                 variant="anyexperts_tight_k", target_avg_k=target,
                 impl=f"anyexperts_ops layer, importance slots K in [{k_min}, {k_max}], "
                      f"same weights as the configured layer")

        def build():
            cfg = dataclasses.replace(layer.config, k_min=k_min, k_max=k_max,
                                      target_avg_k=target)
            tight = AnyExpertsMoE(cfg, device=x.device, dtype=x.dtype).eval()
            for name in ("w_gate_up", "w_down", "const_vectors", "router", "importance"):
                setattr(tight, name, getattr(layer, name))   # shared, not copied
            return tight
        self.calibrated_rows(b, build, x, dy, layer_call)

    def calibrated_rows(self, b, build, x, dy, layer_call):
        """The rows of the layer build() makes, its bias calibrated to b's Avg-K target on x;
        a setup that fails is recorded in the rows."""
        try:
            layer = build()
            b["calibrated_avg_real"] = layer.set_budget(b["target_avg_k"], x)
            real, virt = slot_counts(layer.route(x).ids, layer.config.num_experts)
            b.update(avg_real_experts=float(real.float().mean()),
                     avg_virtual_experts=float(virt.float().mean()))
        except Exception as e:  # noqa: BLE001
            for mode in ("fwd", "fwd_bwd"):
                self.rows.append(dict(b, mode=mode, error=f"setup failed: {_err(e)}"))
            self.write()
            return
        self.layer_rows(b, layer, x, dy, layer_call(layer))

    def baseline_rows(self, base, variant, build, x, dy, ref_out, slow):
        names = {"grouped_mm_pipeline": "torch._grouped_mm pipeline",
                 "eager_loop": "eager per-expert loop (HF)"}
        b = dict(base, name=names[variant], variant=variant, target_avg_k=None,
                 avg_real_experts=float(base["top_k"]), avg_virtual_experts=0.0,
                 gemm_rows_per_token=float(base["top_k"]))
        print(f"  {b['name']} ...", flush=True)
        try:
            model = build()
            b["impl"] = model.label
            if isinstance(model, GroupedMMMoE):
                b["name"] = ("torch._grouped_mm pipeline" if model.use_torch_grouped_mm else
                             "per-group loop pipeline (torch._grouped_mm fallback)")
                b["torch_grouped_mm"] = model.use_torch_grouped_mm
                b["align"] = model.align
                if model.fallback_reason:
                    b["note"] = model.fallback_reason
        except Exception as e:  # noqa: BLE001
            rows = [dict(b, mode=m, error=f"build failed: {_err(e)}") for m in ("fwd", "fwd_bwd")]
            self._finish(rows)
            return rows
        try:
            with torch.no_grad():
                b["check_rel_err"] = rel_err(model(x)[0], ref_out)
            b["check_against"] = "static top-K layer output (same weights)"
        except Exception as e:  # noqa: BLE001
            b["check_error"] = _err(e)
        rows = self.bench_model(b, model, list(model.parameters()), x, dy, slow=slow)
        del model
        _free(self.device)
        self._finish(rows)
        return rows

    def _finish(self, rows):
        for r in rows:
            self.rows.append(r)
            t = r.get("time_ms")
            msg = f"{t:9.3f} ms" if t is not None else f"ERROR {r.get('error')}"
            extra = ""
            if r.get("routing_overhead_frac") is not None:
                extra = f"  overhead {100 * r['routing_overhead_frac']:.1f}%"
            print(f"    {r['mode']:7s} {msg}{extra}", flush=True)
        derive(self.rows)
        self.write()


# ---- derived fields, summary, output --------------------------------------------------

def _compiled(r: dict) -> bool:
    return r.get("variant", "").endswith("_compiled")


def derive(rows: list[dict]) -> None:
    """time_ratio_vs_static_topk (compiled rows: to the compiled static layer) and
    speedup_vs_eager, per shape and mode."""
    ref = {}
    eager = {}
    for r in rows:
        if r.get("time_ms") is None:
            continue
        key = (r["shape"], r["mode"])
        if r["variant"] in ("static_topk", "static_topk_compiled"):
            ref[key + (_compiled(r),)] = r["time_ms"]
        elif r["variant"] == "eager_loop":
            eager[key] = r["time_ms"]
    for r in rows:
        key = (r.get("shape"), r.get("mode"))
        t = r.get("time_ms")
        rk = key + (_compiled(r),)
        r["time_ratio_vs_static_topk"] = (t / ref[rk]) if (t is not None and rk in ref) else None
        r["speedup_vs_eager"] = (eager[key] / t) if (t is not None and key in eager) else None


def summary(rows: list[dict], shapes: list[dict]) -> dict:
    """The issue's 'done when' numbers, measured (None where a row is missing)."""
    out = {}
    for s in shapes:
        name = s["name"]
        lo, hi = min(s["avg_k_targets"]), max(s["avg_k_targets"])

        def pick(variant, mode, target=None):
            for r in rows:
                if (r["shape"] == name and r["variant"] == variant and r["mode"] == mode
                        and (target is None or r.get("target_avg_k") == target)
                        and r.get("time_ms") is not None):
                    return r
            return None
        ent = {}
        r = pick("anyexperts", "fwd_bwd", lo)
        ent["ratio_lowest_avgk_vs_static_fwd_bwd"] = r and r["time_ratio_vs_static_topk"]
        ent["ratio_lowest_avgk_vs_static_fwd_bwd_in_turns"] = r and r.get(
            "time_ratio_vs_static_topk_in_turns")
        ent["ratio_lowest_avgk_vs_static_fwd_bwd_in_turns_round_quartiles"] = r and r.get(
            "time_ratio_in_turns_round_quartiles")
        ent["ratio_lowest_avgk_vs_static_fwd_bwd_target"] = 0.70
        r = pick("anyexperts", "fwd", lo)
        ent["ratio_lowest_avgk_vs_static_fwd"] = r and r["time_ratio_vs_static_topk"]
        ent["ratio_lowest_avgk_vs_static_fwd_in_turns"] = r and r.get(
            "time_ratio_vs_static_topk_in_turns")
        ov = {}
        for mode in ("fwd", "fwd_bwd"):
            vals = [x.get("routing_overhead_frac") for x in rows
                    if x["shape"] == name and x["variant"] == "anyexperts" and x["mode"] == mode
                    and x.get("routing_overhead_frac") is not None]
            ov[mode] = max(vals) if vals else None
        ent["max_routing_overhead_frac_anyexperts"] = ov
        r = pick("anyexperts_compiled", "fwd_bwd", lo)
        ent["ratio_lowest_avgk_vs_static_fwd_bwd_compiled"] = r and r["time_ratio_vs_static_topk"]
        ent["routing_overhead_frac_compiled"] = {}
        for mode in ("fwd", "fwd_bwd"):
            r = pick("anyexperts_compiled", mode, lo)
            ent["routing_overhead_frac_compiled"][mode] = r and r.get("routing_overhead_frac")
        ent["routing_overhead_target"] = 0.15
        r = pick("anyexperts", "fwd_bwd", hi)
        ent["speedup_vs_eager_fwd_bwd_at_avgk_topk"] = r and r["speedup_vs_eager"]
        r = pick("anyexperts", "fwd_bwd", lo)
        ent["speedup_vs_eager_fwd_bwd_at_lowest_avgk"] = r and r["speedup_vs_eager"]
        r = pick("static_topk", "fwd_bwd")
        ent["speedup_vs_eager_fwd_bwd_static_layer"] = r and r["speedup_vs_eager"]
        ent["speedup_vs_eager_target"] = 3.0
        out[name] = ent
    return out


def environment(device) -> dict:
    gpu = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        gpu = f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    kernels = {}
    for op in ("segmented_topk", "permute", "grouped_mm", "grouped_mm_wgrad", "unpermute"):
        try:
            kernels[op] = bool(torch._C._dispatch_has_kernel_for_dispatch_key(
                f"anyexperts::{op}", "CUDA"))
        except Exception:  # noqa: BLE001
            kernels[op] = None
    commit = code_commit()
    return dict(gpu=gpu, cpu=platform.processor() or platform.machine(),
                cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                cuda=torch.version.cuda,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                commit=commit, anyexperts_cuda_kernels=kernels,
                grouped_mm_backend_override=os.environ.get("ANYEXPERTS_GROUPED_MM_BACKEND"))


MODES_DOC = {
    "fwd": "forward under torch.no_grad()",
    "fwd_bwd": "forward with autograd (input requires grad) + backward of the output "
               "(random cotangent) and the auxiliary loss; parameter grads reset each step",
}


def write_results(path: str, meta: dict, shapes: list[dict], rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    doc = dict(meta)
    doc.update(
        benchmark="anyexperts_ops layer (bench/bench_layer.py)",
        modes=MODES_DOC,
        timing="median of reps after warm-up; CUDA events on GPU, perf_counter on CPU. "
               "The *_in_turns fields (AnyExperts at the lowest Avg-K): that layer and the "
               "static top-K layer timed again in turns (with the ratio's 25th-75th percentile "
               "over the rounds), in_turns_rounds rounds of "
               "in_turns_iters steps each, order shuffled per round (bench/timing.py)",
        memory="torch.cuda.max_memory_allocated over one step (peak_mem_bytes) and above "
               "the memory allocated before it (peak_mem_extra_bytes); null on CPU",
        routing_overhead="layer time minus (gemm1 + activation + gemm2) timed alone on the "
                         "rows that layer's permute produced, same run (fwd rows also "
                         "carry gemm1_ms, activation_ms (swiglu, live rows only) and "
                         "gemm2_ms)",
        shapes=shapes,
        rows=rows,
        summary=summary(rows, shapes),
    )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)
    md = os.path.splitext(path)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(doc))


def _fmt(v, spec="{:.3g}", none="-"):
    if v is None:
        return none
    try:
        return spec.format(v)
    except (TypeError, ValueError):
        return str(v)


def markdown(doc: dict) -> str:
    lines = ["# AnyExperts layer benchmark",
             "",
             f"GPU: {doc.get('gpu') or 'none (CPU: ' + str(doc.get('cpu')) + ')'}; "
             f"torch {doc.get('torch')}, CUDA {doc.get('cuda')}; {doc.get('date')}; "
             f"commit {doc.get('commit')}",
             "",
             "fwd: forward under no_grad; fwd+bwd: forward + backward (output and aux loss). "
             "Times are medians in ms; `x static` is the time ratio to the same layer at "
             "static top-K (rows under torch.compile: to static top-K under torch.compile); "
             "overhead = layer time minus the two grouped GEMMs and the "
             "activation timed alone on the same rows. Peak memory is for fwd+bwd. "
             "`recompute_activations` rows: the same layer, its backward making x_perm and "
             "the SwiGLU output again (fwd under no_grad is the plain layer's); "
             "`router_dtype float32` rows: a copy with the router and importance "
             "predictor in fp32, calibrated again.",
             ""]
    rows = doc.get("rows", [])
    for s in doc.get("shapes", []):
        lines += [f"## {s['name']}", "",
                  f"K range [{s['k_min']}, {s['k_max']}], Avg-K targets {s['avg_k_targets']}",
                  "",
                  "| variant | Avg-K real | GEMM rows/token | fwd ms | fwd x static | "
                  "fwd+bwd ms | fwd+bwd x static | vs eager (fwd+bwd) | overhead fwd | "
                  "overhead fwd+bwd | peak GiB (fwd+bwd) | note |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = []
        for r in rows:
            if r.get("shape") == s["name"] and r["name"] not in order:
                order.append(r["name"])
        for name in order:
            by = {r["mode"]: r for r in rows if r.get("shape") == s["name"] and r["name"] == name}
            f_, b_ = by.get("fwd", {}), by.get("fwd_bwd", {})
            any_r = f_ or b_
            note = "; ".join(x for x in (
                f_.get("error") and f"fwd: {f_['error']}", b_.get("error") and
                f"fwd+bwd: {b_['error']}", any_r.get("note"),
                any_r.get("expert_compute_error") and
                f"GEMM timing: {any_r['expert_compute_error']}",
                any_r.get("check_rel_err") is not None and
                f"rel err vs {any_r.get('check_against', 'ref').split(' ')[0]} "
                f"{any_r['check_rel_err']:.1e}") if x)
            mem = b_.get("peak_mem_bytes")
            rows_pt = any_r.get("gemm_rows_per_token")
            lines.append("| " + " | ".join([
                name,
                _fmt(any_r.get("avg_real_experts"), "{:.3f}"),
                _fmt(rows_pt, "{:.2f}"),
                _fmt(f_.get("time_ms"), "{:.3f}"),
                _fmt(f_.get("time_ratio_vs_static_topk"), "{:.2f}"),
                _fmt(b_.get("time_ms"), "{:.3f}"),
                _fmt(b_.get("time_ratio_vs_static_topk"), "{:.2f}"),
                _fmt(b_.get("speedup_vs_eager"), "{:.2f}x"),
                _fmt(f_.get("routing_overhead_frac") and 100 * f_["routing_overhead_frac"],
                     "{:.1f}%"),
                _fmt(b_.get("routing_overhead_frac") and 100 * b_["routing_overhead_frac"],
                     "{:.1f}%"),
                _fmt(mem and mem / 2**30, "{:.2f}"),
                note.replace("|", "/").replace("\n", " ")[:300],
            ]) + " |")
        lines.append("")
    summ = doc.get("summary") or {}
    if summ:
        lines += ["## Targets (issue 6)", "",
                  "| shape | AnyExperts lowest Avg-K / static, fwd+bwd (target <= 0.70); "
                  "timed in turns | "
                  "max routing overhead fwd / fwd+bwd (target <= 15% at E=128) | "
                  "speedup vs eager, fwd+bwd, Avg-K = top-k (target >= 3x) | "
                  "under torch.compile: ratio / overhead fwd / fwd+bwd |",
                  "|---|---|---|---|---|"]

        def pct(v):
            return _fmt(v and 100 * v, "{:.1f}%")
        for name, e in summ.items():
            ov = e.get("max_routing_overhead_frac_anyexperts") or {}
            oc = e.get("routing_overhead_frac_compiled") or {}
            q = quartile_range(
                e.get("ratio_lowest_avgk_vs_static_fwd_bwd_in_turns_round_quartiles"))
            ratio = (_fmt(e.get("ratio_lowest_avgk_vs_static_fwd_bwd"), "{:.2f}") + "; " +
                     _fmt(e.get("ratio_lowest_avgk_vs_static_fwd_bwd_in_turns"), "{:.2f}") +
                     (f" ({q} over the rounds)" if q else ""))
            ratio_c = _fmt(e.get("ratio_lowest_avgk_vs_static_fwd_bwd_compiled"), "{:.2f}")
            lines.append(f"| {name} | {ratio} | {pct(ov.get('fwd'))} / {pct(ov.get('fwd_bwd'))}"
                         f" | {_fmt(e.get('speedup_vs_eager_fwd_bwd_at_avgk_topk'), '{:.2f}x')}"
                         f" | {ratio_c} / {pct(oc.get('fwd'))} / {pct(oc.get('fwd_bwd'))} |")
        lines.append("")
    return "\n".join(lines)


# ---- entry point ----------------------------------------------------------------------

def build_argparser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="JSON path; the markdown table goes beside it (.md). Default "
                        "bench/results/layer.json, with --quick the temporary folder's "
                        "anyexperts_layer_quick.json")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (q16, q4), few reps: a CPU smoke run of about a minute "
                        "(one CPU thread unless --threads says otherwise)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated: e128, e64, e8, q16, q4, a full name, or "
                        "E16:H64:F32:T256:k8 (default: e128,e64,e8; --quick: q16,q4)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--avgk", default=None,
                   help="Avg-K real targets on the top-8 scale, comma-separated (scaled by "
                        "top_k/8 per shape); default 4.8,6.4,7.2,8.0 (--quick: 4.8,8.0)")
    p.add_argument("--weight0-at", choices=("all", "lowest"), default=None,
                   help="Avg-K targets that get the weight-0 rows (default all; --quick: "
                        "lowest)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (CPU runs on busy machines: 1; --quick on a "
                        "CPU: 1 unless set)")
    p.add_argument("--variants",
                   default="static,anyexperts,recompute,router32,weight0,tight,compiled,gmm,eager",
                   help="subset of static,anyexperts,recompute,router32,weight0,tight,compiled,"
                        "gmm,eager "
                        "(compiled: static top-K and the lowest Avg-K under torch.compile)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compiled rows (CPU smoke tests: "
                        "aot_eager, since inductor's C++ build takes minutes there)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode of the compiled rows (e.g. reduce-overhead for "
                        "CUDA graphs); default: torch's default")
    p.add_argument("--torch-gmm", choices=("auto", "on", "off"), default="auto",
                   help="torch._grouped_mm in the pipeline baseline: auto = on for CUDA "
                        "(when a probe call works), off on CPU (per-group loop)")
    p.add_argument("--align", type=int, default=1, help="layer's permute row alignment")
    p.add_argument("--stats", action="store_true",
                   help="keep the layer's routing statistics on (compute_stats=True)")
    p.add_argument("--nvtx", action="store_true",
                   help="stage NVTX/record_function ranges in the timed layer steps "
                        "(for running this script under nsys; adds a little host time)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--min-reps", type=int, default=3)
    p.add_argument("--max-reps", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=0.4,
                   help="target seconds of timed repetitions per measurement")
    p.add_argument("--rounds", type=int, default=10,
                   help="rounds of the in-turns timing (static top-K and AnyExperts at the "
                        "lowest Avg-K, each --iters steps per round, in a shuffled order)")
    p.add_argument("--iters", type=int, default=3, help="steps per round in turns")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="skip what remains (recorded as errors) after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    return p


def main(argv=None) -> int:
    args = build_argparser().parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "anyexperts_layer_quick.json")
                    if args.quick else os.path.join(HERE, "results", "layer.json"))
    if args.quick and not args.threads and not args.device.startswith("cuda"):
        args.threads = 1  # tiny shapes: more threads only add wake-up noise to the timings
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = args.shapes or ("q16,q4" if args.quick else "e128,e64,e8")
    shapes = [parse_shape(x) for x in specs.split(",") if x.strip()]
    suite = Suite(args)
    print(f"anyexperts layer bench: {len(shapes)} shape(s) on {args.device} ({args.dtype}); "
          f"out {args.out}", flush=True)
    env = suite.meta()
    if suite.device.type == "cuda" and not all(env["anyexperts_cuda_kernels"].values()):
        print(f"WARNING: anyexperts ops without CUDA kernels: {env['anyexperts_cuda_kernels']}"
              " (build with ANYEXPERTS_CUDA=ON); layer rows will fail", flush=True)
    for key, s in shapes:
        try:
            suite.run_shape(key, s)
        except Exception as e:  # noqa: BLE001 - e.g. OOM building the shape
            print(f"shape {shape_name(s)} failed: {_err(e)}", flush=True)
            if args.verbose:
                traceback.print_exc()
            suite.rows.append(dict(shape=shape_name(s), name="(shape setup)", variant="setup",
                                   mode="fwd", error=_err(e)))
            suite.write()
            _free(suite.device)
    suite.write()
    print(f"wrote {args.out} and {os.path.splitext(args.out)[0]}.md "
          f"({len(suite.rows)} rows, {time.perf_counter() - suite.t_start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
