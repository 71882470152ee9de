"""Writing safetensors piece by piece, from several threads, with the header first.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a fused shard
or a mask of a large model would then cost its whole size in RAM. The format is simple (an
8-byte little-endian header length, a JSON header with dtype, shape and data offsets per
tensor, then the bytes), so with shapes known up front the header is written first, the file
sized, and every piece written at its own offset as soon as it is computed. Files are read back
with safetensors itself (tested).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from pathlib import Path

import numpy as np
import torch

from cpift_dist.errors import CpiftError
from cpift_dist.io.manifest import file_hash, hash_update

DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def build_header(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included, padded to 8) and each tensor's data size."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    sizes, off = {}, 0
    for name, (dtype, shape) in entries.items():
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape),
                        "data_offsets": [off, off + n]}
        sizes[name] = n
        off += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb, sizes


class PositionalWriter:
    """Writes one safetensors file whose header is known up front: tensors or row ranges in
    any order, from any thread, each ``pwrite`` at its precomputed offset, and hashed
    (:func:`~cpift_dist.io.manifest.file_hash`) in file order as the written prefix grows.
    A write that extends the hashed prefix is hashed from the caller's buffer by the writing
    thread, while the bytes are in its caches; what was written ahead of the prefix is hashed
    later by a background thread, read back from the file. Measured on the 2-core VM: BLAKE3
    over a 1-4 MiB buffer in cache at 6.3 GB/s, against 2.9-3.4 GB/s read back through maps
    of a tmpfs file (or ``pread``); the fuser writes each shard's runs in order, 8-16 MiB at a
    time, and its hashing of the 1.1B pair's output fell from 0.84 to 0.60 CPU-s (``perf``).

    Use :meth:`write` for the bytes of a tensor from a byte offset, :meth:`close` to finish
    (every byte written exactly once, else an error naming the first incomplete tensor) and get
    its digest; :meth:`abort` on failure.

    Raises:
        CpiftError: a write outside its tensor, twice over the same bytes, or an incomplete file.
    """

    def __init__(self, path: str | Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None, hash_block: int = 1 << 24):
        self.path = Path(path)
        self.entries = dict(entries)
        header, sizes = build_header(self.entries, metadata)
        self.offsets, off = {}, len(header)
        self.data_start = len(header)
        for name, n in sizes.items():
            self.offsets[name] = off
            off += n
        self._sizes = sizes
        self.size = off
        self._block = hash_block
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self.size)
        self._pwrite(memoryview(header), 0)
        self._cv = threading.Condition()
        self._ranges: dict[int, int] = {}  # start -> end of written ranges past the frontier
        self._frontier = len(header)  # bytes [0, frontier) are written
        self._closing = False
        self._error: BaseException | None = None
        self._hash_of = file_hash()
        self._hash_of.update(header)
        self._hashed = len(header)  # bytes [0, hashed) are in the hash
        self._hashing = False  # a thread is adding bytes to the hash
        self._aborted = False  # the digest no longer matters: the hasher stops at once
        self._hasher = threading.Thread(target=self._hash, name=f"hash {self.path.name}",
                                        daemon=True)
        self._hasher.start()

    def write(self, name: str, data: torch.Tensor | np.ndarray, byte_offset: int = 0) -> None:
        """Writes ``data`` (its raw bytes) into tensor ``name`` from ``byte_offset``."""
        if isinstance(data, torch.Tensor):
            if data.dtype != self.entries[name][0]:
                raise CpiftError(f"{self.path}: tensor {name!r}: dtype {data.dtype}, expected "
                                 f"{self.entries[name][0]}")
            data = data.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        mv = memoryview(np.ascontiguousarray(data)).cast("B")
        if byte_offset < 0 or byte_offset + len(mv) > self._sizes[name]:
            raise CpiftError(f"{self.path}: tensor {name!r}: bytes {byte_offset}.."
                             f"{byte_offset + len(mv)} outside its {self._sizes[name]}")
        if not len(mv):
            return
        self._record(mv, self.offsets[name] + byte_offset,
                     f"tensor {name!r}: bytes from {byte_offset}")

    def write_range(self, start: int, data: np.ndarray) -> None:
        """Writes ``data`` (its raw bytes) at file offset ``start`` of the tensors' data: a
        range of consecutive tensors in one call (the fuser's runs of chunks)."""
        mv = memoryview(np.ascontiguousarray(data)).cast("B")
        if start < self.data_start or start + len(mv) > self.size:
            raise CpiftError(f"{self.path}: bytes {start}..{start + len(mv)} outside the "
                             f"tensors' data ({self.data_start}..{self.size})")
        if len(mv):
            self._record(mv, start, f"bytes from offset {start}")

    def _record(self, mv: memoryview, start: int, what: str) -> None:
        """Writes ``mv`` at ``start``, moves the written prefix past it when it can, and hashes
        it from ``mv`` where it is the next range to hash and no thread hashes now."""
        self._pwrite(mv, start)
        with self._cv:
            if start < self._frontier or start in self._ranges:
                raise CpiftError(f"{self.path}: {what} written twice")
            self._ranges[start] = start + len(mv)
            advanced = False
            while self._frontier in self._ranges:
                self._frontier = self._ranges.pop(self._frontier)
                advanced = True
            mine = not self._hashing and self._hashed == start  # then start was the frontier
            self._hashing |= mine
            if advanced and not mine:
                self._cv.notify_all()
        if not mine:
            return
        try:
            self._hash_of.update(mv)
        except BaseException as e:
            self._error = e  # the digest is wrong: close() reports it
            raise
        finally:
            with self._cv:
                self._hashed = start + len(mv)
                self._hashing = False
                self._cv.notify_all()  # the background hasher: written ranges past this one

    def copy(self, source: str, name: str) -> None:
        """Writes tensor ``name`` as a byte copy of the complete tensor ``source`` (a stored
        tied copy), read back from this file in blocks."""
        if self.entries[name] != self.entries[source]:
            raise CpiftError(f"{self.path}: tensor {name!r} cannot repeat {source!r} "
                             "(dtype or shape differ)")
        for at in range(0, self._sizes[source], self._block):
            n = min(self._block, self._sizes[source] - at)
            data = os.pread(self._fd, n, self.offsets[source] + at)
            self.write(name, np.frombuffer(data, np.uint8), at)

    def _pwrite(self, mv: memoryview, pos: int) -> None:
        done = 0
        while done < len(mv):
            done += os.pwrite(self._fd, mv[done:], pos + done)

    def _hash(self) -> None:
        """Hashes, read back from the file, the written bytes no writing thread hashed."""
        try:
            while True:
                with self._cv:
                    while not self._aborted and (self._hashing or (
                            self._frontier == self._hashed and not self._closing)):
                        self._cv.wait()
                    start, target = self._hashed, self._frontier
                    if self._aborted or target == start:
                        return  # aborted; or closing, and every written byte is hashed
                    self._hashing = True
                try:
                    hash_update(self._hash_of, self._fd, start, target)
                finally:
                    with self._cv:
                        self._hashed = target
                        self._hashing = False
                        self._cv.notify_all()
        except BaseException as e:  # reported by close()
            self._error = e

    def close(self) -> str:
        """Checks every byte was written; returns the file's digest (as manifests record it)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._hasher.join()
        os.close(self._fd)
        self._fd = -1
        if self._frontier != self.size:
            first = next(n for n in self.entries
                         if self.offsets[n] + self._sizes[n] > self._frontier)
            raise CpiftError(f"{self.path}: tensor {first!r} was not written whole")
        if self._error is not None:
            raise CpiftError(f"{self.path}: hashing failed ({self._error})")
        return self._hash_of.hexdigest()

    def abort(self) -> None:
        """Stops the hasher and closes the file (after an error; the file is incomplete). Does
        nothing after :meth:`close`."""
        if self._fd < 0:
            return
        with self._cv:  # not waiting for a writer that may still hash (or died hashing)
            self._closing = self._aborted = True
            self._cv.notify_all()
        self._hasher.join()
        os.close(self._fd)
        self._fd = -1
