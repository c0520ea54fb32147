#!/usr/bin/env python3
"""Grouped GEMM benchmark (issue 4): anyexperts grouped_mm (forward, dgrad) and
grouped_mm_wgrad against torch._grouped_mm, a per-expert cuBLAS loop and one dense cuBLAS
GEMM of equal FLOPs, side by side in one run, bf16.

Layer shapes (E experts, hidden H, FFN width F, T tokens, top-k; R = T*k routed rows):
  qwen3_moe  E=128 H=2048 F=768   T=32768 top-8   (fine-grained)
  olmoe      E=64  H=2048 F=1024  T=16384 top-8
  mixtral    E=8   H=4096 F=14336 T=8192  top-2
each with balanced loads (R/E rows per expert) and Zipf-skewed loads (expert of rank r gets
a share ~ 1/r, capped at T rows since a token picks an expert at most once).

The GEMMs are those of one FFN projection with nn.Linear weights W[E,F,H]:
  forward  out[R,F]  = x[R,H]  @ W[e]^T   b = W.transpose(1,2), a column-major B
  dgrad    dx[R,H]   = dy[R,F] @ W[e]     b = W, a row-major B
  wgrad    dW^T[E,H,F] = x_e^T @ dy_e     (variable-K grouped GEMM)
TFLOP/s = 2 * R * K * N / time; each time is the median of CUDA-event timings after
warm-up. Rows carry speedup_vs_torch_grouped_mm (torch time / this time) and, for ours,
fraction_of_dense (our TFLOP/s over the dense GEMM's).

Writes JSON {"gpu","torch","cuda","date","rows":[...]} to --out and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys

import torch

try:
    import anyexperts_ops  # noqa: F401  (registers torch.ops.anyexperts)
except ImportError:  # run from a source checkout without PYTHONPATH=python
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import anyexperts_ops  # noqa: F401

ops = torch.ops.anyexperts

SHAPES = [  # name, E, H, F, T, top_k
    ("qwen3_moe", 128, 2048, 768, 32768, 8),
    ("olmoe", 64, 2048, 1024, 16384, 8),
    ("mixtral", 8, 4096, 14336, 8192, 2),
]
QUICK_SHAPES = [
    ("quick_fine", 16, 256, 128, 1024, 4),
    ("quick_coarse", 4, 512, 1024, 512, 2),
]
LOADS = ("balanced", "zipf")
ZIPF_S = 1.0
IMPLS = ("anyexperts", "torch_grouped_mm", "cublas_loop", "dense_cublas")


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


def median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    den = float(torch.linalg.vector_norm(b))
    return float(torch.linalg.vector_norm(a - b)) / den if den > 0 else 0.0


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

    has_torch_gmm = hasattr(torch, "_grouped_mm")
    cases = {
        # op: (K, N, {impl: fn}); M = R for all of them
        "forward": (H, F, {
            "anyexperts": lambda: ops.grouped_mm(x, Wt, offsets),
            "torch_grouped_mm": (lambda: torch._grouped_mm(x, Wt, offs=offsets, out_dtype=dt))
            if has_torch_gmm else None,
            "cublas_loop": loop_fwd,
            "dense_cublas": lambda: torch.mm(x, w0t),
        }),
        "dgrad": (F, H, {
            "anyexperts": lambda: ops.grouped_mm(dy, W, offsets),
            "torch_grouped_mm": (lambda: torch._grouped_mm(dy, W, offs=offsets, out_dtype=dt))
            if has_torch_gmm else None,
            "cublas_loop": loop_dgrad,
            "dense_cublas": lambda: torch.mm(dy, w0),
        }),
        "wgrad": (H, F, {
            "anyexperts": lambda: ops.grouped_mm_wgrad(x, dy, offsets),
            "torch_grouped_mm": (lambda: torch._grouped_mm(x.t(), dy, offs=offsets, out_dtype=dt))
            if has_torch_gmm else None,
            "cublas_loop": loop_wgrad,
            "dense_cublas": lambda: torch.mm(x.t(), dy),
        }),
    }
    rows = []
    for op, (K, N, impls) in cases.items():
        flops = 2.0 * R * K * N
        times, notes = {}, {}
        check = None
        for impl in IMPLS:
            fn = impls.get(impl)
            if fn is None:
                notes[impl] = "torch._grouped_mm not available"
                continue
            try:
                times[impl] = median_ms(fn, args.warmup, args.iters)
            except Exception as exc:  # noqa: BLE001  (a baseline failing is a result, not a crash)
                notes[impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                torch.cuda.synchronize()
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
                           speedup_vs_torch_grouped_mm=(torch_ms / ms) if torch_ms else None)
                if impl == "anyexperts":
                    row["fraction_of_dense"] = (row["tflops"] / dense_tflops
                                                if dense_tflops else None)
                    row["rel_diff_vs_torch_grouped_mm"] = check
            else:
                row.update(ms=None, tflops=None, speedup_vs_torch_grouped_mm=None,
                           error=notes.get(impl))
            rows.append(row)
        ours = times.get("anyexperts")
        print(f"{name:12s} {load:8s} {op:7s} " + "  ".join(
            f"{impl}={flops / times[impl] / 1e9:7.1f}" if impl in times else f"{impl}=  n/a  "
            for impl in IMPLS) + " TFLOP/s" +
            (f"  speedup={torch_ms / ours:.2f}x" if ours and torch_ms else "") +
            (f"  rel_diff={check:.1e}" if check is not None else ""), flush=True)
    del x, dy, W, Wt, out_f, out_d, out_w
    torch.cuda.empty_cache()
    return rows


def markdown(meta, rows) -> str:
    lines = [
        f"# Grouped GEMM: {meta['gpu']}, torch {meta['torch']}, CUDA {meta['cuda']}, {meta['date']}",
        "",
        "TFLOP/s (bf16, median of CUDA-event times). speedup = torch._grouped_mm time / ours;"
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

    for (shape, load, op), impls in by_key.items():
        ours = impls.get("anyexperts", {})
        sp = ours.get("speedup_vs_torch_grouped_mm")
        fd = ours.get("fraction_of_dense")
        any_row = next(iter(impls.values()))
        lines.append(
            f"| {shape} | {load} | {op} | {any_row['M']}x{any_row['K']}x{any_row['N']} | "
            f"{fmt(ours)} | {fmt(impls.get('torch_grouped_mm'))} | "
            f"{fmt(impls.get('cublas_loop'))} | {fmt(impls.get('dense_cublas'))} | "
            f"{f'{sp:.2f}x' if sp else 'n/a'} | {f'{100 * fd:.0f}%' if fd else 'n/a'} |")
    errors = [r for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['name']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(here, "results", "grouped_mm.json"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, few iterations")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--shapes", default=None, help="comma-separated subset of shape names")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_grouped_mm: needs a CUDA GPU", file=sys.stderr)
        return 2
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.iters = args.iters if args.iters is not None else (5 if args.quick else 20)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in shapes if s[0] in wanted]
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "benchmark": "grouped_mm",
        "dtype": "bfloat16",
        "zipf_s": ZIPF_S,
        "warmup": args.warmup,
        "iters": args.iters,
        "schedule_override": os.environ.get("ANYEXPERTS_GROUPED_MM_SCHEDULE"),
    }
    rows = []
    for shape in shapes:
        for load in LOADS:
            rows += run_config(*shape, load, args, gen)
    result = dict(meta, rows=rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    md_path = os.path.splitext(args.out)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(markdown(meta, rows))
    print(f"wrote {args.out} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
