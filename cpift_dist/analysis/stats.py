"""Where each task's core region sits: counts per tensor, module type and layer; the summary."""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from cpift_dist.analysis.plan import layer_of, module_type
from cpift_dist.config import AnalysisConfig
from cpift_dist.io.checkpoint import TensorInfo


def task_stats(task: str, cfg: AnalysisConfig, sels: dict, params: list[TensorInfo],
               selected: np.ndarray, skipped: list[str]) -> dict:
    """The ``stats.json`` entry of one task.

    Args:
        selected: selected elements per tensor of ``params`` (same order).
    """
    mine = {g: s for (t, g), s in sels.items() if t == task}
    per_tensor, per_module, per_layer = {}, defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    for info, n_sel in zip(params, selected.tolist()):
        per_tensor[info.name] = {"numel": info.numel, "selected": n_sel}
        for table, key in ((per_module, module_type(info.name)), (per_layer, _layer_key(info.name))):
            table[key][0] += info.numel
            table[key][1] += n_sel

    def share(table):
        return {k: {"numel": n, "selected": s, "share_of_core": s / max(1, int(selected.sum())),
                    "density": s / n if n else 0.0} for k, (n, s) in sorted(table.items())}

    out = {
        "task": task,
        "p": cfg.p,
        "selection": cfg.selection,
        "D": int(sum(s.numel for s in mine.values())),
        "k": int(sum(s.k for s in mine.values())),
        "selected": int(selected.sum()),
        "threshold": mine["all"].threshold if "all" in mine else None,
        "groups": {g: {"numel": s.numel, "k": s.k, "threshold": s.threshold,
                       "greater": s.greater, "ties": s.ties, "method": s.method} for g, s in sorted(mine.items())},
        "per_module": share(per_module),
        "per_layer": share(per_layer),
        "per_tensor": per_tensor,
        "skipped_tensors": skipped,
    }
    return out


def _layer_key(name: str) -> str:
    layer = layer_of(name)
    return f"{layer:04d}" if layer is not None else "non-layer"


def summary_table(stats: dict, overlap: dict):
    """A rich renderable: per-task core size and threshold, top module types, Jaccard matrix."""
    from rich.console import Group
    from rich.table import Table

    tasks = overlap["tasks"]
    t1 = Table(title="core regions", title_justify="left")
    for col in ("task", "D", "k", "threshold", "largest shares of the core (module type)"):
        t1.add_column(col, justify="left" if col in ("task",) or col.startswith("largest") else "right")
    for t in tasks:
        s = stats[t]
        top = sorted(s["per_module"].items(), key=lambda kv: -kv[1]["selected"])[:3]
        thr = f"{s['threshold']:.3e}" if s["threshold"] is not None else "per group"
        t1.add_row(t, f"{s['D']:,}", f"{s['k']:,}", thr,
                   ", ".join(f"{m} {v['share_of_core']:.0%}" for m, v in top))
    t2 = Table(title="Jaccard overlap of core regions", title_justify="left")
    t2.add_column("")
    for t in tasks:
        t2.add_column(t, justify="right")
    for i, t in enumerate(tasks):
        t2.add_row(t, *(f"{v:.3f}" for v in overlap["jaccard"][i]))
    return Group(t1, t2)
