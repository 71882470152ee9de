"""Triton kernels of the fusion: a Gram reduction and a fused SLERP/transplant apply.

Same contract as :func:`cpift_dist.fusion.slerp.gram_torch` and ``apply_torch``; one chunk of
one tensor, N task tensors stacked as X [N, n] (any float dtype), the base B [n], the packed
core masks M [N, ceil(n/8)] (bit e of task j: ``M[j, e >> 3] >> (e & 7) & 1``), the chunk cut
into S equal segments of L elements (one SLERP angle each).

- ``gram``: each program reads one block of every input once and writes partial dot products
  of the non-core elements in float64; the partials are summed on the host side in float64.
- ``apply``: each program reads X, B and M once, forms sum_j c_j x_j (+ theta0 in task-vector
  space) on non-core elements and the winning task's value on core ones, casts to the output
  dtype and writes once.

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gram_kernel(X, B, M, P, L, n_blocks, stride_x, stride_m,
                 N: tl.constexpr, NP2: tl.constexpr, TASK_VECTORS: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # 1-d grid: CUDA caps grid dims 1-2 at 65,535
    s = pid // n_blocks
    blk = pid % n_blocks
    col = blk * BLOCK + tl.arange(0, BLOCK)
    valid = col < L
    e = s * L + col
    j = tl.arange(0, NP2)
    rows = j[:, None] < N
    both = rows & valid[None, :]
    x = tl.load(X + j[:, None] * stride_x + e[None, :], mask=both, other=0.0).to(tl.float64)
    if TASK_VECTORS:
        b = tl.load(B + e, mask=valid, other=0.0).to(tl.float64)
        x = x - b[None, :]
    byte = tl.load(M + j[:, None] * stride_m + (e >> 3)[None, :], mask=both, other=0)
    bits = (byte.to(tl.int32) >> (e & 7)[None, :]) & 1
    core = tl.max(bits, axis=0) > 0
    x = tl.where(both & (core == 0)[None, :], x, 0.0)
    out = P + (s * n_blocks + blk) * NP2 * NP2
    for i in tl.static_range(N):
        xi = tl.sum(tl.where(j[:, None] == i, x, 0.0), axis=0)
        tl.store(out + i * NP2 + j, tl.sum(x * xi[None, :], axis=1))


@triton.jit
def _apply_kernel(X, B, M, C, O, L, n_blocks, stride_x, stride_m,
                  N: tl.constexpr, NP2: tl.constexpr, TASK_VECTORS: tl.constexpr,
                  MAX_MAGNITUDE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    s = pid // n_blocks
    col = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
    valid = col < L
    e = s * L + col
    j = tl.arange(0, NP2)
    rows = j[:, None] < N
    both = rows & valid[None, :]
    x = tl.load(X + j[:, None] * stride_x + e[None, :], mask=both, other=0.0).to(tl.float32)
    b = tl.load(B + e, mask=valid, other=0.0).to(tl.float32)
    c = tl.load(C + s * NP2 + j)  # float32, zero-padded to NP2
    v = x - b[None, :] if TASK_VECTORS else x
    acc = tl.sum(c[:, None] * v, axis=0)
    if TASK_VECTORS:
        acc = acc + b
    byte = tl.load(M + j[:, None] * stride_m + (e >> 3)[None, :], mask=both, other=0)
    bits = ((byte.to(tl.int32) >> (e & 7)[None, :]) & 1) > 0
    if MAX_MAGNITUDE:
        mag = tl.where(bits, tl.abs(x - b[None, :]), -1.0)
        best = tl.max(mag, axis=0)
        bits = bits & (mag == best[None, :])
    winner = tl.min(tl.where(bits, j[:, None], NP2), axis=0)  # first task among the best
    picked = tl.sum(tl.where(j[:, None] == winner[None, :], x, 0.0), axis=0)
    out = tl.where(winner < N, picked, acc)
    tl.store(O + e, out.to(O.dtype.element_ty), mask=valid)


def _np2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def gram(x: torch.Tensor, base: torch.Tensor, packed: torch.Tensor, segments: int,
         task_vectors: bool, block: int = 1024) -> torch.Tensor:
    """float64 [S, N, N] Gram matrices of the non-core elements (see module doc)."""
    n_tasks, n = x.shape
    L = n // segments
    np2 = _np2(n_tasks)
    n_blocks = triton.cdiv(L, block)
    partial = torch.empty((segments, n_blocks, np2, np2), dtype=torch.float64, device=x.device)
    _gram_kernel[(segments * n_blocks,)](
        x, base, packed, partial, L, n_blocks, x.stride(0), packed.stride(0),
        N=n_tasks, NP2=np2, TASK_VECTORS=task_vectors, BLOCK=block)
    return partial.sum(dim=1)[:, :n_tasks, :n_tasks]


def apply(x: torch.Tensor, base: torch.Tensor, packed: torch.Tensor, coef: torch.Tensor,
          task_vectors: bool, overlap: str, out_dtype: torch.dtype,
          block: int = 1024) -> torch.Tensor:
    """Fused values [n] of one chunk (see module doc); ``coef`` is [S, N] (any float dtype)."""
    n_tasks, n = x.shape
    segments = coef.shape[0]
    np2 = _np2(n_tasks)
    c = torch.zeros((segments, np2), dtype=torch.float32, device=x.device)
    c[:, :n_tasks] = coef.to(device=x.device, dtype=torch.float32)
    out = torch.empty(n, dtype=out_dtype, device=x.device)
    L = n // segments
    n_blocks = triton.cdiv(L, block)
    _apply_kernel[(segments * n_blocks,)](
        x, base, packed, c, out, L, n_blocks, x.stride(0), packed.stride(0),
        N=n_tasks, NP2=np2, TASK_VECTORS=task_vectors,
        MAX_MAGNITUDE=overlap == "max-magnitude", BLOCK=block)
    return out
