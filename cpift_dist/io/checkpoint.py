"""Lazy, validated access to an HF safetensors checkpoint directory.

A checkpoint is either a single ``model.safetensors`` or several shards listed by
``model.safetensors.index.json``. Only headers are read when it is opened; tensors are read on
demand, whole or in row chunks, so memory is bounded by what the caller asks for.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import mmap
import os
import struct
import sys
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from cpift_dist.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, read from a safetensors header."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0
    """Absolute byte offset of the tensor's data in ``file``."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def row_numel(self) -> int:
        """Elements per row of dim 0 (a 0-d or 1-d tensor has rows of one element)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


class Checkpoint:
    """An opened checkpoint directory: its tensors' names, shapes, dtypes and files.

    Raises:
        CheckpointError: the directory is missing, has no safetensors weights, its index is
            malformed or points outside the directory, or a file is corrupt or truncated.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: checkpoint directory does not exist")
        root = self.path.resolve()
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = _read_index(index)
            files = {}
            for name, rel in weight_map.items():
                if rel not in files:  # each shard checked once, not once per tensor
                    file = (self.path / rel)
                    if Path(rel).is_absolute() or not _inside(file.resolve(), root):
                        raise CheckpointError(f"{index}: entry {name!r} points outside the "
                                              f"checkpoint directory: {rel!r}")
                    if not file.is_file():
                        raise CheckpointError(
                            f"{index}: shard {rel!r} of tensor {name!r} is missing")
                files.setdefault(rel, []).append(name)
        elif (self.path / SINGLE_NAME).is_file():
            weight_map = None
            files = {SINGLE_NAME: None}
        else:
            bins = sorted(p.name for p in self.path.glob("*.bin"))
            hint = f" (found {bins[0]}: pickle checkpoints are not read)" if bins else ""
            raise CheckpointError(
                f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")

        self.tensors: dict[str, TensorInfo] = {}
        for rel, listed in sorted(files.items()):
            file = self.path / rel
            header = read_header(file)
            if listed is not None:
                missing = sorted(set(listed) - set(header))
                if missing:
                    raise CheckpointError(
                        f"{file}: tensor {missing[0]!r} listed in {INDEX_NAME} is not in this shard")
                extra = sorted(set(header) - set(listed))
                if extra:
                    raise CheckpointError(
                        f"{file}: tensor {extra[0]!r} is in this shard but not in {INDEX_NAME}")
            for name, (dtype, shape, offset) in header.items():
                if name in self.tensors:
                    raise CheckpointError(f"{file}: tensor {name!r} appears in two shards")
                self.tensors[name] = TensorInfo(name, file, dtype, shape, offset)
        self.files = sorted({t.file for t in self.tensors.values()})
        self.tied: dict[str, str] = tied_copies(self.path, self.tensors)
        """Stored tied copies: alias (e.g. ``lm_head.weight``) -> the parameter it repeats
        (``model.embed_tokens.weight``). One parameter: counted, masked and fused once."""

    def names(self) -> list[str]:
        """Parameter names in the canonical (sorted) order used for ties and plans: every
        stored tensor except the tied copies in :attr:`tied`."""
        return sorted(n for n in self.tensors if n not in self.tied)

    def stored_names(self) -> list[str]:
        """Every tensor the files hold, tied copies included (sorted)."""
        return sorted(self.tensors)

    def check_tied(self, block_bytes: int = 1 << 24) -> None:
        """Checks that every stored tied copy equals its parameter, byte for byte (streamed).

        Raises:
            CheckpointError: naming both tensors and their files.
        """
        for alias, name in sorted(self.tied.items()):
            a, b = self.tensors[alias], self.tensors[name]
            rows = max(1, block_bytes // max(1, b.row_numel * b.dtype.itemsize))
            with self.reader() as ra, self.reader() as rb:
                for r0 in range(0, b.rows, rows):
                    r1 = min(b.rows, r0 + rows)
                    if not torch.equal(ra.read_rows(alias, r0, r1).view(torch.uint8),
                                       rb.read_rows(name, r0, r1).view(torch.uint8)):
                        raise CheckpointError(
                            f"{self.path}: tied tensors differ: {alias!r} ({a.file.name}) is "
                            f"not equal to {name!r} ({b.file.name}), although the config "
                            "ties them (tie_word_embeddings); re-export the checkpoint with "
                            "one value, or untie it in config.json")

    def __len__(self) -> int:
        return len(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def reader(self) -> "CheckpointReader":
        """A context manager that keeps files open for a batch of reads, then releases them."""
        return CheckpointReader(self)

    def read(self, name: str) -> torch.Tensor:
        """Reads one whole tensor."""
        with self.reader() as r:
            return r.read(name)


class CheckpointReader:
    """Open files of one checkpoint for a batch of reads (closed on exit).

    Row chunks are read with ``preadv`` straight into a reused buffer at the offsets the
    (validated) safetensors header gives, or mapped (:meth:`map_rows`) where a compiled loop
    reads them once: no copy at all.
    """

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self._fds: dict[Path, int] = {}
        self._random_fds: dict[Path, int] = {}  # opened apart: see gather_rows
        self._maps: dict[Path, mmap.mmap] = {}
        self._buf = torch.empty(0, dtype=torch.uint8)
        self._mapped: list[tuple[mmap.mmap, int, int]] = []
        self._where: dict[str, tuple[int, int, int]] = {}

    def span(self, name: str) -> tuple[int, int, int]:
        """Tensor ``name``'s file descriptor (opened here), data offset and bytes per row of
        dim 0, looked up once (compiled reads take them for many chunks)."""
        got = self._where.get(name)
        if got is None:
            info = self.checkpoint.info(name)
            got = self._where[name] = (self._fd(info.file), info.offset,
                                       info.row_numel * info.dtype.itemsize)
        return got

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.drop_mapped()
        for fd in (*self._fds.values(), *self._random_fds.values()):
            os.close(fd)
        self._fds.clear()
        self._where.clear()
        self._random_fds.clear()
        self._maps.clear()
        self._buf = torch.empty(0, dtype=torch.uint8)

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise CheckpointError(f"{file}: cannot open ({e.strerror})") from None
        return fd

    def map_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of dim 0 as a read-only uint8 array over a memory map of the
        file: no copy. Measured on 2 cores, reading 2.8 GB from page cache into a compiled
        loop: 0.29 s from maps against 1.3 s with ``preadv`` into a buffer, and 2 threads
        1.6x faster than one. The whole file is mapped once per process (:func:`_file_map`;
        mapping each chunk instead serialises threads on the address-space lock), and
        :meth:`drop_mapped` drops the pages a reader handed out from this process's page
        tables, so that only the chunks in flight count in its resident set.

        Raises:
            CheckpointError: the file is shorter than its header says (checked here: touching
                a page past the end of a mapped file would kill the process with SIGBUS).
        """
        info = self.checkpoint.info(name)
        row_bytes = info.row_numel * info.dtype.itemsize
        begin, end = info.offset + start * row_bytes, info.offset + stop * row_bytes
        if end == begin:
            return np.zeros(0, np.uint8)
        mm = self._map(info.file)
        if len(mm) < end:
            raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
        page = begin - begin % mmap.PAGESIZE
        self._mapped.append((mm, page, end - page))
        return np.frombuffer(mm, np.uint8, end - begin, begin)

    def gather_rows(self, parts: list[tuple[str, np.ndarray]], out: np.ndarray) -> np.ndarray:
        """Row ranges of tensors, ``parts = [(name, ranges), ...]`` with ``ranges`` an int64
        array ``[m, 2]`` of (start, stop) rows of dim 0, concatenated in that order into the
        first bytes of ``out`` (a contiguous uint8 array large enough); returns a view of it.

        For a sparse sample of rows (the analysis's sample pass): ``pread`` of each range, all
        in one compiled call that releases the GIL (:func:`cpift_dist.io.gather.gather`), from
        this reader's own descriptor of each file, advised for random access
        (``POSIX_FADV_RANDOM``): a range not in the page cache reads its own pages only, not
        the device's read-ahead around them. Through a file map, every sampled row's page fault
        mapped 16 pages around it (the kernel's fault-around) and the pass then unmapped them:
        the kernel's page-table work and TLB shootdowns were 55% of the sample pass's CPU time
        (perf, 348M bf16, 2 threads), for 1/64 of the bytes.

        Raises:
            CheckpointError: a file ends before the rows (truncated).
        """
        from cpift_dist.io.gather import gather

        fds, starts, lengths = self._spans(parts)
        total = int(lengths.sum())
        if out.size < total:
            raise ValueError(f"out holds {out.size} bytes, the rows {total}")
        got = gather(fds, starts, lengths, out)
        if got != total:  # name the tensor whose range came short
            part_bytes = np.cumsum([self._spans([p])[2].sum() for p in parts])
            name = parts[int(np.searchsorted(part_bytes, got, side="right"))][0]
            raise CheckpointError(f"{self.checkpoint.info(name).file}: truncated while "
                                  f"reading tensor {name!r}")
        return out[:total]

    def prefetch_gather(self, parts: list[tuple[str, np.ndarray]]) -> None:
        """Asks the kernel to read the rows a :meth:`gather_rows` of ``parts`` will read, without
        waiting (``POSIX_FADV_WILLNEED`` on the same descriptors, in one compiled call): the
        reads are then in flight together, rather than one ``pread`` at a time."""
        from cpift_dist.io.gather import HAS_FADVISE, WILLNEED, willneed

        if HAS_FADVISE:  # elsewhere the reads are left to gather_rows
            willneed(*self._spans(parts), WILLNEED)

    def _spans(self, parts: list[tuple[str, np.ndarray]]):
        """(descriptors, file offsets, byte lengths) of the row ranges of ``parts``."""
        fds, starts, lengths = [], [], []
        for name, ranges in parts:
            info = self.checkpoint.info(name)
            row_bytes = info.row_numel * info.dtype.itemsize
            b = np.asarray(ranges, np.int64).reshape(-1, 2) * row_bytes
            fds.append(np.full(len(b), self._random_fd(info.file), np.int32))
            starts.append(b[:, 0] + info.offset)
            lengths.append(b[:, 1] - b[:, 0])
        if not parts:
            return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(fds), np.concatenate(starts), np.concatenate(lengths)

    def _map(self, file: Path) -> mmap.mmap:
        """The process's shared map of a file (:func:`_file_map`), looked up once per reader:
        its ``fstat`` released and retook the GIL on every chunk, 4 of a window-pass chunk's 6
        hand-overs between threads. A file truncated while a reader is open was, and is, a
        race that no check before the reads closes; one truncated before is reported by
        :meth:`map_rows`."""
        mm = self._maps.get(file)
        if mm is None:
            mm = self._maps[file] = _file_map(self._fd(file))
        return mm

    def _random_fd(self, file: Path) -> int:
        """A descriptor of the file opened apart from :meth:`_fd`'s (whose open file the shared
        maps may use: its read-ahead state must stay the default), advised for random reads."""
        fd = self._random_fds.get(file)
        if fd is None:
            fd = self._fd(file)  # names the file in the error where it cannot be opened
            fd = self._random_fds[file] = os.open(file, os.O_RDONLY)
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return fd

    def prefetch_rows(self, name: str, ranges: list[tuple[int, int]]) -> None:
        """Asks the kernel to read row ranges of a tensor into the page cache, without waiting
        (``MADV_WILLNEED``): the reads are then in flight together, rather than one page fault
        at a time. Ranges past the end of a truncated file are left to :meth:`map_rows`."""
        info = self.checkpoint.info(name)
        row_bytes = info.row_numel * info.dtype.itemsize
        mm = self._map(info.file)
        size = len(mm)
        for start, stop in ranges:
            begin = info.offset + start * row_bytes
            page = begin - begin % mmap.PAGESIZE
            end = min(size, info.offset + stop * row_bytes)
            if end > page:
                _advise(mm, mmap.MADV_WILLNEED, page, end - page)

    def cached(self, points: list[tuple[str, int]]) -> bool:
        """Whether the page holding each (tensor, row)'s first byte is in the page cache
        (``mincore``, about 6 us a page here: callers probe a few rows, not every chunk);
        False where it cannot be told. A kernel that tells the page cache only for files the
        process owns or may write (Linux 5.0 restricted ``mincore`` so) would read a shared
        read-only checkpoint as cold: the callers would then ask for pages already cached,
        which costs the requests' time only (about 20% of a warm sample pass), never the
        results. This VM's kernel (6.18) tells it for another user's read-only file
        (checked)."""
        if _MINCORE is None:
            return False
        vec = ctypes.c_ubyte(0)
        for name, row in points:
            info = self.checkpoint.info(name)
            mm = self._map(info.file)
            at = info.offset + row * info.row_numel * info.dtype.itemsize
            if at >= len(mm):
                continue  # a truncated file: map_rows reports it
            addr = _address(mm) + at - at % mmap.PAGESIZE
            if _MINCORE(addr, 1, ctypes.byref(vec)) != 0 or not vec.value & 1:
                return False
        return True

    def drop_mapped(self) -> None:
        """Drops the pages of every range :meth:`map_rows` handed out since the last call from
        this process's page tables (``MADV_DONTNEED``; the file's page cache stays). Harmless
        for an array still in use: a read-only file map refaults the same bytes."""
        drop_mapped([self])

    def read(self, name: str) -> torch.Tensor:
        """One whole tensor, in its shape (a fresh tensor)."""
        info = self.checkpoint.info(name)
        return self.read_rows(name, 0, info.rows).clone().reshape(info.shape)

    def read_row_ranges(self, name: str, ranges: list[tuple[int, int]],
                        out: torch.Tensor | None = None) -> torch.Tensor:
        """Row ranges ``[(start, stop), ...]`` of dim 0, concatenated and flattened to 1-d.

        The result is a view of this reader's buffer, valid until its next read, or ``out``
        (a contiguous tensor of the rows' dtype and size) when given.
        """
        info = self.checkpoint.info(name)
        row_bytes = info.row_numel * info.dtype.itemsize
        total = sum(b - a for a, b in ranges) * row_bytes
        view = self._target(name, total, out)
        mv = memoryview(view.numpy())
        at = 0
        for a, b in ranges:
            self._pread(info, mv[at:at + (b - a) * row_bytes], info.offset + a * row_bytes, name)
            at += (b - a) * row_bytes
        return view.view(info.dtype)

    def _target(self, name: str, nbytes: int, out: torch.Tensor | None) -> torch.Tensor:
        """The uint8 view a read of ``nbytes`` lands in: ``out``, or this reader's buffer."""
        if out is not None:
            view = out.reshape(-1).view(torch.uint8)
            if view.numel() != nbytes:
                raise ValueError(f"{name}: out holds {view.numel()} bytes, the rows {nbytes}")
            return view
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf[:nbytes]

    def _pread(self, info: TensorInfo, mv: memoryview, pos: int, name: str) -> None:
        done, nbytes = 0, len(mv)
        while done < nbytes:
            got = os.preadv(self._fd(info.file), [mv[done:]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{info.file}: truncated while reading tensor {name!r}")
            done += got

    def read_rows(self, name: str, start: int, stop: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of dim 0 (elements for a 1-d tensor), flattened to 1-d.

        The result is a view of this reader's buffer, valid until its next read, or ``out``
        (a contiguous tensor of the rows' dtype and size) when given.
        """
        info = self.checkpoint.info(name)
        item = info.dtype.itemsize
        row_bytes = info.row_numel * item
        nbytes = (stop - start) * row_bytes
        view = self._target(name, nbytes, out)
        self._pread(info, memoryview(view.numpy()), info.offset + start * row_bytes, name)
        return view.view(info.dtype)


_MAPS: "OrderedDict[tuple, mmap.mmap]" = OrderedDict()
_MAPS_LOCK = threading.Lock()
_MAPS_KEEP = 64  # each map holds a file descriptor (Python's mmap keeps a dup)


try:
    _LIBC = ctypes.CDLL(None, use_errno=True)  # the C library this process links
    _MINCORE = _LIBC.mincore
    _MINCORE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _MADVISE = _LIBC.madvise
    _MADVISE.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):
    _MINCORE = _MADVISE = None
_ADDRESSES: "weakref.WeakKeyDictionary[mmap.mmap, int]" = weakref.WeakKeyDictionary()


def read_chunk(readers: list["CheckpointReader"], name: str, start: int, stop: int,
               out: np.ndarray) -> list[np.ndarray]:
    """Rows ``start:stop`` of tensor ``name`` from each reader's checkpoint, one after the other
    in ``out`` (a contiguous uint8 array large enough): a list of uint8 views of ``out``, one
    per reader. One compiled call (:func:`cpift_dist.io.gather.gather`) reads them all with
    ``pread`` from the readers' main descriptors (the files' read-ahead as usual) and releases
    the GIL once.

    The analysis's full passes read this way (``analysis.read: pread``): a chunk copied into a
    buffer that stays in the CPU's caches costs less than reading it through file maps, whose
    page faults, fault-around and unmapping after the chunk are kernel work per page. Measured
    on 2 cores, 348M bf16, 3 tasks, CPU time of the window pass's loops over 5 runs: 0.68-0.74 s
    on 1M-element chunks read this way (plus 0.99 s of copying) against 1.5-1.6 s on maps
    (docs/benchmarks.md).

    Raises:
        CheckpointError: a file ends before the rows (truncated); names the file and tensor.
    """
    from cpift_dist.io.gather import gather

    fds, starts = row_spans(readers, [(name, start)])
    lengths = np.array([(stop - start) * r.checkpoint.info(name).row_numel *
                        r.checkpoint.info(name).dtype.itemsize for r in readers], np.int64)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(readers) else 0
    if out.size < total:
        raise ValueError(f"out holds {out.size} bytes, the rows {total}")
    got = gather(fds[0], starts[0], lengths, out)
    if got != total:
        k = int(np.searchsorted(ends, got, side="right"))
        raise CheckpointError(f"{readers[k].checkpoint.info(name).file}: truncated while "
                              f"reading tensor {name!r}")
    return [out[int(e - m):int(e)] for e, m in zip(ends, lengths)]


def row_spans(readers: list["CheckpointReader"],
              rows: list[tuple[str, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``rows`` (tensor name, first row) starts in each reader's checkpoint: the
    readers' main descriptors (int32) and byte offsets (int64), both ``[len(rows),
    len(readers)]``, as :func:`read_chunk` and the analysis's compiled window pass read them.
    Each reader looks a tensor up once (:meth:`CheckpointReader.span`)."""
    spans = [[r.span(n) for r in readers] for n, _ in rows]
    fds = np.array([[f for f, _, _ in sp] for sp in spans], np.int32)
    starts = np.array([[o + r0 * b for _, o, b in sp] for sp, (_, r0) in zip(spans, rows)],
                      np.int64)
    return fds.reshape(len(rows), len(readers)), starts.reshape(len(rows), len(readers))


def drop_mapped(readers: list["CheckpointReader"]) -> None:
    """:meth:`CheckpointReader.drop_mapped` of several readers in one compiled call where
    numba is loaded (a chunk's readers drop their pages together, and the GIL is handed over
    once, not once per reader: each hand-over waits for the thread holding it), else one
    ``madvise`` each. The ranges' maps stay referenced through the call, so none is closed
    meanwhile."""
    ranges = [(mm, page, length) for r in readers for mm, page, length in r._mapped]
    for r in readers:
        r._mapped.clear()
    gather = sys.modules.get("cpift_dist.io.gather")
    if gather is None or _MADVISE is None or len(ranges) < 2:
        for mm, page, length in ranges:
            _advise(mm, mmap.MADV_DONTNEED, page, length)
        return
    gather.advise(np.array([_address(mm) + page for mm, page, _ in ranges], np.uint64),
                  np.array([length for *_, length in ranges], np.uint64), mmap.MADV_DONTNEED)


def _address(mm: mmap.mmap) -> int:
    """Where a map starts in this process's address space (looked up once per map)."""
    addr = _ADDRESSES.get(mm)
    if addr is None:
        addr = _ADDRESSES[mm] = np.frombuffer(mm, np.uint8).ctypes.data
    return addr


def _advise(mm: mmap.mmap, option: int, start: int, length: int) -> None:
    """``madvise`` on a page-aligned range of a map, with the GIL released: Python's own
    ``mmap.madvise`` holds it through the call, and dropping a chunk's pages from the page
    tables (``MADV_DONTNEED``, with the TLB shootdowns it sends to the other threads' cores)
    was then 21% of the GIL-holding samples of the sample pass's threads (py-spy, 2 threads,
    348M bf16). Only maps alive in the caller's hands are advised (maps close only when no
    reference is left), so the range is still this map's. Advice is a hint: a failure is
    ignored."""
    if _MADVISE is None:
        with contextlib.suppress(OSError, ValueError):  # a hint: a failure changes nothing
            mm.madvise(option, start, length)
        return
    _MADVISE(_address(mm) + start, length, option)


def _file_map(fd: int) -> mmap.mmap:
    """A read-only map of a whole file, shared by every reader and thread of this process.

    Keyed by the file's identity and version (device, inode, size, mtime), so a file replaced
    at the same path gets a fresh map; the least recently used maps beyond 64 are released
    (their pages stay mapped while an array still uses them)."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    with _MAPS_LOCK:
        mm = _MAPS.get(key)
        if mm is None:
            mm = _MAPS[key] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            while len(_MAPS) > _MAPS_KEEP:
                _MAPS.popitem(last=False)
        else:
            _MAPS.move_to_end(key)
        return mm


def read_header(file: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
    """Names, dtypes, shapes and absolute data offsets of one safetensors file.

    safetensors itself validates the file first (header, offsets, size); the offsets are then
    taken from the header JSON, which safetensors' API does not expose.

    Raises:
        CheckpointError: the file is truncated, has a malformed header or an unsupported dtype.
    """
    try:
        with safe_open(str(file), framework="pt") as f:
            names = list(f.keys())
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except Exception as e:  # SafetensorError, OSError, ValueError...
        raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from None
    out = {}
    for name in names:
        entry = header[name]
        code = entry["dtype"]
        if code not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {code}")
        out[name] = (_DTYPES[code], tuple(int(d) for d in entry["shape"]),
                     8 + n + int(entry["data_offsets"][0]))
    return out


def _read_index(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{index}: malformed index ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map tensor names to file names")
    return wm


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
               "tok_embeddings.weight")


def tied_copies(path: Path, tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """The tied tensors a checkpoint stores twice: alias -> the parameter it repeats.

    Some exports store both ``lm_head.weight`` and a tied ``model.embed_tokens.weight``. They
    are one parameter when ``config.json`` ties them (``tie_word_embeddings``, or the model
    type's default when the key is absent). The pairs come from the model class's
    ``_tied_weights_keys`` (transformers 5: alias -> source) where transformers knows the model
    type, otherwise from the usual names of output heads and input embeddings. A checkpoint
    that stores only one of the two has nothing to dedupe (empty result).
    """
    heads = [n for n in tensors if n.endswith(_HEADS)]
    if not heads or not (path / "config.json").is_file():
        return {}  # the common case: nothing to look up
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable model config ({e})") from None
    if not isinstance(config, dict):
        return {}
    text = config.get("text_config")
    tie = config.get("tie_word_embeddings",
                     text.get("tie_word_embeddings") if isinstance(text, dict) else None)
    if tie is False:
        return {}  # an untied model (most Llamas): no transformers import needed
    pairs = None
    try:  # transformers names the pairs, and the model type's default when the key is absent
        import transformers
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        model_type = config.get("model_type")
        if tie is None and model_type:
            tie = getattr(transformers.AutoConfig.for_model(model_type), "tie_word_embeddings",
                          None)
        cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type, ""), None)
        keys = getattr(cls, "_tied_weights_keys", None)
        if isinstance(keys, dict):
            pairs = dict(keys)
    except Exception:  # an unknown model type, an older transformers: the names decide
        pass
    if not tie:
        return {}
    if pairs is None:
        embeds = [n for n in tensors if n.endswith(_EMBEDDINGS)]
        pairs = {h: embeds[0] for h in heads} if len(embeds) == 1 else {}
    return {a: c for a, c in pairs.items() if a in tensors and c in tensors and a != c
            and tensors[a].shape == tensors[c].shape and tensors[a].dtype == tensors[c].dtype}


MIXABLE = (torch.bfloat16, torch.float16, torch.float32)
"""Dtypes that one parameter may have differently in the base and the tuned checkpoints (a bf16
release fine-tuned and saved in fp32, as DeepSpeed's ``zero_to_fp32`` writes): the analysis
and the fuser widen such a parameter's values to float32, exactly."""


def widened(base: Checkpoint, tuned: list[Checkpoint]) -> frozenset[str]:
    """The base's parameters that some tuned checkpoint stores in another dtype (checked by
    :func:`compare_checkpoints`): compared and fused in float32, to which every
    :data:`MIXABLE` dtype widens exactly (torch's type promotion of any two of them gives the
    same)."""
    return frozenset(n for n in base.names()
                     if any(t.info(n).dtype != base.info(n).dtype for t in tuned))


def compare_checkpoints(base: Checkpoint, tuned: Checkpoint) -> None:
    """Checks that ``tuned`` has exactly ``base``'s parameters with the same shapes, and the
    same dtypes, or two of :data:`MIXABLE` (a bf16 or fp16 base with fp32 fine-tunes, say).

    Parameters, not stored tensors: a tied copy stored by one and not the other (see
    :func:`tied_copies`) is the same model.

    Raises:
        CheckpointError: naming the first missing or extra tensor, or the tensor whose shape
            differs, or whose dtypes differ and cannot be mixed, with both files.
    """
    missing = sorted(set(base.names()) - set(tuned.names()))
    if missing:
        raise CheckpointError(
            f"{tuned.path}: missing tensor {missing[0]!r} present in base {base.path}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(tuned.names()) - set(base.names()))
    if extra:
        raise CheckpointError(
            f"{tuned.path}: extra tensor {extra[0]!r} not present in base {base.path}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for name in base.names():
        b, t = base.tensors[name], tuned.tensors[name]
        if b.shape != t.shape:
            raise CheckpointError(
                f"tensor {name!r}: shape {list(t.shape)} in {t.file} != {list(b.shape)} in {b.file}")
        if b.dtype != t.dtype and not (b.dtype in MIXABLE and t.dtype in MIXABLE):
            raise CheckpointError(
                f"tensor {name!r}: dtype {t.dtype} in {t.file} != {b.dtype} in {b.file} "
                f"(only bfloat16, float16 and float32 may differ)")
