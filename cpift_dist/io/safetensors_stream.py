"""Writing safetensors tensor by tensor, chunk by chunk, with the header first.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once; a fused shard
or a mask of a large model would then cost its whole size in RAM. The format is simple (an
8-byte little-endian header length, a JSON header with dtype, shape and data offsets per
tensor, then the bytes), so with shapes known up front the header is written first and the
data appended in header order. Files are read back with safetensors itself (tested).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from cpift_dist.errors import CpiftError

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


class SequentialWriter:
    """Writes one safetensors file: header now, then tensors in ``entries`` order, each in one
    or more consecutive chunks; hashes (sha256) as it writes.

    Raises:
        CpiftError: a tensor written out of order, with the wrong dtype, or not to its size.
    """

    def __init__(self, path: str | Path, entries: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.entries = dict(entries)
        header, self._sizes = build_header(self.entries, metadata)
        self._order = list(self.entries)
        self._i, self._written = 0, 0
        self._sha = hashlib.sha256(header)
        self._header_len = len(header)
        self._f = open(self.path, "wb")
        self._f.write(header)

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Appends ``chunk`` (flattened, contiguous) to tensor ``name``."""
        if self._i < len(self._order) and self._order[self._i] != name \
                and self._written == self._sizes[self._order[self._i]]:
            self._i, self._written = self._i + 1, 0
        if self._i >= len(self._order) or self._order[self._i] != name:
            raise CpiftError(f"{self.path}: tensor {name!r} written out of order")
        if chunk.dtype != self.entries[name][0]:
            raise CpiftError(f"{self.path}: tensor {name!r}: dtype {chunk.dtype}, expected "
                             f"{self.entries[name][0]}")
        data = chunk.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        if self._written + data.nbytes > self._sizes[name]:
            raise CpiftError(f"{self.path}: tensor {name!r}: more data than its shape holds")
        self._f.write(data)
        self._sha.update(data)
        self._written += data.nbytes

    def repeat(self, source: str, name: str, block: int = 1 << 24) -> None:
        """Writes tensor ``name`` as a byte copy of the already written tensor ``source`` (a
        stored tied copy), read back from this file in blocks: no second computation, memory
        bounded by ``block``."""
        if self.entries[name] != self.entries[source]:
            raise CpiftError(f"{self.path}: tensor {name!r} cannot repeat {source!r} "
                             "(dtype or shape differ)")
        self._f.flush()
        off = self._header_len + self._offset(source)
        done, size = 0, self._sizes[source]
        with open(self.path, "rb") as f:
            while done < size:
                f.seek(off + done)
                data = f.read(min(block, size - done))
                if not data:
                    raise CpiftError(f"{self.path}: tensor {source!r} not written before "
                                     f"its copy {name!r}")
                self.write(name, torch.frombuffer(bytearray(data), dtype=torch.uint8)
                           .view(self.entries[name][0]))
                done += len(data)

    def _offset(self, name: str) -> int:
        off = 0
        for n in self._order:
            if n == name:
                return off
            off += self._sizes[n]
        raise KeyError(name)

    def close(self) -> str:
        """Checks every tensor is complete; returns the file's sha256."""
        last = self._order[self._i] if self._i < len(self._order) else None
        done = self._i + (1 if last is not None and self._written == self._sizes[last] else 0)
        self._f.close()
        if done != len(self._order):
            raise CpiftError(f"{self.path}: tensor {self._order[done]!r} was not written whole")
        return self._sha.hexdigest()
