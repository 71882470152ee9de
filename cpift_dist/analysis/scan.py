"""The work of one unit, for each pass of the analysis: read chunks, return small results.

These functions run wherever the executor puts them (this process or a Ray worker). Each reads
the unit's chunks of the base and of every tuned checkpoint once (the sample pass: 1/s of
their rows), and returns histograms, packed mask bytes or window candidates: never more than
the unit's size. Compares run in numpy (several times faster than torch's on CPU here);
histograms in torch.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from cpift_dist.analysis.masks import pack_mask
from cpift_dist.analysis.plan import Unit
from cpift_dist.analysis.radix_select import (finite, high_histogram, low_histogram,
                                              magnitude_bits, to_sparse, update_magnitude)
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


def _magnitudes(ctx: ScanContext, unit: Unit, sample_every: int = 1):
    """Yields (chunk index, chunk, {task: float32 update magnitudes}) for the unit's chunks.

    With ``sample_every`` > 1 only the first ceil(rows / sample_every) rows of each chunk are
    read. The magnitude buffers are reused from chunk to chunk: consume them before the next.
    """
    base = _checkpoint(ctx.base)
    tuned = {t: _checkpoint(p) for t, p in ctx.tuned.items()}
    size = max(c.numel for c in unit.chunks)
    bufs = {t: torch.empty(size, dtype=torch.float32) for t in tuned}
    with ExitStack() as stack:
        rb = stack.enter_context(base.reader())
        readers = {t: stack.enter_context(c.reader()) for t, c in tuned.items()}
        for ci, c in enumerate(unit.chunks):
            r0, r1 = c.row_start, c.row_stop
            if sample_every > 1:
                r1 = r0 + -(-(r1 - r0) // sample_every)
            n = c.numel * (r1 - r0) // (c.row_stop - c.row_start)
            b = rb.read_rows(c.name, r0, r1)
            yield ci, c, {t: update_magnitude(b, r.read_rows(c.name, r0, r1), out=bufs[t][:n])
                          for t, r in readers.items()}


def _non_finite(ctx: ScanContext, task: str, name: str) -> CheckpointError:
    base, tuned = _checkpoint(ctx.base), _checkpoint(ctx.tuned[task])
    bad = base if not bool(torch.isfinite(base.read(name)).all()) else tuned
    return CheckpointError(f"{bad.info(name).file}: tensor {name!r} has non-finite values "
                           f"(NaN or Inf)")


def _histograms(ctx: ScanContext, unit: Unit, keys, sample_every: int) -> dict[Key, Sparse]:
    acc: dict[Key, torch.Tensor] = {}
    for _, c, mags in _magnitudes(ctx, unit, sample_every):
        for t, u in mags.items():
            key = (t, c.group)
            if keys is not None and key not in keys:
                continue
            h = high_histogram(u)
            if ctx.check_finite and not finite(h):
                raise _non_finite(ctx, t, c.name)
            if key in acc:
                acc[key] += h
            else:
                acc[key] = h
    return {k: to_sparse(h) for k, h in acc.items()}


def scan_sample(ctx: ScanContext, unit: Unit, sample_every: int) -> dict[Key, Sparse]:
    """Sample pass: high-bits histograms of 1/``sample_every`` of the rows of every chunk."""
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
    res = WindowResult()
    low_acc: dict[Key, torch.Tensor] = {}
    for ci, c, mags in _magnitudes(ctx, unit):
        for t, u in mags.items():
            key = (t, c.group)
            if key not in plan:
                continue
            mode, *arg = plan[key]
            if mode == "histogram":
                h = low_histogram(u, arg[0])
                if key in low_acc:
                    low_acc[key] += h
                else:
                    low_acc[key] = h
                continue
            lo, hi = arg
            x = magnitude_bits(u).numpy()
            if ctx.check_finite and x.max() >= 0x7F800000:
                raise _non_finite(ctx, t, c.name)
            above = x >= hi
            packed = pack_mask(above)
            res.packed[(t, ci)] = packed
            res.above[key] = res.above.get(key, 0) + int(np.bitwise_count(packed).sum())
            idx = np.flatnonzero((x >= lo) ^ above)
            if len(idx):
                res.items.setdefault(key, []).append((ci, idx, x[idx]))
    res.low_hist = {k: to_sparse(h) for k, h in low_acc.items()}
    return res


def scan_mask(ctx: ScanContext, unit: Unit,
              plan: dict[Key, tuple[int, int]]) -> dict[tuple[str, int], np.ndarray]:
    """Radix pass 3 for selections resolved by histogram.

    ``plan[(task, group)] = (threshold bits, ties this unit takes)``: an element is selected
    when above the threshold, or equal to it and among the first ``ties`` equal ones of the
    unit (canonical order).
    """
    out: dict[tuple[str, int], np.ndarray] = {}
    taken: dict[Key, int] = {}
    for ci, c, mags in _magnitudes(ctx, unit):
        for t, u in mags.items():
            key = (t, c.group)
            if key not in plan:
                continue
            thr, quota = plan[key]
            x = magnitude_bits(u).numpy()
            sel = x > thr
            left = quota - taken.get(key, 0)
            if left > 0:
                eq = np.flatnonzero(x == thr)[:left]
                sel[eq] = True
                taken[key] = taken.get(key, 0) + len(eq)
            out[(t, ci)] = pack_mask(sel)
    return out
