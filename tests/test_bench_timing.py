"""bench/timing.py's interleaved_rounds_ms on simulated clocks (CUDA events and perf_counter): it
times every callable in turns, in an order that changes between rounds, and records a
callable that fails (at once or after warm-up) instead of stopping. No real timing."""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "bench"))
import timing  # noqa: E402

CLOCK = {"ms": 0.0}   # advanced by the simulated calls


class _FakeEvent:
    """torch.cuda.Event on the CPU: record() reads the simulated clock."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = CLOCK["ms"]

    def elapsed_time(self, other):
        return other.t - self.t


@pytest.fixture(params=["cuda", "cpu"])
def clock(request, monkeypatch):
    CLOCK["ms"] = 0.0
    if request.param == "cuda":
        monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    else:
        monkeypatch.setattr(timing.time, "perf_counter", lambda: CLOCK["ms"] / 1e3)
    return request.param


@pytest.mark.parametrize("warmup", [0, 2])
def test_interleaved_rounds_ms_times_in_turns_and_survives_failures(clock, warmup):
    calls, order = {"fails_late": 0}, []

    def timed(name, cost):
        def fn():
            order.append(name)
            CLOCK["ms"] += cost
        return fn

    def fails_late():
        calls["fails_late"] += 1
        if calls["fails_late"] > max(warmup, 1) + 2:   # after warm-up, within the rounds
            raise RuntimeError("late failure\nsecond line")
        CLOCK["ms"] += 5.0

    def fails_at_once():
        raise ValueError("broken")

    fns = {"a": timed("a", 1.0), "b": timed("b", 3.0), "fails_late": fails_late,
           "fails_at_once": fails_at_once}
    by_round, errors = timing.interleaved_rounds_ms(fns, warmup, rounds=6, iters=2,
                                                    device=clock)
    assert set(by_round) == {"a", "b"}
    assert by_round["a"] == [[pytest.approx(1.0)] * 2] * 6
    assert by_round["b"] == [[pytest.approx(3.0)] * 2] * 6
    assert timing.medians(by_round) == pytest.approx({"a": 1.0, "b": 3.0})
    assert errors == {"fails_late": "RuntimeError: late failure",
                      "fails_at_once": "ValueError: broken"}
    timed_order = order[2 * max(warmup, 1):]            # after each one's warm-up calls
    assert len(timed_order) == 6 * 2 * 2
    firsts = {timed_order[4 * r] for r in range(6)}      # the order changes between rounds
    assert firsts == {"a", "b"}


def test_rounds_keep_each_rounds_calls_and_give_ratio_quartiles(clock):
    """interleaved_rounds_ms returns every timed call, round by round, so a ratio's spread
    over the rounds can be reported beside the ratio of medians."""
    per_round = [2.0, 3.0, 3.0, 4.0, 5.0, 6.0]   # b's cost in each round; a's is 1.0
    calls = {"b": 0}

    def a():
        CLOCK["ms"] += 1.0

    def b():
        calls["b"] += 1
        timed = calls["b"] - 1 - 1                 # one warm-up call
        CLOCK["ms"] += per_round[timed // 2] if timed >= 0 else 1.0

    by_round, errors = timing.interleaved_rounds_ms({"a": a, "b": b}, 0, rounds=6, iters=2,
                                                    device=clock)
    assert not errors
    assert by_round["b"] == [[pytest.approx(c)] * 2 for c in per_round]
    assert by_round["a"] == [[pytest.approx(1.0)] * 2] * 6
    q1, q3 = timing.round_ratio_quartiles(by_round, "b", "a")
    assert (q1, q3) == (pytest.approx(3.0), pytest.approx(4.75))
    assert timing.round_ratio_quartiles(by_round, "b", "missing") is None
    one_round, _ = timing.interleaved_rounds_ms({"a": a}, 0, rounds=1, iters=2, device=clock)
    assert timing.round_ratio_quartiles(one_round, "a", "a") is None
