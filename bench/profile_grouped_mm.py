#!/usr/bin/env python3
"""GPU time of each kernel one grouped GEMM call launches, ours against torch._grouped_mm
(torch.profiler, mean over --calls calls): the prepare kernel that fills the per-group
arguments and the CUTLASS GEMM, for forward, dgrad and wgrad at one shape of
bench_grouped_mm.py. Where bench_grouped_mm.py shows a ratio, this shows which kernel
makes it.

  python3 bench/profile_grouped_mm.py [--shape qwen3_moe] [--load balanced]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_grouped_mm as bg  # noqa: E402  (also imports anyexperts_ops)
from provenance import code_commit  # noqa: E402

def kernel_times(fn, calls: int) -> list[tuple[str, float]]:
    """(kernel name, mean GPU ms per call) of the kernels fn launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return [(e.key, e.device_time_total / 1000 / calls) for e in prof.key_averages()
            if e.device_time_total > 0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shapes = bg.SHAPES + bg.SERVING_SHAPES
    p.add_argument("--shape", default="qwen3_moe", choices=[s[0] for s in shapes])
    p.add_argument("--load", default="balanced", choices=bg.LOADS)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("profile_grouped_mm: needs a CUDA GPU", file=sys.stderr)
        return 2
    name, E, H, F, T, k = next(s for s in shapes if s[0] == args.shape)
    sizes = bg.group_sizes(E, T, k, args.load, torch.Generator().manual_seed(0))
    R, dt = sum(sizes), torch.bfloat16
    offs = torch.tensor(sizes).cumsum(0).to(torch.int32).cuda()
    x = torch.randn(R, H, device="cuda", dtype=dt)
    dy = torch.randn(R, F, device="cuda", dtype=dt)
    W = torch.randn(E, F, H, device="cuda", dtype=dt) / H ** 0.5
    cases = bg.grouped_calls(x, dy, W, offs, dt)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, commit {code_commit()}: "
          f"{name} {args.load} (R={R}, E={E}, H={H}, F={F}), bf16, mean of {args.calls} calls")
    print("| op | impl | kernel | GPU ms |\n|---|---|---|---:|")
    for op, (ours, theirs) in cases.items():
        for impl, fn in (("anyexperts", ours), ("torch._grouped_mm", theirs)):
            if fn is None:
                continue
            for kname, ms in kernel_times(fn, args.calls):
                print(f"| {op} | {impl} | {kname[:90]} | {ms:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
