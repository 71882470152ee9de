"""Core-region overlap: popcounts of AND over packed masks, tensor by tensor, block by block."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numba import njit, types
from numba.extending import intrinsic
from tqdm.auto import tqdm

from cpift_dist.errors import MaskError
from cpift_dist.io.checkpoint import read_header

_BLOCK = 1 << 18  # packed bytes per file and read: 2M elements; N such rows stay in L2/L3


@intrinsic
def _popcount(typingctx, word):
    """Set bits of a uint64 (LLVM's ``ctpop``: one instruction, vectorised in loops)."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.uint64(types.uint64), codegen


@njit(nogil=True, cache=True)
def and_counts(words, counts, inter):
    """For the rows of ``words`` (uint64 ``[N, W]``, one per mask): adds each row's set bits
    to ``counts[i]`` and, for i < j, those of row i AND row j to ``inter[i, j]`` (int64)."""
    n = words.shape[0]
    for i in range(n):
        wi = words[i]
        c = np.uint64(0)
        for x in range(wi.size):
            c += _popcount(wi[x])
        counts[i] += np.int64(c)  # (int64 + uint64 would be typed float64)
        for j in range(i + 1, n):
            wj = words[j]
            c = np.uint64(0)
            for x in range(wi.size):
                c += _popcount(wi[x] & wj[x])
            inter[i, j] += np.int64(c)


def mask_counts(paths: list[Path], names: list[str],
                progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-tensor core sizes and pairwise intersections of N mask files.

    Tensors are counted on up to one thread per core, each reading its packed bytes with
    ``preadv`` (at the offsets of the validated headers) into one reused buffer per thread, and
    counting every row and pair in one compiled pass (:func:`and_counts`, GIL released). It
    replaced numpy's ``bitwise_count(a & b).sum()``, which made two fresh temporaries the size
    of the block per pair: measured on 2 cores, the 3 masks of a 348M model (131 MB), 0.14 s
    before, 0.05 s now.

    Returns:
        counts: int64 [len(names), N], selected elements per tensor and task.
        inter: int64 [N, N], |C_i & C_j| over the whole model (diagonal: |C_i|).
    """
    n = len(paths)
    counts = np.zeros((len(names), n), np.int64)
    inter = np.zeros((n, n), np.int64)
    headers = [read_header(Path(p)) for p in paths]  # validated by safetensors first
    fds = [os.open(p, os.O_RDONLY) for p in paths]
    local = threading.local()
    and_counts(np.zeros((n, 1), np.uint64), np.zeros(n, np.int64), np.zeros((n, n), np.int64))
    # ^ compiled or loaded from numba's cache here, before the threads would wait on its lock

    def one(ti: int) -> np.ndarray:
        name = names[ti]
        length = headers[0][name][1][0]
        part = np.zeros((n, n), np.int64)
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.zeros((n, _BLOCK), np.uint8)
        for s in range(0, length, _BLOCK):
            size = min(length, s + _BLOCK) - s
            padded = -(-size // 8) * 8
            buf[:, size:padded] = 0  # a tensor's last block: whole words
            for i, (fd, h) in enumerate(zip(fds, headers)):
                got = os.preadv(fd, [memoryview(buf[i, :size])], h[name][2] + s)
                if got != size:
                    raise MaskError(f"{paths[i]}: tensor {name!r} ends early (truncated)")
            and_counts(buf[:, :padded].view(np.uint64), counts[ti], part)
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
