#!/usr/bin/env python3
"""Grouped GEMM benchmark (issue 4): anyexperts grouped_mm (forward, dgrad) and
grouped_mm_wgrad against torch._grouped_mm, a per-expert cuBLAS loop and one dense cuBLAS
GEMM of equal FLOPs, side by side in one run, bf16.

Layer shapes (E experts, hidden H, FFN width F, T tokens, top-k; R = T*k routed rows):
  qwen3_moe  E=128 H=2048 F=768   T=32768 top-8   (fine-grained)
  olmoe      E=64  H=2048 F=1024  T=16384 top-8
  mixtral    E=8   H=4096 F=14336 T=8192  top-2
each with balanced loads (R/E rows per expert) and Zipf-skewed loads (expert of rank r gets
a share ~ 1/r, capped at T rows since a token picks an expert at most once). Then the
serving shapes (SERVING_SHAPES): qwen3_moe and mixtral at T = 64 and T = 1024.

The GEMMs are those of one FFN projection with nn.Linear weights W[E,F,H]:
  forward  out[R,F]  = x[R,H]  @ W[e]^T   b = W.transpose(1,2), a column-major B
  dgrad    dx[R,H]   = dy[R,F] @ W[e]     b = W, a row-major B
  wgrad    dW^T[E,H,F] = x_e^T @ dy_e     (variable-K grouped GEMM)
The wgrad rows of SHAPES also time our kernel with its problems in index order
(ANYEXPERTS_GROUPED_MM_WGRAD_ORDER=index) beside the default, largest group first:
index_order_ms and largest_first_gain on our row.
TFLOP/s = 2 * R * K * N / time; each time is the median of CUDA-event timings after
warm-up, the implementations of a case timed in turns (timing.interleaved_rounds_ms). Rows
carry speedup_vs_torch_grouped_mm (torch time / this time), speedup_round_quartiles (the 25th
and 75th percentiles over the rounds of that ratio within a round: the noise a speedup of
1.00x +- 0.01 sits in) and, for ours, fraction_of_dense (our TFLOP/s over the dense GEMM's).

Writes JSON {"gpu","torch","cuda","date","rows":[...]} to --out and a markdown table beside it.

--sweep (SM90 only) times grouped_mm, forward and dgrad, under every compiled kernel schedule
x raster order x swizzle of the tuning overrides (csrc/cuda/grouped_mm.cu: environment
variables ANYEXPERTS_GROUPED_MM_SCHEDULE/_RASTER/_SWIZZLE, re-read on every call in this
process through ANYEXPERTS_GROUPED_MM_TUNING_LIVE=1), next to torch._grouped_mm on the same
inputs in the same process, and writes bench/results/grouped_mm_sweep.{json,md}: one row per
configuration with speedup_vs_torch_grouped_mm, the best configuration per case and per
shape, and a ranking of configurations over all cases (the data to choose the default from).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys

import torch

try:
    import anyexperts_ops  # noqa: F401  (registers torch.ops.anyexperts)
except ImportError:  # run from a source checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import anyexperts_ops  # noqa: F401

sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
from provenance import code_commit  # noqa: E402
from timing import (error_text, interleaved_rounds_ms, medians, quartile_range,  # noqa: E402
                    round_ratio_quartiles)

ops = torch.ops.anyexperts

SHAPES = [  # name, E, H, F, T, top_k
    ("qwen3_moe", 128, 2048, 768, 32768, 8),
    ("olmoe", 64, 2048, 1024, 16384, 8),
    ("mixtral", 8, 4096, 14336, 8192, 2),
]
# Small batches as in serving (decode: T = 64; a short prefill: T = 1024): few rows per
# expert, some experts empty under Zipf, where the prepare kernel, the launch and the
# short-group schedule weigh. In the default run after SHAPES; the sweep takes them by --shapes.
SERVING_SHAPES = [
    ("qwen3_moe_t64", 128, 2048, 768, 64, 8),
    ("qwen3_moe_t1024", 128, 2048, 768, 1024, 8),
    ("mixtral_t64", 8, 4096, 14336, 64, 2),
    ("mixtral_t1024", 8, 4096, 14336, 1024, 2),
]
QUICK_SHAPES = [
    ("quick_fine", 16, 256, 128, 1024, 4),
    ("quick_coarse", 4, 512, 1024, 512, 2),
]
LOADS = ("balanced", "zipf")
ZIPF_S = 1.0
IMPLS = ("anyexperts", "torch_grouped_mm", "cublas_loop", "dense_cublas")

# --sweep: every schedule compiled into the SM90 grouped GEMM (kScheduleNames in
# csrc/cuda/grouped_mm.cu; tests/test_bench_grouped_mm.py keeps the two lists equal).
SWEEP_SCHEDULES = (
    "cooperative_128x256_2x1",   # default when rows/groups > 128 and K > 1024
    "pingpong_64x256_1x1",       # default when rows/groups <= 128
    "cooperative_128x128_1x2",   # candidates
    "cooperative_256x128_2x1",
    "pingpong_128x128_1x2",      # default when rows/groups > 128 and K <= 1024
)
# "heuristic" is left out: with problem shapes on the device only, CUTLASS's heuristic sees
# an (SM count x 1) tile grid and always picks along_n.
SWEEP_RASTERS = ("along_m", "along_n")
SWEEP_SWIZZLES = (1, 2, 4, 8)
SWEEP_OPS = ("forward", "dgrad")
ENV_SCHEDULE = "ANYEXPERTS_GROUPED_MM_SCHEDULE"
ENV_RASTER = "ANYEXPERTS_GROUPED_MM_RASTER"
ENV_SWIZZLE = "ANYEXPERTS_GROUPED_MM_SWIZZLE"
ENV_LIVE = "ANYEXPERTS_GROUPED_MM_TUNING_LIVE"
ENV_BACKEND = "ANYEXPERTS_GROUPED_MM_BACKEND"   # e.g. sm80: the Ampere kernels on an H100
ENV_WGRAD_ORDER = "ANYEXPERTS_GROUPED_MM_WGRAD_ORDER"
TORCH_LABEL = "torch._grouped_mm"   # the sweep's baseline row
MISMATCH_TOL = 2e-2   # rel. difference to torch._grouped_mm beyond which a row is an error


def group_sizes(E: int, T: int, top_k: int, load: str, gen: torch.Generator) -> list[int]:
    """Rows per expert, summing to R = T*top_k, each at most T."""
    R = T * top_k
    if load == "balanced":
        sizes = [R // E] * E
        for i in range(R - sum(sizes)):
            sizes[i] += 1
        return sizes
    weights = [1.0 / (r + 1) ** ZIPF_S for r in range(E)]
    order = torch.randperm(E, generator=gen).tolist()   # which expert gets which rank
    share = [0.0] * E
    for rank, e in enumerate(order):
        share[e] = weights[rank]
    # Water-filling: cap at T, hand the excess to the uncapped experts by their weights.
    sizes = [0] * E
    free = list(range(E))
    left = R
    while free and left > 0:
        tot = sum(share[e] for e in free)
        capped = [e for e in free if share[e] / tot * left >= T]
        if not capped:
            for e in free:
                sizes[e] = int(share[e] / tot * left)
            break
        for e in capped:
            sizes[e] = T
            free.remove(e)
        left = R - sum(sizes)
    rest = R - sum(sizes)
    for e in sorted(range(E), key=lambda e: -share[e]):
        if rest == 0:
            break
        add = min(rest, T - sizes[e])
        sizes[e] += add
        rest -= add
    assert sum(sizes) == R and max(sizes) <= T, (sizes, R, T)
    return sizes


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    den = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / den if den > 0 else 0.0


def grouped_calls(x, dy, W, offsets, dt) -> dict:
    """op -> (ours, torch._grouped_mm or None where this torch lacks it): the three grouped
    GEMMs of one FFN projection with nn.Linear weights W[E, F, H] (see the module doc)."""
    Wt = W.transpose(1, 2)

    def theirs(a, b):
        if not hasattr(torch, "_grouped_mm"):
            return None
        return lambda: torch._grouped_mm(a, b, offs=offsets, out_dtype=dt)

    return {
        "forward": (lambda: ops.grouped_mm(x, Wt, offsets), theirs(x, Wt)),
        "dgrad": (lambda: ops.grouped_mm(dy, W, offsets), theirs(dy, W)),
        "wgrad": (lambda: ops.grouped_mm_wgrad(x, dy, offsets), theirs(x.t(), dy)),
    }


def run_config(name, E, H, F, T, top_k, load, args, gen):
    dt = torch.bfloat16
    dev = "cuda"
    sizes = group_sizes(E, T, top_k, load, gen)
    R = sum(sizes)
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    ends = offsets.tolist()
    spans = [(0 if g == 0 else ends[g - 1], ends[g]) for g in range(E)]

    x = torch.randn(R, H, device=dev, dtype=dt)
    dy = torch.randn(R, F, device=dev, dtype=dt)
    W = (torch.randn(E, F, H, device=dev, dtype=dt) / H ** 0.5)   # nn.Linear [out, in]
    Wt = W.transpose(1, 2)                                          # [E,H,F] view
    out_f = torch.empty(R, F, device=dev, dtype=dt)
    out_d = torch.empty(R, H, device=dev, dtype=dt)
    out_w = torch.empty(E, H, F, device=dev, dtype=dt)
    w0t, w0 = Wt[0], W[0]

    def loop_fwd():
        for g, (s, e) in enumerate(spans):
            if e > s:
                torch.mm(x[s:e], Wt[g], out=out_f[s:e])

    def loop_dgrad():
        for g, (s, e) in enumerate(spans):
            if e > s:
                torch.mm(dy[s:e], W[g], out=out_d[s:e])

    def loop_wgrad():
        for g, (s, e) in enumerate(spans):
            if e > s:
                torch.mm(x[s:e].t(), dy[s:e], out=out_w[g])
            else:
                out_w[g].zero_()

    grouped = grouped_calls(x, dy, W, offsets, dt)
    # The training shapes' wgrad also runs in index order, in the same turns (the variable
    # is re-read per call: main sets ENV_LIVE). Setting it costs our calls ~2 us of host
    # time that torch's do not pay: nothing beside a wgrad of a millisecond, but not done on
    # the serving shapes, whose calls are short.
    compare_order = any(name == shape[0] for shape in SHAPES)
    user_order = os.environ.get(ENV_WGRAD_ORDER)

    def in_order(order, fn):
        if not compare_order:
            return None if order == "index" else fn

        def call():
            os.environ[ENV_WGRAD_ORDER] = order
            return fn()
        return call

    cases = {
        # op: (K, N, {impl: fn}); M = R for all of them
        "forward": (H, F, {
            "anyexperts": grouped["forward"][0],
            "torch_grouped_mm": grouped["forward"][1],
            "cublas_loop": loop_fwd,
            "dense_cublas": lambda: torch.mm(x, w0t),
        }),
        "dgrad": (F, H, {
            "anyexperts": grouped["dgrad"][0],
            "torch_grouped_mm": grouped["dgrad"][1],
            "cublas_loop": loop_dgrad,
            "dense_cublas": lambda: torch.mm(dy, w0),
        }),
        "wgrad": (H, F, {
            "anyexperts": in_order("largest_first", grouped["wgrad"][0]),
            "torch_grouped_mm": grouped["wgrad"][1],
            "cublas_loop": loop_wgrad,
            "dense_cublas": lambda: torch.mm(x.t(), dy),
            # The order the kernel took before largest first, timed in the same turns.
            "anyexperts_index_order": in_order("index", grouped["wgrad"][0]),
        }),
    }
    rows = []
    for op, (K, N, impls) in cases.items():
        flops = 2.0 * R * K * N
        notes = {impl: "torch._grouped_mm not available" for impl in IMPLS if impls.get(impl) is None}
        by_round, errors = interleaved_rounds_ms({impl: fn for impl, fn in impls.items() if fn},
                                                 args.warmup, args.rounds, args.iters)
        times = medians(by_round)
        notes.update(errors)
        check = None
        if "anyexperts" in times and "torch_grouped_mm" in times:
            check = rel_diff(impls["anyexperts"](), impls["torch_grouped_mm"]())
        torch_ms = times.get("torch_grouped_mm")
        dense_tflops = flops / times["dense_cublas"] / 1e9 if "dense_cublas" in times else None
        for impl in IMPLS:
            row = {
                "name": f"{name}/{load}/{op}/{impl}",
                "shape": name, "E": E, "H": H, "F": F, "T": T, "top_k": top_k, "R": R,
                "load": load, "max_group_rows": max(sizes), "empty_groups": sizes.count(0),
                "op": op, "impl": impl, "M": R, "K": K, "N": N, "dtype": "bfloat16",
                "flops": flops,
            }
            if impl in times:
                ms = times[impl]
                row.update(ms=ms, tflops=flops / ms / 1e9,
                           speedup_vs_torch_grouped_mm=(torch_ms / ms) if torch_ms else None,
                           speedup_round_quartiles=round_ratio_quartiles(
                               by_round, "torch_grouped_mm", impl))
                if impl == "anyexperts":
                    row["fraction_of_dense"] = (row["tflops"] / dense_tflops
                                                if dense_tflops else None)
                    row["rel_diff_vs_torch_grouped_mm"] = check
                    if "anyexperts_index_order" in times:
                        row["index_order_ms"] = times["anyexperts_index_order"]
                        row["largest_first_gain"] = times["anyexperts_index_order"] / ms
                    elif "anyexperts_index_order" in notes:
                        row["index_order_error"] = notes["anyexperts_index_order"]
            else:
                row.update(ms=None, tflops=None, speedup_vs_torch_grouped_mm=None,
                           error=notes.get(impl))
            rows.append(row)
        ours = times.get("anyexperts")
        spread = quartile_range(round_ratio_quartiles(by_round, "torch_grouped_mm", "anyexperts"))
        print(f"{name:12s} {load:8s} {op:7s} " + "  ".join(
            f"{impl}={flops / times[impl] / 1e9:7.1f}" if impl in times else f"{impl}=  n/a  "
            for impl in IMPLS) + " TFLOP/s" +
            (f"  speedup={torch_ms / ours:.2f}x" + (f" ({spread})" if spread else "")
             if ours and torch_ms else "") +
            (f"  rel_diff={check:.1e}" if check is not None else "") +
            (f"  index_order/largest_first={times['anyexperts_index_order'] / ours:.3f}x"
             if ours and "anyexperts_index_order" in times else ""), flush=True)
    if user_order is None:
        os.environ.pop(ENV_WGRAD_ORDER, None)
    else:
        os.environ[ENV_WGRAD_ORDER] = user_order
    del x, dy, W, Wt, out_f, out_d, out_w
    torch.cuda.empty_cache()
    return rows


# ---- --sweep -----------------------------------------------------------------------------

def set_tuning(schedule=None, raster=None, swizzle=None) -> None:
    """Sets (or, for None, clears) the tuning overrides; read by the next grouped_mm call."""
    for var, val in ((ENV_SCHEDULE, schedule), (ENV_RASTER, raster), (ENV_SWIZZLE, swizzle)):
        if val is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = str(val)


def sweep_unavailable() -> str | None:
    """Why --sweep cannot run here, or None. Must run before any grouped_mm call of the
    process: the dispatcher reads ENV_LIVE once, at its first SM90 call."""
    if not torch.cuda.is_available():
        return "needs an SM90 GPU (H100/H200); this machine has no CUDA GPU"
    cap = torch.cuda.get_device_capability()
    if cap != (9, 0):
        return (f"needs an SM90 GPU (compute capability 9.0, H100/H200); this GPU is "
                f"{torch.cuda.get_device_name()} ({cap[0]}.{cap[1]}): the swept CUTLASS "
                "schedules exist for sm_90a only")
    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("anyexperts::grouped_mm", "CUDA")
    except Exception:  # noqa: BLE001  (private API moved: the probe below tells)
        has = True
    if not has:
        return "anyexperts_ops was built without CUDA kernels (ANYEXPERTS_CUDA=ON, archs with 90a)"
    # Probe: a bogus schedule name must fail an SM90-eligible call. It does not when the SM90
    # kernels are not compiled in (archs without 90a: the SIMT fallback ignores the override)
    # or when the overrides are not re-read per call (ENV_LIVE was read before it was set).
    os.environ[ENV_LIVE] = "1"
    a = torch.zeros(16, 16, device="cuda", dtype=torch.bfloat16)
    b = torch.zeros(2, 16, 16, device="cuda", dtype=torch.bfloat16)
    off = torch.tensor([8, 16], device="cuda", dtype=torch.int32)
    set_tuning(schedule="__probe__")
    try:
        ops.grouped_mm(a, b, off)
        torch.cuda.synchronize()
        return ("the grouped_mm overrides had no effect: anyexperts_ops has no SM90 kernels "
                "(build with ANYEXPERTS_CUDA_ARCHS containing 90a), or the process called "
                f"grouped_mm before {ENV_LIVE}=1 was set")
    except RuntimeError as exc:
        if ENV_SCHEDULE not in str(exc):
            raise
    finally:
        set_tuning()
    return None


def sweep_configs(args):
    """(label, schedule, raster, swizzle); the first is the default choice, no overrides."""
    configs = [("auto", None, None, None)]
    for sched in args.sweep_schedules:
        for raster in args.sweep_rasters:
            for sw in args.sweep_swizzles:
                configs.append((f"{sched}/{raster}/sw{sw}", sched, raster, sw))
    return configs


def sweep_case(name, E, H, F, T, top_k, load, args, gen):
    dt = torch.bfloat16
    dev = "cuda"
    sizes = group_sizes(E, T, top_k, load, gen)
    R = sum(sizes)
    offsets = torch.tensor(sizes, dtype=torch.int64).cumsum(0).to(torch.int32).to(dev)
    x = torch.randn(R, H, device=dev, dtype=dt)
    dy = torch.randn(R, F, device=dev, dtype=dt)
    W = torch.randn(E, F, H, device=dev, dtype=dt) / H ** 0.5
    Wt = W.transpose(1, 2)
    cases = {  # op: (a, b, K, N), as in run_config
        "forward": (x, Wt, H, F),
        "dgrad": (dy, W, F, H),
    }
    base = {"shape": name, "E": E, "H": H, "F": F, "T": T, "top_k": top_k, "R": R, "load": load,
            "max_group_rows": max(sizes), "empty_groups": sizes.count(0), "dtype": "bfloat16"}
    rows = []
    for op in args.sweep_ops:
        a, b, K, N = cases[op]
        flops = 2.0 * R * K * N
        case = dict(base, op=op, M=R, K=K, N=N, flops=flops)
        torch_fn = lambda: torch._grouped_mm(a, b, offs=offsets, out_dtype=dt)  # noqa: E731
        expect = torch_fn()
        ours = {label: dict(case, name=f"{name}/{load}/{op}/{label}", impl="anyexperts",
                            config=label, schedule=sched, raster=raster, swizzle=sw)
                for label, sched, raster, sw in sweep_configs(args)}
        fns = {TORCH_LABEL: torch_fn}
        for label, sched, raster, sw in sweep_configs(args):
            def fn(sched=sched, raster=raster, sw=sw):
                set_tuning(sched, raster, sw)
                try:
                    return ops.grouped_mm(a, b, offsets)
                finally:
                    set_tuning()
            row = ours[label]
            try:
                diff = rel_diff(fn(), expect)
            except Exception as exc:  # noqa: BLE001  (a failing configuration is a result)
                row["error"] = error_text(exc)
                torch.cuda.synchronize()
                continue
            row["rel_diff_vs_torch_grouped_mm"] = diff
            if not diff <= MISMATCH_TOL:   # NaN included
                row["error"] = f"result differs from torch._grouped_mm: rel. diff {diff:.2e}"
                continue
            fns[label] = fn
        # All configurations and torch in turns (interleaved_rounds_ms): a clock change
        # during the sweep then reaches every one of them alike.
        by_round, errors = interleaved_rounds_ms(fns, args.warmup, args.rounds, args.iters)
        times = medians(by_round)
        if TORCH_LABEL in errors:
            raise RuntimeError(f"{TORCH_LABEL} failed while timed: {errors[TORCH_LABEL]}")
        for label, err in errors.items():
            ours[label]["error"] = err
        torch_ms = times[TORCH_LABEL]
        rows.append(dict(case, name=f"{name}/{load}/{op}/torch_grouped_mm", impl="torch_grouped_mm",
                         config=TORCH_LABEL, schedule=None, raster=None, swizzle=None,
                         ms=torch_ms, tflops=flops / torch_ms / 1e9,
                         speedup_vs_torch_grouped_mm=1.0))
        for label, row in ours.items():
            ms = times.get(label)
            if ms is None:
                row.update(ms=None, tflops=None, speedup_vs_torch_grouped_mm=None)
            else:
                row.update(ms=ms, tflops=flops / ms / 1e9,
                           speedup_vs_torch_grouped_mm=torch_ms / ms,
                           speedup_round_quartiles=round_ratio_quartiles(
                               by_round, TORCH_LABEL, label))
            rows.append(row)
        ok = [r for r in ours.values() if not r.get("error")]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        auto = ours["auto"] if not ours["auto"].get("error") else None
        print(f"{name:12s} {load:8s} {op:7s} torch={flops / torch_ms / 1e9:7.1f} TFLOP/s  "
              + (f"auto={auto['speedup_vs_torch_grouped_mm']:.3f}x  " if auto else "auto=n/a  ")
              + (f"best={best['config']} {best['speedup_vs_torch_grouped_mm']:.3f}x" if best
                 else "best=n/a")
              + (f"  errors={len(ours) - len(ok)}" if len(ok) < len(ours) else ""), flush=True)
        del expect
    del x, dy, W, Wt
    torch.cuda.empty_cache()
    return rows


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def sweep_summary(rows) -> dict:
    """Best configuration per case and per shape; configurations ranked by the geometric
    mean of their speedup over every case (only configurations that ran every case)."""
    ours = [r for r in rows if r["impl"] == "anyexperts"]
    cases = {}
    for r in ours:
        cases.setdefault((r["shape"], r["load"], r["op"]), []).append(r)
    best_per_case = []
    for (shape, load, op), rs in cases.items():
        ok = [r for r in rs if not r.get("error")]
        auto = next((r for r in ok if r["config"] == "auto"), None)
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        best_per_case.append({
            "shape": shape, "load": load, "op": op,
            "best_config": best["config"] if best else None,
            "best_speedup_vs_torch_grouped_mm": best["speedup_vs_torch_grouped_mm"] if best else None,
            "auto_speedup_vs_torch_grouped_mm": auto["speedup_vs_torch_grouped_mm"] if auto else None,
            "best_vs_auto": auto["ms"] / best["ms"] if best and auto else None,
        })

    def ranking(case_keys):
        by_config = {}
        for key in case_keys:
            for r in cases[key]:
                if not r.get("error"):
                    by_config.setdefault(r["config"], []).append(r["speedup_vs_torch_grouped_mm"])
        full = {c: v for c, v in by_config.items() if len(v) == len(case_keys)}
        return sorted(({"config": c, "geomean_speedup_vs_torch_grouped_mm": geomean(v),
                        "min_speedup_vs_torch_grouped_mm": min(v), "cases": len(v)}
                       for c, v in full.items()),
                      key=lambda e: -e["geomean_speedup_vs_torch_grouped_mm"])

    shapes = sorted({k[0] for k in cases}, key=[k[0] for k in cases].index)
    best_per_shape = []
    for shape in shapes:
        rank = ranking([k for k in cases if k[0] == shape])
        auto = next((e for e in rank if e["config"] == "auto"), None)
        best_per_shape.append({
            "shape": shape,
            "best_config": rank[0]["config"] if rank else None,
            "best_geomean_speedup_vs_torch_grouped_mm":
                rank[0]["geomean_speedup_vs_torch_grouped_mm"] if rank else None,
            "auto_geomean_speedup_vs_torch_grouped_mm":
                auto["geomean_speedup_vs_torch_grouped_mm"] if auto else None,
        })
    return {"best_per_case": best_per_case, "best_per_shape": best_per_shape,
            "ranking_all_cases": ranking(list(cases))}


def sweep_markdown(meta, rows, summary) -> str:
    def f(v, fmt):
        return format(v, fmt) if v is not None else "n/a"

    lines = [
        f"# Grouped GEMM schedule sweep: {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']},"
        f" {meta['date']}, commit {meta.get('commit')}",
        "",
        "bf16 grouped_mm (forward: column-major B = nn.Linear weight transposed; dgrad: row-major"
        " B) under each tuning override, against torch._grouped_mm on the same inputs in the same"
        " process, all timed in turns. speedup = torch._grouped_mm time / ours (> 1: ours"
        " faster). Config ="
        " schedule/raster/swizzle; `auto` is the default choice with no overrides (it equals one"
        " of the explicit rows: their difference is the run-to-run noise). The 25th-75th"
        " percentile of a speedup is taken over the rounds, each round's ratio of medians.",
        "",
        "## Ranking over all cases (geometric mean of speedup)",
        "",
        "| config | geomean speedup | min speedup | cases |",
        "|---|---:|---:|---:|",
    ]
    for e in summary["ranking_all_cases"]:
        lines.append(f"| {e['config']} | {e['geomean_speedup_vs_torch_grouped_mm']:.3f}x | "
                     f"{e['min_speedup_vs_torch_grouped_mm']:.3f}x | {e['cases']} |")
    lines += ["", "## Best config per shape (geometric mean over loads and ops)", "",
              "| shape | best config | geomean speedup | auto geomean speedup |",
              "|---|---|---:|---:|"]
    for e in summary["best_per_shape"]:
        lines.append(f"| {e['shape']} | {e['best_config']} | "
                     f"{f(e['best_geomean_speedup_vs_torch_grouped_mm'], '.3f')}x | "
                     f"{f(e['auto_geomean_speedup_vs_torch_grouped_mm'], '.3f')}x |")
    lines += ["", "## Best config per case", "",
              "| shape | load | op | best config | speedup | auto speedup | best / auto |",
              "|---|---|---|---|---:|---:|---:|"]
    for e in summary["best_per_case"]:
        lines.append(f"| {e['shape']} | {e['load']} | {e['op']} | {e['best_config']} | "
                     f"{f(e['best_speedup_vs_torch_grouped_mm'], '.3f')}x | "
                     f"{f(e['auto_speedup_vs_torch_grouped_mm'], '.3f')}x | "
                     f"{f(e['best_vs_auto'], '.3f')}x |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "## Errors (left out of the rankings)", ""] + [
            f"- {r['name']}: {r['error']}" for r in errors]
    lines += ["", "## All rows", "",
              "| shape | load | op | M x K x N | config | ms | TFLOP/s | speedup vs torch |"
              " 25th-75th pct. over rounds | rel. diff |",
              "|---|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['load']} | {r['op']} | {r['M']}x{r['K']}x{r['N']} | {r['config']} | "
            f"{f(r.get('ms'), '.3f')} | {f(r.get('tflops'), '.1f')} | "
            f"{f(r.get('speedup_vs_torch_grouped_mm'), '.3f')}x | "
            f"{quartile_range(r.get('speedup_round_quartiles')) or 'n/a'} | "
            f"{f(r.get('rel_diff_vs_torch_grouped_mm'), '.1e')} |")
    return "\n".join(lines) + "\n"


def run_sweep(args, shapes, gen, meta) -> int:
    why = sweep_unavailable()
    if why:
        print(f"bench_grouped_mm --sweep: {why}", file=sys.stderr)
        return 2
    if not hasattr(torch, "_grouped_mm"):
        print("bench_grouped_mm --sweep: needs torch._grouped_mm (torch >= 2.8) as the baseline",
              file=sys.stderr)
        return 2
    meta = dict(meta, benchmark="grouped_mm_sweep", ops=list(args.sweep_ops),
                schedules=list(args.sweep_schedules), rasters=list(args.sweep_rasters),
                swizzles=list(args.sweep_swizzles), mismatch_tol=MISMATCH_TOL)
    print(f"sweep: {len(sweep_configs(args))} configs x {len(shapes)} shapes x {len(LOADS)} loads"
          f" x {len(args.sweep_ops)} ops", flush=True)
    rows = []
    for shape in shapes:
        for load in LOADS:
            rows += sweep_case(*shape, load, args, gen)
    summary = sweep_summary(rows)
    write_results(args.out, dict(meta, summary=summary, rows=rows),
                  sweep_markdown(meta, rows, summary))
    return 0


def write_results(path, doc, md) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    md_path = os.path.splitext(path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(md)
    print(f"wrote {path} and {md_path}")


def csv_arg(kind, allowed):
    def parse(text):
        items = [kind(v) for v in text.split(",") if v]
        bad = [v for v in items if v not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{bad or text!r}: choose from {', '.join(map(str, allowed))}")
        return tuple(items)
    return parse


def markdown(meta, rows) -> str:
    lines = [
        f"# Grouped GEMM: {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, {meta['date']},"
        f" commit {meta.get('commit')}",
        "",
        *([f"anyexperts kernels capped at {ENV_BACKEND}={meta['backend_override']}.", ""]
          if meta.get("backend_override") else []),
        f"TFLOP/s (bf16, median of {meta['rounds'] * meta['iters']} CUDA-event times, the"
        " implementations timed in turns). speedup = torch._grouped_mm time / ours, with its"
        f" 25th-75th percentile over the rounds ({meta['rounds']}) in brackets;"
        " % dense = ours / one dense cuBLAS GEMM of equal FLOPs.",
        "",
        "| shape | load | op | M x K x N | anyexperts | torch._grouped_mm | cuBLAS loop |"
        " dense cuBLAS | speedup vs torch | % dense |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["load"], r["op"]), {})[r["impl"]] = r

    def fmt(r):
        return f"{r['tflops']:.1f}" if r and r.get("tflops") else "n/a"

    def spread(r):
        q = quartile_range(r.get("speedup_round_quartiles"))
        return f" ({q})" if q else ""

    for (shape, load, op), impls in by_key.items():
        ours = impls.get("anyexperts", {})
        sp = ours.get("speedup_vs_torch_grouped_mm")
        fd = ours.get("fraction_of_dense")
        any_row = next(iter(impls.values()))
        lines.append(
            f"| {shape} | {load} | {op} | {any_row['M']}x{any_row['K']}x{any_row['N']} | "
            f"{fmt(ours)} | {fmt(impls.get('torch_grouped_mm'))} | "
            f"{fmt(impls.get('cublas_loop'))} | {fmt(impls.get('dense_cublas'))} | "
            f"{f'{sp:.2f}x' if sp else 'n/a'}{spread(ours) if sp else ''} | "
            f"{f'{100 * fd:.0f}%' if fd else 'n/a'} |")
    gains = [r for r in rows if r.get("largest_first_gain")]
    if gains:
        lines += ["", "wgrad problem order, timed in the same turns: index order time / largest"
                  " first time (largest first is the default): " + ", ".join(
                      f"{r['shape']} {r['load']} {r['largest_first_gain']:.3f}x" for r in gains)
                  + "."]
    errors = [(r["name"], r["error"]) for r in rows if r.get("error")]
    errors += [(r["name"] + " (index order)", r["index_order_error"]) for r in rows
               if r.get("index_order_error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {name}: {error}" for name, error in errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON path (markdown beside it); default "
                   "bench/results/grouped_mm.json, with --sweep grouped_mm_sweep.json")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few iterations")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds; each times --iters calls of every implementation in turn")
    p.add_argument("--shapes", default=None,
                   help="comma-separated shape names (default: the layer shapes, then the "
                        "serving shapes; --sweep: the layer shapes; --quick: the quick ones)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true",
                   help="SM90 only: time grouped_mm under every schedule x raster x swizzle "
                        "override next to torch._grouped_mm")
    p.add_argument("--sweep-schedules", type=csv_arg(str, SWEEP_SCHEDULES),
                   default=SWEEP_SCHEDULES, help="comma-separated subset of schedules")
    p.add_argument("--sweep-rasters", type=csv_arg(str, ("along_m", "along_n", "heuristic")),
                   default=SWEEP_RASTERS)
    p.add_argument("--sweep-swizzles", type=csv_arg(int, SWEEP_SWIZZLES), default=SWEEP_SWIZZLES)
    p.add_argument("--sweep-ops", type=csv_arg(str, SWEEP_OPS), default=SWEEP_OPS)
    args = p.parse_args()
    if args.out is None:
        args.out = os.path.join(here, "results",
                                "grouped_mm_sweep.json" if args.sweep else "grouped_mm.json")
    if args.quick:
        shapes = QUICK_SHAPES
    else:
        shapes = SHAPES if args.sweep else SHAPES + SERVING_SHAPES
    if args.shapes:
        wanted = args.shapes.split(",")
        known = {s[0]: s for s in QUICK_SHAPES + SHAPES + SERVING_SHAPES}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            p.error(f"unknown shape(s) {', '.join(unknown)}: choose from {', '.join(known)}")
        shapes = [known[w] for w in wanted]
    if args.sweep and not torch.cuda.is_available():
        print(f"bench_grouped_mm --sweep: {sweep_unavailable()}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("bench_grouped_mm: needs a CUDA GPU", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.iters = args.iters if args.iters is not None else (2 if args.quick else 3)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 20)
    if min(args.iters, args.rounds) < 1 or args.warmup < 0:
        p.error("--iters and --rounds must be at least 1, --warmup at least 0")
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": code_commit(),
        "benchmark": "grouped_mm",
        "dtype": "bfloat16",
        "zipf_s": ZIPF_S,
        "warmup": args.warmup,
        "iters": args.iters,
        "rounds": args.rounds,
        "schedule_override": os.environ.get(ENV_SCHEDULE),
        "raster_override": os.environ.get(ENV_RASTER),
        "swizzle_override": os.environ.get(ENV_SWIZZLE),
        "backend_override": os.environ.get(ENV_BACKEND),
    }
    if args.sweep:
        return run_sweep(args, shapes, gen, meta)
    # The wgrad rows time both problem orders in turns, switching ENV_WGRAD_ORDER per call:
    # the dispatcher re-reads it only with ENV_LIVE set before its first call.
    os.environ[ENV_LIVE] = "1"
    rows = []
    for shape in shapes:
        for load in LOADS:
            rows += run_config(*shape, load, args, gen)
    write_results(args.out, dict(meta, rows=rows), markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
