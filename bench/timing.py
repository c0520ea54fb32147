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


def interleaved_ms(fns: dict, warmup: int, rounds: int, iters: int, device="cuda"):
    """Median time (ms) of each callable in `fns` (name -> fn), timed in turns: each of
    `rounds` rounds times `iters` calls of every callable, in an order shuffled anew each
    round (seeded). Shuffled rather than rotated, so that no callable always follows the
    same one (a power-hungry predecessor slows the clock for the next). CUDA events on a
    CUDA device, perf_counter (after each call) elsewhere.
    Returns ({name: ms}, {name: error}): a callable that raises, in warm-up or later, gets
    an error and no time (a baseline failing is a result, not a crash)."""
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
    times = {name: statistics.median(elapsed(s, e) for s, e in pairs)
             for name, pairs in stamps.items()}
    return times, errors
