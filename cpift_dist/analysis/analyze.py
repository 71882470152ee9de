"""Delta analysis: exact top-p% core masks per task, streamed shard by shard.

Recipe: plan units -> sample pass (1/s of the rows: predict a window of magnitudes around each
k-th largest) -> window pass (packed masks above the window + the window's candidates; counts
check that the window holds the k-th largest) -> exact radix select for any selection the
window missed (high-bits histograms, then a one-bin window or, for a huge bin, low-bits
histograms and a mask pass) -> stats and overlap from the written masks -> manifest. Every path
is exact; the sample only decides how many passes it takes. Output appears whole (atomic
rename) or not at all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cpift_dist.analysis import fused
from cpift_dist.analysis import scan as scan_module
from cpift_dist.analysis.masks import MaskWriter, packed_len
from cpift_dist.analysis.overlap import mask_counts
from cpift_dist.analysis.plan import Unit, plan_units
from cpift_dist.analysis.radix_select import (HIGH_BINS, LOW_BINS, Selection, add_sparse,
                                              resolve_high, resolve_low, sample_window,
                                              resolve_window)
from cpift_dist.analysis.scan import (ScanContext, WindowResult, pass_read_ahead, reading_ahead,
                                      scan_high, scan_mask, scan_sample, scan_window)
from cpift_dist.analysis.stats import task_stats
from cpift_dist.config import TASK_NAME, AnalysisConfig
from cpift_dist.errors import CpiftError
from cpift_dist.executor import InProcessExecutor
from cpift_dist.io import (Checkpoint, atomic_dir, check_room, checkpoint_digest,
                           compare_checkpoints, widened, write_manifest)
from cpift_dist.io.manifest import file_digests
from cpift_dist.timing import TimeSplit


_log = logging.getLogger(__name__)


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
    marks = [("start", time.perf_counter())]
    cfg = cfg or AnalysisConfig()
    executor = executor or InProcessExecutor()
    out = Path(out)
    _check_task_names(tuned)
    base_ck = Checkpoint(base)
    tuned_ck = {t: Checkpoint(p) for t, p in tuned.items()}
    base_ck.check_tied()  # a stored tied copy is one parameter: counted and masked once
    for ck in tuned_ck.values():
        compare_checkpoints(base_ck, ck)
        ck.check_tied()
    params = [base_ck.tensors[n] for n in base_ck.names()
              if base_ck.tensors[n].dtype.is_floating_point]
    skipped = [n for n in base_ck.names() if not base_ck.tensors[n].dtype.is_floating_point]
    units = plan_units(params, cfg.selection, cfg.chunk_elements,
                       unit_size(cfg, sum(p.numel for p in params), executor))
    group_numel: dict[str, int] = defaultdict(int)
    for u in units:
        for c in u.chunks:
            group_numel[c.group] += c.numel
    sels = {(t, g): Selection(math.floor(cfg.p * n), n)
            for t in tuned for g, n in group_numel.items()}
    ctx = ScanContext(str(base), {t: str(p) for t, p in tuned.items()}, cfg.check_finite,
                      cfg.read)
    limit = collect_limit(cfg)
    # numba's loops loaded once here, before the executor's threads or workers start: threads
    # that each load them at once serialise on numba's compiler lock (measured on 16 cores)
    marks.append(("checks", time.perf_counter()))
    wide = widened(base_ck, list(tuned_ck.values()))  # compared in float32
    fused.warm({np.uint16 if p.dtype == torch.bfloat16 and p.name not in wide else np.float32
                for p in params})
    marks.append(("numba's loops", time.perf_counter()))
    bar = _Bars(progress, len(units))
    spent0 = scan_module.SPENT.snapshot()

    with atomic_dir(out, overwrite=overwrite) as tmp:
        check_room(tmp, len(tuned) * sum(packed_len(p.numel) for p in params), out,
                   f"the core masks of {len(tuned)} task(s)")
        (tmp / "masks").mkdir()
        shapes = {p.name: p.shape for p in params}
        writers = {t: MaskWriter(tmp / "masks" / f"{t}.safetensors", shapes) for t in tuned}
        active = {key for key, sel in sels.items() if sel.k > 0}
        passes: list[str] = []

        # Sample pass: a 1/s row sample predicts a window around each k-th largest magnitude.
        plan = {}
        if cfg.sample_every > 1 and active:
            hist = {key: np.zeros(HIGH_BINS, np.int64) for key in active}
            for _, res in bar(executor.map(bar.timed(scan_sample, executor), ctx,
                                           [(u, cfg.sample_every) for u in units]), "sample"):
                for key, sparse in res.items():
                    add_sparse(hist[key], sparse)
            windows = {key: w for key in active
                       if (w := sample_window(sels[key], hist[key])) is not None}
            for key in _admit({key: w[2] for key, w in windows.items()}, limit):
                plan[key] = ("window", *windows[key][:2])
            passes.append("sample")
            marks.append(("sample", time.perf_counter()))
        # Window pass: one full pass resolves every selection whose window was right.
        done: set = set()
        if plan:
            done, _ = _window_pass(plan, units, ctx, executor, writers, sels, bar, "window")
            for key in done:
                sels[key].method = "sample-window"
            passes.append("window")
            marks.append(("window", time.perf_counter()))

        # Radix select for the rest (no sample, a window that missed, a mass of ties).
        rest = active - done
        if rest:
            high = {key: np.zeros(HIGH_BINS, np.int64) for key in rest}
            with _in_process(scan_high, units, ctx, executor, bar) as scan:
                for _, res in bar(executor.map(scan, ctx, [(u, frozenset(rest)) for u in units]),
                                  "radix histogram"):
                    for key, sparse in res.items():
                        add_sparse(high[key], sparse)
            for key in rest:
                resolve_high(sels[key], high[key])
            fits = _admit({key: sels[key].in_bin for key in rest}, limit)
            plan = {key: (("window", sels[key].high << 16, (sels[key].high + 1) << 16)
                          if key in fits else ("histogram", sels[key].high)) for key in rest}
            del high
            ok, unit_low = _window_pass(plan, units, ctx, executor, writers, sels, bar,
                                        "radix bin")
            passes += ["radix-histogram", "radix-bin"]
            hist_keys = [k for k, v in plan.items() if v[0] == "histogram"]
            assert ok == set(plan) - set(hist_keys), "a one-bin window must hold the k-th"
            for key in ok:
                sels[key].method = "radix"
            if hist_keys:  # the bin was too large to collect: a third pass
                plans = _tie_quotas(sels, hist_keys, unit_low, len(units))
                todo = [i for i in range(len(units)) if plans[i]]
                with _in_process(scan_mask, [units[i] for i in todo], ctx, executor, bar,
                                 writers) as scan:
                    for j, res in bar(executor.map(scan, ctx,
                                                   [(units[i], plans[i]) for i in todo]),
                                      "radix masks", total=len(todo)):
                        _write_packed(writers, units[todo[j]], res)
                for key in hist_keys:
                    sels[key].method = "radix-3pass"
                passes.append("radix-mask")
            del unit_low
            marks.append(("radix", time.perf_counter()))

        digests = {"base": checkpoint_digest(base)}
        digests.update({f"tuned/{t}": checkpoint_digest(p) for t, p in tuned.items()})
        with ThreadPoolExecutor(len(writers)) as pool:  # the copies release the GIL
            list(pool.map(lambda t: writers[t].close(_mask_metadata(t, cfg, sels, digests)),
                          writers))

        marks.append(("mask files", time.perf_counter()))
        # the masks' digests (for the manifest) while they are counted: the hash is serial per
        # file, the counts run on every core; measured on 2 cores, 348M bf16, 3 tasks: counts
        # and hashes 0.12-0.16 s one after the other
        mask_paths = [tmp / "masks" / f"{t}.safetensors" for t in tuned]
        hasher = ThreadPoolExecutor(1)
        mask_digests = hasher.submit(file_digests, mask_paths)
        hasher.shutdown(wait=False)
        counts, inter = mask_counts(mask_paths, list(shapes), progress=progress)
        stats = {t: task_stats(t, cfg, sels, params, counts[:, j], skipped)
                 for j, t in enumerate(tuned)}
        for t, s in stats.items():  # the masks on disk hold exactly k elements per selection
            if s["selected"] != s["k"]:
                raise CpiftError(f"internal error: mask of task {t!r} holds {s['selected']} "
                                 f"elements, expected k={s['k']}")
        overlap = _overlap(list(tuned), inter)
        marks.append(("counts", time.perf_counter()))
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (tmp / "overlap.json").write_text(json.dumps(overlap, indent=2) + "\n")
        known = {str(p.relative_to(tmp)): d for p, d in zip(mask_paths, mask_digests.result())}
        write_manifest(tmp, "analyze", cfg.model_dump(mode="json"), digests,
                       extra={"tasks": list(tuned), "executor": executor.name,
                              "units": len(units), "passes": passes,
                              "collect_limit": limit}, known=known)
    marks.append(("manifest", time.perf_counter()))
    _log.debug("analyze, %d units: %s; the driver's own work (while the units ran, and "
               "after): %s", len(units), ", ".join(
                   f"{name} {t - marks[i][1]:.2f} s" for i, (name, t) in enumerate(marks[1:])),
               ", ".join(f"{name} {t:.2f} s" for name, t in bar.driver.items()))
    if isinstance(executor, InProcessExecutor):
        spent, units = scan_module.SPENT.since(spent0), bar.units.snapshot()["units"]
        _log.debug("analyze units: %.2f s on %d thread(s): compiled loops %.2f s, reads "
                   "%.2f s, the rest (Python, waits for the GIL and for locks, mask writes) "
                   "%.2f s", units, executor.parallelism(), spent["loops"],
                   spent["reads"], TimeSplit.rest(units, spent))
    return AnalysisResult(out, stats, overlap)


UNITS_PER_WORKER = 4
CANDIDATE_BYTES = 24
"""Driver memory counted per window candidate: 12 bytes kept from the window pass (int64
index, int32 bits), 4 more while its selection is resolved (its bits concatenated; the
winners' bits are set straight in the mapped mask), and room for the per-chunk arrays in
flight. Measured: the driver's peak traced memory (``tracemalloc``, 348M bf16, 3 tasks) grows
by 12 bytes per candidate between p = 1% and 5% (93 -> 218 MB for 2.7M -> 12.9M)."""


def collect_limit(cfg: AnalysisConfig) -> int:
    """Window candidates the driver may hold: ``cfg.collect_limit``, or by default a quarter of
    the memory available now (the smaller of the machine's and its cgroup's), at
    :data:`CANDIDATE_BYTES` each. The masks never depend on it: it only decides how many full
    passes the analysis takes (a fixed 4M candidates sent every selection of a model above
    about 1.6B parameters at p = 1% to the radix path's 2-3 passes)."""
    if cfg.collect_limit is not None:
        return cfg.collect_limit
    return available_memory() // 4 // CANDIDATE_BYTES


def available_memory() -> int:
    """Bytes this process can still allocate: ``MemAvailable``, capped by the room left under
    each memory cgroup limit from this process's cgroup up to the root (SLURM and Kubernetes
    set them; cgroup v2 ``memory.max`` or v1 ``memory.limit_in_bytes``). A cgroup's usage
    counts page cache, so its inactive file pages, which the kernel reclaims first, count as
    room (as the kubelet's working set does). The free physical memory where ``/proc`` is
    absent. Written here: psutil reports only the machine's figure."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return avail
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2
            root, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current",
                                                   "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            root, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes",
                                                          "memory.usage_in_bytes",
                                                          "total_inactive_file")
        else:
            continue
        d = root / rel.strip().lstrip("/")
        while True:
            avail = min(avail, _cgroup_room(d, *files))
            if d == root or d == d.parent:
                break
            d = d.parent
    return avail


def _cgroup_room(d: Path, limit_file: str, usage_file: str, inactive_key: str) -> int:
    """Room under one cgroup's memory limit (a huge number where it has none or is unread)."""
    try:
        limit = (d / limit_file).read_text().strip()
        if limit == "max" or int(limit) >= 1 << 60:
            return 1 << 62
        used = int((d / usage_file).read_text())
        inactive = next((int(f[1]) for f in map(str.split, (d / "memory.stat").read_text()
                                                   .splitlines()) if f[:1] == [inactive_key]), 0)
        return max(0, int(limit) - used + inactive)
    except (OSError, ValueError):
        return 1 << 62


def _admit(sizes: dict, limit: int) -> set:
    """The selections whose windows are collected: smallest first while their candidates
    fit in ``limit`` together."""
    admitted, total = set(), 0
    for key in sorted(sizes, key=lambda k: (sizes[k], k)):
        if total + sizes[key] > limit:
            break
        admitted.add(key)
        total += sizes[key]
    return admitted


def unit_size(cfg: AnalysisConfig, total: int, executor) -> int:
    """Elements per unit: ``cfg.unit_elements``, smaller where that would give fewer than
    :data:`UNITS_PER_WORKER` units per worker (measured on 16 cores, 1.1B elements in 33
    units: 30% of the threads' time idle in each pass's last round), never below one chunk.
    Units only group chunks: the masks do not depend on their size."""
    workers = getattr(executor, "parallelism", lambda: 1)()
    share = -(-total // max(1, workers * UNITS_PER_WORKER))
    return max(cfg.chunk_elements, min(cfg.unit_elements, share))


def _check_task_names(tuned: dict) -> None:
    import re
    if not tuned:
        raise CpiftError("no tuned checkpoints given (--tuned NAME=DIR)")
    for t in tuned:
        if not re.match(TASK_NAME, t):
            raise CpiftError(f"task name {t!r}: use letters, digits, '_', '-', '.'")


class _Bars:
    """Wraps a pass's results in a progress bar, and adds to ``driver[desc]`` the time the
    driver spends on each result before it asks for the next (writing mask bytes, summing
    histograms): serial work that bounds a pass on many cores once it nears the pass's time
    (the debug log prints it beside each phase)."""

    def __init__(self, progress: bool, n_units: int):
        self.progress, self.n_units = progress, n_units
        self.driver: dict[str, float] = defaultdict(float)
        self.units = TimeSplit("units")  # in this process: the units' time, summed over threads

    def timed(self, scan, executor):
        """``scan`` adding each unit's time to :attr:`units` where the units run in this
        process (as is, for Ray's workers)."""
        if not isinstance(executor, InProcessExecutor):
            return scan

        @functools.wraps(scan)
        def run(*args):
            with self.units.timed("units"):
                return scan(*args)
        return run

    def __call__(self, it, desc, total=None):
        for res in tqdm(it, total=total or self.n_units, desc=f"analyze {desc}", unit="unit",
                        disable=not self.progress, leave=False):
            t = time.perf_counter()
            yield res
            self.driver[desc] += time.perf_counter() - t


def _write_packed(writers: dict[str, MaskWriter], unit: Unit, packed: dict) -> None:
    for (t, ci), data in packed.items():
        c = unit.chunks[ci]
        writers[t].write(c.name, c.flat_start // 8, data)


@contextmanager
def _in_process(scan, units: list[Unit], ctx, executor, bar: _Bars, writers=None):
    """``scan`` as ``executor.map`` should run it over ``units`` (a full pass, in their order).

    In this process, a wrapper that:

    - scans each unit under the pass's read-ahead
      (:func:`~cpift_dist.analysis.scan.pass_read_ahead`), one thread asking the kernel for
      the cold inputs' chunks ahead of all threads, across units;
    - with ``writers``, writes each unit's packed mask bytes from the thread that computed them
      and returns the result without them. The driver, which writes them for Ray's results,
      wrote every byte of every mask on one thread: serial time that a pass on many threads
      waits on (measured on 2 cores, 348M bf16, 3 tasks: 0.05-0.09 s of the driver's own time
      in the window pass, 0.00 s with this, the whole run unchanged; projected for 1.1B:
      0.16-0.3 s, against a window pass at I/O speed on 16 threads of 0.2-0.4 s). Units write
      distinct byte ranges (chunks start at multiples of 8 elements) with ``pwrite``, which
      releases the GIL; the winners' bits are set after the pass;
    - adds each unit's time to ``bar.units`` (the debug log's split of it)."""
    if not isinstance(executor, InProcessExecutor):
        yield scan
        return
    with pass_read_ahead(ctx, units, executor.parallelism()) as ahead:
        @functools.wraps(scan)
        def run(ctx, unit: Unit, *args):
            with reading_ahead(ahead, unit):
                res = scan(ctx, unit, *args)
            if writers is not None:
                packed = res.packed if isinstance(res, WindowResult) else res
                _write_packed(writers, unit, packed)
                packed.clear()
            return res

        yield bar.timed(run, executor)


def _window_pass(plan: dict, units: list[Unit], ctx, executor, writers, sels, bar, desc):
    """Runs :func:`scan_window` over all units; resolves the selections whose window held the
    k-th largest element (checked by counts), and returns them with the low histograms."""
    items: dict = defaultdict(dict)
    above: dict = defaultdict(int)
    unit_low: dict = defaultdict(dict)
    with _in_process(scan_window, units, ctx, executor, bar, writers) as scan:
        for i, res in bar(executor.map(scan, ctx, [(u, plan) for u in units]), desc):
            _write_packed(writers, units[i], res.packed)  # Ray's results bring their bytes
            for key, n in res.above.items():
                above[key] += n
            for key, lst in res.items.items():
                items[key][i] = lst
            for key, sparse in res.low_hist.items():
                unit_low[key][i] = sparse
    resolved = set()
    t = time.perf_counter()
    for key, (mode, *_) in plan.items():
        if mode != "window":
            continue
        segments = [(i, ci, idx, bits) for i in sorted(items[key])
                    for ci, idx, bits in items[key][i]]
        inside = sum(len(s[2]) for s in segments)
        if not above[key] < sels[key].k <= above[key] + inside:
            continue  # the predicted window missed the k-th largest: left to radix select
        _select_window(sels[key], above[key], segments, units, writers[key[0]])
        resolved.add(key)
    bar.driver[f"{desc} selection"] += time.perf_counter() - t
    return resolved, unit_low


def _select_window(sel: Selection, above: int, segments: list, units: list[Unit],
                   writer: MaskWriter) -> None:
    """Picks the window's winners in canonical order and sets their bits in the mask (compiled
    loops straight on the mapped mask file: a numpy partition, per-segment boolean indexing
    and a read-modify-write per tensor took 0.2 s of a 1.5 s analysis)."""
    resolve_window(sel, above, np.concatenate([s[3] for s in segments]))
    left = sel.ties
    packed = writer.mapped()
    for i, ci, idx, bits in segments:
        c = units[i].chunks[ci]
        left = fused.set_winners(fused.readonly(bits), fused.readonly(idx),
                                 8 * (writer.offsets[c.name] - writer.data_start) + c.flat_start,
                                 sel.threshold_bits, left, packed)
    assert left == 0, "every tie is placed"


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
