"""Delta analysis: exact top-p% core masks per task, streamed shard by shard.

Recipe: plan units -> pass 1 (high-bits histograms) -> find each selection's bin -> pass 2
(packed masks above the bin + in-bin candidates, or low-bits histograms for huge bins) ->
resolve the exact threshold and ties -> pass 3 only where needed -> stats and overlap from the
written masks -> manifest. Output appears whole (atomic rename) or not at all.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cpift_dist.analysis.masks import MaskWriter
from cpift_dist.analysis.overlap import mask_counts
from cpift_dist.analysis.plan import Unit, plan_units
from cpift_dist.analysis.radix_select import (HIGH_BINS, LOW_BINS, Selection, add_sparse,
                                              resolve_high, resolve_low, select_in_bin)
from cpift_dist.analysis.scan import ScanContext, scan_bin, scan_high, scan_mask
from cpift_dist.analysis.stats import task_stats
from cpift_dist.config import TASK_NAME, AnalysisConfig
from cpift_dist.errors import CpiftError
from cpift_dist.executor import InProcessExecutor
from cpift_dist.io import (Checkpoint, atomic_dir, checkpoint_digest, compare_checkpoints,
                           write_manifest)


@dataclass
class AnalysisResult:
    """What :func:`analyze` wrote and found."""

    out: Path
    stats: dict
    overlap: dict


def analyze(base: str | Path, tuned: dict[str, str | Path], out: str | Path,
            cfg: AnalysisConfig | None = None, executor=None, overwrite: bool = False,
            progress: bool = True) -> AnalysisResult:
    """Computes every task's core mask, stats and pairwise overlap; writes them to ``out``.

    Args:
        base: base checkpoint directory (theta0).
        tuned: task name -> fine-tuned checkpoint directory, in task order.
        out: output directory (``masks/``, ``stats.json``, ``overlap.json``, manifest).
        cfg: analysis settings (p, selection policy, chunk sizes).
        executor: where units run (:class:`~cpift_dist.executor.InProcessExecutor` by default).
        overwrite: replace an existing ``out`` once the new one is complete.
        progress: show progress bars.

    Raises:
        CpiftError: bad task names, incompatible or corrupt checkpoints, non-finite weights.
    """
    cfg = cfg or AnalysisConfig()
    executor = executor or InProcessExecutor()
    out = Path(out)
    _check_task_names(tuned)
    base_ck = Checkpoint(base)
    tuned_ck = {t: Checkpoint(p) for t, p in tuned.items()}
    for ck in tuned_ck.values():
        compare_checkpoints(base_ck, ck)
    params = [base_ck.tensors[n] for n in base_ck.names()
              if base_ck.tensors[n].dtype.is_floating_point]
    skipped = [n for n in base_ck.names() if not base_ck.tensors[n].dtype.is_floating_point]
    units = plan_units(params, cfg.selection, cfg.chunk_elements, cfg.unit_elements)
    group_numel: dict[str, int] = defaultdict(int)
    for u in units:
        for c in u.chunks:
            group_numel[c.group] += c.numel
    sels = {(t, g): Selection(math.floor(cfg.p * n), n)
            for t in tuned for g, n in group_numel.items()}
    ctx = ScanContext(str(base), {t: str(p) for t, p in tuned.items()}, cfg.check_finite)
    bar = _bars(progress, len(units))

    with atomic_dir(out, overwrite=overwrite) as tmp:
        # Pass 1: high-bits histograms -> each selection's threshold bin.
        high = {key: np.zeros(HIGH_BINS, np.int64) for key in sels}
        for _, res in bar(executor.map(scan_high, ctx, [(u,) for u in units]), "pass 1/3 histogram"):
            for key, sparse in res.items():
                add_sparse(high[key], sparse)
        for key, sel in sels.items():
            resolve_high(sel, high[key])
        del high
        mode = {key: ("collect" if sel.in_bin <= cfg.collect_limit else "histogram", sel.high)
                for key, sel in sels.items() if sel.k > 0}

        # Pass 2: masks above the bin and in-bin candidates (or low-bits histograms).
        (tmp / "masks").mkdir()
        shapes = {p.name: p.shape for p in params}
        writers = {t: MaskWriter(tmp / "masks" / f"{t}.safetensors", shapes) for t in tuned}
        items: dict = defaultdict(dict)
        unit_low: dict = defaultdict(dict)
        for i, res in bar(executor.map(scan_bin, ctx, [(u, mode) for u in units]),
                          "pass 2/3 threshold bin"):
            _write_packed(writers, units[i], res.packed)
            for key, lst in res.items.items():
                items[key][i] = lst
            for key, sparse in res.low_hist.items():
                unit_low[key][i] = sparse
        for key, per_unit in items.items():
            _select_collected(sels[key], per_unit, units, writers[key[0]])
        del items

        # Pass 3 (only for selections whose bin was too large to collect).
        hist_keys = [k for k, (m, _) in mode.items() if m == "histogram"]
        if hist_keys:
            plans = _tie_quotas(sels, hist_keys, unit_low, len(units))
            todo = [i for i in range(len(units)) if plans[i]]
            for j, res in bar(executor.map(scan_mask, ctx, [(units[i], plans[i]) for i in todo]),
                              "pass 3/3 masks", total=len(todo)):
                _write_packed(writers, units[todo[j]], res)
        del unit_low

        digests = {"base": checkpoint_digest(base)}
        digests.update({f"tuned/{t}": checkpoint_digest(p) for t, p in tuned.items()})
        for t, w in writers.items():
            w.close(_mask_metadata(t, cfg, sels, digests))

        counts, inter = mask_counts([tmp / "masks" / f"{t}.safetensors" for t in tuned],
                                    list(shapes), progress=progress)
        stats = {t: task_stats(t, cfg, sels, params, counts[:, j], skipped)
                 for j, t in enumerate(tuned)}
        for t, s in stats.items():  # the masks on disk hold exactly k elements per selection
            if s["selected"] != s["k"]:
                raise CpiftError(f"internal error: mask of task {t!r} holds {s['selected']} "
                                 f"elements, expected k={s['k']}")
        overlap = _overlap(list(tuned), inter)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (tmp / "overlap.json").write_text(json.dumps(overlap, indent=2) + "\n")
        write_manifest(tmp, "analyze", cfg.model_dump(mode="json"), digests,
                       extra={"tasks": list(tuned), "executor": executor.name,
                              "units": len(units), "passes": 3 if hist_keys else 2})
    return AnalysisResult(out, stats, overlap)


def _check_task_names(tuned: dict) -> None:
    import re
    if not tuned:
        raise CpiftError("no tuned checkpoints given (--tuned NAME=DIR)")
    for t in tuned:
        if not re.match(TASK_NAME, t):
            raise CpiftError(f"task name {t!r}: use letters, digits, '_', '-', '.'")


def _bars(progress: bool, n_units: int):
    def wrap(it, desc, total=None):
        return tqdm(it, total=total or n_units, desc=f"analyze {desc}", unit="unit",
                    disable=not progress, leave=False)
    return wrap


def _write_packed(writers: dict[str, MaskWriter], unit: Unit, packed: dict) -> None:
    for (t, ci), data in packed.items():
        c = unit.chunks[ci]
        writers[t].write(c.name, c.flat_start // 8, data)


def _select_collected(sel: Selection, per_unit: dict[int, list], units: list[Unit],
                      writer: MaskWriter) -> None:
    """Resolves a collected selection: picks in-bin winners in canonical order, sets their bits."""
    segments = [(i, ci, idx, low) for i in sorted(per_unit) for ci, idx, low in per_unit[i]]
    low = np.concatenate([s[3] for s in segments]) if segments else np.zeros(0, np.uint16)
    chosen = select_in_bin(sel, low)
    pos = 0
    by_tensor: dict[str, list[np.ndarray]] = defaultdict(list)
    for i, ci, idx, seg_low in segments:
        take = chosen[pos:pos + len(seg_low)]
        pos += len(seg_low)
        if take.any():
            c = units[i].chunks[ci]
            by_tensor[c.name].append(idx[take] + c.flat_start)
    for name, parts in by_tensor.items():
        writer.set_bits(name, np.concatenate(parts))


def _tie_quotas(sels: dict, keys: list, unit_low: dict, n_units: int) -> list[dict]:
    """Exact thresholds of histogram-resolved selections and each unit's share of the ties."""
    plans: list[dict] = [{} for _ in range(n_units)]
    for key in keys:
        sel = sels[key]
        dense = np.zeros(LOW_BINS, np.int64)
        for sparse in unit_low[key].values():
            add_sparse(dense, sparse)
        resolve_low(sel, dense)
        t_low = sel.threshold_bits & 0xFFFF
        left = sel.ties
        for i in sorted(unit_low[key]):
            bins, cnt = unit_low[key][i]
            here = int(cnt[bins == t_low].sum())
            quota = min(here, left)
            left -= quota
            plans[i][key] = (sel.threshold_bits, quota)
    return plans


def _mask_metadata(task: str, cfg: AnalysisConfig, sels: dict, digests: dict) -> dict[str, str]:
    mine = {g: s for (t, g), s in sels.items() if t == task}
    return {
        "task": task,
        "p": repr(cfg.p),
        "selection": cfg.selection,
        "k": str(sum(s.k for s in mine.values())),
        "numel": str(sum(s.numel for s in mine.values())),
        "threshold": repr(mine["all"].threshold) if "all" in mine else "per-group",
        "thresholds": json.dumps({g: s.threshold for g, s in sorted(mine.items())}),
        "base_digest": digests["base"],
        "tuned_digest": digests[f"tuned/{task}"],
    }


def _overlap(tasks: list[str], inter: np.ndarray) -> dict:
    size = np.diag(inter)
    union = size[:, None] + size[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        jac = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    return {
        "tasks": tasks,
        "core_size": {t: int(size[i]) for i, t in enumerate(tasks)},
        "intersection": inter.astype(int).tolist(),
        "union": union.astype(int).tolist(),
        "jaccard": jac.round(8).tolist(),
    }
