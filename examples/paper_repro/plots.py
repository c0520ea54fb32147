"""Figures: per-patch importance / real-expert heatmaps, text-token heatmaps, the
accuracy-vs-Avg-K plot. Small PNGs (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data import QUESTION_NAMES, VOCAB, Batch  # noqa: E402


def patch_heatmaps(path, ev: Batch, arrays: dict, rows: list[int], grid: int, k_max: int,
                   title: str, dpi: int = 72):
    """Per image row: the canvas, then per layer the importance w and the real-expert count
    of each patch (image tokens only)."""
    imp, real = arrays["importance"], arrays["real"]
    L = real.shape[0]
    P = grid * grid
    # importance is min-max scaled per layer over the patches shown (its range is printed
    # in the column title): after training, image-token w can sit in a narrow band
    cols = 1 + 2 * L
    ranges = [(float(imp[l, rows, -P:].min()), float(imp[l, rows, -P:].max())) for l in range(L)]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.45 * cols + 1.4, 1.45 * len(rows) + 0.6),
                             squeeze=False, layout="constrained")
    for r, i in enumerate(rows):
        ax = axes[r, 0]
        ax.imshow(ev.canvas[i].numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_ylabel(f"digit {int(ev.digit[i])}", fontsize=8)
        for l in range(L):
            lo, hi = ranges[l]
            w = ((imp[l, i, -P:] - lo) / max(hi - lo, 1e-12)).reshape(grid, grid).numpy()
            k = real[l, i, -P:].reshape(grid, grid).numpy()
            a1, a2 = axes[r, 1 + 2 * l], axes[r, 2 + 2 * l]
            im1 = a1.imshow(w, cmap="magma", vmin=0, vmax=1)
            im2 = a2.imshow(k, cmap="viridis", vmin=0, vmax=k_max)
            if r == 0:
                a1.set_title(f"L{l + 1} w [{lo:.3f},{hi:.3f}]", fontsize=7)
                a2.set_title(f"L{l + 1} real experts", fontsize=8)
        if r == 0:
            axes[r, 0].set_title("canvas", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im1, ax=axes[:, -1].tolist(), shrink=0.45, label="importance (min-max per layer)",
                 location="right")
    fig.colorbar(im2, ax=axes[:, -1].tolist(), shrink=0.45, label="real experts", location="right")
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def text_heatmap(path, ev: Batch, arrays: dict, rows: list[int], k_max: int, title: str,
                 dpi: int = 72):
    """Real-expert count (mean over layers) and importance (mean over layers) per word for a
    few questions."""
    real = arrays["real"][:, :, 1:1 + ev.text.shape[1]].mean(0)      # [B, 6]
    imp = arrays["importance"]
    imp = imp[:, :, 1:1 + ev.text.shape[1]].mean(0) if imp is not None else None
    n = 2 if imp is not None else 1
    fig, axes = plt.subplots(n, 1, figsize=(6.0, 0.55 * len(rows) * n + 0.9), squeeze=False)
    mats = [(real[rows].numpy(), "real experts (mean over layers)", "viridis", 0, k_max)]
    if imp is not None:
        mats.append((imp[rows].numpy(), "importance w (mean over layers)", "magma", 0, 1))
    for ax, (m, lab, cmap, lo, hi) in zip(axes[:, 0], mats):
        ax.imshow(m, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        for r, i in enumerate(rows):
            for j, w in enumerate(ev.text[i].tolist()):
                v = m[r, j]
                ax.text(j, r, f"{VOCAB[w]}\n{v:.2f}" if hi == 1 else f"{VOCAB[w]}\n{v:.1f}",
                        ha="center", va="center", fontsize=6.5,
                        color="white" if (v - lo) / (hi - lo) < 0.6 else "black")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([QUESTION_NAMES[int(ev.qtype[i])] for i in rows], fontsize=7)
        ax.set_xticks([])
        ax.set_title(lab, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def accuracy_vs_budget(path, results: dict, dpi: int = 80):
    """Accuracy against Avg-K real on image tokens and on text tokens, per model."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.0), sharey=True)
    for ax, mod in zip(axes, ("image", "text")):
        for name, r in results.items():
            m = r["metrics"]
            static = r["spec"]["kind"] == "static"
            ax.scatter(m["avg_k_real_by_modality"][mod], m["accuracy"],
                       marker="s" if static else "o", color="tab:gray" if static else "tab:red",
                       s=30)
            ax.annotate(name, (m["avg_k_real_by_modality"][mod], m["accuracy"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(f"Avg-K real, {mod} tokens")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    fig.suptitle("static top-K (squares) vs AnyExperts (circles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
