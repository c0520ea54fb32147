"""bench/bench_grouped_mm.py --sweep: refuses cleanly without an SM90 GPU, runs its quick
form on one, and sweeps exactly the schedules the dispatcher compiles (kScheduleNames in
csrc/cuda/grouped_mm.cu). No timing assertions.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import bench_subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_grouped_mm.py")
DISPATCHER = os.path.join(ROOT, "csrc", "cuda", "grouped_mm.cu")
CUDA_TESTS = os.path.join(ROOT, "tests", "test_cuda_grouped_mm.py")



def _run(args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, env=bench_subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_grouped_mm_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


def _dispatcher_schedules() -> list[str]:
    """Canonical names of kScheduleNames: the first name given to each sm90::Schedule."""
    with open(DISPATCHER) as f:
        src = f.read()
    table = re.search(r"kScheduleNames\[\]\s*=\s*\{(.*?)\n\};", src, re.S)
    assert table, "kScheduleNames not found in csrc/cuda/grouped_mm.cu"
    names, seen = [], set()
    for name, schedule in re.findall(r'\{"(\w+)",\s*sm90::Schedule::(\w+)\}', table.group(1)):
        if schedule not in seen:
            seen.add(schedule)
            names.append(name)
    return names


def test_sweep_covers_every_compiled_schedule():
    names = _dispatcher_schedules()
    assert len(names) >= 2
    bench = _load_bench()
    assert list(bench.SWEEP_SCHEDULES) == names
    with open(CUDA_TESTS) as f:
        block = re.search(r"SM90_SCHEDULES = \((.*?)\)", f.read(), re.S)
    assert block and re.findall(r'"(\w+)"', block.group(1)) == names


@pytest.mark.skipif(_sm90(), reason="checks the refusal on machines without an SM90 GPU")
def test_sweep_refuses_without_sm90(tmp_path):
    out = tmp_path / "sweep.json"
    p = _run(["--sweep", "--quick", "--out", str(out)], timeout=240)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "--sweep" in p.stderr and "SM90" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    assert not out.exists()


def test_sweep_rejects_unknown_names():
    p = _run(["--sweep", "--sweep-schedules", "cooperative_64x64"], timeout=240)
    assert p.returncode == 2 and "cooperative_64x64" in p.stderr, p.stderr


def test_group_sizes_fill_every_shape():
    bench = _load_bench()
    gen = torch.Generator().manual_seed(0)
    for name, E, H, F, T, k in bench.SHAPES + bench.SERVING_SHAPES + bench.QUICK_SHAPES:
        for load in bench.LOADS:
            sizes = bench.group_sizes(E, T, k, load, gen)
            assert len(sizes) == E and sum(sizes) == T * k, (name, load)
            assert 0 <= min(sizes) and max(sizes) <= T, (name, load)   # a token: once per expert
            if load == "balanced":
                assert max(sizes) - min(sizes) <= 1, name


def test_unknown_shape_is_refused():
    p = _run(["--shapes", "qwen3_moe,nope"], timeout=240)
    assert p.returncode == 2 and "nope" in p.stderr, (p.returncode, p.stderr)


def test_sweep_summary_and_markdown():
    # The reporting half of the sweep, on made-up timings (runs on any machine).
    bench = _load_bench()
    rows = []
    for shape in ("s1", "s2"):
        for op in ("forward", "dgrad"):
            case = dict(shape=shape, load="balanced", op=op, M=64, K=32, N=16)
            rows.append(dict(case, name=f"{shape}/{op}/torch", impl="torch_grouped_mm",
                             config="torch._grouped_mm", ms=1.0, tflops=1.0,
                             speedup_vs_torch_grouped_mm=1.0))
            for config, ms in (("auto", 1.0), ("a/along_m/sw1", 0.8), ("b/along_n/sw2", 1.25)):
                if shape == "s2" and config == "a/along_m/sw1":
                    ms = 2.0
                rows.append(dict(case, name=f"{shape}/{op}/{config}", impl="anyexperts",
                                 config=config, ms=ms, tflops=1.0 / ms,
                                 speedup_vs_torch_grouped_mm=1.0 / ms,
                                 rel_diff_vs_torch_grouped_mm=1e-3))
            rows[-1]["speedup_round_quartiles"] = (0.75, 0.85)
            rows.append(dict(case, name=f"{shape}/{op}/bad", impl="anyexperts", config="bad",
                             ms=None, tflops=None, speedup_vs_torch_grouped_mm=None,
                             error="RuntimeError: boom"))
    summary = bench.sweep_summary(rows)
    best_case = {(e["shape"], e["op"]): e["best_config"] for e in summary["best_per_case"]}
    assert best_case[("s1", "forward")] == "a/along_m/sw1"
    assert best_case[("s2", "dgrad")] == "auto"
    assert {e["shape"]: e["best_config"] for e in summary["best_per_shape"]} == {
        "s1": "a/along_m/sw1", "s2": "auto"}
    ranking = [e["config"] for e in summary["ranking_all_cases"]]
    assert "bad" not in ranking and ranking[0] == "auto"
    meta = dict(gpu="GPU", torch="t", cuda="c", date="d")
    md = bench.sweep_markdown(meta, rows, summary)
    assert "## Best config per shape" in md and "RuntimeError: boom" in md
    assert md.index("## Errors") < md.index("## All rows")   # gpu_session.sh prints up to All rows
    assert "| 0.800x | 0.75-0.85 |" in md and "| 1.000x | n/a |" in md


def test_markdown_reports_the_wgrad_order_gain():
    # The main run's table on made-up rows: the wgrad rows' order comparison is printed.
    bench = _load_bench()
    rows = []
    for load, gain in (("zipf", 1.25), ("balanced", None)):
        for impl in bench.IMPLS:
            row = dict(name=f"s/{load}/wgrad/{impl}", shape="s", load=load, op="wgrad",
                       impl=impl, M=64, K=32, N=16, ms=1.0, tflops=1.0,
                       speedup_vs_torch_grouped_mm=1.0)
            if impl == "anyexperts":
                row.update(dict(index_order_ms=gain, largest_first_gain=gain) if gain else
                           dict(index_order_error="RuntimeError: order"))
                row["speedup_round_quartiles"] = (0.981, 1.024) if gain else None
            rows.append(row)
    md = bench.markdown(dict(gpu="GPU", torch="t", cuda="c", date="d", rounds=2, iters=3), rows)
    assert md.count("| s | zipf |") == 1 and md.count("| s | balanced |") == 1
    assert "| 1.00x (0.98-1.02) |" in md and "| 1.00x |" in md   # the rounds' quartiles
    assert "index order time / largest first time" in md and "s zipf 1.250x" in md
    assert "s/balanced/wgrad/anyexperts (index order): RuntimeError: order" in md


@pytest.mark.skipif(not _sm90(), reason="the sweep runs on SM90 GPUs only")
def test_sweep_quick_on_sm90(tmp_path):
    out = tmp_path / "sweep.json"
    p = _run(["--sweep", "--quick", "--warmup", "1", "--iters", "2", "--out", str(out)])
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    with open(out) as f:
        doc = json.load(f)
    assert os.path.exists(tmp_path / "sweep.md")
    bench = _load_bench()
    ours = [r for r in doc["rows"] if r["impl"] == "anyexperts"]
    assert {r["schedule"] for r in ours} == set(bench.SWEEP_SCHEDULES) | {None}
    bad = [r for r in ours if r.get("error")]
    assert not bad, bad
    assert all(r["speedup_vs_torch_grouped_mm"] > 0 for r in ours)
    assert doc["summary"]["best_per_shape"] and doc["summary"]["ranking_all_cases"]


def test_wgrad_order_model_runs():
    """bench/wgrad_order_model.py: one table row per shape, load, seed and epilogue cost;
    no order's busiest cluster is below the mean."""
    script = os.path.join(ROOT, "bench", "wgrad_order_model.py")
    p = subprocess.run([sys.executable, script], cwd=ROOT, env=bench_subprocess_env(),
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    spec = importlib.util.spec_from_file_location("wgrad_order_model_under_test", script)
    model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model)
    rows = model.rows()
    bench = _load_bench()
    assert len(rows) == len(bench.SHAPES) * len(bench.LOADS) * len(model.SEEDS) * len(
        model.EPILOGUE_K_STEPS)
    assert len(p.stdout.splitlines()) == len(rows) + 3
    assert all(min(r["index_order"], r["largest_first"]) >= r["ideal"] > 0 for r in rows)
