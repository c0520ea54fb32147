"""Small-scale CPU reproduction of AnyExperts' claims (issue 7): one command, whole study.

    PYTHONPATH=python python examples/paper_repro/run.py            # full study -> results/
    PYTHONPATH=python python examples/paper_repro/run.py --tiny     # seconds, for the test

Trains a tiny multimodal transformer (digits on a blank canvas + a question) whose FFNs are
AnyExperts MoE layers, with static top-K (K = 2, 4, 6) and AnyExperts at several target
Avg-K, all from the same seeds and the same data stream, and writes results.json,
results.md (the table) and PNG figures (importance / real-expert heatmaps).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import anyexperts_ops  # noqa: E402,F401  (registers the ops)
from data import QUESTION_NAMES, CanvasDigits, load_digits_split, slice_batch  # noqa: E402
from study import Hyper, ModelSpec, analyse, build, train  # noqa: E402

FULL_SPECS = [
    ModelSpec("static_k2", "static", k=2),
    ModelSpec("static_k4", "static", k=4),
    ModelSpec("static_k6", "static", k=6),
    ModelSpec("anyexperts_t2", "anyexperts", target=2.0),
    ModelSpec("anyexperts_t3", "anyexperts", target=3.0),
    ModelSpec("anyexperts_t4", "anyexperts", target=4.0),
]
TINY_SPECS = [ModelSpec("static_k2", "static", k=2),
              ModelSpec("anyexperts_t2", "anyexperts", target=2.0)]


def fmt(x, nd=2):
    return "n/a" if x is None or x != x else f"{x:.{nd}f}"


def table(results: dict) -> str:
    head = ("| model | Avg-K real (all) | image | text | test acc | " +
            " | ".join(QUESTION_NAMES) +
            " | real / fg patch | real / bg patch | real slots on fg | corr(w, ink) L1 / L2 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        m = r["metrics"]
        k = m["avg_k_real_by_modality"]
        corr = m.get("corr_importance_ink_pearson_by_layer")
        corr_s = " / ".join(fmt(c) for c in corr) if corr else "n/a"
        lines.append(
            f"| {name} | {fmt(m['avg_k_real'])} | {fmt(k['image'])} | {fmt(k['text'])} | "
            f"{fmt(100 * m['accuracy'], 1)} | " +
            " | ".join(fmt(100 * m["accuracy_by_question"][q], 1) for q in QUESTION_NAMES) +
            f" | {fmt(m['real_per_fg_patch'])} | {fmt(m['real_per_bg_patch'])} | "
            f"{fmt(100 * m['real_share_on_fg'], 1)}% | {corr_s} |")
    return "\n".join(lines)


def run_model(job):
    """Builds, trains and analyses one model (in its own process with --workers > 1)."""
    spec, hp, seed, eval_images, log_every, threads, save_dir = job
    torch.set_num_threads(threads)
    tr_x, tr_y, te_x, te_y = load_digits_split(seed=seed)
    train_data = CanvasDigits(tr_x, tr_y)
    ev = CanvasDigits(te_x, te_y).fixed_eval(seed=1000 + seed, limit=eval_images)
    t0, c0 = time.perf_counter(), time.process_time()
    model = build(spec, hp, train_data)
    init = None
    if spec.kind == "anyexperts":   # the untrained predictor, as a control
        sub = slice_batch(ev, slice(0, min(len(ev.answer), 400)))
        m0, _ = analyse(model, sub, hp.eval_chunk)
        init = {k: m0[k] for k in ("corr_importance_ink_pearson_by_layer",
                                   "corr_importance_ink_within_image_by_layer",
                                   "importance_image_between_example_variance_share_by_layer",
                                   "importance_fg_bg_by_layer", "real_per_fg_patch",
                                   "real_per_bg_patch", "avg_k_real_by_modality")}
    log = train(model, train_data, hp, log_every=log_every, prefix=f"[{spec.name}] ")
    metrics, arrays = analyse(model, ev, hp.eval_chunk)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        torch.save(model.state_dict(), os.path.join(save_dir, f"{spec.name}.pt"))
    res = {"spec": vars(spec), "config": model.moes[0].config.to_dict(),
           "metrics": metrics, "at_init": init, "train": log,
           "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0}
    k = metrics["avg_k_real_by_modality"]
    corr = metrics.get("corr_importance_ink_pearson_by_layer")
    print(f"[{spec.name}] done: acc {metrics['accuracy']:.3f}  Avg-K real "
          f"{metrics['avg_k_real']:.2f} (image {k['image']:.2f}, text {k['text']:.2f})  "
          f"real/fg {metrics['real_per_fg_patch']:.2f} real/bg {metrics['real_per_bg_patch']:.2f}"
          f"  corr(w,ink) {[round(c, 3) for c in corr] if corr else None}  "
          f"[{res['seconds']:.0f}s]", flush=True)
    return res, arrays


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a seconds-long smoke version")
    ap.add_argument("--out", default=None, help="output folder (default: results/ next to "
                    "this file; a temporary folder with --tiny)")
    ap.add_argument("--workers", type=int, default=2,
                    help="models trained in parallel, one process each (default 2: 2 cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", default=None, help="comma-separated model names to run")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--save-models", default=None, metavar="DIR",
                    help="also save each trained model's state_dict there (not committed)")
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = args.out or (tempfile.mkdtemp(prefix="paper_repro_tiny_") if args.tiny
                       else os.path.join(HERE, "results"))
    os.makedirs(out, exist_ok=True)

    if args.tiny:
        hp = Hyper(steps=6, batch=16, seed=args.seed, warmup=2)
        specs, eval_images, log_every = TINY_SPECS, 12, 3
    else:
        hp = Hyper(seed=args.seed)
        specs, eval_images, log_every = FULL_SPECS, None, 100
    if args.steps is not None:
        hp.steps = args.steps
    if args.only:
        keep = set(args.only.split(","))
        specs = [s for s in specs if s.name in keep]

    tr_x, tr_y, te_x, te_y = load_digits_split(seed=args.seed)
    train_data = CanvasDigits(tr_x, tr_y)
    test_data = CanvasDigits(te_x, te_y)
    ev = test_data.fixed_eval(seed=1000 + args.seed, limit=eval_images)
    print(f"train images {len(tr_y)}, eval examples {len(ev.answer)} "
          f"({len(te_y) if eval_images is None else eval_images} test images x "
          f"{len(QUESTION_NAMES)} questions), {train_data.num_patches} patches + 7 text tokens, "
          f"{args.workers} worker(s) x {args.threads} thread(s)", flush=True)

    jobs = [(spec, hp, args.seed, eval_images, log_every, args.threads, args.save_models)
            for spec in specs]
    if args.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(min(args.workers, len(jobs))) as pool:
            outs = pool.map(run_model, jobs, chunksize=1)
    else:
        outs = [run_model(j) for j in jobs]
    results = {spec.name: o[0] for spec, o in zip(specs, outs)}
    arrays_by_model = {spec.name: o[1] for spec, o in zip(specs, outs)}

    figures = []
    if not args.no_figures:
        import plots
        rows = [i for i in range(len(ev.answer)) if int(ev.qtype[i]) == 0][:6]
        text_rows = [next(i for i in range(len(ev.answer)) if int(ev.qtype[i]) == q)
                     for q in range(len(QUESTION_NAMES))]
        for spec in specs:
            if spec.kind != "anyexperts":
                continue
            a = arrays_by_model[spec.name]
            m = results[spec.name]["metrics"]
            title = (f"{spec.name}: Avg-K real image {m['avg_k_real_by_modality']['image']:.2f}, "
                     f"text {m['avg_k_real_by_modality']['text']:.2f}")
            p = os.path.join(out, f"heatmap_{spec.name}.png")
            plots.patch_heatmaps(p, ev, a, rows, train_data.grid, hp.k_max, title)
            figures.append(p)
            p = os.path.join(out, f"text_{spec.name}.png")
            plots.text_heatmap(p, ev, a, text_rows, hp.k_max, title)
            figures.append(p)
        p = os.path.join(out, "accuracy_vs_avgk.png")
        plots.accuracy_vs_budget(p, results)
        figures.append(p)

    import sklearn
    total = time.perf_counter() - t_start
    summary = {
        "study": "tiny" if args.tiny else "full",
        "hyper": vars(hp),
        "data": {"canvas": train_data.canvas, "patch": train_data.patch,
                 "num_patches": train_data.num_patches, "text_tokens": 7,
                 "train_images": len(tr_y), "eval_examples": len(ev.answer)},
        "models": results,
        "total_seconds": total,
        "workers": args.workers, "threads_per_worker": args.threads,
        "versions": {"torch": torch.__version__, "sklearn": sklearn.__version__,
                     "python": platform.python_version(),
                     "anyexperts_ops": anyexperts_ops.__version__},
        "figures": [os.path.basename(f) for f in figures],
    }
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    tab = table(results)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(tab + "\n")
    print(tab)
    print(f"total {total:.0f}s; results in {out}")
    return summary


if __name__ == "__main__":
    main()
