"""Achieved memory bandwidth of the CUDA routing kernels against a device-to-device copy
measured in the same run.

For each shape, times segmented_topk, permute, unpermute and permute + unpermute together
(CUDA events, median over reps after warm-up, L2 flushed before every rep) and divides the
minimum bytes each must move by the time. The copy reference moves as many bytes the same
way (read half, write half). Writes JSON to --out and a markdown table beside it (.md).

    python bench/bench_routing.py [--out bench/results/routing.json] [--quick]
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import anyexperts_ops  # noqa: F401  (registers torch.ops.anyexperts)
except ImportError:  # run from a source checkout without PYTHONPATH=python
    sys.path.insert(0, str(ROOT / "python"))
    import anyexperts_ops  # noqa: F401
from provenance import code_commit  # noqa: E402  (bench/ is the script's own folder)

ops = torch.ops.anyexperts
DTYPE = torch.bfloat16
ALIGN = 16  # row alignment of the expert groups, as a grouped GEMM wants them
L2_FLUSH_BYTES = 256 << 20


def _time_us(fn, reps: int, warmup: int, flush: torch.Tensor) -> float:
    """Median time of fn in microseconds, each rep timed alone after an L2 flush."""
    for _ in range(warmup):
        fn()
    pairs = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs) * 1e3


class CopyReference:
    """Device-to-device copy bandwidth, counting read + write bytes, cached by size."""

    def __init__(self, reps, warmup, flush):
        self.reps, self.warmup, self.flush = reps, warmup, flush
        self.cache: dict[int, float] = {}

    def gbps(self, moved_bytes: int) -> float:
        half = max(moved_bytes // 2, 1 << 20) // 16 * 16
        if half not in self.cache:
            src = torch.empty(half, dtype=torch.uint8, device="cuda").fill_(1)
            dst = torch.empty_like(src)
            us = _time_us(lambda: dst.copy_(src), self.reps, self.warmup, self.flush)
            self.cache[half] = 2 * half / (us * 1e3)
            del src, dst
        return self.cache[half]


def _routing_inputs(T, N, M, k_max, gen):
    logits = torch.randn(T, N + M, generator=gen, device="cuda").to(DTYPE)
    slots = torch.randint(k_max // 2, k_max + 1, (T,), generator=gen, device="cuda",
                          dtype=torch.int32)
    max_virtual = (slots * 2) // 10  # rho_max = 0.2
    return logits, slots, max_virtual


def bench_shape(T, H, N, M, k_max, reps, warmup, flush, copy, gen):
    el = torch.finfo(DTYPE).bits // 8
    logits, slots, max_virtual = _routing_inputs(T, N, M, k_max, gen)
    ids, weights = ops.segmented_topk(logits, slots, max_virtual, k_max, N, "selected")
    x = torch.randn(T, H, generator=gen, device="cuda").to(DTYPE)
    x_perm, offsets, slot_rows = ops.permute(x, ids, N, ALIGN)
    R = x_perm.shape[0]
    live = slot_rows >= 0
    live_slots = int(live.sum())
    live_tokens = int(live.any(dim=1).sum())
    idx_bytes = T * k_max * 4  # one int32 (or fp32) per slot

    # Minimum traffic: every input read once, every output written once; permute reads
    # only tokens with a live slot, unpermute only the live rows of y.
    topk_bytes = logits.numel() * el + 2 * T * 4 + 2 * idx_bytes
    permute_bytes = idx_bytes + live_tokens * H * el + R * H * el + N * 4 + idx_bytes
    unpermute_bytes = 2 * idx_bytes + live_slots * H * el + T * H * el
    cases = {
        "segmented_topk": (lambda: ops.segmented_topk(logits, slots, max_virtual, k_max, N,
                                                      "selected"), topk_bytes),
        "permute": (lambda: ops.permute(x, ids, N, ALIGN), permute_bytes),
        "unpermute": (lambda: ops.unpermute(x_perm, slot_rows, weights), unpermute_bytes),
        "permute+unpermute": (
            lambda: ops.unpermute(ops.permute(x, ids, N, ALIGN)[0], slot_rows, weights),
            permute_bytes + unpermute_bytes),
    }
    rows = []
    for name, (fn, moved) in cases.items():
        us = _time_us(fn, reps, warmup, flush)
        gbps = moved / (us * 1e3)
        copy_gbps = copy.gbps(moved)
        rows.append(dict(name=name, T=T, H=H, N=N, M=M, k_max=k_max, align=ALIGN,
                         dtype=str(DTYPE).removeprefix("torch."), R=R, live_slots=live_slots,
                         bytes=moved, time_us=round(us, 2), gbps=round(gbps, 1),
                         copy_gbps=round(copy_gbps, 1), frac_of_copy=round(gbps / copy_gbps, 3)))
        print(f"{name:>18} T={T:<6} N={N:<3} M={M:<2} k={k_max:<2} {us:10.1f} us "
              f"{gbps:8.1f} GB/s  copy {copy_gbps:7.1f} GB/s  {gbps / copy_gbps:6.1%}",
              flush=True)
    return rows


def _markdown(result) -> str:
    head = (f"# Routing kernels: achieved bandwidth vs device copy\n\n"
            f"GPU: {result['gpu']}, torch {result['torch']}, CUDA {result['cuda']}, "
            f"{result['date']}, commit {result.get('commit')}. {DTYPE}, align {ALIGN}; bytes "
            f"are each kernel's minimum traffic; copy measured in the same run.\n\n"
            "| op | T | H | N | M | k_max | live slots | time (us) | GB/s | copy GB/s | "
            "of copy |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [f"| {r['name']} | {r['T']} | {r['H']} | {r['N']} | {r['M']} | {r['k_max']} | "
             f"{r['live_slots']} | {r['time_us']:.1f} | {r['gbps']:.1f} | "
             f"{r['copy_gbps']:.1f} | {r['frac_of_copy']:.1%} |" for r in result["rows"]]
    return head + "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "routing.json"))
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few reps")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_routing: needs a CUDA GPU")

    if args.quick:
        Ts, H, experts, ks = (256,), 256, ((64, 16),), (8,)
        reps, warmup = args.reps or 5, args.warmup or 2
    else:
        Ts, H, experts, ks = (4096, 32768, 131072), 2048, ((64, 16), (128, 32)), (8, 12)
        reps, warmup = args.reps or 30, args.warmup or 5

    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    copy = CopyReference(reps, warmup, flush)
    rows = []
    for T in Ts:
        for N, M in experts:
            for k_max in ks:
                rows += bench_shape(T, H, N, M, k_max, reps, warmup, flush, copy, gen)
                torch.cuda.empty_cache()

    result = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                  cuda=torch.version.cuda,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  commit=code_commit(), rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
