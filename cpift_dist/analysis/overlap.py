"""Core-region overlap: popcounts of AND over packed masks, tensor by tensor, block by block."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
from safetensors import safe_open
from tqdm.auto import tqdm

_BLOCK = 1 << 24  # packed bytes per read: 128M elements


def mask_counts(paths: list[Path], names: list[str],
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor core sizes and pairwise intersections of N mask files.

    Returns:
        counts: int64 [len(names), N], selected elements per tensor and task.
        inter: int64 [N, N], |C_i & C_j| over the whole model (diagonal: |C_i|).
    """
    n = len(paths)
    counts = np.zeros((len(names), n), np.int64)
    inter = np.zeros((n, n), np.int64)
    with ExitStack() as stack:
        files = [stack.enter_context(safe_open(str(p), framework="np")) for p in paths]
        for ti, name in enumerate(tqdm(names, desc="analyze overlap", unit="tensor",
                                       disable=not progress, leave=False)):
            slices = [f.get_slice(name) for f in files]
            length = slices[0].get_shape()[0]
            for s in range(0, length, _BLOCK):
                blocks = [sl[s:min(length, s + _BLOCK)] for sl in slices]
                for i in range(n):
                    counts[ti, i] += int(np.bitwise_count(blocks[i]).sum(dtype=np.int64))
                    for j in range(i + 1, n):
                        inter[i, j] += int(np.bitwise_count(blocks[i] & blocks[j])
                                           .sum(dtype=np.int64))
    inter = inter + inter.T
    inter[np.diag_indices(n)] = counts.sum(axis=0)
    return counts, inter
