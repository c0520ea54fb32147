#!/usr/bin/env python3
"""Plot of the layer benchmark: time vs Avg-K real experts per token.

    python bench/plot_layer.py [bench/results/layer.json] [--out bench/results/layer.png]

One row of panels per shape, forward and forward+backward side by side. AnyExperts is a line
over its Avg-K targets; the weight-0 handlings of its masked slots are lines at the same
Avg-K (their GEMMs compute more rows than real slots); static top-K on the same layer, the
torch._grouped_mm pipeline and the eager loop are points at Avg-K = top-k. The dashed line
is static top-K's time scaled by Avg-K / top-k: the ideal "compute follows real slots".
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

STYLE = {  # variant: (label, marker, linestyle, color)
    "anyexperts": ("AnyExperts (masked virtual/unused slots)", "o", "-", "tab:blue"),
    "weight0_virtual": ("virtual slots -> real expert, weight 0", "v", "--", "tab:orange"),
    "weight0_all": ("virtual + unused slots -> real expert, weight 0", "^", "--", "tab:green"),
    "anyexperts_tight_k": ("AnyExperts, K_max = top-K", "P", "", "tab:cyan"),
    "static_topk": ("static top-K, same layer", "s", "", "tab:red"),
    "grouped_mm_pipeline": ("torch._grouped_mm pipeline", "D", "", "tab:purple"),
    "eager_loop": ("eager per-expert loop (HF)", "X", "", "tab:brown"),
}


def plot(doc: dict, out: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc.get("rows", []) if r.get("time_ms") is not None
            and r.get("avg_real_experts") is not None]
    shapes = [s["name"] for s in doc.get("shapes", [])] or sorted({r["shape"] for r in rows})
    shapes = [s for s in shapes if any(r["shape"] == s for r in rows)] or shapes[:1]
    modes = ("fwd", "fwd_bwd")
    fig, axes = plt.subplots(max(len(shapes), 1), 2, figsize=(12, 3.8 * max(len(shapes), 1)),
                             squeeze=False)
    for i, shape in enumerate(shapes):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == shape and r["mode"] == mode]
            for variant, (label, marker, ls, color) in STYLE.items():
                pts = sorted((r["avg_real_experts"], r["time_ms"], r.get("name", ""))
                             for r in sel if r["variant"] == variant)
                if not pts:
                    continue
                if variant == "grouped_mm_pipeline" and any("fallback" in p[2] for p in pts):
                    label = "per-group loop pipeline (no torch._grouped_mm)"
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, marker=marker, linestyle=ls or "none", label=label,
                        markersize=7, color=color)
            st = [r for r in sel if r["variant"] == "static_topk"]
            if st:
                k = st[0]["top_k"]
                xs = sorted({r["avg_real_experts"] for r in sel} | {float(k)})
                ax.plot(xs, [st[0]["time_ms"] * x / k for x in xs], color="gray",
                        linestyle=":", linewidth=1, label="static x Avg-K / top-k (ideal)")
            ax.set_title(f"{shape} - {'forward' if mode == 'fwd' else 'forward + backward'}",
                         fontsize=9)
            ax.set_xlabel("Avg-K real experts per token")
            ax.set_ylabel("time (ms)")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=6, loc="best")
    dev = doc.get("gpu") or f"CPU ({doc.get('cpu')})"
    fig.suptitle(f"AnyExperts layer: time vs Avg-K real - {dev}, torch {doc.get('torch')}",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="?", default=os.path.join(HERE, "results", "layer.json"))
    p.add_argument("--out", default=None, help="PNG path (default: beside the JSON)")
    a = p.parse_args(argv)
    with open(a.json) as f:
        doc = json.load(f)
    out = a.out or os.path.splitext(a.json)[0] + ".png"
    print(f"wrote {plot(doc, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
