"""Core masks on disk: one safetensors file per task, one packed-bit uint8 tensor per parameter.

Format (DESIGN.md §3): for every parameter, its flattened boolean core mask packed 8 per byte,
``numpy.packbits(mask, bitorder="little")``, stored as a 1-d uint8 tensor of ceil(numel/8)
bytes under the parameter's name. File metadata (all strings, as safetensors requires):
``format`` = ``cpift-core-mask/1``, ``task``, ``p``, ``k``, ``threshold``, ``selection``,
``tensors`` (JSON: name -> {numel, shape}), ``base_digest``, ``tuned_digest``.

The writer is hand-written on purpose: ``safetensors.save_file`` needs every tensor in memory at
once, and a mask of a 70B model is 8.75 GB. The packed bytes are placed at their offsets as
chunks finish, in any order, after room reserved for the header, which is written last (its
JSON padded with spaces, as the format allows). Files are read back with safetensors.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from cpift_dist.analysis.fused import set_bits
from cpift_dist.errors import MaskError
from cpift_dist.io.checkpoint import read_header
from cpift_dist.io.safetensors_stream import build_header

MASK_FORMAT = "cpift-core-mask/1"


def pack_mask(mask: torch.Tensor | np.ndarray) -> np.ndarray:
    """Packs a boolean mask (flattened) into uint8, 8 elements per byte, little bit order."""
    if isinstance(mask, torch.Tensor):
        mask = mask.numpy()
    return np.packbits(mask.reshape(-1), bitorder="little")


def unpack_mask(packed: np.ndarray | torch.Tensor, numel: int) -> np.ndarray:
    """The inverse of :func:`pack_mask`: a flat boolean array of ``numel`` elements."""
    if isinstance(packed, torch.Tensor):
        packed = packed.numpy()
    return np.unpackbits(packed, count=numel, bitorder="little").astype(bool)


def packed_len(numel: int) -> int:
    return (numel + 7) // 8


class MaskWriter:
    """Writes one mask file in place: packed bytes at their offsets as chunks finish, the
    header at close.

    The threshold and counts that the header's metadata records are known only at the end, so
    the data starts after room reserved for the header (:meth:`_reserve`, page-aligned), and
    :meth:`close` writes the header there, its JSON padded with spaces (the safetensors format
    allows trailing whitespace in the header). Before, the bytes went to a scratch file that
    close copied after the header: 0.05 s for the 348M benchmark's 3 masks, and at 70B a
    second write of 26 GB. A header that outgrows its room (it cannot with the metadata the
    analysis and EPI write) is still written, by moving the bytes behind it.

    Args:
        path: output file (written in place: put it in a temporary directory or name).
        shapes: parameter name -> shape, for every parameter of the model.
    """

    def __init__(self, path: str | Path, shapes: dict[str, tuple[int, ...]]):
        self.path = Path(path)
        self.shapes = dict(sorted(shapes.items()))
        self.offsets: dict[str, int] = {}  # file offset of each parameter's packed bytes
        self._base = self._reserve()
        off = self._base
        for name, shape in self.shapes.items():
            self.offsets[name] = off
            off += packed_len(math.prod(shape))
        self._size = off - self._base
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, off)  # zero bits: nothing selected

    def _entries(self) -> dict:
        return {n: (torch.uint8, (packed_len(math.prod(s)),)) for n, s in self.shapes.items()}

    def _tensors_json(self) -> str:
        return json.dumps({n: {"numel": math.prod(s), "shape": list(s)}
                           for n, s in self.shapes.items()}, separators=(",", ":"))

    def _reserve(self) -> int:
        """Bytes before the data: the header without the run's metadata, plus room for it
        (4 KiB, and per parameter twice its name and 48 bytes: a per-tensor selection records
        a threshold per parameter), rounded up to a page."""
        bare, _ = build_header(self._entries(), {"format": MASK_FORMAT,
                                                 "tensors": self._tensors_json()})
        room = len(bare) + 4096 + sum(2 * len(n) + 48 for n in self.shapes)
        return -(-room // mmap.PAGESIZE) * mmap.PAGESIZE

    def write(self, name: str, byte_offset: int, packed: np.ndarray) -> None:
        """Writes packed bytes of parameter ``name`` starting at its byte ``byte_offset``."""
        mv = memoryview(np.ascontiguousarray(packed, dtype=np.uint8)).cast("B")
        at = self.offsets[name] + byte_offset
        done = 0
        while done < len(mv):  # no copy, GIL released (in-process, the scan threads write at once)
            done += os.pwrite(self._fd, mv[done:], at + done)

    def set_bits(self, name: str, positions: np.ndarray) -> None:
        """Sets the bits of flat element ``positions`` (any order) of parameter ``name``."""
        if len(positions) == 0:
            return
        positions = np.ascontiguousarray(positions, dtype=np.int64)
        lo, hi = int(positions.min()) >> 3, (int(positions.max()) >> 3) + 1
        where = self.offsets[name] + lo
        buf = np.empty(hi - lo, np.uint8)
        if os.preadv(self._fd, [buf], where) != len(buf):
            raise MaskError(f"{self.path}: mask file ends early")
        set_bits(buf, positions, 8 * lo)  # compiled (GIL released): numpy's bitwise_or.at
        # took 10-20 ns per position
        os.pwrite(self._fd, buf, where)

    def mapped(self) -> np.ndarray:
        """The packed bytes of every parameter as one writable array over the file (parameter
        ``name`` starts at ``offsets[name] - data_start``), unmapped when the array is freed.
        Writes go through the page cache: :meth:`write` and :meth:`close` see them."""
        if self._size == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(mmap.mmap(self._fd, self._size, offset=self._base), np.uint8)

    @property
    def data_start(self) -> int:
        """File offset of the first parameter's packed bytes (index 0 of :meth:`mapped`)."""
        return self._base

    def close(self, metadata: dict[str, str]) -> None:
        """Writes the header with ``metadata`` before the bytes, and closes the file."""
        meta = {k: str(v) for k, v in metadata.items()}
        meta["format"] = MASK_FORMAT
        meta["tensors"] = self._tensors_json()
        header, _ = build_header(self._entries(), meta)
        try:
            if len(header) <= self._base:
                pad = self._base - len(header)
                os.pwrite(self._fd, struct.pack("<Q", self._base - 8) + header[8:]
                          + b" " * pad, 0)
            else:  # the data moves behind the longer header (a second file, then renamed)
                moved = self.path.with_name(self.path.name + ".moving")
                with open(moved, "wb") as out:
                    out.write(header)
                    out.flush()
                    _copy_range(self._fd, out.fileno(), self._size, len(header), self._base)
                os.replace(moved, self.path)
        finally:
            os.close(self._fd)


def _copy_range(src: int, dst: int, size: int, dst_at: int, src_at: int = 0) -> None:
    """Copies ``size`` bytes of ``src`` from ``src_at`` to ``dst`` at ``dst_at`` in the kernel
    (``copy_file_range``: no trip through Python buffers, the GIL released), falling back to
    pread/pwrite where the file system refuses it."""
    pos = 0
    while pos < size:
        try:
            n = os.copy_file_range(src, dst, size - pos, src_at + pos, dst_at + pos)
        except OSError:
            n = 0
        if n <= 0:
            block = os.pread(src, min(1 << 24, size - pos), src_at + pos)
            if not block:
                raise MaskError(f"mask file ended {size - pos} bytes early")
            n = os.pwrite(dst, block, dst_at + pos)
        pos += n


class MaskFile:
    """A core-mask file opened for reading (validated on open).

    Raises:
        MaskError: the file is missing, not a safetensors file, not a cpift mask, or its
            tensors disagree with its own metadata.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = -1
        if not self.path.is_file():
            raise MaskError(f"{self.path}: mask file does not exist")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata = f.metadata() or {}
                names = list(f.keys())
                lens = {n: f.get_slice(n).get_shape() for n in names}
                dtypes = {n: f.get_slice(n).get_dtype() for n in names}
        except Exception as e:
            raise MaskError(f"{self.path}: corrupt or truncated mask file ({e})") from None
        if self.metadata.get("format") != MASK_FORMAT:
            raise MaskError(f"{self.path}: not a cpift core-mask file (format "
                            f"{self.metadata.get('format')!r}, expected {MASK_FORMAT!r})")
        try:
            tensors = json.loads(self.metadata["tensors"])
            if not isinstance(tensors, dict):  # e.g. "0": a number, not a table of tensors
                raise TypeError(f"a JSON {type(tensors).__name__}, not an object")
            self.numel = {n: int(v["numel"]) for n, v in tensors.items()}
            self.shapes = {n: tuple(int(d) for d in v["shape"]) for n, v in tensors.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise MaskError(f"{self.path}: malformed 'tensors' metadata ({e})") from None
        if set(names) != set(self.numel):
            raise MaskError(f"{self.path}: tensors in the file disagree with its metadata")
        for n in names:
            if dtypes[n] != "U8" or list(lens[n]) != [packed_len(self.numel[n])]:
                raise MaskError(f"{self.path}: tensor {n!r} is not {packed_len(self.numel[n])} "
                                f"packed bytes")
        self.task = self.metadata.get("task", self.path.stem)
        self._offsets = {n: off for n, (_, _, off) in read_header(self.path).items()}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()

    def names(self) -> list[str]:
        return sorted(self.numel)

    def open(self) -> "MaskFile":
        """Opens the file for reads now (else the first read does): then threads may share
        this object, as its reads are positional."""
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self

    def span(self, name: str, start: int = 0) -> tuple[int, int]:
        """The file descriptor and offset of packed byte ``start`` of parameter ``name``, for
        a compiled ``pread`` (the fuser's runs of chunks); the descriptor stays this object's."""
        self.open()
        return self._fd, self._offsets[name] + start

    def read_packed(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Packed bytes ``start:stop`` of parameter ``name`` (pread: no memory map)."""
        total = packed_len(self.numel[name])
        stop = total if stop is None else min(stop, total)
        data = os.pread(self.open()._fd, stop - start, self._offsets[name] + start)
        if len(data) != stop - start:
            raise MaskError(f"{self.path}: truncated while reading {name!r}")
        return np.frombuffer(data, dtype=np.uint8)

    def read(self, name: str) -> torch.Tensor:
        """The boolean core mask of parameter ``name``, in its shape."""
        flat = unpack_mask(self.read_packed(name), self.numel[name])
        return torch.from_numpy(flat).reshape(self.shapes[name])

    def check_model(self, shapes: dict[str, tuple[int, ...]], where: str) -> None:
        """Checks that this mask was made for a model with exactly these tensors and shapes.

        Raises:
            MaskError: naming the first tensor that differs.
        """
        missing = sorted(set(shapes) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(shapes))
        if missing or extra:
            what = (f"has no mask for tensor {missing[0]!r}" if missing
                    else f"has a mask for tensor {extra[0]!r} not in the model")
            raise MaskError(f"{self.path}: made for another model: {what} ({where})")
        for n, s in shapes.items():
            if tuple(s) != self.shapes[n]:
                raise MaskError(f"{self.path}: made for another model: tensor {n!r} has shape "
                                f"{list(self.shapes[n])} in the mask, {list(s)} in {where}")
