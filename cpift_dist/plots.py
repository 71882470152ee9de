"""Figures (matplotlib, Agg backend): the Jaccard heatmap and where core regions sit."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def jaccard_heatmap(tasks: list[str], jaccard: list[list[float]], groups: list[list[str]],
                    tau: float, path: str | Path) -> tuple[float, float]:
    """Jaccard matrix with tasks ordered by stage; each group (stage) outlined and labelled.

    Returns:
        The colour scale's (min, max): the range of the off-diagonal values.
    """
    order = [t for g in groups for t in g]
    idx = [tasks.index(t) for t in order]
    mat = [[jaccard[i][j] for j in idx] for i in idx]
    n = len(order)
    lo, hi = offdiagonal_range(mat)
    fig, ax = plt.subplots(figsize=(1.6 + 0.7 * n, 1.0 + 0.6 * n))
    # The colour scale spans the off-diagonal values alone: overlaps of core regions are
    # often a few percent, and a 0..1 scale (set by the diagonal's 1s) paints them all alike.
    # The diagonal (a task with itself) is drawn grey, outside the scale.
    masked = np.ma.masked_array(np.asarray(mat, dtype=float), mask=np.eye(n, dtype=bool))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#d0d0d0")
    im = ax.imshow(masked, cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(n), order, rotation=45, ha="right")
    ax.set_yticks(range(n), order)
    for i in range(n):
        for j in range(n):
            rel = 1.0 if i == j else (mat[i][j] - lo) / (hi - lo)
            ax.text(j, i, f"{mat[i][j]:.3f}", ha="center", va="center", fontsize=8,
                    color="black" if i == j or rel > 0.6 else "white")
    pos = 0
    for k, g in enumerate(groups):
        ax.add_patch(Rectangle((pos - 0.5, pos - 0.5), len(g), len(g), fill=False,
                               edgecolor="red", linewidth=2))
        ax.text(pos - 0.45, pos - 0.3, f"stage {k + 1}", color="red", fontsize=8)
        pos += len(g)
    ax.set_title(f"Jaccard of core regions (tau = {tau}); stages outlined")
    bar = fig.colorbar(im, ax=ax, fraction=0.046)
    bar.set_label(f"Jaccard, scaled to the off-diagonal range {lo:.3f}-{hi:.3f}\n"
                  "(diagonal = 1, grey)", fontsize=8)
    _save(fig, Path(path))
    return lo, hi


def offdiagonal_range(mat) -> tuple[float, float]:
    """(min, max) of a square matrix's off-diagonal values; a non-empty range even when they
    are all equal or there is only one task."""
    vals = [mat[i][j] for i in range(len(mat)) for j in range(len(mat)) if i != j]
    lo, hi = (min(vals), max(vals)) if vals else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = max(0.0, lo - 0.5e-3), hi + 0.5e-3
    return lo, hi


def core_location(stats: dict, tasks: list[str], path: str | Path) -> None:
    """Per task: share of its core elements in each layer, and in each module type."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    for t in tasks:
        layers = stats[t]["per_layer"]
        keys = [k for k in sorted(layers) if k != "non-layer"]
        a1.plot([int(k) for k in keys], [layers[k]["share_of_core"] for k in keys], marker="o",
                label=t)
    a1.xaxis.get_major_locator().set_params(integer=True)
    a1.set_xlabel("layer")
    a1.set_ylabel("share of the core region")
    a1.set_title("core region by layer")
    a1.legend(fontsize=8)
    modules = sorted({m for t in tasks for m in stats[t]["per_module"]})
    width = 0.8 / max(1, len(tasks))
    for i, t in enumerate(tasks):
        per = stats[t]["per_module"]
        a2.bar([m + i * width for m in range(len(modules))],
               [per.get(m, {}).get("share_of_core", 0.0) for m in modules], width, label=t)
    a2.set_xticks([m + 0.4 - width / 2 for m in range(len(modules))], modules, rotation=45,
                  ha="right")
    a2.set_title("core region by module type")
    a2.legend(fontsize=8)
    _save(fig, Path(path))
