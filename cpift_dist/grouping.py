"""Grouping tasks into SFT stages: connected components of the Jaccard >= tau graph.

``groups.json`` records the groups in stage order, tau, the order policy, the seed and the
Jaccard matrix used, beside two PNGs: the Jaccard heatmap with the groups marked, and where each
task's core region sits (share of core elements per layer and per module type).
"""

from __future__ import annotations

import json
import os
import random
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import safe_open

from cpift_dist.config import GroupingConfig
from cpift_dist.errors import CpiftError
from cpift_dist.io.manifest import sha256_json


def connected_groups(tasks: list[str], jaccard: list[list[float]], tau: float) -> list[list[str]]:
    """Connected components of the graph linking tasks with Jaccard >= tau.

    A union-find of a few lines (tasks are few); each group keeps task order, groups are
    ordered by their first task.
    """
    parent = list(range(len(tasks)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(tasks)):
        for j in range(i + 1, len(tasks)):
            if jaccard[i][j] >= tau:
                parent[root(j)] = root(i)
    groups: dict[int, list[str]] = {}
    for i, t in enumerate(tasks):
        groups.setdefault(root(i), []).append(t)
    return list(groups.values())


def core_union_size(mask_paths: list[Path], block: int = 1 << 24) -> int:
    """|C_1 | ... | C_m|: popcount of the OR of packed masks, tensor by tensor, block by block."""
    total = 0
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="np")) for p in mask_paths]
        for name in files[0].keys():
            slices = [f.get_slice(name) for f in files]
            n = slices[0].get_shape()[0]
            for s in range(0, n, block):
                acc = np.zeros(min(block, n - s), np.uint8)
                for sl in slices:
                    acc |= sl[s:min(n, s + block)]
                total += int(np.bitwise_count(acc).sum())
    return total


def order_groups(groups: list[list[str]], policy: str, seed: int,
                 union_size: dict[tuple[str, ...], int]) -> list[list[str]]:
    """Stage order: ``random`` (seeded shuffle, the paper's), ``core-size`` (larger core union
    first; ties keep task order) or ``task-order``."""
    out = list(groups)
    if policy == "random":
        random.Random(seed).shuffle(out)
    elif policy == "core-size":
        out.sort(key=lambda g: -union_size[tuple(g)])
    return out


def group(analysis: str | Path, cfg: GroupingConfig | None = None,
          out: str | Path | None = None, plots: bool = True) -> dict:
    """Groups the tasks of an analysis directory; writes ``groups.json`` and its plots.

    Raises:
        CpiftError: the analysis directory is incomplete or malformed.
    """
    cfg = cfg or GroupingConfig()
    analysis = Path(analysis)
    out = Path(out) if out else analysis.parent / "groups.json"
    try:
        overlap = json.loads((analysis / "overlap.json").read_text())
        stats = json.loads((analysis / "stats.json").read_text())
        tasks, jac = overlap["tasks"], overlap["jaccard"]
    except (OSError, ValueError, KeyError) as e:
        raise CpiftError(f"{analysis}: not a complete analysis directory ({e})") from None
    groups = connected_groups(tasks, jac, cfg.tau)
    sizes = {tuple(g): core_union_size([analysis / "masks" / f"{t}.safetensors" for t in g])
             for g in groups}
    stages = order_groups(groups, cfg.order, cfg.seed, sizes)
    result = {
        "tau": cfg.tau,
        "order": cfg.order,
        "seed": cfg.seed,
        "tasks": tasks,
        "jaccard": jac,
        "groups": stages,
        "stages": [{"stage": k + 1, "tasks": g, "core_union": sizes[tuple(g)]}
                   for k, g in enumerate(stages)],
        "analysis": str(analysis),
        "analysis_digest": sha256_json(overlap),
    }
    files = {out: json.dumps(result, indent=2) + "\n"}
    _write_atomic(files)
    if plots:
        from cpift_dist.plots import core_location, jaccard_heatmap

        jaccard_heatmap(tasks, jac, stages, cfg.tau, out.with_suffix(".jaccard.png"))
        core_location(stats, tasks, out.with_suffix(".core-location.png"))
    return result


def _write_atomic(files: dict[Path, str]) -> None:
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
