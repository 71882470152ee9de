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
import threading
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


_OPEN_LOCK = threading.Lock()


def _checkpoint(path: str) -> Checkpoint:
    """The opened checkpoint (headers only), once per process: threads that start together
    wait for the first to open it instead of each parsing every header (a stampede that cost
    40% of the sample pass on 16 cores)."""
    with _OPEN_LOCK:
        return _opened(path)


@functools.lru_cache(maxsize=32)
def _opened(path: str) -> Checkpoint:
    return Checkpoint(path)


SAMPLE_SEGMENT = 256
"""Elements per sampled segment of a chunk (whole rows: one row of a matrix, 256 elements of
a vector): the sample pass reads every ``sample_every``-th segment, spread over the chunk's
rows (fine-tune updates concentrate in some rows, which a sample of the first rows misses)."""


def sample_ranges(rows: int, row_numel: int, every: int) -> list[tuple[int, int]]:
    """Row ranges (relative to the chunk) of the segments a sample pass reads."""
    seg = max(1, -(-SAMPLE_SEGMENT // max(1, row_numel)))
    return [(r, min(rows, r + seg)) for r in range(0, rows, seg * every)]


def _as_kernel_input(x: torch.Tensor) -> np.ndarray:
    """A tensor as the fused loops take it (see :func:`kernel_view`)."""
    return kernel_view(x.contiguous().reshape(-1).view(torch.uint8).numpy(), x.dtype)


def kernel_view(raw: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Raw bytes of a chunk as the fused loops take them, read-only: bf16 as its uint16 bits,
    float32 as is (both views, no copy), any other float dtype widened to float32 (exactly, as
    torch does). A chunk that is not aligned to its item size (safetensors does not pad between
    tensors) is copied, so that every loop compiles for aligned arrays only."""
    if dtype in (torch.bfloat16, torch.float32) and raw.ctypes.data % dtype.itemsize == 0:
        out = raw.view(np.uint16 if dtype == torch.bfloat16 else np.float32)
    elif dtype in (torch.bfloat16, torch.float32):
        out = raw.copy().view(np.uint16 if dtype == torch.bfloat16 else np.float32)
    else:
        out = torch.from_numpy(raw.copy()).view(dtype).to(torch.float32).numpy()
    out = out.view()
    out.flags.writeable = False
    return out


READ_AHEAD = 1 << 25
"""Elements of a unit's next chunks asked from the kernel ahead of a full pass's reading, per
checkpoint (64 MiB of bf16): the disk reads them while the current chunk is worked on."""
PROBES = 8
"""Chunks of a unit whose first page is looked up in the page cache: where all are there (a
warm cache), nothing is asked ahead for that checkpoint."""


def _chunks(ctx: ScanContext, unit: Unit, sample_every: int = 1):
    """Yields (chunk index, chunk, base, [tuned in task order], bf16) for the unit's chunks,
    each a read-only view over a memory map of the file (no copy). Consume a chunk before the
    next: its pages are then dropped from this process's page tables.

    Inputs not in the page cache (probed at a few chunks per unit and checkpoint) are asked
    from the kernel ahead of use: with ``sample_every > 1`` only the sampled rows
    (:func:`sample_ranges`), all of the unit's at once, read through maps whose faults fetch
    only their own page; in a full pass, the chunks up to :data:`READ_AHEAD` elements ahead.
    Before, the sample pass's faults read the device's whole read-ahead around every touched
    page, so that it read all of the inputs, and inputs larger than memory were read twice.
    Measured on this VM, 348M bf16 checkpoints evicted (4 runs each, old and new alternated):
    the sample pass read 0.19 GB instead of 2.79 GB, in 0.38-0.46 s instead of 1.64-2.73 s;
    the analysis took 3.03-3.35 s instead of 4.72-5.39 s, and with the inputs evicted again
    between the passes (as when they exceed memory) 3.08-3.58 s and 2.97 GB read instead of
    4.38-4.94 s and 5.50 GB."""
    fused.load_registries()  # a Ray worker's first loop (the driver's warm() did it there)
    base = _checkpoint(ctx.base)
    tuned = [_checkpoint(p) for p in ctx.tuned.values()]
    sparse = sample_every > 1
    chunks = unit.chunks
    probe = [(c.name, c.row_start) for c in chunks[::max(1, len(chunks) // PROBES)]]
    probe.append((chunks[-1].name, chunks[-1].row_stop - 1))
    with ExitStack() as stack:
        rb = stack.enter_context(base.reader())
        readers = [stack.enter_context(c.reader()) for c in tuned]
        cold = [r for r in (rb, *readers) if not r.cached(probe)]
        if sparse:
            for c in chunks if cold else ():
                ranges = [(c.row_start + a, c.row_start + b) for a, b in sample_ranges(
                    c.row_stop - c.row_start, base.info(c.name).row_numel, sample_every)]
                for r in cold:
                    r.prefetch_rows(c.name, ranges)
        ahead, pending = 0, 0  # full passes: chunks [ci, ahead), pending elements, asked for
        for ci, c in enumerate(chunks):
            while cold and not sparse and ahead < len(chunks) and (ahead <= ci
                                                                   or pending < READ_AHEAD):
                nxt = chunks[ahead]
                for r in cold:
                    r.prefetch_rows(nxt.name, [(nxt.row_start, nxt.row_stop)])
                pending += nxt.numel
                ahead += 1
            dtype = base.info(c.name).dtype
            ts = [kernel_view(r.map_rows(c.name, c.row_start, c.row_stop, sparse), dtype)
                  for r in readers]
            b = kernel_view(rb.map_rows(c.name, c.row_start, c.row_stop, sparse), dtype)
            yield ci, c, b, ts, dtype == torch.bfloat16
            pending -= c.numel
            for r in (rb, *readers):
                r.drop_mapped()


def _groups(b: np.ndarray, ts: list[np.ndarray]) -> list[tuple[int, tuple]]:
    """The tasks in groups of exactly ``fused.GROUP`` arrays, the last padded with the base
    (inactive: the callers' per-task arrays have :func:`_padded` rows)."""
    out = []
    for g0 in range(0, len(ts), fused.GROUP):
        part = tuple(ts[g0:g0 + fused.GROUP])
        out.append((g0, part + (b,) * (fused.GROUP - len(part))))
    return out


def _padded(n_tasks: int) -> int:
    return -(-n_tasks // fused.GROUP) * fused.GROUP


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
    n_pad = _padded(len(tasks))
    acc: dict[str, np.ndarray] = {}  # selection group -> (tasks, HIGH_BINS) counts
    for _, c, b, ts, bf16 in _chunks(ctx, unit, sample_every):
        active = np.zeros(n_pad, np.bool_)
        active[:len(tasks)] = [keys is None or (t, c.group) in keys for t in tasks]
        if not active.any() or b.size == 0:
            continue
        hist = acc.get(c.group)
        if hist is None:
            hist = acc[c.group] = np.zeros((n_pad, HIGH_BINS), np.int64)
        if sample_every > 1:  # whole rows: the segments of sample_ranges
            rows = c.row_stop - c.row_start
            row_numel = b.size // rows
            seg = max(1, -(-SAMPLE_SEGMENT // max(1, row_numel))) * row_numel
            step = seg * sample_every
        else:
            seg = step = b.size
        before = hist[:, NONFINITE_BIN:].sum(axis=1) if ctx.check_finite else None
        for g0, group in _groups(b, ts):
            g1 = g0 + fused.GROUP
            fused.high_histograms(b, group, bf16, active[g0:g1], hist[g0:g1], seg, step)
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
    n_t, n_pad = len(tasks), _padded(len(tasks))
    res = WindowResult()
    low_acc: dict[str, np.ndarray] = {}
    for ci, c, b, ts, bf16 in _chunks(ctx, unit):
        modes = [plan.get((t, c.group), (None,)) for t in tasks]
        win = _pad([m[0] == "window" for m in modes], n_pad, np.bool_)
        hist = _pad([m[0] == "histogram" for m in modes], n_pad, np.bool_)
        groups = _groups(b, ts)
        if win.any():
            lo = _pad([m[1] if m[0] == "window" else 0 for m in modes], n_pad, np.int64)
            hi = _pad([m[2] if m[0] == "window" else 0 for m in modes], n_pad, np.int64)
            packed = np.zeros((n_pad, (c.numel + 7) // 8), np.uint8)
            above = np.zeros(n_pad, np.int64)
            bad = np.zeros(n_pad, np.bool_)
            found = []
            for g0, group in groups:
                g1 = g0 + fused.GROUP
                c_task, c_idx, c_bits = fused.window(b, group, bf16, win[g0:g1], lo[g0:g1],
                                                     hi[g0:g1], packed[g0:g1], above[g0:g1],
                                                     bad[g0:g1])
                found.append((c_task + g0, c_idx, c_bits))
            c_task, c_idx, c_bits = (found[0] if len(found) == 1 else
                                     (np.concatenate(x) for x in zip(*found)))
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
            high = _pad([m[1] if m[0] == "histogram" else 0 for m in modes], n_pad, np.int64)
            acc = low_acc.get(c.group)
            if acc is None:
                acc = low_acc[c.group] = np.zeros((n_pad, LOW_BINS), np.int64)
            for g0, group in groups:
                g1 = g0 + fused.GROUP
                fused.low_histograms(b, group, bf16, hist[g0:g1], high[g0:g1], acc[g0:g1])
    res.low_hist = {(t, g): _to_sparse(h[k]) for g, h in low_acc.items()
                    for k, t in enumerate(tasks)
                    if plan.get((t, g), (None,))[0] == "histogram"}
    return res


def _pad(values: list, n: int, dtype) -> np.ndarray:
    out = np.zeros(n, dtype)
    out[:len(values)] = values
    return out


def scan_mask(ctx: ScanContext, unit: Unit,
              plan: dict[Key, tuple[int, int]]) -> dict[tuple[str, int], np.ndarray]:
    """Radix pass 3 for selections resolved by histogram.

    ``plan[(task, group)] = (threshold bits, ties this unit takes)``: an element is selected
    when above the threshold, or equal to it and among the first ``ties`` equal ones of the
    unit (canonical order).
    """
    tasks = list(ctx.tuned)
    n_pad = _padded(len(tasks))
    out: dict[tuple[str, int], np.ndarray] = {}
    taken: dict[Key, int] = {}
    for ci, c, b, ts, bf16 in _chunks(ctx, unit):
        keys = [(t, c.group) for t in tasks]
        active = _pad([k in plan for k in keys], n_pad, np.bool_)
        if not active.any():
            continue
        thr = _pad([plan[k][0] if k in plan else 0 for k in keys], n_pad, np.int64)
        quota = _pad([plan[k][1] if k in plan else 0 for k in keys], n_pad, np.int64)
        took = _pad([taken.get(k, 0) for k in keys], n_pad, np.int64)
        packed = np.zeros((n_pad, (c.numel + 7) // 8), np.uint8)
        for g0, group in _groups(b, ts):
            g1 = g0 + fused.GROUP
            fused.threshold_masks(b, group, bf16, active[g0:g1], thr[g0:g1], quota[g0:g1],
                                  took[g0:g1], packed[g0:g1])
        for k in np.flatnonzero(active):
            taken[keys[k]] = int(took[k])
            out[(tasks[k], ci)] = packed[k]
    return out
