#!/usr/bin/env python3
"""Per-stage profile of one AnyExperts layer step.

    python bench/profile.py                          # E=128 shape, Avg-K 4.8, fwd+bwd
    python bench/profile.py --shape e8 --variant static --mode fwd
    python bench/profile.py --quick                  # tiny shape, CPU: torch.profiler

Runs a few layer steps (after warm-up) under ``nsys profile`` when nsys is on PATH and the
device is CUDA (the script re-invokes itself under nsys, capturing only the profiled steps
through cudaProfilerStart/Stop), else under ``torch.profiler``. Either way it prints a table
of time per stage - importance, router, segmented_topk, permute, gemm1, activation, gemm2,
unpermute, losses - forward and backward, from the NVTX / record_function ranges of those
names: GPU kernel time (each kernel counted in the innermost stage range open on the thread
that launched it) on CUDA, range wall time on CPU.

The stage ranges are placed from outside the layer (bench_layer.LayerProbe: module hooks and
a wrapper of the layer's op backend; backward ranges "bwd:<stage>" from autograd pre-hooks).
If the layer emits ranges of the same names itself, ``--no-outside-ranges`` profiles with its
ranges alone; the table lists the stage names it found and those it did not.

The nsys command it runs (also usable by hand, then open the .nsys-rep in Nsight Systems):

    nsys profile --trace=cuda,nvtx --capture-range=cudaProfilerApi --capture-range-end=stop \\
        --sample=none --cpuctxsw=none --force-overwrite=true -o bench/results/profile/layer \\
        python bench/profile.py --inner nsys [same options]
"""
# This file is named as the brief asks (bench/profile.py), which shadows the standard
# library's `profile` for any script run from bench/ (sys.path[0] = bench/): cProfile, which
# torch._dynamo imports, does `import profile`. When imported under that name, this module
# therefore turns itself into the standard library's module and defines nothing else heavy.
import sys

if __name__ == "profile":
    import importlib.util as _ilu
    import os as _os
    import sysconfig as _sc

    def _stdlib_profile_path():
        here = _os.path.dirname(_os.path.abspath(__file__))
        cands = [_os.path.join(_sc.get_paths()["stdlib"], "profile.py")]
        cands += [_os.path.join(p, "profile.py") for p in sys.path
                  if p and _os.path.abspath(p) != here]
        for c in cands:
            if _os.path.isfile(c) and _os.path.abspath(c) != _os.path.abspath(__file__):
                return c
        raise ImportError("bench/profile.py shadows the standard library's profile module, "
                          "which could not be found")

    _spec = _ilu.spec_from_file_location("profile", _stdlib_profile_path())
    _std = _ilu.module_from_spec(_spec)
    sys.modules["profile"] = _std
    _spec.loader.exec_module(_std)   # `import profile` now yields the stdlib module
else:
    import argparse
    import json
    import re
    import os
    import shutil
    import sqlite3
    import subprocess
    import time

    HERE = os.path.dirname(os.path.abspath(__file__))
    STAGES = ("importance", "router", "segmented_topk", "permute", "gemm1", "activation",
              "gemm2", "unpermute", "losses")
    BWD = "bwd:"
    STEP = "profile_step"
    NSYS_ARGS = ["--trace=cuda,nvtx", "--capture-range=cudaProfilerApi",
                 "--capture-range-end=stop", "--sample=none", "--cpuctxsw=none",
                 "--force-overwrite=true"]


def _stage_of(name):
    """(stage, "fwd"|"bwd") for a stage range name, else None."""
    if name in STAGES:
        return name, "fwd"
    if name.startswith(BWD) and name[len(BWD):] in STAGES:
        return name[len(BWD):], "bwd"
    return None


# ---- attribution ----------------------------------------------------------------------

def attribute(ranges, kernels, steps):
    """ranges: [(name, tid, start, end)] (ns); kernels: [(tid, launch_ns, dur_ns, name)].
    Returns the per-stage table dict (times in ms per step)."""
    stage_ranges = [r for r in ranges if _stage_of(r[0])]
    step_ranges = [r for r in ranges if r[0] == STEP]
    by_tid = {}
    for r in stage_ranges:
        by_tid.setdefault(r[1], []).append(r)
    table = {s: {"fwd_gpu_ms": 0.0, "bwd_gpu_ms": 0.0, "fwd_cpu_ms": 0.0, "bwd_cpu_ms": 0.0,
                 "fwd_kernels": 0, "bwd_kernels": 0} for s in STAGES}
    other = {"gpu_ms": 0.0, "kernels": 0}
    top_kernels = {}   # (range, kernel) -> [ms, launches]
    # CPU wall time of the ranges (a range nested in one of the same stage is not re-counted)
    for r in stage_ranges:
        st, d = _stage_of(r[0])
        nested = any(o is not r and o[1] == r[1] and _stage_of(o[0]) == (st, d)
                     and o[2] <= r[2] and r[3] <= o[3] and (o[3] - o[2]) > (r[3] - r[2])
                     for o in by_tid[r[1]])
        if not nested:
            table[st][f"{d}_cpu_ms"] += (r[3] - r[2]) / 1e6
    total_gpu = 0.0
    in_step = 0
    for tid, ts, dur, kname in kernels:
        inside_step = any(s[2] <= ts <= s[3] for s in step_ranges) if step_ranges else True
        best = None
        for r in by_tid.get(tid, ()):
            if r[2] <= ts <= r[3] and (best is None or r[3] - r[2] < best[3] - best[2]):
                best = r
        if best is None and not inside_step:
            continue
        in_step += 1
        total_gpu += dur / 1e6
        if best is None:
            other["gpu_ms"] += dur / 1e6
            other["kernels"] += 1
            key = ("other", kname)
        else:
            st, d = _stage_of(best[0])
            table[st][f"{d}_gpu_ms"] += dur / 1e6
            table[st][f"{d}_kernels"] += 1
            key = (best[0], kname)
        acc = top_kernels.setdefault(key, [0.0, 0])
        acc[0] += dur / 1e6
        acc[1] += 1
    n = max(steps, 1)
    for row in table.values():
        for k in list(row):
            if k.endswith("_ms"):
                row[k] /= n
            else:
                row[k] = row[k] / n
    other = {"gpu_ms": other["gpu_ms"] / n, "kernels": other["kernels"] / n}
    found = sorted({r[0] for r in stage_ranges})
    step_wall = sum(s[3] - s[2] for s in step_ranges) / 1e6 / n if step_ranges else None
    tops = sorted(top_kernels.items(), key=lambda kv: -kv[1][0])
    return dict(stages=table, other=other, gpu_total_ms=total_gpu / n, kernels_per_step=in_step / n,
                step_wall_ms=step_wall, steps=steps, ranges_found=found,
                stages_missing_fwd=[s for s in STAGES if s not in found],
                stages_missing_bwd=[s for s in STAGES if BWD + s not in found],
                top_kernels=[dict(range=k[0], kernel=k[1], ms_per_step=v[0] / n,
                                  launches_per_step=v[1] / n) for k, v in tops])


_GENERIC = {"elementwise_kernel", "vectorized_elementwise_kernel", "unrolled_elementwise_kernel",
            "gpu_kernel_impl", "gpu_kernel_impl_nocast", "launch_kernel", "index_elementwise_kernel",
            "reduce_kernel", "ReduceOp", "Array", "native"}


def short_kernel_name(name: str) -> str:
    """A readable kernel name: the launching function plus the functors named inside its
    template arguments (ATen), or the CUTLASS kernel (3.x schedule and MMA atom, or 2.x
    grouped GEMM and tile); the JSON keeps the full name. Takes mangled names (torch.profiler)
    and demangled ones (nsys)."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    if name.startswith("_ZN7cutlass") or name.startswith("cutlass"):
        parts = re.findall(r"Kernel(?:PtrArray)?TmaWarpSpecialized(?:Cooperative|Pingpong)"
                           r"|MMA_\d+x\d+x\d+|GemmGrouped", name)
        tile = re.search(r"GemmShape(?:ILi(\d+)ELi(\d+)ELi(\d+)E|<(\d+), ?(\d+), ?(\d+)>)", name)
        if tile:
            parts.append("x".join(g for g in tile.groups() if g))
        head = "cutlass " if parts else name.split("<", 1)[0]
        return head + " ".join(dict.fromkeys(parts))
    name = name.replace("(anonymous namespace)::", "")
    head = name.split("<", 1)[0].split("(", 1)[0]
    inner = re.findall(r"at::native::(\w+)", name)
    extra = [w for w in dict.fromkeys(inner) if w not in _GENERIC and w not in head]
    return head + (" [" + ", ".join(extra[:3]) + "]" if extra else "")


def print_table(res, source):
    gpu = res["kernels_per_step"] > 0
    print(f"\nPer-stage time per step ({source}; {res['steps']} step(s); "
          f"{'GPU kernel time' if gpu else 'CPU range wall time'}):")
    hdr = f"{'stage':16s} {'fwd ms':>10s} {'bwd ms':>10s} {'total ms':>10s} {'share':>7s}"
    if gpu:
        hdr += f" {'fwd krn':>8s} {'bwd krn':>8s} {'fwd CPU':>9s} {'bwd CPU':>9s}"
    print(hdr)
    print("-" * len(hdr))
    key = "gpu" if gpu else "cpu"
    tot = sum(r[f"fwd_{key}_ms"] + r[f"bwd_{key}_ms"] for r in res["stages"].values())
    if gpu:
        tot += res["other"]["gpu_ms"]
    for st in STAGES:
        r = res["stages"][st]
        f, b = r[f"fwd_{key}_ms"], r[f"bwd_{key}_ms"]
        line = (f"{st:16s} {f:10.3f} {b:10.3f} {f + b:10.3f} "
                f"{100 * (f + b) / tot if tot else 0:6.1f}%")
        if gpu:
            line += (f" {r['fwd_kernels']:8.1f} {r['bwd_kernels']:8.1f} "
                     f"{r['fwd_cpu_ms']:9.3f} {r['bwd_cpu_ms']:9.3f}")
        print(line)
    if gpu:
        o = res["other"]["gpu_ms"]
        print(f"{'(outside stages)':16s} {o:10.3f} {'':10s} {o:10.3f} "
              f"{100 * o / tot if tot else 0:6.1f}%")
    print("-" * len(hdr))
    print(f"{'total':16s} {'':10s} {'':10s} {tot:10.3f}")
    if res.get("step_wall_ms") is not None:
        print(f"step wall time (host view): {res['step_wall_ms']:.3f} ms")
    gem = sum(res["stages"][s][f"fwd_{key}_ms"] + res["stages"][s][f"bwd_{key}_ms"]
              for s in ("gemm1", "activation", "gemm2"))
    if tot:
        print(f"routing overhead (all but gemm1, activation, gemm2): {tot - gem:.3f} ms = "
              f"{100 * (tot - gem) / tot:.1f}% of the step")
    print(f"stage ranges found: {', '.join(res['ranges_found']) or 'none'}")
    if res["stages_missing_fwd"]:
        print(f"forward stages with no range: {', '.join(res['stages_missing_fwd'])}")
    if res["stages_missing_bwd"]:
        print(f"backward stages with no range: {', '.join(res['stages_missing_bwd'])}")
    if res.get("top_kernels"):
        print("\ntop kernels (ms per step, launches per step):")
        for k in res["top_kernels"][:10]:
            print(f"  {k['ms_per_step']:9.3f} {k.get('launches_per_step', 0):4.0f}x  "
                  f"[{k['range']}] {short_kernel_name(k['kernel'])[:100]}")
        print("\nkernels by range (the three largest of each; ms per step, launches):")
        by_range = {}
        for k in res["top_kernels"]:
            by_range.setdefault(k["range"], []).append(k)
        for rng in sorted(by_range, key=lambda r: -sum(k["ms_per_step"] for k in by_range[r])):
            ks = by_range[rng]
            print(f"  {rng}: {sum(k['ms_per_step'] for k in ks):.3f} ms in "
                  f"{sum(k.get('launches_per_step', 0) for k in ks):.0f} launches")
            for k in ks[:3]:
                print(f"    {k['ms_per_step']:8.3f} {k.get('launches_per_step', 0):4.0f}x  "
                      f"{short_kernel_name(k['kernel'])[:100]}")


# ---- the workload ---------------------------------------------------------------------

def setup(args):
    """(step function, description, marker); imports the benchmark's builders."""
    if HERE not in sys.path:
        sys.path.append(HERE)
    import torch
    import bench_layer as bl
    from baselines import Weight0Backend

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    dt = getattr(torch, args.dtype)
    key, s = bl.parse_shape(args.shape)
    plan = bl.k_plan(s)
    built = bl.build_layers(s, plan, dev, dt, seed=args.seed, align=args.align)
    layer, static, x, dy = built["layer"], built["static"], built["x"], built["dy"]
    desc = f"{bl.shape_name(s)} {args.dtype} on {dev}, {args.mode}"
    inner = None
    if args.variant == "static":
        model = static
        desc += f", static top-{s['top_k']}"
    else:
        target = args.avgk if args.avgk is not None else min(plan["targets"])
        achieved = layer.set_budget(target, x)
        model = layer
        desc += f", AnyExperts Avg-K {achieved:.3f} (target {target:g})"
        if args.variant.startswith("weight0"):
            inner = Weight0Backend(layer._B, args.variant.split("_", 1)[1])
            desc += f", {args.variant}"
    marker = bl.StageMarker(nvtx=None if dev.type == "cuda" else False)
    xr = x.detach().clone().requires_grad_(args.mode == "fwd_bwd")
    params = [p for p in model.parameters() if p.requires_grad]
    outside = not args.no_outside_ranges

    def step():
        with marker.range(STEP):
            if args.mode == "fwd":
                with torch.no_grad(), _probe(bl, model, marker if outside else None, inner):
                    model(xr)
                return
            xr.grad = None
            for p in params:
                p.grad = None
            with _probe(bl, model, marker if outside else None, inner) as pr:
                out, aux = model(xr)
                roots, grads = [out], [dy]
                if aux.loss.requires_grad:
                    roots.append(aux.loss)
                    grads.append(torch.ones_like(aux.loss))
                if pr is not None:
                    pr.mark_backward(roots, xr)
                torch.autograd.backward(roots, grads)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
    return step, desc, dev


def _probe(bl, model, marker, inner):
    import contextlib
    if marker is None and inner is None:
        return contextlib.nullcontext()
    return bl.LayerProbe(model, marker=marker, inner=inner)


def run_torch_profiler(args):
    import torch
    from torch.profiler import ProfilerActivity, profile
    step, desc, dev = setup(args)
    for _ in range(args.warmup):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(args.steps):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    if args.trace:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, "layer_trace.json")
        prof.export_chrome_trace(path)
        print(f"chrome trace: {path}")
    ranges, kernels, ops = [], [], {}
    events = prof.profiler.kineto_results.events()
    names = set(STAGES) | {BWD + s for s in STAGES} | {STEP}
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            if e.linked_correlation_id() == 0:
                ops[e.correlation_id()] = (e.start_thread_id(), e.start_ns())
            if e.name() in names:
                ranges.append((e.name(), e.start_thread_id(), e.start_ns(), e.end_ns()))
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            continue
        act = ""
        try:
            act = str(e.activity_type())
        except Exception:  # noqa: BLE001
            pass
        if act and act not in ("kernel", "gpu_memcpy", "gpu_memset"):
            continue
        if e.is_user_annotation() or e.name() in names:
            continue
        src = ops.get(e.linked_correlation_id())
        if src is None:
            continue
        kernels.append((src[0], src[1], e.duration_ns(), e.name()))
    res = attribute(ranges, kernels, args.steps)
    res.update(profiler="torch.profiler", workload=desc)
    return res


# ---- nsys -----------------------------------------------------------------------------

def run_nsys_inner(args):
    import torch
    step, desc, dev = setup(args)
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize(dev)
    torch.cuda.profiler.start()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize(dev)
    torch.cuda.profiler.stop()
    with open(args.inner_desc, "w") as f:
        f.write(desc)


def nsys_command(nsys, base, argv):
    return [nsys, "profile", *NSYS_ARGS, "-o", base, sys.executable,
            os.path.abspath(__file__), *argv]


def read_nsys_sqlite(path, steps):
    con = sqlite3.connect(path)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    strings = "StringIds" in tables
    q = ("SELECT COALESCE(n.text, s.value), n.globalTid, n.start, n.end FROM NVTX_EVENTS n "
         "LEFT JOIN StringIds s ON s.id = n.textId "
         "WHERE n.end IS NOT NULL AND n.end > n.start") if strings else (
        "SELECT n.text, n.globalTid, n.start, n.end FROM NVTX_EVENTS n "
        "WHERE n.end IS NOT NULL AND n.end > n.start")
    ranges = [(r[0] or "", r[1], r[2], r[3]) for r in con.execute(q)]
    kernels = []
    kernel_cols = {r[1] for r in con.execute("PRAGMA table_info(CUPTI_ACTIVITY_KIND_KERNEL)")}
    name = "demangledName" if "demangledName" in kernel_cols else "shortName"
    for table, name_col in (("CUPTI_ACTIVITY_KIND_KERNEL", name),
                            ("CUPTI_ACTIVITY_KIND_MEMSET", None),
                            ("CUPTI_ACTIVITY_KIND_MEMCPY", None)):
        if table not in tables:
            continue
        if name_col and strings:
            sel = (f"SELECT r.globalTid, r.start, k.end - k.start, COALESCE(s.value, '') "
                   f"FROM {table} k JOIN CUPTI_ACTIVITY_KIND_RUNTIME r "
                   f"ON k.correlationId = r.correlationId "
                   f"LEFT JOIN StringIds s ON s.id = k.{name_col}")
        else:
            sel = (f"SELECT r.globalTid, r.start, k.end - k.start, '{table[20:].lower()}' "
                   f"FROM {table} k JOIN CUPTI_ACTIVITY_KIND_RUNTIME r "
                   f"ON k.correlationId = r.correlationId")
        kernels += [tuple(r) for r in con.execute(sel)]
    con.close()
    return attribute(ranges, kernels, steps)


def run_nsys_outer(args, argv, nsys):
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, "layer")
    desc_path = base + ".desc.txt"
    inner_argv = [a for a in argv] + ["--inner", "nsys", "--inner-desc", desc_path]
    cmd = nsys_command(nsys, base, inner_argv)
    print("running: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.run(cmd).returncode
    print(f"nsys profile: rc={rc} in {time.perf_counter() - t0:.1f} s", flush=True)
    rep = base + ".nsys-rep"
    if not os.path.exists(rep) and os.path.exists(base + ".qdrep"):
        rep = base + ".qdrep"
    if rc != 0 or not os.path.exists(rep):
        raise RuntimeError(f"nsys profile failed (rc={rc}); report {rep} missing")
    sq = base + ".sqlite"
    ex = subprocess.run([nsys, "export", "--type=sqlite", "--force-overwrite=true",
                         f"--output={sq}", rep], capture_output=True, text=True)
    try:
        if ex.returncode != 0:
            raise RuntimeError(ex.stderr.strip()[-400:])
        res = read_nsys_sqlite(sq, args.steps)
    except Exception as e:  # noqa: BLE001 - fall back to nsys's own NVTX projection
        print(f"could not read {sq} ({type(e).__name__}: {e}); nsys stats instead:")
        subprocess.run([nsys, "stats", "--report", "nvtx_gpu_proj_sum", "--report",
                        "nvtx_sum", rep])
        return None
    desc = open(desc_path).read() if os.path.exists(desc_path) else ""
    res.update(profiler="nsys", workload=desc, report=rep)
    return res


# ---- entry point ----------------------------------------------------------------------

def build_argparser():
    import torch
    p = argparse.ArgumentParser(description="Per-stage profile of one AnyExperts layer step "
                                "(nsys when available, else torch.profiler).")
    p.add_argument("--shape", default=None,
                   help="e128 (default), e64, e8, q16, q4 or E16:H64:F32:T256:k8")
    p.add_argument("--quick", action="store_true", help="tiny shape (q16), for CPU / tests")
    p.add_argument("--variant", default="anyexperts",
                   choices=("anyexperts", "static", "weight0_all", "weight0_virtual"))
    p.add_argument("--avgk", type=float, default=None,
                   help="Avg-K real target on the shape's own scale (default: its lowest, "
                        "e.g. 4.8 for top-8)")
    p.add_argument("--mode", choices=("fwd", "fwd_bwd"), default="fwd_bwd")
    p.add_argument("--steps", type=int, default=3, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profiler", choices=("auto", "nsys", "torch"), default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--align", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-outside-ranges", action="store_true",
                   help="do not place stage ranges from outside (use the layer's own)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results", "profile"),
                   help="nsys report / chrome trace directory")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    p.add_argument("--trace", action="store_true", help="torch.profiler: export a chrome trace")
    p.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    p.add_argument("--inner-desc", default=None, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_argparser().parse_args(argv)
    if args.shape is None:
        args.shape = "q16" if args.quick else "e128"
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.inner == "nsys":
        run_nsys_inner(args)
        return 0
    nsys = shutil.which("nsys")
    use_nsys = args.profiler == "nsys" or (
        args.profiler == "auto" and nsys is not None and args.device.startswith("cuda"))
    res = None
    if use_nsys:
        if nsys is None:
            print("nsys is not on PATH", file=sys.stderr)
            return 2
        try:
            res = run_nsys_outer(args, argv, nsys)
        except Exception as e:  # noqa: BLE001
            print(f"nsys run failed: {type(e).__name__}: {e}", file=sys.stderr)
            if args.profiler == "nsys":
                return 1
            print("falling back to torch.profiler", file=sys.stderr)
        if res is None and args.profiler == "nsys":
            return 0  # nsys stats printed its own tables
    if res is None:
        res = run_torch_profiler(args)
    if HERE not in sys.path:
        sys.path.append(HERE)
    from provenance import code_commit
    res["commit"] = code_commit()
    print(f"workload: {res.get('workload')}, commit {res['commit']}")
    print_table(res, res["profiler"])
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
