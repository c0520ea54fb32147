"""The layer benchmark, its baselines, the profiler and the plot keep working (CPU, tiny shapes).

No timing assertions: these tests run the scripts' quick / torch.profiler paths, check the
JSON schema and that every variant produced rows, and check that the comparison
implementations compute what the layer computes (so the benchmark compares like with like).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys

import pytest
import torch

from conftest import bench_subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.append(BENCH)   # appended: bench/profile.py must not shadow the stdlib module

STAGES = ("importance", "router", "segmented_topk", "permute", "gemm1", "activation", "gemm2",
          "unpermute", "losses")



def _run(args, timeout=240):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=bench_subprocess_env(), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{args} failed (rc={p.returncode}):\n{p.stdout[-3000:]}\n" \
                              f"{p.stderr[-3000:]}"
    return p.stdout


def _load_profile_module():
    spec = importlib.util.spec_from_file_location("bench_profile_under_test",
                                                  os.path.join(BENCH, "profile.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- bench_layer.py --quick -----------------------------------------------------------

@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "layer.json"
    _run(["bench/bench_layer.py", "--quick", "--device", "cpu", "--threads", "1",
          "--compile-backend", "aot_eager", "--out", str(out)])
    with open(out) as f:
        return out, json.load(f)


def test_quick_suite_schema(quick_results):
    path, doc = quick_results
    for key in ("gpu", "torch", "cuda", "date", "rows", "shapes", "summary"):
        assert key in doc, key
    assert doc["torch"] == torch.__version__
    assert os.path.exists(os.path.splitext(path)[0] + ".md")
    shapes = {s["name"]: s for s in doc["shapes"]}
    assert len(shapes) == 2
    variants = {"static_topk", "anyexperts", "anyexperts_recompute", "anyexperts_router_fp32",
                "anyexperts_tight_k", "weight0_all", "static_topk_compiled",
                "anyexperts_compiled", "grouped_mm_pipeline", "eager_loop"}
    for name, s in shapes.items():
        rows = [r for r in doc["rows"] if r["shape"] == name]
        assert {r["variant"] for r in rows} >= variants, name
        if s["virtual_slots_possible"]:
            assert any(r["variant"] == "weight0_virtual" for r in rows), name
        for r in rows:
            assert r["mode"] in ("fwd", "fwd_bwd")
            for field in ("name", "variant", "avg_real_experts", "time_ms",
                          "time_ratio_vs_static_topk", "peak_mem_bytes", "error"):
                assert field in r, (field, r["name"])
            assert r["error"] is None, (r["name"], r["mode"], r["error"])
            assert r["time_ms"] > 0 and r["time_ratio_vs_static_topk"] > 0
            assert r["peak_mem_bytes"] is None          # CPU: no peak memory
        for r in rows:
            if r["variant"] in ("anyexperts", "anyexperts_tight_k", "static_topk", "weight0_all",
                                "weight0_virtual", "static_topk_compiled",
                                "anyexperts_compiled"):
                assert r.get("expert_compute_ms") is not None, r["name"]
                assert "routing_overhead_frac" in r
                assert r["gemm_rows"] >= 0
        # AnyExperts hits each Avg-K target (the layer's calibration promises 1%)
        for r in rows:
            if r["variant"] == "anyexperts":
                assert abs(r["avg_real_experts"] - r["target_avg_k"]) <= 0.03 * r["target_avg_k"]
                assert s["k_min"] - 1 <= r["avg_real_experts"] <= s["k_max"]
            if r["variant"] == "anyexperts_tight_k":   # the lowest budget, K_max = top-k
                assert r["target_avg_k"] == min(s["avg_k_targets"])
                assert abs(r["avg_real_experts"] - r["target_avg_k"]) <= 0.03 * r["target_avg_k"]
                if r["mode"] == "fwd":   # the static rows R = T*K_max of the tight range
                    assert r["gemm_rows_capacity"] == s["T"] * min(s["top_k"], s["E"])
            if r["variant"] in ("static_topk", "static_topk_compiled"):   # each its own base
                assert r["time_ratio_vs_static_topk"] == pytest.approx(1.0)
            if r["variant"].endswith("_compiled"):   # the compiled graph computes the layer
                assert r["check_rel_err"] < 1e-6, (r["name"], r["check_rel_err"])
                if r["variant"] == "anyexperts_compiled":
                    assert r["target_avg_k"] == min(s["avg_k_targets"])
            in_turns = r["variant"] == "anyexperts" and r["target_avg_k"] == min(
                s["avg_k_targets"])   # the headline ratio, timed again in turns
            assert (r.get("time_ratio_vs_static_topk_in_turns") is not None) == in_turns, (
                r["name"], r.get("in_turns_error"))
            if in_turns:
                assert r["time_ratio_vs_static_topk_in_turns"] == pytest.approx(
                    r["in_turns_ms"] / r["in_turns_static_ms"])
                q1, q3 = r["time_ratio_in_turns_round_quartiles"]   # quick: 2 rounds
                assert 0 < q1 <= q3
            if r["variant"] == "weight0_all":   # every slot up to K_max computed
                assert r["gemm_rows_per_token"] == pytest.approx(s["k_max"])
            if r.get("check_rel_err") is not None:   # fp32: baselines == the layer
                assert r["check_rel_err"] < 1e-4, (r["name"], r["check_rel_err"])
    for name, e in doc["summary"].items():
        assert e["ratio_lowest_avgk_vs_static_fwd_bwd_compiled"] > 0, name
        assert e["ratio_lowest_avgk_vs_static_fwd_bwd_in_turns"] > 0, name
        assert set(e["routing_overhead_frac_compiled"]) == {"fwd", "fwd_bwd"}, name


def test_quick_suite_plot(quick_results, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = quick_results
    png = tmp_path / "layer.png"
    _run(["bench/plot_layer.py", str(path), "--out", str(png)])
    assert png.stat().st_size > 1000


# ---- profile.py (torch.profiler path) -------------------------------------------------

def test_profile_torch_path(tmp_path):
    out = tmp_path / "prof.json"
    text = _run(["bench/profile.py", "--quick", "--profiler", "torch", "--device", "cpu",
                 "--threads", "1", "--steps", "1", "--warmup", "1", "--json", str(out),
                 "--out-dir", str(tmp_path)])
    res = json.loads(out.read_text())
    assert res["profiler"] == "torch.profiler"
    for st in STAGES:
        assert st in text
        assert st in res["ranges_found"], st
        assert "bwd:" + st in res["ranges_found"], st
        assert res["stages"][st]["fwd_cpu_ms"] >= 0
    assert res["stages_missing_fwd"] == [] and res["stages_missing_bwd"] == []


def test_profile_tolerates_missing_stages(tmp_path, capsys):
    """The static preset has no importance predictor: the table says so, and runs."""
    prof = _load_profile_module()
    out = tmp_path / "prof.json"
    rc = prof.main(["--quick", "--profiler", "torch", "--device", "cpu", "--steps", "1",
                    "--warmup", "1", "--variant", "static", "--mode", "fwd", "--json",
                    str(out), "--out-dir", str(tmp_path)])
    text = capsys.readouterr().out
    assert rc == 0
    res = json.loads(out.read_text())
    assert "importance" in res["stages_missing_fwd"]
    assert "gemm1" in res["ranges_found"]
    assert "forward stages with no range: importance" in text


def test_profile_attribution_and_nsys_sqlite(tmp_path, capsys):
    """The GPU-side attribution (kernels to the innermost stage range on the launching
    thread) on synthetic data, through the same SQL the nsys path runs."""
    prof = _load_profile_module()
    db = tmp_path / "fake.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT);
        CREATE TABLE NVTX_EVENTS (start INT, end INT, eventType INT, text TEXT, textId INT,
                                  globalTid INT, domainId INT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INT, end INT, globalTid INT,
                                                  correlationId INT, nameId INT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INT, end INT, correlationId INT,
                                                 shortName INT, demangledName INT);
        INSERT INTO StringIds VALUES (1, 'gemm1'), (2, 'bwd:gemm1'), (3, 'cutlass_kernel'),
                                     (4, 'profile_step');
        INSERT INTO NVTX_EVENTS VALUES (0, 1000, 59, NULL, 4, 7, 0);
        INSERT INTO NVTX_EVENTS VALUES (100, 200, 59, NULL, 1, 7, 0);
        INSERT INTO NVTX_EVENTS VALUES (300, 400, 59, 'router', NULL, 7, 0);
        INSERT INTO NVTX_EVENTS VALUES (500, 600, 59, NULL, 2, 9, 0);
        INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (150, 160, 7, 1, 0), (350, 360, 7, 2, 0),
                                                       (550, 560, 9, 3, 0), (700, 710, 7, 4, 0),
                                                       (550, 560, 7, 5, 0);
        INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (2000, 4000000, 1, 3, 3),
            (5000, 1005000, 2, 3, 3), (6000, 3006000, 3, 3, 3), (7000, 1007000, 4, 3, 3),
            (8000, 2008000, 5, 3, 3);
    """)
    con.commit()
    con.close()
    res = prof.read_nsys_sqlite(str(db), steps=1)
    st = res["stages"]
    assert st["gemm1"]["fwd_gpu_ms"] == pytest.approx(3.998)
    assert st["router"]["fwd_gpu_ms"] == pytest.approx(1.0)
    assert st["gemm1"]["bwd_gpu_ms"] == pytest.approx(3.0)   # launched on the autograd thread
    # launched in the step but in no stage range on its thread: "other"
    assert res["other"]["gpu_ms"] == pytest.approx(3.0)
    assert set(res["ranges_found"]) == {"gemm1", "router", "bwd:gemm1"}
    assert "importance" in res["stages_missing_fwd"]
    tops = {(k["range"], k["kernel"]): k for k in res["top_kernels"]}
    assert tops[("gemm1", "cutlass_kernel")]["launches_per_step"] == 1
    assert tops[("other", "cutlass_kernel")]["launches_per_step"] == 2
    assert tops[("other", "cutlass_kernel")]["ms_per_step"] == pytest.approx(3.0)
    prof.print_table(res, "synthetic")
    text = capsys.readouterr().out
    assert "kernels by range" in text and "  other: 3.000 ms in 2 launches" in text


# (kernel name as a profiler reports it, its short form)
KERNEL_NAMES = [
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<"
     "at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}>>(int)",
     "at::native::elementwise_kernel [direct_copy_kernel_cuda]"),
    ("void anyexperts::(anonymous namespace)::gather_kernel<c10::BFloat16, 8>(int, int)",
     "anyexperts::gather_kernel"),
    ("_ZN7cutlass13device_kernelINS_4gemm6kernel13GemmUniversalINS1_17GroupProblemShape"
     "NS1_43KernelPtrArrayTmaWarpSpecializedCooperativeEEENS6_IJNSC_ILi128EEENS5_4SM90"
     "4GMMA28MMA_64x256x16_F32BF16BF16_SSILNSV_5MajorE0E",
     "cutlass KernelPtrArrayTmaWarpSpecializedCooperative MMA_64x256x16"),
    ("_ZN7cutlass6KernelINS_4gemm6kernel11GemmGroupedINS1_11threadblock13MmaMultistageINS1_"
     "9GemmShapeILi128ELi128ELi32EEENS_9transform11threadblockEEEEEvNT_6ParamsE",
     "cutlass GemmGrouped 128x128x32"),
    ("void cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::"
     "KernelPtrArrayTmaWarpSpecializedPingpong, cute::SM90::GMMA::MMA_64x256x16_F32BF16BF16_SS"
     "<(cute::SM90::GMMA::Major)0>>>(T1::Params)",        # demangled, as nsys reports it
     "cutlass KernelPtrArrayTmaWarpSpecializedPingpong MMA_64x256x16"),
    ("void cutlass::other_kernel<int>(int)", "cutlass::other_kernel"),
]


@pytest.mark.parametrize("name,short", KERNEL_NAMES)
def test_profile_short_kernel_names(name, short):
    assert _load_profile_module().short_kernel_name(name) == short


def test_profile_module_does_not_shadow_stdlib():
    """With bench/ first on sys.path (as for any script run from bench/), `import profile`
    must still give the standard library's module: cProfile and torch._dynamo import it."""
    code = ("import sys; sys.path.insert(0, %r); import cProfile, profile; "
            "assert hasattr(profile, 'Profile') and hasattr(profile, 'run'), profile; "
            "assert profile.__file__ != %r; print('ok')") % (
                BENCH, os.path.join(BENCH, "profile.py"))
    assert "ok" in _run(["-c", code], timeout=120)


# ---- baselines compute what the layer computes ----------------------------------------

def _tiny(seed=0, k=4):
    import bench_layer as bl
    s = dict(E=8, H=32, F=16, T=48, top_k=k)
    plan = bl.k_plan(s)
    return bl, s, plan, bl.build_layers(s, plan, torch.device("cpu"), torch.float32,
                                        seed=seed)


def _fwd_bwd(call, x, dy, params):
    xr = x.detach().clone().requires_grad_(True)
    for p in params:
        p.grad = None
    out, loss = call(xr)
    torch.autograd.backward([out], [dy])
    return out.detach(), xr.grad.detach()


@pytest.mark.parametrize("gmm", ["loop", "torch"])
def test_baselines_match_static_layer(gmm):
    import baselines
    bl, s, plan, b = _tiny()
    static, x, dy = b["static"], b["x"], b["dy"]
    ref_out, ref_dx = _fwd_bwd(lambda t: static(t), x, dy, list(static.parameters()))
    ref_wgrad = static.w_gate_up.grad.clone()
    models = [baselines.EagerLoopMoE(static.router.weight, static.w_gate_up, static.w_down,
                                     s["top_k"])]
    g = baselines.GroupedMMMoE(static.router.weight, static.w_gate_up, static.w_down,
                               s["top_k"], use_torch_grouped_mm=(gmm == "torch"))
    if gmm == "torch" and not g.use_torch_grouped_mm:
        pytest.skip(f"torch._grouped_mm unusable here: {g.fallback_reason}")
    models.append(g)
    if gmm == "torch":   # the padded path (as torchtitan pads groups for torch._grouped_mm)
        models.append(baselines.GroupedMMMoE(static.router.weight, static.w_gate_up,
                                             static.w_down, s["top_k"],
                                             use_torch_grouped_mm=True, align=16))
    for m in models:
        out, dx = _fwd_bwd(m, x, dy, list(m.parameters()))
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5, msg=m.label)
        torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5, msg=m.label)
        if isinstance(m, baselines.GroupedMMMoE):
            torch.testing.assert_close(static.w_gate_up.grad, ref_wgrad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["virtual", "all"])
def test_weight0_equals_layer(mode):
    import baselines
    bl, s, plan, b = _tiny(k=8)
    layer, x, dy = b["layer"], b["x"], b["dy"]
    layer.set_budget(min(plan["targets"]), x)
    params = list(layer.parameters())
    call = lambda t: (lambda o: (o[0], o[1].loss))(layer(t))  # noqa: E731
    ref_out, ref_dx = _fwd_bwd(call, x, dy, params)
    inner = baselines.Weight0Backend(layer._B, mode)
    with bl.LayerProbe(layer, inner=inner, capture=True) as pr:
        out, dx = _fwd_bwd(call, x, dy, params)
        rows = int(pr.backend.captured["offsets"][-1])
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    if mode == "all":
        assert rows == s["T"] * plan["k_max"]
    # the probe left the layer as it was
    assert type(layer).__name__ == "AnyExpertsMoE" and "_bench_backend" not in vars(layer)
    out2, _ = layer(x)
    torch.testing.assert_close(out2.detach(), ref_out, rtol=1e-5, atol=1e-6)


def test_stage_ranges_cover_every_stage():
    """The outside ranges open every stage name, forward and backward, in data-flow order."""
    bl, s, plan, b = _tiny(k=8)
    layer, x, dy = b["layer"], b["x"], b["dy"]
    seen = []

    class Rec(bl.StageMarker):
        def switch(self, name):
            if not seen or seen[-1] != name:
                seen.append(name)
            super().switch(name)
    m = Rec(nvtx=False, record_function=False)
    xr = x.detach().clone().requires_grad_(True)
    with bl.LayerProbe(layer, marker=m) as pr:
        out, aux = layer(xr)
        pr.mark_backward([out, aux.loss], xr)
        torch.autograd.backward([out, aux.loss], [dy, torch.ones_like(aux.loss)])
    fwd = [n for n in seen if not n.startswith("bwd:")]
    bwd = [n[4:] for n in seen if n.startswith("bwd:")]
    assert fwd == list(STAGES), fwd
    assert set(bwd) == set(STAGES), bwd
    assert bwd[0] == "losses" and bwd[-1] == "importance", bwd
