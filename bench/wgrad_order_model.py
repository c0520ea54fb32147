"""A model, not a measurement: how the order of the wgrad problems moves the time the SM90
grouped GEMM's persistent scheduler needs, on bench_grouped_mm.py's shapes and loads.

The scheduler (CUTLASS's PersistentTileSchedulerSm90Group) deals work units (one cluster of
2x1 tiles of 128x256) to the resident clusters round robin, in problem order, M-major within a
problem. A wgrad problem's K is its group's rows, so a unit costs ceil(rows / 64) k-steps plus
an epilogue; the model counts both in k-steps and reports each order's makespan (the busiest
cluster's sum) over the balanced load's, beside the ideal (the mean). Index order is what the
kernel did before grouped_mm_prepare.cuh's wgrad_slot; largest first is what it does now. The
epilogue's cost in k-steps is not known without a GPU, so the table gives a range.

    python3 bench/wgrad_order_model.py [--clusters 60]
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_grouped_mm import LOADS, SHAPES, group_sizes  # noqa: E402

# The kernel's grid is cudaOccupancyMaxActiveClusters clusters: 66 when every one of an H100
# SXM's 132 SMs pairs up; fewer where the GPCs' SM counts leave some unpaired (--clusters).
CLUSTERS = 66
TILE_M, TILE_N, CLUSTER_M, K_STEP = 128, 256, 2, 64
EPILOGUE_K_STEPS = (2, 8)
SEEDS = (0, 1, 2)


def makespan(sizes: list[int], units_per_group: int, order: list[int], epilogue: float,
             clusters: int = CLUSTERS) -> float:
    load = [0.0] * clusters
    unit = 0
    for g in order:
        if sizes[g] == 0:
            continue
        cost = -(-sizes[g] // K_STEP) + epilogue
        for _ in range(units_per_group):
            load[unit % clusters] += cost
            unit += 1
    return max(load)


def largest_first(sizes: list[int]) -> list[int]:
    return sorted(range(len(sizes)), key=lambda g: (-sizes[g], g))


def rows(clusters: int = CLUSTERS) -> list[dict]:
    """Per seed, the loads drawn as bench_grouped_mm.py --seed draws them (one generator,
    shapes and loads in its order): seed 0 gives the loads of its default run. Makespans and
    the ideal in k-steps."""
    out = []
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        for (name, E, H, F, T, top_k), load in itertools.product(SHAPES, LOADS):
            units = -(-H // (TILE_M * CLUSTER_M)) * -(-F // TILE_N)
            sizes = group_sizes(E, T, top_k, load, gen)
            for epi in EPILOGUE_K_STEPS:
                out.append({
                    "shape": name, "load": load, "seed": seed, "epilogue_k_steps": epi,
                    "ideal": sum(units * (-(-s // K_STEP) + epi) for s in sizes if s) / clusters,
                    "index_order": makespan(sizes, units, list(range(E)), epi, clusters),
                    "largest_first": makespan(sizes, units, largest_first(sizes), epi, clusters),
                })
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clusters", type=int, default=CLUSTERS,
                   help="clusters resident at once (the persistent grid)")
    args = p.parse_args()
    if args.clusters < 1:
        p.error("--clusters must be at least 1")
    table = rows(args.clusters)
    base = {(r["shape"], r["seed"], r["epilogue_k_steps"]): r["index_order"]
            for r in table if r["load"] == "balanced"}
    names = [shape[0] for shape in SHAPES]
    print("busiest cluster's load over the balanced load's in index order (the measured drop in"
          " TFLOP/s from balanced to Zipf compares with the index order column)")
    print("| shape | load | seed | epilogue (k-steps) | index order | largest first | ideal | gain |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in sorted(table, key=lambda r: (names.index(r["shape"]), r["load"], r["seed"])):
        b = base[(r["shape"], r["seed"], r["epilogue_k_steps"])]
        print(f"| {r['shape']} | {r['load']} | {r['seed']} | {r['epilogue_k_steps']} | "
              f"{r['index_order'] / b:.3f} | {r['largest_first'] / b:.3f} | {r['ideal'] / b:.3f} | "
              f"{r['index_order'] / r['largest_first']:.3f}x |")


if __name__ == "__main__":
    main()
