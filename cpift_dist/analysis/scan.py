"""The work of one unit, for each pass of the analysis: read chunks, return small results.

These functions run wherever the executor puts them (this process or a Ray worker). Each reads
the unit's chunks of the base and of every tuned checkpoint once, and returns histograms,
packed mask bytes or in-bin candidates: never more than the unit's size.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch

from cpift_dist.analysis.masks import pack_mask
from cpift_dist.analysis.plan import Unit
from cpift_dist.analysis.radix_select import (finite, high_histogram, low_histogram,
                                              magnitude_bits, to_sparse, update_magnitude)
from cpift_dist.errors import CheckpointError
from cpift_dist.io.checkpoint import Checkpoint

Key = tuple[str, str]  # (task, selection group)


@dataclass(frozen=True)
class ScanContext:
    """What every unit needs to find its inputs."""

    base: str
    tuned: dict[str, str]  # task -> checkpoint directory
    check_finite: bool = True


@functools.lru_cache(maxsize=32)
def _checkpoint(path: str) -> Checkpoint:
    return Checkpoint(path)  # headers only; cached per worker process


def _magnitudes(ctx: ScanContext, unit: Unit):
    """Yields (chunk index, chunk, {task: float32 update magnitudes}) for the unit's chunks.

    The magnitude buffers are reused from chunk to chunk: consume them before the next one.
    """
    base = _checkpoint(ctx.base)
    tuned = {t: _checkpoint(p) for t, p in ctx.tuned.items()}
    size = max(c.numel for c in unit.chunks)
    bufs = {t: torch.empty(size, dtype=torch.float32) for t in tuned}
    with ExitStack() as stack:
        rb = stack.enter_context(base.reader())
        readers = {t: stack.enter_context(c.reader()) for t, c in tuned.items()}
        for ci, c in enumerate(unit.chunks):
            b = rb.read_rows(c.name, c.row_start, c.row_stop)
            yield ci, c, {t: update_magnitude(b, r.read_rows(c.name, c.row_start, c.row_stop),
                                              out=bufs[t][:c.numel])
                          for t, r in readers.items()}


def _non_finite(ctx: ScanContext, task: str, name: str) -> CheckpointError:
    base, tuned = _checkpoint(ctx.base), _checkpoint(ctx.tuned[task])
    bad = base if not bool(torch.isfinite(base.read(name)).all()) else tuned
    return CheckpointError(f"{bad.info(name).file}: tensor {name!r} has non-finite values "
                           f"(NaN or Inf)")


def scan_high(ctx: ScanContext, unit: Unit) -> dict[Key, tuple[np.ndarray, np.ndarray]]:
    """Pass 1: sparse histograms of the high 16 bits per (task, selection group).

    Raises:
        CheckpointError: a magnitude is NaN or Inf (naming the tensor and file).
    """
    acc: dict[Key, torch.Tensor] = {}
    for _, c, mags in _magnitudes(ctx, unit):
        for t, u in mags.items():
            h = high_histogram(u)
            if ctx.check_finite and not finite(h):
                raise _non_finite(ctx, t, c.name)
            key = (t, c.group)
            if key in acc:
                acc[key] += h
            else:
                acc[key] = h
    return {k: to_sparse(h) for k, h in acc.items()}


@dataclass
class BinResult:
    """Pass 2 output of one unit.

    Attributes:
        packed: (task, chunk index) -> packed mask of the elements above the threshold's bin,
            for collected selections (absent when no bit is set).
        items: (task, group) -> list of (chunk index, flat offsets in chunk, low 16 bits) of
            in-bin elements, for collected selections.
        low_hist: (task, group) -> sparse low-bits histogram of in-bin elements, for
            selections resolved by a third pass.
    """

    packed: dict[tuple[str, int], np.ndarray]
    items: dict[Key, list[tuple[int, np.ndarray, np.ndarray]]]
    low_hist: dict[Key, tuple[np.ndarray, np.ndarray]]


def scan_bin(ctx: ScanContext, unit: Unit, plan: dict[Key, tuple[str, int]]) -> BinResult:
    """Pass 2. ``plan[(task, group)] = (mode, high)``; mode ``collect`` or ``histogram``."""
    res = BinResult({}, {}, {})
    low_acc: dict[Key, torch.Tensor] = {}
    for ci, c, mags in _magnitudes(ctx, unit):
        for t, u in mags.items():
            key = (t, c.group)
            if key not in plan:
                continue  # k == 0: nothing selected
            mode, high = plan[key]
            if mode == "histogram":
                h = low_histogram(u, high)
                if key in low_acc:
                    low_acc[key] += h
                else:
                    low_acc[key] = h
                continue
            x = magnitude_bits(u).numpy()  # numpy: much faster compares than torch on CPU
            above = x >= (high + 1) << 16
            res.packed[(t, ci)] = pack_mask(above)
            idx = np.flatnonzero((x >= high << 16) ^ above)
            if len(idx):
                low = (x[idx] & 0xFFFF).astype(np.uint16)
                res.items.setdefault(key, []).append((ci, idx, low))
    res.low_hist = {k: to_sparse(h) for k, h in low_acc.items()}
    return res


def scan_mask(ctx: ScanContext, unit: Unit,
              plan: dict[Key, tuple[int, int]]) -> dict[tuple[str, int], np.ndarray]:
    """Pass 3 for selections resolved by histogram.

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
