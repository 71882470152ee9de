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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from cpift_dist.analysis import fused
from cpift_dist.analysis.plan import Unit
from cpift_dist.analysis.radix_select import HIGH_BINS, LOW_BINS, NONFINITE_BIN
from cpift_dist.errors import CheckpointError
from cpift_dist.io.checkpoint import Checkpoint, drop_mapped, read_chunk, row_spans
from cpift_dist.io.read_ahead import ReadAhead
from cpift_dist.timing import TimeSplit

SPENT = TimeSplit("loops", "reads")
"""In this process, summed over threads: seconds in the compiled loops (with, in runs, the reads
they make themselves) and in separate reads of chunks (buffers, the sample's rows): the
analysis's debug log gives them against the units' time; the rest is their own Python and
their waits for the GIL."""

Key = tuple[str, str]  # (task, selection group)
Sparse = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ScanContext:
    """What every unit needs to find its inputs."""

    base: str
    tuned: dict[str, str]  # task -> checkpoint directory
    check_finite: bool = True
    read: str = "pread"  # how the full passes read: "pread" into a buffer, or "map"


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


def sample_ranges(rows: int, row_numel: int, every: int) -> np.ndarray:
    """Row ranges (start, stop) relative to the chunk, int64 ``[m, 2]``, of the segments a
    sample pass reads."""
    seg = max(1, -(-SAMPLE_SEGMENT // max(1, row_numel)))
    start = np.arange(0, rows, seg * every, dtype=np.int64)
    return np.stack([start, np.minimum(start + seg, rows)], axis=1)


def _as_kernel_input(x: torch.Tensor) -> np.ndarray:
    """A tensor as the fused loops take it (see :func:`kernel_view`)."""
    return kernel_view(x.contiguous().reshape(-1).view(torch.uint8).numpy(), x.dtype)


def kernel_view(raw: np.ndarray, dtype: torch.dtype, wide: bool = False,
                into: np.ndarray | None = None) -> np.ndarray:
    """Raw bytes of a chunk as the fused loops take them, read-only: bf16 as its uint16 bits,
    float32 as is (both views, no copy), any other float dtype widened to float32 (exactly, as
    torch does), and bf16 too where ``wide`` (a parameter whose checkpoints differ in dtype:
    see :func:`~cpift_dist.io.checkpoint.widened`), by a compiled loop into ``into`` (a
    float32 buffer the caller reuses) where given. A chunk that is not aligned to its item
    size (safetensors does not pad between tensors) is copied, so that every loop compiles for
    aligned arrays only."""
    if dtype == torch.float32 or dtype == torch.bfloat16:
        kind = np.uint16 if dtype == torch.bfloat16 else np.float32
        out = raw.view(kind)  # a new array: the caller's flags stay as they are
        if not out.flags.aligned:  # (numpy's flag; ``raw.ctypes`` cost 1.4 us a chunk)
            out = raw.copy().view(kind)
        if wide and dtype == torch.bfloat16:
            out.flags.writeable = False
            wide_out = np.empty(out.size, np.float32) if into is None else into[:out.size]
            fused.widen_bf16(out, wide_out)
            out = wide_out
    else:
        out = torch.from_numpy(raw.copy()).view(dtype).to(torch.float32).numpy()
    out.flags.writeable = False
    return out


READ_AHEAD = 1 << 25
"""Elements of a unit's next chunks asked from the kernel ahead of a full pass's reading, per
checkpoint (64 MiB of bf16): the disk reads them while the current chunk is worked on."""
PROBES = 8
"""Chunks of a unit whose first page is looked up in the page cache: where all are there (a
warm cache), nothing is asked ahead for that checkpoint."""


_LOCAL = threading.local()


def _buffer(nbytes: int) -> np.ndarray:
    """This thread's buffer for a full pass's chunks, grown as needed and reused: fresh memory
    would cost a page fault per 4 KiB on every chunk. It lives as long as the thread (one
    chunk of every checkpoint: 8 MiB for 3 tasks on the default 1M-element bf16 chunks)."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < nbytes:
        buf = _LOCAL.buf = np.empty(nbytes, np.uint8)
    return buf


def _widened(k: int, n: int) -> np.ndarray:
    """This thread's ``k``-th float32 buffer for chunks widened from bf16 (checkpoints that
    differ in dtype), at least ``n`` elements, reused chunk after chunk."""
    bufs = getattr(_LOCAL, "widened", None)
    if bufs is None:
        bufs = _LOCAL.widened = []
    while len(bufs) <= k:
        bufs.append(np.empty(0, np.float32))
    if bufs[k].size < n:
        bufs[k] = np.empty(n, np.float32)
    return bufs[k]


def _chunks(ctx: ScanContext, unit: Unit):
    """Yields (chunk index, chunk, base, [tuned in task order], bf16) for the unit's chunks,
    read-only. Consume a chunk before the next. With ``ctx.read == "pread"`` (the default)
    each chunk of every checkpoint is read into this thread's buffer in one compiled call
    (:func:`~cpift_dist.io.checkpoint.read_chunk`), which the next chunk overwrites; with
    ``"map"`` the arrays are views over the files' memory maps (no copy), whose pages are
    dropped from this process's page tables before the next chunk.

    Inputs not in the page cache are asked from the kernel ahead of use: by this process's
    read-ahead thread where the pass runs one (:func:`pass_read_ahead`, :func:`reading_ahead`),
    else by this thread, the unit's chunks up to :data:`READ_AHEAD` elements ahead (of the
    checkpoints whose pages a probe of a few chunks, :func:`_cold_readers`, found missing)."""
    fused.load_registries()  # a Ray worker's first loop (the driver's warm() did it there)
    base = _checkpoint(ctx.base)
    tuned = [_checkpoint(p) for p in ctx.tuned.values()]
    chunks = unit.chunks
    shared = getattr(_LOCAL, "ahead", None) is not None
    with ExitStack() as stack:
        rb = stack.enter_context(base.reader())
        readers = [stack.enter_context(c.reader()) for c in tuned]
        every = [rb, *readers]
        pread = ctx.read == "pread"
        cold = [] if shared else _cold_readers(unit, every)
        ahead, pending = 0, 0  # chunks [ci, ahead), pending elements, asked for
        for ci, c in enumerate(chunks):
            while cold and ahead < len(chunks) and (ahead <= ci or pending < READ_AHEAD):
                nxt = chunks[ahead]
                for r in cold:
                    r.prefetch_rows(nxt.name, [(nxt.row_start, nxt.row_stop)])
                pending += nxt.numel
                ahead += 1
            dtypes = [ck.info(c.name).dtype for ck in (base, *tuned)]
            wide = len(set(dtypes)) > 1
            if pread:
                with SPENT.timed("reads"):
                    raw = read_chunk(every, c.name, c.row_start, c.row_stop,
                                     _buffer(c.numel * sum(d.itemsize for d in dtypes)))
            else:
                raw = [r.map_rows(c.name, c.row_start, c.row_stop) for r in every]
            b, *ts = (kernel_view(x, d, wide, _widened(k, c.numel) if wide else None)
                      for k, (x, d) in enumerate(zip(raw, dtypes)))
            yield ci, c, b, ts, dtypes[0] == torch.bfloat16 and not wide
            pending -= c.numel
            if not pread:
                drop_mapped(every)


def pass_read_ahead(ctx: ScanContext, units: list[Unit], threads: int) -> ReadAhead:
    """A full pass's read-ahead for every thread of this process, across units.

    Where a unit runs alone (a Ray worker's task), it asks for its own chunks. Where each of
    this process's threads did so, the disk sat idle at times (:mod:`cpift_dist.io.read_ahead`).
    Here one thread walks the pass's units in the order the executor hands them out, finds the
    checkpoints whose pages are missing (:func:`_cold_readers`, as it reaches each unit) and
    asks for their chunks, up to :data:`READ_AHEAD` elements per scanning thread beyond the
    units begun; the scanning threads only say which unit they begin (:func:`reading_ahead`).

    Use as a context manager around the pass."""
    return ReadAhead(_pass_asks(ctx, units), READ_AHEAD * max(1, threads))


def _pass_asks(ctx: ScanContext, units: list[Unit]):
    """The read-ahead's steps of a full pass: per chunk of each unit, its elements and the ask
    for it from the checkpoints that lack the unit's pages (probed as the unit is reached)."""
    opened = [_checkpoint(ctx.base), *map(_checkpoint, ctx.tuned.values())]
    with ExitStack() as stack:
        every = [stack.enter_context(c.reader()) for c in opened]
        for unit in units:
            cold = _cold_readers(unit, every)  # probed as the read-ahead reaches the unit
            for c in unit.chunks:
                yield c.numel, functools.partial(_ask, cold, c)


def _ask(readers, c) -> None:
    for r in readers:
        r.prefetch_rows(c.name, [(c.row_start, c.row_stop)])


@contextmanager
def reading_ahead(ahead: ReadAhead, unit: Unit):
    """Within it, this thread scans ``unit`` and leaves asking for its chunks to ``ahead``
    (outside it, a unit asks for its own)."""
    ahead.begin(sum(c.numel for c in unit.chunks))
    before = getattr(_LOCAL, "ahead", None)
    _LOCAL.ahead = ahead
    try:
        yield
    finally:
        _LOCAL.ahead = before


def _cold_readers(unit: Unit, readers) -> list:
    """The readers whose checkpoint lacks pages of the unit in the page cache: the first page
    of up to :data:`PROBES` chunks and the unit's last page, looked up with ``mincore``."""
    chunks = unit.chunks
    probe = [(c.name, c.row_start) for c in chunks[::max(1, len(chunks) // PROBES)]]
    probe.append((chunks[-1].name, chunks[-1].row_stop - 1))
    return [r for r in readers if not r.cached(probe)]


def _sample_runs(ctx: ScanContext, unit: Unit, sample_every: int):
    """Yields (selection group, base, [tuned in task order], bf16) for each run of the unit's
    consecutive chunks that share a selection group and dtype: the sampled rows of all of the
    run's chunks (:func:`sample_ranges`), concatenated in buffers of the call's, reused by the
    next run.

    Each checkpoint's rows are read in one compiled call that releases the GIL
    (:meth:`CheckpointReader.gather_rows`); where the page cache lacks them, all of the unit's
    are asked from the kernel first, at once (:meth:`CheckpointReader.prefetch_gather`). Before,
    the sample read each chunk through file maps: the kernel's page-table work for the faults'
    surrounding pages, and 5 GIL hand-overs per chunk, kept the pass from scaling (0.10-0.12 s
    on 1 and on 2 threads, 348M bf16, 215 chunks)."""
    fused.load_registries()
    base = _checkpoint(ctx.base)
    tuned = [_checkpoint(p) for p in ctx.tuned.values()]
    runs: list[list] = []  # [group, dtypes, [(name, absolute row ranges)], elements]
    for c in unit.chunks:
        info = base.info(c.name)
        rel = sample_ranges(c.row_stop - c.row_start, info.row_numel, sample_every)
        numel = int((rel[:, 1] - rel[:, 0]).sum()) * info.row_numel
        dtypes = tuple(ck.info(c.name).dtype for ck in (base, *tuned))
        if not runs or runs[-1][:2] != [c.group, dtypes]:
            runs.append([c.group, dtypes, [], 0])
        parts = runs[-1][2]
        if parts and parts[-1][0] == c.name:  # one part per tensor, not per chunk: each part
            parts[-1][1].append(rel + c.row_start)  # costs every reader a few numpy calls
        else:  # under the GIL (py-spy: 60% of the pass's GIL-holding samples, 1M chunks)
            parts.append((c.name, [rel + c.row_start]))
        runs[-1][3] += numel
    for run in runs:
        run[2] = [(name, np.concatenate(r)) for name, r in run[2]]
    with ExitStack() as stack:
        rb = stack.enter_context(base.reader())
        readers = [stack.enter_context(c.reader()) for c in tuned]
        for r in _cold_readers(unit, (rb, *readers)):
            r.prefetch_gather([part for run in runs for part in run[2]])
        bufs = [np.empty(max(run[3] * run[1][k].itemsize for run in runs), np.uint8)
                for k in range(len(readers) + 1)]
        for run in runs:
            group, dtypes, parts, _ = run
            wide = len(set(dtypes)) > 1
            with SPENT.timed("reads"):
                b, *ts = [kernel_view(r.gather_rows(parts, buf), d, wide,
                                      _widened(k, run[3]) if wide else None)
                          for k, (r, buf, d) in enumerate(zip((rb, *readers), bufs, dtypes))]
            yield group, b, ts, dtypes[0] == torch.bfloat16 and not wide


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


def _first_non_finite(ctx: ScanContext, unit: Unit, tasks: list[str]) -> CheckpointError:
    """The error naming the first of the unit's tensors that holds a NaN or Inf in the base or
    in one of ``tasks``' checkpoints (a histogram counted one there; the error path only)."""
    base = _checkpoint(ctx.base)
    for name in dict.fromkeys(c.name for c in unit.chunks):
        for task in tasks:
            tuned = _checkpoint(ctx.tuned[task])
            if not all(bool(torch.isfinite(ck.read(name)).all()) for ck in (base, tuned)):
                return _non_finite(ctx, task, name)
    names = ", ".join(repr(n) for n in dict.fromkeys(c.name for c in unit.chunks))
    return CheckpointError(f"{ctx.tuned[tasks[0]]}: |tuned - base| overflows float32 in one of "
                           f"the tensors {names}")


def _to_sparse(hist: np.ndarray) -> Sparse:
    idx = np.flatnonzero(hist)
    return idx.astype(np.int32), hist[idx].astype(np.int64)


def _histograms(ctx: ScanContext, unit: Unit, keys, sample_every: int) -> dict[Key, Sparse]:
    tasks = list(ctx.tuned)
    n_pad = _padded(len(tasks))
    acc: dict[str, np.ndarray] = {}  # selection group -> (tasks, HIGH_BINS) counts
    pieces = (_sample_runs(ctx, unit, sample_every) if sample_every > 1 else
              ((c.group, b, ts, bf16) for _, c, b, ts, bf16 in _chunks(ctx, unit)))
    for group, b, ts, bf16 in pieces:
        active = np.zeros(n_pad, np.bool_)
        active[:len(tasks)] = [keys is None or (t, group) in keys for t in tasks]
        if not active.any() or b.size == 0:
            continue
        hist = acc.get(group)
        if hist is None:
            hist = acc[group] = np.zeros((n_pad, HIGH_BINS), np.int64)
        for g0, grp in _groups(b, ts):
            g1 = g0 + fused.GROUP
            with SPENT.timed("loops"):
                fused.high_histograms(b, grp, bf16, active[g0:g1], hist[g0:g1])
    if ctx.check_finite:  # once per unit: per chunk, the sums cost 6% of the sample pass's GIL
        bad = {k for h in acc.values() for k in np.flatnonzero(h[:, NONFINITE_BIN:].any(axis=1))}
        if bad:
            raise _first_non_finite(ctx, unit, [tasks[k] for k in sorted(bad)])
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
    runs = _window_runs(ctx, unit, plan)
    if runs is not None:
        return runs
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
                with SPENT.timed("loops"):
                    c_task, c_idx, c_bits = fused.window(b, group, bf16, win[g0:g1],
                                                         lo[g0:g1], hi[g0:g1], packed[g0:g1],
                                                         above[g0:g1], bad[g0:g1])
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
                with SPENT.timed("loops"):
                    fused.low_histograms(b, group, bf16, hist[g0:g1], high[g0:g1],
                                         acc[g0:g1])
    res.low_hist = {(t, g): _to_sparse(h[k]) for g, h in low_acc.items()
                    for k, t in enumerate(tasks)
                    if plan.get((t, g), (None,))[0] == "histogram"}
    return res


_KINDS = {torch.bfloat16: np.uint16, torch.float32: np.float32}


def _window_runs(ctx: ScanContext, unit: Unit, plan: dict[Key, tuple]) -> WindowResult | None:
    """:func:`scan_window` for the common case, one compiled call per run of chunks
    (:func:`fused.window_run`: reads and window loop, the GIL released once per run, not handed
    over twice per chunk), with the same results. ``None`` where the per-chunk loop must do it:
    reads through maps (``read: map``), a dtype other than bf16 and float32 or checkpoints that
    differ in dtype (widened chunk by chunk), a histogram plan (the radix fallback), or inputs
    not in the page cache (its reads are asked ahead chunk by chunk)."""
    tasks = list(ctx.tuned)
    n_t, n_pad = len(tasks), _padded(len(tasks))
    groups = dict.fromkeys(c.group for c in unit.chunks)
    if ctx.read != "pread" or any(plan.get((t, g), (None,))[0] == "histogram"
                                  for t in tasks for g in groups):
        return None
    base = _checkpoint(ctx.base)
    tuned = [_checkpoint(p) for p in ctx.tuned.values()]
    names = dict.fromkeys(c.name for c in unit.chunks)
    if any(base.info(n).dtype not in _KINDS or any(ck.info(n).dtype != base.info(n).dtype
                                                   for ck in tuned) for n in names):
        return None
    runs: list[list] = []  # [group, dtype, [chunk indices]]
    for ci, c in enumerate(unit.chunks):
        dtype = base.info(c.name).dtype
        if not runs or runs[-1][:2] != [c.group, dtype]:
            runs.append([c.group, dtype, []])
        runs[-1][2].append(ci)
    res = WindowResult()
    with ExitStack() as stack:
        every = [stack.enter_context(ck.reader()) for ck in (base, *tuned)]
        if _cold_readers(unit, every):
            return None
        fused.load_registries()
        for group, dtype, idxs in runs:
            modes = [plan.get((t, group), (None,)) for t in tasks]
            win = _pad([m[0] == "window" for m in modes], n_pad, np.bool_)
            if not win.any():
                continue
            lo = _pad([m[1] if m[0] == "window" else 0 for m in modes], n_pad, np.int64)
            hi = _pad([m[2] if m[0] == "window" else 0 for m in modes], n_pad, np.int64)
            chunks = [unit.chunks[i] for i in idxs]
            fds, starts = row_spans(every, [(c.name, c.row_start) for c in chunks])
            numel = np.array([c.numel for c in chunks], np.int64)
            nbytes = numel * dtype.itemsize
            pb = (numel + 7) // 8
            poff = np.zeros(len(chunks) + 1, np.int64)
            np.cumsum(n_pad * pb, out=poff[1:])
            packed = np.empty(int(poff[-1]), np.uint8)  # every active row is written whole
            above = np.zeros(n_pad, np.int64)
            bad = np.zeros(n_pad, np.bool_)
            short = np.full(1, -1, np.int64)
            buf = _buffer(int(nbytes.max()) * len(every))
            with SPENT.timed("loops"):
                c_ci, c_task, c_idx, c_bits = fused.window_run(
                    fds, starts, nbytes, buf, _KINDS[dtype], dtype == torch.bfloat16, win, lo,
                    hi, packed, poff, above, bad, short)
            if short[0] >= 0:  # names the file that came short
                c = chunks[int(short[0])]
                read_chunk(every, c.name, c.row_start, c.row_stop,
                           _buffer(c.numel * dtype.itemsize * len(every)))
                raise CheckpointError(f"{ctx.base}: a read of tensor {c.name!r} came short")
            if ctx.check_finite and bad.any():
                raise _first_non_finite(ctx, unit, [tasks[k] for k in np.flatnonzero(bad)])
            order = np.argsort(c_task, kind="stable")  # by task, then chunk and index
            c_ci, c_task, c_idx, c_bits = c_ci[order], c_task[order], c_idx[order], c_bits[order]
            bounds = np.searchsorted(c_task, np.arange(n_t + 1))
            for k in np.flatnonzero(win):
                key = (tasks[k], group)
                res.above[key] = res.above.get(key, 0) + int(above[k])
                for j, ci in enumerate(idxs):
                    res.packed[(tasks[k], ci)] = packed[poff[j] + k * pb[j]:
                                                        poff[j] + (k + 1) * pb[j]]
                lo_k, hi_k = bounds[k], bounds[k + 1]
                if hi_k > lo_k:
                    cis = c_ci[lo_k:hi_k]
                    cut = np.flatnonzero(cis[1:] != cis[:-1]) + 1
                    for a, z in zip(np.concatenate([[0], cut]), np.concatenate([cut, [len(cis)]])):
                        res.items.setdefault(key, []).append(
                            (idxs[int(cis[a])], c_idx[lo_k + a:lo_k + z],
                             c_bits[lo_k + a:lo_k + z]))
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
            with SPENT.timed("loops"):
                fused.threshold_masks(b, group, bf16, active[g0:g1], thr[g0:g1], quota[g0:g1],
                                      took[g0:g1], packed[g0:g1])
        for k in np.flatnonzero(active):
            taken[keys[k]] = int(took[k])
            out[(tasks[k], ci)] = packed[k]
    return out
