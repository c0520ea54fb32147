"""Timing several implementations of one thing in turns, shared by the benchmarks.

A GPU's clock follows its power and temperature over a run (torch._grouped_mm's olmoe
balanced forward took 0.792 ms in one sequentially timed sweep and 0.885 ms in another on
the same H100), so timing one callable after another hands the drift to whichever ran in
the cooler or hotter stretch. Timed in turns, every callable sees the same stretches.
"""
from __future__ import annotations

import random
import statistics
import time

import torch


def error_text(exc: BaseException) -> str:
    """One line for a result row: the exception's type and its message's first line."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def medians(by_round: dict) -> dict:
    """{name: median ms over all of its timed calls} of interleaved_rounds_ms's rounds."""
    return {name: statistics.median(ms for r in runs for ms in r)
            for name, runs in by_round.items()}


def round_ratio_quartiles(by_round: dict, num: str, den: str):
    """(25th, 75th percentile) over the rounds of interleaved_rounds_ms of the ratio
    median(num's calls) / median(den's calls) within a round: how far a ratio of two
    overall medians moves with the stretch of the run it is taken in (None: fewer than 2
    rounds, or either callable untimed)."""
    if num not in by_round or den not in by_round or len(by_round[num]) < 2:
        return None
    ratios = [statistics.median(n) / statistics.median(d)
              for n, d in zip(by_round[num], by_round[den])]
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def quartile_range(q) -> str:
    """'0.98-1.02' for round_ratio_quartiles' (q1, q3), '' for None."""
    return f"{q[0]:.2f}-{q[1]:.2f}" if q else ""


def interleaved_rounds_ms(fns: dict, warmup: int, rounds: int, iters: int, device="cuda"):
    """Times each callable in `fns` (name -> fn) in turns: each of `rounds` rounds times
    `iters` calls of every callable, in an order shuffled anew each round (seeded).
    Shuffled rather than rotated, so that no callable always follows the same one (a
    power-hungry predecessor slows the clock for the next). CUDA events on a CUDA device,
    perf_counter (after each call) elsewhere.
    Returns ({name: [[ms of each call] for each round]}, {name: error}): a callable that
    raises, in warm-up or later, gets an error and no times (a baseline failing is a
    result, not a crash)."""
    on_cuda = torch.device(device).type == "cuda"

    def sync():
        if on_cuda:
            torch.cuda.synchronize()

    def stamp():
        if not on_cuda:
            return time.perf_counter() * 1e3
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed(start, end) -> float:
        return start.elapsed_time(end) if on_cuda else end - start

    errors, stamps = {}, {}
    for name, fn in fns.items():
        try:
            for _ in range(max(warmup, 1)):   # at least one untimed call: it may fail
                fn()
            sync()
            stamps[name] = []
        except Exception as exc:  # noqa: BLE001
            errors[name] = error_text(exc)
            sync()
    order = random.Random(0)
    for _ in range(rounds):
        for name in order.sample(list(stamps), len(stamps)):
            try:
                for _ in range(iters):
                    start = stamp()
                    fns[name]()
                    stamps[name].append((start, stamp()))
            except Exception as exc:  # noqa: BLE001
                errors[name] = error_text(exc)
                del stamps[name]
    sync()
    return {name: [[elapsed(s, e) for s, e in pairs[r * iters:(r + 1) * iters]]
                   for r in range(rounds)]
            for name, pairs in stamps.items()}, errors
