"""The work of one unit, for each pass of the analysis: read chunks, return small results.

These functions run wherever the executor puts them (this process or a Ray worker). Each reads
the unit's chunks of the base and of every tuned checkpoint once (the sample pass: every s-th
segment of rows), and returns histograms, packed mask bytes or window candidates: never more
than the unit's size. The per-element work of a pass is one fused, compiled loop over all
tasks (:mod:`cpift_dist.analysis.fused`), which releases the GIL: units on threads run in
parallel.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from cpift_dist.analysis import fused
from cpift_dist.analysis.plan import Unit
from cpift_dist.analysis.radix_select import HIGH_BINS, LOW_BINS, NONFINITE_BIN
from cpift_dist.errors import CheckpointError
from cpift_dist.io.checkpoint import Checkpoint

Key = tuple[str, str]  # (task, selection group)
Sparse = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ScanContext:
    """What every unit needs to find its inputs."""

    base: str
    tuned: dict[str, str]  # task -> checkpoint directory
    check_finite: bool = True


@functools.lru_cache(maxsize=32)
def _checkpoint(path: str) -> Checkpoint:
    return Checkpoint(path)  # headers only; cached per worker process


SAMPLE_SEGMENT = 256
"""Elements per sampled segment of a chunk (whole rows: one row of a matrix, 256 elements of
a vector): the sample pass reads every ``sample_every``-th segment, spread over the chunk's
rows (fine-tune updates concentrate in some rows, which a sample of the first rows misses)."""


def sample_ranges(rows: int, row_numel: int, every: int) -> list[tuple[int, int]]:
    """Row ranges (relative to the chunk) of the segments a sample pass reads."""
    seg = max(1, -(-SAMPLE_SEGMENT // max(1, row_numel)))
    return [(r, min(rows, r + seg)) for r in range(0, rows, seg * every)]


def _as_kernel_input(x: torch.Tensor) -> np.ndarray:
    """A chunk as the fused loops take it: bf16 as its uint16 bits, float32 as is, any other
    float dtype widened to float32 (exactly, as torch does)."""
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x.numpy()


def _chunks(ctx: ScanContext, unit: Unit, sample_every: int = 1):
    """Yields (chunk index, chunk, base, tuned [N, n] in task order, bf16) for the unit's
    chunks, each read once into buffers reused from chunk to chunk (consume before the next);
    the tasks' rows are read straight into one 2-d array.

    With ``sample_every`` > 1 only the segments of :func:`sample_ranges` are read.
    """
    base = _checkpoint(ctx.base)
    tuned = [_checkpoint(p) for p in ctx.tuned.values()]
    buf = torch.empty(0, dtype=torch.uint8)
    with ExitStack() as stack:
        rb = stack.enter_context(base.reader())
        readers = [stack.enter_context(c.reader()) for c in tuned]
        for ci, c in enumerate(unit.chunks):
            info = base.info(c.name)
            if sample_every > 1:
                ranges = [(c.row_start + a, c.row_start + b) for a, b in
                          sample_ranges(c.row_stop - c.row_start, info.row_numel, sample_every)]
            else:
                ranges = [(c.row_start, c.row_stop)]
            n = sum(b - a for a, b in ranges) * info.row_numel
            nbytes = len(readers) * n * info.dtype.itemsize
            if buf.numel() < nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8)
            ts = buf[:nbytes].view(info.dtype).view(len(readers), n)
            for k, r in enumerate(readers):
                r.read_row_ranges(c.name, ranges, ts[k])
            b = rb.read_row_ranges(c.name, ranges)
            yield ci, c, _as_kernel_input(b), _as_kernel_input(ts), b.dtype == torch.bfloat16


def _non_finite(ctx: ScanContext, task: str, name: str) -> CheckpointError:
    base, tuned = _checkpoint(ctx.base), _checkpoint(ctx.tuned[task])
    bad = base if not bool(torch.isfinite(base.read(name)).all()) else tuned
    return CheckpointError(f"{bad.info(name).file}: tensor {name!r} has non-finite values "
                           f"(NaN or Inf)")


def _to_sparse(hist: np.ndarray) -> Sparse:
    idx = np.flatnonzero(hist)
    return idx.astype(np.int32), hist[idx].astype(np.int64)


def _histograms(ctx: ScanContext, unit: Unit, keys, sample_every: int) -> dict[Key, Sparse]:
    tasks = list(ctx.tuned)
    acc: dict[str, np.ndarray] = {}  # selection group -> (tasks, HIGH_BINS) counts
    for _, c, b, ts, bf16 in _chunks(ctx, unit, sample_every):
        active = np.array([keys is None or (t, c.group) in keys for t in tasks])
        if not active.any() or b.size == 0:
            continue
        hist = acc.get(c.group)
        if hist is None:
            hist = acc[c.group] = np.zeros((len(tasks), HIGH_BINS), np.int64)
        before = hist[:, NONFINITE_BIN:].sum(axis=1) if ctx.check_finite else None
        fused.high_histograms(b, ts, bf16, active, hist)
        if ctx.check_finite:
            grew = np.flatnonzero(hist[:, NONFINITE_BIN:].sum(axis=1) > before)
            if len(grew):
                raise _non_finite(ctx, tasks[grew[0]], c.name)
    return {(t, g): _to_sparse(h[k]) for g, h in acc.items() for k, t in enumerate(tasks)
            if keys is None or (t, g) in keys}


def scan_sample(ctx: ScanContext, unit: Unit, sample_every: int) -> dict[Key, Sparse]:
    """Sample pass: high-bits histograms of every ``sample_every``-th segment of every chunk."""
    return _histograms(ctx, unit, None, sample_every)


def scan_high(ctx: ScanContext, unit: Unit, keys: frozenset | None = None) -> dict[Key, Sparse]:
    """Radix pass 1: high-bits histograms per (task, selection group) of ``keys`` (or all).

    Raises:
        CheckpointError: a magnitude is NaN or Inf (naming the tensor and file).
    """
    return _histograms(ctx, unit, keys, 1)


@dataclass
class WindowResult:
    """What one unit returns from a window pass.

    Attributes:
        packed: (task, chunk index) -> packed mask of the elements at or above the window.
        above: (task, group) -> how many elements lie at or above the window.
        items: (task, group) -> list of (chunk index, flat offsets in chunk, int32 bits) of the
            elements inside the window.
        low_hist: (task, group) -> sparse low-bits histogram of the elements of one high bin,
            for selections resolved by a third pass.
    """

    packed: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    above: dict[Key, int] = field(default_factory=dict)
    items: dict[Key, list] = field(default_factory=dict)
    low_hist: dict[Key, Sparse] = field(default_factory=dict)


def scan_window(ctx: ScanContext, unit: Unit, plan: dict[Key, tuple]) -> WindowResult:
    """One full pass for a set of selections.

    ``plan[(task, group)]`` is ``("window", lo, hi)``: write the packed mask of bits >= hi and
    collect elements with lo <= bits < hi; or ``("histogram", high)``: histogram the low bits
    of the elements of high bin ``high``. Selections not in ``plan`` are skipped.
    """
    tasks = list(ctx.tuned)
    n_t = len(tasks)
    res = WindowResult()
    low_acc: dict[str, np.ndarray] = {}
    for ci, c, b, ts, bf16 in _chunks(ctx, unit):
        modes = [plan.get((t, c.group), (None,)) for t in tasks]
        win = np.array([m[0] == "window" for m in modes])
        hist = np.array([m[0] == "histogram" for m in modes])
        if win.any():
            lo = np.array([m[1] if m[0] == "window" else 0 for m in modes], np.int64)
            hi = np.array([m[2] if m[0] == "window" else 0 for m in modes], np.int64)
            packed = np.zeros((n_t, (c.numel + 7) // 8), np.uint8)
            above = np.zeros(n_t, np.int64)
            bad = np.zeros(n_t, np.bool_)
            c_task, c_idx, c_bits = fused.window(b, ts, bf16, win, lo, hi, packed, above, bad)
            if ctx.check_finite and bad.any():
                raise _non_finite(ctx, tasks[int(np.flatnonzero(bad)[0])], c.name)
            bounds = np.searchsorted(c_task, np.arange(n_t + 1))
            for k in np.flatnonzero(win):
                key = (tasks[k], c.group)
                res.packed[(tasks[k], ci)] = packed[k]
                res.above[key] = res.above.get(key, 0) + int(above[k])
                lo_k, hi_k = bounds[k], bounds[k + 1]
                if hi_k > lo_k:
                    res.items.setdefault(key, []).append((ci, c_idx[lo_k:hi_k],
                                                          c_bits[lo_k:hi_k]))
        if hist.any():
            high = np.array([m[1] if m[0] == "histogram" else 0 for m in modes], np.int64)
            acc = low_acc.get(c.group)
            if acc is None:
                acc = low_acc[c.group] = np.zeros((n_t, LOW_BINS), np.int64)
            fused.low_histograms(b, ts, bf16, hist, high, acc)
    res.low_hist = {(t, g): _to_sparse(h[k]) for g, h in low_acc.items()
                    for k, t in enumerate(tasks)
                    if plan.get((t, g), (None,))[0] == "histogram"}
    return res


def scan_mask(ctx: ScanContext, unit: Unit,
              plan: dict[Key, tuple[int, int]]) -> dict[tuple[str, int], np.ndarray]:
    """Radix pass 3 for selections resolved by histogram.

    ``plan[(task, group)] = (threshold bits, ties this unit takes)``: an element is selected
    when above the threshold, or equal to it and among the first ``ties`` equal ones of the
    unit (canonical order).
    """
    tasks = list(ctx.tuned)
    out: dict[tuple[str, int], np.ndarray] = {}
    taken: dict[Key, int] = {}
    for ci, c, b, ts, bf16 in _chunks(ctx, unit):
        keys = [(t, c.group) for t in tasks]
        active = np.array([k in plan for k in keys])
        if not active.any():
            continue
        thr = np.array([plan[k][0] if k in plan else 0 for k in keys], np.int64)
        quota = np.array([plan[k][1] if k in plan else 0 for k in keys], np.int64)
        took = np.array([taken.get(k, 0) for k in keys], np.int64)
        packed = np.zeros((len(tasks), (c.numel + 7) // 8), np.uint8)
        fused.threshold_masks(b, ts, bf16, active, thr, quota, took, packed)
        for k in np.flatnonzero(active):
            taken[keys[k]] = int(took[k])
            out[(tasks[k], ci)] = packed[k]
    return out
