"""Mean and range over seeds of the study's main columns.

One seed moves a model's accuracy here by up to 18 points, more than the differences between
models, so the README reads the study through several seeds:

    python3 examples/paper_repro/run.py                                  # seed 0 -> results/
    python3 examples/paper_repro/run.py --seed 1 --out examples/paper_repro/results/seed1 --no-figures
    python3 examples/paper_repro/run.py --seed 2 --out examples/paper_repro/results/seed2 --no-figures
    python3 examples/paper_repro/seeds.py   # reads results/results.json, results/seed*/results.json

writes results/seeds.md and prints it.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))

# (column, value of one run's metrics)
COLUMNS = [
    ("Avg-K real", lambda m: m["avg_k_real"]),
    ("image", lambda m: m["avg_k_real_by_modality"]["image"]),
    ("text", lambda m: m["avg_k_real_by_modality"]["text"]),
    ("test acc %", lambda m: 100 * m["accuracy"]),
    ("real / fg patch", lambda m: m["real_per_fg_patch"]),
    ("real / bg patch", lambda m: m["real_per_bg_patch"]),
]


def cell(values, digits):
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(runs: list[dict]) -> str:
    seeds = [r["hyper"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"two results files of the same seed: {seeds}")
    models = list(runs[0]["models"])
    head = "| model | " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [f"Mean (min-max) over seeds {', '.join(map(str, sorted(seeds)))}.", "",
             head, "|---|" + "---:|" * len(COLUMNS)]
    for name in models:
        metrics = [r["models"][name]["metrics"] for r in runs if name in r["models"]]
        cells = [cell([get(m) for m in metrics], 1 if "%" in col else 2) for col, get in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="*", help="results.json files (default: results/ and "
                    "results/seed*/ next to this file)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "seeds.md"))
    args = ap.parse_args(argv)
    paths = args.results or ([os.path.join(HERE, "results", "results.json")] +
                             sorted(glob.glob(os.path.join(HERE, "results", "seed*",
                                                           "results.json"))))
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    text = table(runs)
    with open(args.out, "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
