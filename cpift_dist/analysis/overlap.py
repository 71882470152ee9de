"""Core-region overlap: popcounts of AND over packed masks, tensor by tensor, block by block."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from cpift_dist.io.checkpoint import read_header

_BLOCK = 1 << 24  # packed bytes per read: 128M elements


def mask_counts(paths: list[Path], names: list[str],
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor core sizes and pairwise intersections of N mask files.

    Tensors are counted on up to one thread per core (numpy's popcount releases the GIL),
    each reading its packed bytes with ``pread`` at the offsets of the (validated) headers.

    Returns:
        counts: int64 [len(names), N], selected elements per tensor and task.
        inter: int64 [N, N], |C_i & C_j| over the whole model (diagonal: |C_i|).
    """
    n = len(paths)
    counts = np.zeros((len(names), n), np.int64)
    inter = np.zeros((n, n), np.int64)
    headers = [read_header(Path(p)) for p in paths]  # validated by safetensors first
    fds = [os.open(p, os.O_RDONLY) for p in paths]

    def one(ti: int) -> np.ndarray:
        name = names[ti]
        length = headers[0][name][1][0]
        part = np.zeros((n, n), np.int64)
        for s in range(0, length, _BLOCK):
            size = min(length, s + _BLOCK) - s
            blocks = [np.frombuffer(os.pread(fd, size, h[name][2] + s), np.uint8)
                      for fd, h in zip(fds, headers)]
            for i in range(n):
                counts[ti, i] += int(np.bitwise_count(blocks[i]).sum(dtype=np.int64))
                for j in range(i + 1, n):
                    part[i, j] += int(np.bitwise_count(blocks[i] & blocks[j]).sum(dtype=np.int64))
        return part

    try:
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for part in tqdm(pool.map(one, range(len(names))), total=len(names),
                             desc="analyze overlap", unit="tensor", disable=not progress,
                             leave=False):
                inter += part
    finally:
        for fd in fds:
            os.close(fd)
    inter = inter + inter.T
    inter[np.diag_indices(n)] = counts.sum(axis=0)
    return counts, inter
