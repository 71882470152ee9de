"""The streaming fuser: one backbone from the task models, one output shard per unit of work.

Recipe: check inputs (base, tuned, masks) -> plan output shards -> per shard (a Ray task or a
thread), per tensor: Gram pass over its row chunks -> fold coefficients on the host -> apply
pass writing the fused chunks straight into the shard file -> index, config and tokenizer from
the base, manifest with overlap counts. Memory is bounded by the chunk size; output appears
whole (atomic rename) or not at all, and an interrupted fuse keeps the shards it finished and
resumes from them (:class:`_Journal`).
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import logging
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cpift_dist.analysis.masks import MaskFile, unpack_mask
from cpift_dist.analysis.plan import Chunk, plan_units
from cpift_dist.analysis.scan import PROBES, READ_AHEAD, kernel_view
from cpift_dist.config import FusionConfig
from cpift_dist.errors import CheckpointError, CpiftError, MaskError
from cpift_dist.executor import InProcessExecutor, fault_point, torch_threads
from cpift_dist.fusion import fused
from cpift_dist.fusion.slerp import (apply_torch, fold_coefficients, fold_weights, gram_torch,
                                     segments_of)
from cpift_dist.io import (Checkpoint, atomic_dir, check_room, checkpoint_digest,
                           compare_checkpoints, file_digest, widened, write_manifest)
from cpift_dist.io.checkpoint import (INDEX_NAME, SINGLE_NAME, drop_mapped, read_chunk,
                                     row_spans)
from cpift_dist.io.manifest import file_digests, file_stamp, sha256_json
from cpift_dist.io.read_ahead import ReadAhead
from cpift_dist.io.safetensors_stream import PositionalWriter
from cpift_dist.timing import TimeSplit

_log = logging.getLogger(__name__)
_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class FuseContext:
    """What every output shard needs."""

    base: str
    tuned: dict[str, str]
    masks: dict[str, str]
    out: str
    cfg: FusionConfig
    threads: int = 1
    wide: frozenset = frozenset()
    """Parameters whose checkpoints differ in dtype (:func:`~cpift_dist.io.checkpoint.widened`):
    read widened to float32, fused in float32 and written in float32 (or, with
    ``fusion.widened_dtype: base``, in the base's dtype)."""

    @property
    def wide_out(self) -> frozenset:
        """The parameters written in float32 (:func:`out_dtype` of the output)."""
        return self.wide if self.cfg.widened_dtype == "float32" else frozenset()


@dataclass(frozen=True)
class OutShard:
    """One output file and the tensors it holds, in order."""

    file: str
    names: tuple[str, ...]


def out_dtype(base: Checkpoint, name: str, wide=frozenset()) -> torch.dtype:
    """The dtype of tensor ``name`` (a parameter or a stored tied copy) in the fused output:
    the base's, or float32 for a parameter in ``wide`` (checkpoints that differ in dtype: the
    promoted dtype, so that every transplanted core value is kept exactly)."""
    return torch.float32 if base.tied.get(name, name) in wide else base.info(name).dtype


def out_bytes(base: Checkpoint, name: str, wide=frozenset()) -> int:
    return base.info(name).numel * out_dtype(base, name, wide).itemsize


def plan_shards(base: Checkpoint, max_shard_bytes: int, wide=frozenset()) -> list[OutShard]:
    """Tensors in name order, cut into files of at most ``max_shard_bytes`` (HF naming) of
    output (:func:`out_dtype`).

    A stored tied copy (``base.tied``) follows its parameter in the same file, so that it is
    written as a byte copy of the fused value and the output stays tied.
    """
    groups: list[list[str]] = [[]]
    size = 0
    for name in base.names():
        names = [name] + sorted(a for a, src in base.tied.items() if src == name)
        nbytes = sum(out_bytes(base, n, wide) for n in names)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1] += names
        size += nbytes
    n = len(groups)
    return [OutShard(SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors",
                     tuple(g)) for i, g in enumerate(groups)]


@functools.lru_cache(maxsize=32)
def _checkpoint(path: str) -> Checkpoint:
    return Checkpoint(path)


def _device_and_backend(cfg: FusionConfig) -> tuple[str, str]:
    device = cfg.device
    if device == "auto":  # the numba loops run on the CPU, whatever else is there
        device = "cuda" if torch.cuda.is_available() and cfg.backend != "numba" else "cpu"
    backend = cfg.backend
    if backend == "auto":
        backend = "triton" if device == "cuda" else "numba"
    if backend == "numba" and device != "cpu":
        raise CpiftError(f"fusion.backend=numba runs on the CPU, not on {device!r}")
    return device, backend


class _Scheduler:
    """A pool of threads running tasks by priority (lower first, then submission order); tasks
    may submit tasks. The first error stops the pool and is re-raised by :meth:`run`.

    Each task belongs to a *lane* (an output shard's index), and thread ``k`` takes the tasks
    of lane ``k`` modulo the threads first, the best task of any other lane only where its
    own has none: so that threads write into different files. Linux serialises writes into
    one file (its inode lock): measured on 2 cores, 2.2 GB written in 8 MB ``pwrite``s into
    one tmpfs file took 0.87-1.00 s on 1 thread and 0.89-1.02 s on 2, into two files (one per
    thread) 0.49-0.51 s.

    Hand-written because ``concurrent.futures`` has no priorities: the apply pass of a tensor
    must overtake the Gram passes of later tensors, or every tensor's chunks would be held in
    memory until all Gram passes are done.
    """

    def __init__(self, threads: int):
        self.threads = max(1, threads)
        self._lanes: list[list] = [[] for _ in range(self.threads)]  # heaps
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None
        self._workers: list[threading.Thread] = []
        self.busy = 0.0  # seconds the threads spent in tasks, summed over threads

    def submit(self, priority: int, fn, *args, lane: int = 0) -> None:
        with self._cv:
            self._pending += 1
            heapq.heappush(self._lanes[lane % self.threads],
                           (priority, next(self._seq), fn, args))
            self._cv.notify_all()

    def _take(self, k: int):
        """The next task for thread ``k`` (its lane's first, else the best of another lane),
        waiting for one; None once every task is done."""
        with self._cv:
            while True:
                if self._pending == 0:
                    return None
                own = self._lanes[k]
                if not own:
                    own = min((h for h in self._lanes if h), key=lambda h: h[0], default=None)
                if own:
                    return heapq.heappop(own)
                self._cv.wait()

    def _worker(self, k: int) -> None:
        """Runs tasks until none is left. After an error the queued tasks are dropped."""
        while (item := self._take(k)) is not None:
            _, _, fn, args = item
            t0 = time.perf_counter()
            try:
                if self._error is None:
                    fn(*args)
            except BaseException as e:
                with self._cv:
                    self._error = self._error or e
            with self._cv:
                self.busy += time.perf_counter() - t0
                self._pending -= 1
                if self._pending == 0:
                    self._cv.notify_all()

    def run(self) -> None:
        """Runs until every task (including those submitted on the way) is done."""
        if self._pending == 0:
            return
        self._workers = [threading.Thread(target=self._worker, args=(i,), name=f"fuse-{i}",
                                          daemon=True) for i in range(self.threads)]
        for w in self._workers:
            w.start()
        for w in self._workers:
            w.join()
        if self._error is not None:
            raise self._error

    def stop(self, error: BaseException) -> None:
        """After ``run`` was interrupted in this thread (Ctrl-C): the threads drop the queued
        tasks and end with their current one; waits for them (no task may write into a file
        once it is closed)."""
        with self._cv:
            self._error = self._error or error
        for w in self._workers:
            w.join()


_APPLY, _GRAM = 0, 1  # priorities: finish started tensors first
_RUN_DTYPES = (torch.bfloat16, torch.float32)  # what the compiled runs read as is
GROUP_CHUNKS = 8
"""Chunks of a multi-chunk tensor per task of each pass in runs (``read: pread``): read one
after the other into one chunk's buffer by one compiled call; the apply pass's output of the
group is written at once (8 chunks of 1M bf16 elements: a 16 MB output buffer per thread)."""


@dataclass
class _Run:
    """A run's chunks as :meth:`_ShardFuser._plan_run` lays them out: per chunk its bytes per
    checkpoint, mask bytes per task, segment length and where it lies in the files; where each
    chunk's inputs, masks and segments start in the thread's buffers and the Gram matrices
    (``boff``, ``poff``, ``goff``: one more entry than chunks); the buffers; whether each
    chunk's base was read."""

    chunks: list[Chunk]
    dtype: torch.dtype
    nbytes: np.ndarray
    mbytes: np.ndarray
    seg_len: np.ndarray
    fds: np.ndarray  # [C, 1 + N] the base's and the tasks' descriptors, then offsets
    starts: np.ndarray
    mfds: np.ndarray  # [C, N] the masks' descriptors, then offsets
    mstarts: np.ndarray
    boff: np.ndarray | None = None
    poff: np.ndarray | None = None
    goff: np.ndarray | None = None
    buf: np.ndarray | None = None
    packed: np.ndarray | None = None
    out: np.ndarray | None = None
    grams: np.ndarray | None = None
    based: np.ndarray | None = None

    @property
    def bf16(self) -> bool:
        return self.dtype == torch.bfloat16

    @property
    def like(self) -> np.ndarray:
        """An empty array of the values' type in the compiled loops (bf16 bits or float32)."""
        return fused.RUN_LIKE[self.dtype]


class _Runs:
    """Groups whole chunks (tensors of one chunk, or rows with their own angles) into runs:
    consecutive in the output file, one dtype, up to ``limit`` elements together (the chunk
    size: a run is read at once); ``submit(run)`` takes each run when it closes."""

    def __init__(self, submit, limit: int):
        self.submit, self.limit = submit, limit
        self.run: list[tuple[Chunk, int]] = []
        self.numel = self.end = 0
        self.dtype = None

    def add(self, c: Chunk, segments: int, tensor_offset: int, dtype: torch.dtype) -> None:
        start = tensor_offset + c.flat_start * dtype.itemsize
        if self.run and (start != self.end or dtype != self.dtype
                         or self.numel + c.numel > self.limit):
            self.flush()
        self.run.append((c, segments))
        self.numel += c.numel
        self.end, self.dtype = start + c.numel * dtype.itemsize, dtype

    def flush(self) -> None:
        if self.run:
            self.submit(self.run)
        self.run, self.numel = [], 0


@dataclass
class _Tensor:
    """A multi-chunk tensor between its Gram and apply passes."""

    name: str
    chunks: list[Chunk]
    segments: int
    groups: list[tuple[int, int]]  # the chunks i0:i1 of each task of a pass
    remaining: int  # Gram tasks still to finish
    gram: list  # per chunk, its Gram partial
    cached: dict | None  # chunk index -> its inputs, while they fit the cache budget
    reserved: int = 0


class _Shared:
    """What the shard fusers of one process share: one scheduler (so that its threads go on
    from one output shard into the next, and a shard's hashing overlaps the next one's work:
    measured on 2 cores, 4 shards fused one after the other took 1.3x as long as one shard of
    the same tensors), the threads' open readers and CUDA streams, the pooled buffers and the
    cache budget."""

    def __init__(self, threads: int, budget: int, bar=None):
        self.sched = _Scheduler(threads)
        self.lock = threading.Lock()
        self.budget = budget
        self.local = threading.local()
        self.closers: list = []  # every thread's open files
        self.masks: dict = {}  # mask file path -> its MaskFile, shared by the threads
        self.pool: dict[int, list[torch.Tensor]] = {}  # free buffers by size
        self.bar = bar  # progress in output bytes, or None
        self.order: list = []  # cold inputs: (fuser, chunk) in first-read order
        self.ahead: ReadAhead | None = None  # asks the kernel for them, while the work runs
        self.spent = TimeSplit(*SPENT)  # seconds by what the tasks did (debug log)


SPENT = ("loops", "reads", "writes")
"""What the fusion's tasks spend their time on, apart from their own Python: the compiled loops
or kernels (with, in runs, the reads they make themselves, and on CUDA the waits for the
device), separate reads (maps, buffers, copies to the device), and writes."""


class _ShardFuser:
    """The tasks of one output shard: per chunk, read once -> Gram -> (fold) -> apply -> write
    at the chunk's offset. A tensor fits one chunk, or with one angle per row, its chunks are
    independent; otherwise its chunks' Gram partials are summed, and the last one folds the
    coefficients and queues the tensor's apply tasks, which read the chunks again (numba) or
    reuse the chunks kept in memory (torch, Triton: up to ``cache_bytes`` for all tensors in
    flight; beyond, they are read again). On the numba loops with ``read: pread``, whole
    chunks of bf16 and fp32 tensors go in runs (:meth:`_run`: several small tensors read,
    fused and written by two compiled calls and one write), and a multi-chunk tensor's chunks
    as runs of one.

    :meth:`submit` queues the shard's tasks on the shared scheduler; once it has run,
    :meth:`finish` writes the tied copies and returns the counts."""

    def __init__(self, ctx: FuseContext, shard: OutShard, writer: PositionalWriter,
                 shared: _Shared):
        cfg = ctx.cfg
        self.ctx, self.shard, self.writer, self.shared = ctx, shard, writer, shared
        self.device, self.backend = _device_and_backend(cfg)
        self.kernels = None
        if self.backend == "triton":
            from cpift_dist.kernels import slerp as kernels
            self.kernels = kernels
        self.base = _checkpoint(ctx.base)
        self.tasks = list(ctx.tuned)
        self.tuned = [_checkpoint(ctx.tuned[t]) for t in self.tasks]
        self.mask_paths = [ctx.masks[t] for t in self.tasks]
        self.t = fold_weights(len(self.tasks), cfg.omega)
        self.tv = cfg.space == "task-vectors"
        self.counts: dict[str, list[int]] = {}
        self.lock, self.local, self.pool = shared.lock, shared.local, shared.pool
        self.sched = shared.sched
        self.left = 1  # the shard's tasks not yet done, plus one until submit() has queued all
        self.done = None  # called with this fuser, on the thread that ends its last task
        self.lane = 0  # the scheduler's lane of its tasks (its index among the shards)
        self.cuda = self.device == "cuda"
        # the numba loops read the chunks into buffers in runs (read: pread; bf16 and fp32
        # inputs in the page cache) or straight from the files' maps; the torch and Triton
        # paths take tensors (on CUDA copied from page-locked buffers)
        self.maps = self.backend == "numba"
        self.runs = self.maps and cfg.read == "pread"
        self.chunk = cfg.chunk_for(self.backend)
        self.cold: list[int] = []  # readers (0: the base) whose pages were not in the cache
        if self.kernels is not None:  # every dtype the shard's kernels run in (float32 too
            # where some checkpoint stores a parameter in another dtype than the base)
            for dtype in sorted({self._dtype(n) for n in shard.names
                                 if self.base.info(n).dtype.is_floating_point}, key=str):
                _tune_once(self.kernels, len(self.tasks), dtype, self.tv, cfg.overlap,
                           self.device)

    def _dtype(self, name: str) -> torch.dtype:
        """The values' dtype in the loops (:func:`out_dtype`: float32 where widened)."""
        return out_dtype(self.base, name, self.ctx.wide)

    def _out(self, name: str) -> torch.dtype:
        """The dtype written (the loops' dtype, or the base's with ``widened_dtype: base``)."""
        return out_dtype(self.base, name, self.ctx.wide_out)

    def submit(self) -> None:
        planned: list[Chunk] = []  # every float tensor's chunks in the order their tasks are
        # queued (the order of their first reads, tasks of one priority running in that order)

        def submit_run(run: list[tuple[Chunk, int]]) -> None:
            planned.extend(c for c, _ in run)
            self._submit(_GRAM, self._run, run)

        runs = _Runs(submit_run, self.chunk)
        for name in self.shard.names:
            info = self.base.info(name)
            if name in self.base.tied or info.numel == 0:
                continue  # tied copies are byte copies, written last
            if not info.dtype.is_floating_point:  # buffers such as position ids: the base's
                runs.flush()  # tasks queued in file order: writes extend the hashed prefix
                self._submit(_GRAM, self._copy_base, name)
                continue
            self.counts[name] = [0, 0]
            chunks = plan_units([info], "global", self.chunk, 1 << 62)[0].chunks
            segments = segments_of(info.shape, self.ctx.cfg.granularity)
            if len(chunks) == 1 or segments > 1:
                for c in chunks:
                    if self._in_runs(name):
                        runs.add(c, segments, self.writer.offsets[name], info.dtype)
                    else:
                        runs.flush()
                        planned.append(c)
                        self._submit(_GRAM, self._whole, c, segments)
                continue
            runs.flush()
            nbytes = out_bytes(self.base, name, self.ctx.wide) * (len(self.tasks) + 1)
            # in runs, up to GROUP_CHUNKS chunks a task (one compiled call reads them one after
            # the other into the same buffer); else a chunk a task
            step = GROUP_CHUNKS if self._in_runs(name) else 1
            groups = [(i, min(i + step, len(chunks))) for i in range(0, len(chunks), step)]
            st = _Tensor(name, chunks, segments, groups, len(groups), [None] * len(chunks), None)
            planned += chunks
            for i0, i1 in groups:
                self._submit(_GRAM, self._gram_part, st, i0, i1, nbytes)
        runs.flush()
        self._probe(planned)
        self._ended()

    def _submit(self, priority: int, fn, *args) -> None:
        """Queues one of the shard's tasks (counted: the shard is done when none is left)."""
        with self.lock:
            self.left += 1
        self.sched.submit(priority, self._task, fn, args, lane=self.lane)

    def _task(self, fn, args) -> None:
        fn(*args)  # it may queue more of the shard's tasks (counted before this one ends)
        self._ended()

    def _ended(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last and self.done is not None:
            self.done(self)

    def _probe(self, chunks: list[Chunk]) -> None:
        """Finds the input checkpoints whose pages are not in the page cache (a few of the
        shard's ``chunks`` probed, as the analysis does) and queues the chunks to be asked for
        ahead (:func:`_asks`)."""
        if not chunks:
            return
        points = [(c.name, c.row_start) for c in chunks[::max(1, len(chunks) // PROBES)]]
        self.cold = [i for i, r in enumerate(self._readers()[0]) if not r.cached(points)]
        if self.cold:
            with self.lock:
                self.shared.order += [(self, c) for c in chunks]

    def _begin(self, c: Chunk) -> None:
        """Before a chunk's first read: tells the process's read-ahead (:func:`_asks`)."""
        if self.cold and self.shared.ahead is not None:
            self.shared.ahead.begin(c.numel)

    def _ask(self, c: Chunk) -> None:
        """Asks the kernel for a chunk of the cold checkpoints (on the read-ahead's thread);
        the base only where it is read: in task-vector space, or where the chunk holds a core
        element."""
        readers = self._readers()[0]
        for i in self.cold:
            if i > 0 or self.tv or self._masks(c).any():
                readers[i].prefetch_rows(c.name, [(c.row_start, c.row_stop)])

    def finish(self) -> dict:
        for name in self.shard.names:
            if name in self.base.tied:
                self.writer.copy(self.base.tied[name], name)
        return {n: {"core": c[0], "overlap": c[1]} for n, c in self.counts.items()}

    # -- inputs -----------------------------------------------------------------------------
    def _readers(self):
        """This thread's checkpoint readers (the base first) and the mask files, which every
        thread shares (opening one validates its header: 33 ms of Python per fuse on 1 thread
        for a pair of 348M masks, once per thread before)."""
        r = getattr(self.local, "readers", None)
        if r is None:
            with self.lock:
                masks = [self.shared.masks.get(p) for p in self.mask_paths]
                for i, p in enumerate(self.mask_paths):
                    if masks[i] is None:
                        masks[i] = self.shared.masks[p] = MaskFile(p).open()
                        self.shared.closers.append(masks[i].close)
            r = self.local.readers = ([self.base.reader()] + [c.reader() for c in self.tuned],
                                      masks)
            with self.lock:
                self.shared.closers += [functools.partial(x.__exit__, None, None, None)
                                        for x in r[0]]
        return r

    def _buffer(self, nbytes: int) -> torch.Tensor:
        """A uint8 buffer from the pool (fresh memory costs a page fault per 4 KiB: measured
        as much time as the read itself); page-locked when the passes run on CUDA, so that
        copies to and from the device are DMA transfers that need no staging copy."""
        with self.lock:
            free = self.pool.get(nbytes)
            if free:
                return free.pop()
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _release(self, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        with self.lock:
            self.pool.setdefault(buf.numel(), []).append(buf)

    def _stream(self):
        """This thread's CUDA stream: each thread's copies and kernels queue on their own
        stream, so one thread's transfers overlap other threads' kernels, reads and writes."""
        s = getattr(self.local, "stream", None)
        if s is None:
            s = self.local.stream = torch.cuda.Stream(device=self.device)
        return s

    def _load(self, c: Chunk):
        """The chunk's inputs: see :meth:`_map` (the numba loops) and :meth:`_read`."""
        with self.shared.spent.timed("reads"):
            return self._map(c) if self.maps else self._read(c)

    def _masks(self, c: Chunk) -> np.ndarray:
        """The tasks' packed mask bytes of the chunk, ``[N, bytes]``."""
        return np.stack([m.read_packed(c.name, c.flat_start // 8,
                                       (c.flat_start + c.numel + 7) // 8)
                         for m in self._readers()[1]])

    def _map(self, c: Chunk):
        """The chunk's base and tasks' values as read-only arrays straight over the files' maps
        (no copy; the loops read them once, and :meth:`_unmap` drops the pages from this
        process's page tables after the chunk), its packed masks [N, bytes], and no buffer. In
        weight space the base is mapped only where the chunk holds a core element: elsewhere
        the loops do not read it, and the first task's array stands in for it."""
        readers, _ = self._readers()
        wide = c.name in self.ctx.wide  # widened to float32 (each by its own dtype)
        p = self._masks(c)
        xs = [kernel_view(r.map_rows(c.name, c.row_start, c.row_stop),
                          r.checkpoint.info(c.name).dtype, wide) for r in readers[1:]]
        b = (kernel_view(readers[0].map_rows(c.name, c.row_start, c.row_stop),
                         self.base.info(c.name).dtype, wide)
             if self.tv or p.any() else xs[0])
        return b, xs, p, None, None

    def _unmap(self) -> None:
        if self.maps:
            drop_mapped(self._readers()[0])

    def _read(self, c: Chunk):
        """The chunk's base [n] and tasks' [N, n] values (read straight into one pooled
        buffer; in weight space the base is read only where the chunk holds a core element,
        as no other element's result depends on it: a SLERP pair reads 2 models, not 3),
        packed masks [N, bytes] (numpy), the buffer (release it when done) and, on
        CUDA, the masks on the device. On CUDA the values are copied to the device (one
        asynchronous copy of the page-locked buffer on this thread's stream) and the host
        buffer goes back to the pool: the values returned are device tensors. A checkpoint
        that stores the chunk in another dtype than :meth:`_dtype` is read and widened."""
        readers, _ = self._readers()
        dtype = self._dtype(c.name)
        nb = c.numel * dtype.itemsize
        buf = self._buffer(nb * (len(self.tasks) + 1))
        p = self._masks(c)
        b = buf[:nb].view(dtype)
        if self.tv or p.any():  # in weight space only a core element looks at the base (its
            _read_as(readers[0], c, b)  # |x - base|): else skip
        x = buf[nb:].view(dtype).view(len(self.tasks), c.numel)
        for k, r in enumerate(readers[1:]):
            _read_as(r, c, x[k])
        if not self.cuda:
            return b, x, p, buf, None
        stream = self._stream()
        with torch.cuda.stream(stream):
            dev = torch.empty(buf.numel(), dtype=torch.uint8, device=self.device)
            dev.copy_(buf, non_blocking=True)
            pd = torch.from_numpy(p).to(self.device, non_blocking=True)
        stream.synchronize()  # the host buffer is free again (releases the GIL meanwhile)
        self._release(buf)
        return (dev[:nb].view(dtype), dev[nb:].view(dtype).view(len(self.tasks), c.numel), p,
                None, pd)

    def _copy_base(self, name: str) -> None:
        with self.shared.spent.timed("reads"):
            data = self._readers()[0][0].read(name)
        with self.shared.spent.timed("writes"):
            self.writer.write(name, data)

    # -- passes -----------------------------------------------------------------------------
    def _gram(self, c: Chunk, data, segments: int) -> np.ndarray:
        b, x, p, _, pd = data
        segs = c.row_stop - c.row_start if segments > 1 else 1
        with self.shared.spent.timed("loops"):
            if self.backend == "numba":
                return fused.gram_chunk(b, x, p, segs, self.tv)
            with torch.cuda.stream(self._stream()) if self.cuda else nullcontext():
                if self.kernels is not None:
                    g = self.kernels.gram(x, b, pd if pd is not None else torch.from_numpy(p),
                                          segs, self.tv)
                else:
                    union = unpack_mask(np.bitwise_or.reduce(p, axis=0), c.numel)
                    g = gram_torch(x, b, torch.from_numpy(union).to(self.device), segs, self.tv)
                return g.cpu().numpy()  # on CUDA: waits for this thread's stream only

    def _apply(self, c: Chunk, data, coef: np.ndarray) -> None:
        """Fuses, writes and counts the chunk; releases its buffer. On CUDA the result comes
        back by one asynchronous copy into a page-locked buffer, on this thread's stream."""
        b, x, p, buf, pd = data
        dtype, written = self._dtype(c.name), self._out(c.name)
        out = None
        nbytes = c.numel * written.itemsize
        if self.backend == "numba":
            out = self._buffer(c.numel * (2 if dtype == torch.bfloat16 else 4))
            with self.shared.spent.timed("loops"):
                res, union, multi = fused.apply_chunk(b, x, p, coef, self.tv,
                                                      self.ctx.cfg.overlap, written, out)
        else:
            cf = torch.from_numpy(coef)
            with torch.cuda.stream(self._stream()) if self.cuda else nullcontext(), \
                    self.shared.spent.timed("loops"):
                if self.kernels is not None:
                    res = self.kernels.apply(x, b, pd if pd is not None else torch.from_numpy(p),
                                             cf, self.tv, self.ctx.cfg.overlap, written)
                else:
                    res = apply_torch(x, b, _unpack(p, c.numel).to(x.device), cf.to(x.device),
                                      self.tv, self.ctx.cfg.overlap, written)
                if self.cuda:
                    out = self._buffer(nbytes)
                    host = out.view(written)
                    host.copy_(res, non_blocking=True)
                    self._stream().synchronize()
                    res = host
            union, multi = _core_counts(p)
        with self.shared.spent.timed("writes"):
            self.writer.write(c.name, res, c.flat_start * written.itemsize)
        self._release(buf)
        if out is not None:
            self._release(out)
        with self.lock:
            self.counts[c.name][0] += union
            self.counts[c.name][1] += multi
            if self.shared.bar is not None:
                self.shared.bar.update(nbytes)

    def _whole(self, c: Chunk, segments: int) -> None:
        """A chunk whose coefficients depend on it alone."""
        self._begin(c)
        data = self._load(c)
        coef = fold_coefficients(self._gram(c, data, segments), self.t)
        self._apply(c, data, coef)
        self._unmap()

    def _run(self, run: list[tuple[Chunk, int]]) -> None:
        """Whole chunks (``(chunk, segments)``, consecutive in the output file, one dtype) on
        the numba loops: read and Gram, one fold, apply (:meth:`_read_run`,
        :meth:`_apply_run`): two compiled calls and one write per run, where a chunk at a time
        held the GIL for a tenth of a thread's time in Python (docs/benchmarks.md). Cold
        inputs too: the read-ahead (:func:`_asks`) asks for them ahead of the read."""
        for c, _ in run:
            self._begin(c)
        r = self._read_run(run)
        # one fold for the run's segments: the same bits as one fold per chunk (tested)
        self._apply_run(r, fold_coefficients(r.grams, self.t))

    def _plan_run(self, run: list[tuple[Chunk, int]], reuse: bool = False) -> "_Run":
        """Where a run's chunks lie in the files (this thread's descriptors) and go in this
        thread's buffers: one after the other, or with ``reuse`` each at the start (read and
        used one at a time)."""
        readers, masks = self._readers()
        chunks = [c for c, _ in run]
        n_tasks = len(self.tasks)
        dtype = self.base.info(chunks[0].name).dtype
        fds, starts = row_spans(readers, [(c.name, c.row_start) for c in chunks])
        spans = [m.span(c.name, c.flat_start // 8) for c in chunks for m in masks]
        numel = np.array([c.numel for c in chunks], np.int64)
        segs = np.array([c.row_stop - c.row_start if s > 1 else 1 for c, s in run], np.int64)
        r = _Run(chunks, dtype, numel * dtype.itemsize, (numel + 7) // 8, numel // segs, fds,
                 starts, np.array([f for f, _ in spans], np.int32).reshape(len(chunks), n_tasks),
                 np.array([o for _, o in spans], np.int64).reshape(len(chunks), n_tasks))
        sizes = (r.nbytes * (n_tasks + 1), r.mbytes * n_tasks)
        if reuse:
            r.boff, r.poff = (np.zeros(len(chunks) + 1, np.int64) for _ in sizes)
            need = [int(a.max()) for a in sizes]
        else:
            r.boff, r.poff = (np.concatenate([[0], np.cumsum(a)]) for a in sizes)
            need = [int(r.boff[-1]), int(r.poff[-1])]
        r.goff = np.concatenate([[0], np.cumsum(segs)])
        r.buf, r.packed, r.out = self._run_buffers(*need, int(r.nbytes.sum()))
        r.based = np.zeros(len(chunks), np.bool_)
        return r

    def _read_run(self, run: list[tuple[Chunk, int]], reuse: bool = False) -> "_Run":
        """Reads a run's chunks (see :meth:`_plan_run`) and takes their Gram matrices, by one
        compiled call (:func:`fused.gram_run`)."""
        r = self._plan_run(run, reuse)
        n_tasks = len(self.tasks)
        r.grams = np.zeros((int(r.goff[-1]), n_tasks, n_tasks))
        short = np.full(2, -1, np.int64)
        with self.shared.spent.timed("loops"):
            fused.gram_run(r.fds, r.starts, r.nbytes, r.boff, r.mfds, r.mstarts, r.mbytes,
                           r.poff, r.buf, r.packed, r.like, r.bf16, self.tv, r.seg_len, r.goff,
                           r.grams, r.based, short)
        if short[0] >= 0:
            self._name_short(r.chunks[short[0]], bool(short[1]))
        return r

    def _apply_run(self, r: "_Run", coef: np.ndarray, read: bool = False) -> None:
        """Fuses a run's chunks with their segments' coefficients (float64 ``[S, N]``, rounded
        to float32 as :func:`fused.apply_chunk` does), reading them first where ``read`` (else
        :meth:`_read_run` read them), by one compiled call; writes them at once and adds their
        counts."""
        counts = np.zeros((len(r.chunks), 2), np.int64)
        short = np.full(2, -1, np.int64)
        coef32 = np.ascontiguousarray(coef, dtype=np.float32)
        with self.shared.spent.timed("loops"):
            fused.apply_run(read, r.fds, r.starts, r.nbytes, r.boff, r.mfds, r.mstarts,
                            r.mbytes, r.poff, r.buf, r.packed, r.like, r.bf16, self.tv, coef32,
                            r.seg_len, r.goff, self.ctx.cfg.overlap == "max-magnitude",
                            r.based, r.out, counts, short)
        if short[0] >= 0:
            self._name_short(r.chunks[short[0]], bool(short[1]))
        total = int(r.nbytes.sum())
        first = r.chunks[0]
        with self.shared.spent.timed("writes"):
            self.writer.write_range(self.writer.offsets[first.name]
                                    + first.flat_start * r.dtype.itemsize, r.out[:total])
        with self.lock:
            for c, (union, multi) in zip(r.chunks, counts.tolist()):
                self.counts[c.name][0] += union
                self.counts[c.name][1] += multi
            if self.shared.bar is not None:
                self.shared.bar.update(total)

    def _in_runs(self, name: str) -> bool:
        """Whether the chunks of tensor ``name`` go in runs read into buffers by the compiled
        loops (:meth:`_read_run`; numba, ``read: pread``, bf16 or fp32 in every checkpoint);
        a multi-chunk tensor's a chunk a run (the Gram pass and the apply pass each read
        it)."""
        return (self.runs and self.base.info(name).dtype in _RUN_DTYPES
                and name not in self.ctx.wide)

    def _run_buffers(self, *sizes: int) -> list[np.ndarray]:
        """This thread's buffers for a run (inputs, masks, output), grown as needed and
        reused (fresh memory costs a page fault per 4 KiB)."""
        bufs = getattr(self.local, "run", None) or [np.empty(0, np.uint8)] * len(sizes)
        bufs = [b if b.size >= n else np.empty(n, np.uint8) for b, n in zip(bufs, sizes)]
        self.local.run = bufs
        return bufs

    def _name_short(self, c: Chunk, values: bool) -> None:
        """Raises the error naming the file that came short under a run's compiled read."""
        if not values:
            for m in self._readers()[1]:
                m.read_packed(c.name, c.flat_start // 8, (c.flat_start + c.numel + 7) // 8)
        readers = self._readers()[0]
        nbytes = c.numel * self.base.info(c.name).dtype.itemsize * len(readers)
        read_chunk(readers, c.name, c.row_start, c.row_stop, np.empty(nbytes, np.uint8))
        raise CheckpointError(f"tensor {c.name!r}: a read came short, and again did not")

    def _gram_part(self, st: _Tensor, i0: int, i1: int, nbytes: int) -> None:
        """The Gram partials of a multi-chunk tensor's chunks ``i0:i1``; the last of its tasks
        folds the coefficients and queues the apply tasks."""
        with self.lock:
            if st.cached is None:  # the tensor's first chunk to start: reserve its cache
                # (the numba loops read chunks again instead)
                keep = nbytes <= self.shared.budget and not self.maps
                st.cached, st.reserved = {}, nbytes if keep else -1
                self.shared.budget -= nbytes if keep else 0
        grams, data = {}, {}
        if self._in_runs(st.name):  # one compiled call, each chunk into the same buffer
            for c in st.chunks[i0:i1]:
                self._begin(c)
            r = self._read_run([(c, st.segments) for c in st.chunks[i0:i1]], reuse=True)
            grams = {i0 + k: r.grams[k:k + 1] for k in range(i1 - i0)}
        else:
            for i in range(i0, i1):
                self._begin(st.chunks[i])
                data[i] = self._load(st.chunks[i])
                grams[i] = self._gram(st.chunks[i], data[i], st.segments)
                self._unmap()
        with self.lock:
            for i, g in grams.items():  # summed in chunk order at the end: the same bits on
                st.gram[i] = g  # any threads
            if st.reserved > 0:
                st.cached.update(data)
            st.remaining -= 1
            last = st.remaining == 0
        if st.reserved <= 0:
            for d in data.values():
                self._release(d[3])
        if last:
            coef = fold_coefficients(functools.reduce(np.add, st.gram), self.t)
            for j0, j1 in st.groups:
                self._submit(_APPLY, self._apply_part, st, j0, j1, coef)

    def _apply_part(self, st: _Tensor, i0: int, i1: int, coef: np.ndarray) -> None:
        if self._in_runs(st.name):  # read and fused by one compiled call, written at once
            r = self._plan_run([(c, st.segments) for c in st.chunks[i0:i1]], reuse=True)
            self._apply_run(r, np.repeat(coef, i1 - i0, axis=0), read=True)
            return
        for i in range(i0, i1):
            with self.lock:
                data = st.cached.pop(i, None)
            self._apply(st.chunks[i], data if data is not None else self._load(st.chunks[i]),
                        coef)
            self._unmap()
        with self.lock:
            if st.reserved > 0 and not st.cached:
                self.shared.budget += st.reserved
                st.reserved = 0


_TUNED: set = set()
_TUNE_LOCK = threading.Lock()


def _tune_once(kernels, n_tasks: int, dtype: torch.dtype, tv: bool, overlap: str,
               device: str) -> None:
    """The Triton kernels' autotuning for these settings, once per process, before the shard's
    threads start (concurrent first launches would time each other)."""
    key = (n_tasks, dtype, tv, overlap, device)
    with _TUNE_LOCK:
        if key not in _TUNED:
            kernels.tune(n_tasks, dtype, tv, overlap, device)
            _TUNED.add(key)


def fuse_shards(ctx: FuseContext, shards: list[OutShard], bar=None, finished=None) -> list[dict]:
    """Fuses the tensors of ``shards`` on ``ctx.threads`` threads shared by all of them, and
    writes each; returns per shard its digest and counts. The tasks run in shard order (the
    scheduler's priorities), so memory is bounded as for one shard at a time.

    Each shard is closed (its tied copies written, the last of its bytes hashed) as soon as
    its last task ends, on a thread of its own while the others go on, and then handed to
    ``finished`` (the resumable fuse's journal)."""
    t_start = time.perf_counter()
    fused.load_registries()  # a Ray worker's first loop (the driver's warm() did it there)
    base = _checkpoint(ctx.base)
    shared = _Shared(ctx.threads, ctx.cfg.cache_bytes, bar)
    writers: list[PositionalWriter] = []
    closer = ThreadPoolExecutor(1, thread_name_prefix="close shard")
    closing: dict[str, Future] = {}

    def close(fuser: _ShardFuser) -> dict:
        counts = fuser.finish()
        r = {"file": fuser.shard.file, "digest": fuser.writer.close(),
             "names": list(fuser.shard.names), "counts": counts,
             "device": fuser.device, "backend": fuser.backend}
        if finished is not None:
            finished(r)
        return r

    def done(fuser: _ShardFuser) -> None:
        closing[fuser.shard.file] = closer.submit(close, fuser)

    try:
        with torch_threads(max(1, (os.cpu_count() or 1) // max(1, ctx.threads))):
            for i, shard in enumerate(shards):
                entries = {n: (out_dtype(base, n, ctx.wide_out), base.info(n).shape)
                           for n in shard.names}
                writers.append(PositionalWriter(Path(ctx.out) / shard.file, entries,
                                                {"format": "pt"}))
                fuser = _ShardFuser(ctx, shard, writers[-1], shared)
                fuser.done = done
                fuser.lane = i
                fuser.submit()
            t0 = time.perf_counter()
            try:
                if shared.order:  # cold inputs: one thread asks for them ahead of all threads
                    shared.ahead = ReadAhead(_asks(_by_lanes(shared.order, shared.sched.threads)),
                                             READ_AHEAD * shared.sched.threads)
                with shared.ahead or nullcontext():
                    shared.sched.run()
            except BaseException as e:
                shared.sched.stop(e)  # (Ctrl-C) before the threads' files close under them
                raise
            finally:
                for close_files in shared.closers:
                    close_files()
            t1 = time.perf_counter()
            out = [closing[shard.file].result() for shard in shards]
            _log.debug("fuse %d shard(s): set-up %.2f s, work %.2f s, then closes %.2f s",
                       len(shards), t0 - t_start, t1 - t0, time.perf_counter() - t1)
            busy, spent = shared.sched.busy, shared.spent.snapshot()
            _log.debug("fuse tasks: %.2f s on %d thread(s) (%.0f%% of the work's time): "
                       "compiled loops and kernels %.2f s, reads %.2f s, writes %.2f s, the "
                       "rest (Python, waits for the GIL and for locks) %.2f s", busy,
                       shared.sched.threads,
                       100 * busy / max(1e-9, (t1 - t0) * shared.sched.threads),
                       spent["loops"], spent["reads"], spent["writes"],
                       TimeSplit.rest(busy, spent))
    except BaseException as e:
        shared.sched.stop(e)
        closer.shutdown(wait=True, cancel_futures=True)  # no close runs beside the aborts
        for w in writers:
            w.abort()
        raise
    finally:
        closer.shutdown(wait=True)
    return out


def _by_lanes(order: list, threads: int) -> list:
    """The cold chunks (fuser, chunk) in the order the threads begin them: each thread its
    lane's shards in order (:class:`_Scheduler`), the lanes' sequences merged so that each
    has begun as many elements as the others."""
    lanes: dict[int, list] = {}
    for fuser, c in order:
        lanes.setdefault(fuser.lane % threads, []).append((fuser, c))
    if len(lanes) < 2:
        return order
    heads = [(0, lane, 0) for lane in sorted(lanes)]  # (elements begun, lane, next index)
    merged = []
    while heads:
        done, lane, i = heapq.heappop(heads)
        fuser, c = lanes[lane][i]
        merged.append((fuser, c))
        if i + 1 < len(lanes[lane]):
            heapq.heappush(heads, (done + c.numel, lane, i + 1))
    return merged


def _asks(order: list):
    """The fusion's read-ahead steps (:class:`~cpift_dist.io.read_ahead.ReadAhead`): the cold
    chunks of every shard in the order of their first reads, each asked for by its fuser.

    Each working thread asked for the next chunks itself before, ahead of its own read, and
    waited in ``madvise`` as the analysis's threads did (docs/benchmarks.md); one thread now
    keeps :data:`READ_AHEAD` elements per working thread asked for beyond the chunks begun."""
    for fuser, c in order:
        yield c.numel, functools.partial(fuser._ask, c)


def fuse_shard(ctx: FuseContext, shard: OutShard) -> dict:
    """One output shard (a Ray task): see :func:`fuse_shards`."""
    return fuse_shards(ctx, [shard])[0]


def _config_dtype(path: Path, dtype: str) -> None:
    """Sets the model config's dtype (``dtype``, and ``torch_dtype`` where the file has it):
    transformers loads a checkpoint in its config's dtype by default, which would round the
    fused float32 tensors of widened parameters back to the base's dtype."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable model config ({e})") from None
    if not isinstance(config, dict):
        return
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    path.write_text(json.dumps(config, indent=2) + "\n")


def _read_as(reader, c: Chunk, out: torch.Tensor) -> None:
    """The chunk's rows from ``reader`` into ``out``, widened from the checkpoint's own dtype
    where it differs (exactly: bf16 and fp16 to float32)."""
    own = reader.checkpoint.info(c.name).dtype
    if own == out.dtype:
        reader.read_rows(c.name, c.row_start, c.row_stop, out)
        return
    tmp = torch.empty(c.numel, dtype=own)
    reader.read_rows(c.name, c.row_start, c.row_stop, tmp)
    out.copy_(tmp)


def _unpack(packed: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([unpack_mask(p, n) for p in packed]))


def _core_counts(packed: np.ndarray) -> tuple[int, int]:
    """Elements in any core and in two or more cores, from packed bytes (popcounts)."""
    union = np.bitwise_or.reduce(packed, axis=0)
    multi = np.zeros_like(union)
    for i in range(len(packed)):
        for j in range(i + 1, len(packed)):
            multi |= packed[i] & packed[j]
    return int(np.bitwise_count(union).sum()), int(np.bitwise_count(multi).sum())


def check_masks(base: Checkpoint, masks_dir: Path, tasks: list[str]) -> dict[str, str]:
    """The mask file of every task, checked against the base model.

    Raises:
        MaskError: a missing file, a mask of another task, or one made for another model.
    """
    shapes = {n: base.info(n).shape for n in base.names()
              if base.info(n).dtype.is_floating_point}
    out = {}
    for t in tasks:
        path = Path(masks_dir) / f"{t}.safetensors"
        m = MaskFile(path)
        if m.task != t:
            raise MaskError(f"{path}: this is the core mask of task {m.task!r}, not {t!r}")
        m.check_model(shapes, str(base.path))
        m.close()
        out[t] = str(path)
    return out


RESUME_DIR = ".resume"
"""In a partial fusion output: ``key`` (what its bytes depend on) and ``shards.jsonl``."""


class _Journal:
    """The finished shards of a resumable fuse, in its partial output
    (:func:`~cpift_dist.io.atomic.atomic_dir`): ``.resume/key`` holds the digest of everything
    the output's bytes depend on, ``.resume/shards.jsonl`` one line per shard written whole
    (its result, digest and size), appended as each shard closes. A partial output made from
    other inputs or settings is cleared; one made from these keeps its journaled shards once
    they are checked again (:meth:`keep`)."""

    def __init__(self, tmp: Path, key: str):
        self.tmp, self.dir = tmp, tmp / RESUME_DIR
        self.entries: dict[str, dict] = {}
        self.lock = threading.Lock()
        try:
            same = (self.dir / "key").read_text() == key
        except OSError:
            same = False
        if not same:
            for p in tmp.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            self.dir.mkdir()
            (self.dir / "key").write_text(key)
        else:
            for line in _lines(self.dir / "shards.jsonl"):
                try:
                    r = json.loads(line)
                    self.entries[r["file"]] = r
                except (ValueError, KeyError, TypeError):
                    continue  # a line torn by a crash
        self.fh = open(self.dir / "shards.jsonl", "a")

    def keep(self, shards: list[OutShard]) -> list[dict]:
        """The results of the journaled shards whose files still hold what was journaled (the
        size, then the digest re-hashed, a file per core); the others are fused again."""
        planned = {s.file: list(s.names) for s in shards}
        maybe = [r for f, r in self.entries.items() if planned.get(f) == r.get("names")
                 and (self.tmp / f).is_file() and (self.tmp / f).stat().st_size == r.get("bytes")]
        digests = file_digests([self.tmp / r["file"] for r in maybe])
        self.entries = {r["file"]: r for r, d in zip(maybe, digests) if d == r["digest"]}
        for f in planned.keys() - self.entries.keys():  # rewritten: their room counts as free
            (self.tmp / f).unlink(missing_ok=True)
        self.fh.close()
        self.fh = open(self.dir / "shards.jsonl", "w")  # only what is kept
        for r in self.entries.values():
            self.fh.write(json.dumps(r) + "\n")
        self.fh.flush()
        return list(self.entries.values())

    def add(self, result: dict) -> None:
        """Records a shard written whole (on the thread that closed it)."""
        result = dict(result, bytes=(self.tmp / result["file"]).stat().st_size)
        with self.lock:
            self.fh.write(json.dumps(result) + "\n")
            self.fh.flush()
            self.entries[result["file"]] = result
        fault_point("fuse_journal")

    def __len__(self) -> int:
        return len(self.entries)

    def close(self, remove: bool = False) -> None:
        self.fh.close()
        if remove:
            shutil.rmtree(self.dir)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def fuse(base: str | Path, tuned: dict[str, str | Path], masks_dir: str | Path,
         out: str | Path, cfg: FusionConfig | None = None, executor=None,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Builds the fused backbone (DESIGN.md §1.4) as an HF checkpoint in ``out``.

    Args:
        base: base checkpoint (theta0); its config and tokenizer files are copied.
        tuned: task -> fine-tuned checkpoint, in task order (the SLERP fold order).
        masks_dir: directory with ``<task>.safetensors`` core masks (``cpift analyze``).
        cfg: fusion settings.
        executor: where output shards are fused (in-process by default).

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        CpiftError: incompatible checkpoints, missing or foreign masks, unwritable output.
    """
    t_check = time.perf_counter()
    cfg = cfg or FusionConfig()
    executor = executor or InProcessExecutor()
    if not tuned:
        raise CpiftError("no tuned checkpoints given (--tuned NAME=DIR)")
    base_ck = Checkpoint(base)
    base_ck.check_tied()
    tuned_cks = []
    for p in tuned.values():
        tuned_cks.append(Checkpoint(p))
        compare_checkpoints(base_ck, tuned_cks[-1])
        tuned_cks[-1].check_tied()
    wide = widened(base_ck, tuned_cks)  # fused in float32
    wide_out = wide if cfg.widened_dtype == "float32" else frozenset()  # written in float32
    t0 = time.perf_counter()
    mask_files = check_masks(base_ck, Path(masks_dir), list(tuned))
    shards = plan_shards(base_ck, cfg.max_shard_bytes, wide_out)
    device, backend = _device_and_backend(cfg)
    if device == "cuda" and not torch.cuda.is_available():
        raise CpiftError("fusion.device=cuda but no CUDA device is available")
    if backend == "numba":
        fused.warm({torch.bfloat16 if out_dtype(base_ck, n, wide) == torch.bfloat16
                    else torch.float32
                    for n in base_ck.names() if base_ck.info(n).dtype.is_floating_point})
        if wide:  # the compiled widening of bf16 chunks, loaded before the threads start
            kernel_view(np.zeros(2, np.uint8), torch.bfloat16, wide=True)
    base_digest = checkpoint_digest(base)
    tuned_digests = {t: checkpoint_digest(p) for t, p in tuned.items()}
    key = sha256_json({  # everything the output's bytes depend on (threads and memory aside)
        "config": cfg.model_dump(mode="json", exclude={"cache_bytes"}), "device": device,
        "backend": backend, "tasks": list(tuned), "base": base_digest, "tuned": tuned_digests,
        "masks": {t: file_stamp(p) for t, p in mask_files.items()},
        "shards": [[sh.file, list(sh.names)] for sh in shards]})
    t1 = time.perf_counter()
    journal: list[_Journal] = []
    with atomic_dir(out, overwrite=overwrite, keep=lambda: bool(journal and len(journal[0]))
                    ) as tmp, ThreadPoolExecutor(1) as hasher:
        journal.append(_Journal(tmp, key))
        kept = journal[0].keep(shards)
        todo = [sh for sh in shards if sh.file not in {r["file"] for r in kept}]
        check_room(tmp, sum(out_bytes(base_ck, n, wide_out) for sh in todo for n in sh.names),
                   Path(out), "the fused backbone" + (f" ({len(todo)} of its {len(shards)} "
                                                      "shards still to write)" if kept else ""))
        if kept:
            _log.info("fuse: %d of %d shards kept from an interrupted run into %s", len(kept),
                      len(shards), out)
        # the masks' digests (inputs, read-only) while the shards fuse, not after them
        mask_digests = hasher.submit(file_digests, list(mask_files.values()))
        threads = getattr(executor, "threads", None) or max(1, int(executor.num_cpus))
        ctx = FuseContext(str(base), {t: str(p) for t, p in tuned.items()}, mask_files,
                          str(tmp), cfg, threads, wide)
        results = list(kept)
        if todo and isinstance(executor, InProcessExecutor):  # the threads share all the work
            sizes = [sum(out_bytes(base_ck, n, wide_out) for n in sh.names
                         if n not in base_ck.tied) for sh in shards]
            with tqdm(total=sum(sizes), desc="fuse", unit="B", unit_scale=True,
                      disable=not progress, leave=False,
                      initial=sum(z for sh, z in zip(shards, sizes) if sh not in todo)) as bar:
                results += fuse_shards(ctx, todo, bar, journal[0].add)
        elif todo:
            for _, r in tqdm(executor.map(fuse_shard, ctx, [(s,) for s in todo]),
                             total=len(shards), initial=len(kept), desc="fuse shards",
                             unit="shard", disable=not progress, leave=False):
                journal[0].add(r)
                results.append(r)
        t2 = time.perf_counter()
        results.sort(key=lambda r: r["file"])
        outputs = {r["file"]: r["digest"] for r in results}
        if len(shards) > 1:
            weight_map = {n: r["file"] for r in results for n in r["names"]}
            total = sum(out_bytes(base_ck, n, wide_out) for n in base_ck.tensors)
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
            outputs[INDEX_NAME] = file_digest(tmp / INDEX_NAME)
        for f in sorted(Path(base).iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in (
                    INDEX_NAME, "manifest.json"):
                shutil.copy(f, tmp / f.name)
                if f.name == "config.json" and wide_out:
                    _config_dtype(tmp / f.name, "float32")
                outputs[f.name] = file_digest(tmp / f.name)
        counts = {n: c for r in results for n, c in r["counts"].items()}
        digests = {"base": base_digest}
        digests.update({f"tuned/{t}": d for t, d in tuned_digests.items()})
        digests.update({f"masks/{t}": d for t, d in zip(mask_files, mask_digests.result())})
        man = write_manifest(tmp, "fuse", cfg.model_dump(mode="json"), digests, outputs, extra={
            "tasks": list(tuned),
            "fold_weights": fold_weights(len(tuned), cfg.omega),
            "device": device, "backend": backend, "executor": executor.name,
            "core_elements": sum(c["core"] for c in counts.values()),
            "overlap_elements": sum(c["overlap"] for c in counts.values()),
            "per_tensor": counts,
            "widened": {"parameters": sorted(wide), "written_in": cfg.widened_dtype},
            "resumed_shards": len(kept),
        })
        journal[0].close(remove=True)
        _log.debug("fuse: checks %.2f s, numba's loops %.2f s, shards %.2f s, the rest %.2f s",
                   t0 - t_check, t1 - t0, t2 - t1, time.perf_counter() - t2)
    return man
