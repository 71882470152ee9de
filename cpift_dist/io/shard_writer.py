"""Writes HF sharded safetensors (``model-0000i-of-0000n.safetensors`` + index) with bounded memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save

from cpift_dist.io.checkpoint import INDEX_NAME, SINGLE_NAME
from cpift_dist.io.manifest import file_hash


class ShardWriter:
    """Accumulates tensors up to ``max_shard_bytes`` per shard, then writes the shard.

    Memory is bounded by about twice the shard size. Shard file names are final only at
    :meth:`close` (the shard count is known then); write into a temporary directory (see
    :func:`cpift_dist.io.atomic.atomic_dir`) so a crash never leaves a partial checkpoint.
    A single shard is written as ``model.safetensors`` without an index, as HF does.
    """

    def __init__(self, directory: str | Path, max_shard_bytes: int = 2 << 30,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.max_shard_bytes = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str], str]] = []  # (tmp path, names, digest)
        self._total = 0
        self.digests: dict[str, str] = {}

    @property
    def shards_written(self) -> int:
        """Shards flushed to disk so far."""
        return len(self._shards)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        data = save(self._pending, metadata=self.metadata)
        path = self.directory / f".shard-{len(self._shards):05d}.safetensors"
        path.write_bytes(data)
        self._shards.append((path, list(self._pending), file_hash().update(data).hexdigest()))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Writes the last shard and the index; returns file name -> digest (as manifests
        record it)."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (tmp, names, digest) in enumerate(self._shards):
            fname = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            tmp.rename(self.directory / fname)
            self.digests[fname] = digest
            weight_map.update({nm: fname for nm in names})
        if n > 1:
            index = {"metadata": {"total_size": self._total},
                     "weight_map": dict(sorted(weight_map.items()))}
            text = json.dumps(index, indent=2) + "\n"
            (self.directory / INDEX_NAME).write_text(text)
            self.digests[INDEX_NAME] = file_hash().update(text.encode()).hexdigest()
        return self.digests
