"""Triton kernels of the fusion: a Gram reduction and a fused SLERP/transplant apply.

Same contract as :func:`cpift_dist.fusion.slerp.gram_torch` / ``apply_torch`` and the CPU
loops of :mod:`cpift_dist.fusion.fused`: one chunk of one tensor, N task tensors stacked as
X [N, n] (any float dtype), the base B [n], the packed core masks M [N, ceil(n/8)] (bit e of
task j: ``M[j, e >> 3] >> (e & 7) & 1``; a chunk starts on a byte), the chunk cut into S equal
segments of L elements (one SLERP angle each).

Two kernels per pass:

* the fast ones, for 1 to 4 tasks (what fusion groups hold): a grid of (segment, program);
  each program walks its segment in tiles of ``BLOCK`` elements shaped ``[BLOCK/8, 8]``, so a
  row of the tile is one mask byte: each task's mask byte is loaded once per 8 elements (when
  L is a multiple of 8) and the values of a row are one vectorised 16- or 32-byte load. The
  tasks are unrolled (``N`` is a compile-time constant), each value is loaded once, and the
  Gram pass keeps its N(N+1)/2 running sums in registers across tiles, reducing once per
  program. Block size and warps are chosen by ``triton.autotune`` per task count, dtype and
  size class.
* the generic ones, for more tasks: a 2-d ``[NP2, BLOCK]`` tile per program.

Precision (the same arithmetic as the CPU loops, so that CUDA and CPU give the same bits
wherever the coefficients agree):

* Gram: ``v = float64(x) - float64(b)`` (or ``float64(x)``) on non-core elements, products and
  sums in float64. Inputs are float32-representable, so v carries at most 53 significant bits
  and each product is rounded once; the sum's error is below ``n * 2**-53 * sum|v_i v_k|``
  (about 1e-9 relative for a 16M-element chunk), whatever the summation order, far below the
  ``DOT_THRESHOLD`` decision and the float32 coefficients it feeds. float32 accumulation was
  rejected: its ``n * 2**-24`` bound (about 1 relative for 16M elements) is no bound at all.
* Apply: float32, ``acc = c_0 v_0``, then ``acc = acc + c_j v_j`` in task order, then ``+ b``
  (task vectors), compiled with ``enable_fp_fusion=False`` (no FMA contraction, as the CPU
  loops); core elements take the winning task's value bit for bit; the cast to the output
  dtype rounds to nearest even.

Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
"""

from __future__ import annotations

import functools
import os
import threading

import torch
import triton
import triton.language as tl

MAX_FAST = 4  # tasks the unrolled kernels take
_PAD = 4      # coefficient rows and Gram partials are padded to 4 tasks


# -- fast kernels (1 to 4 tasks) ---------------------------------------------------------------
@triton.jit
def _bits(M, stride_m, k, byte0, r, c, e, valid, bvalid, ALIGNED: tl.constexpr):
    """[R, 8] core bits (0/1, int32) of task k for the tile's elements."""
    if ALIGNED:  # one byte per tile row, loaded once, spread over its 8 elements
        byte = tl.load(M + k * stride_m + byte0 + r, mask=bvalid, other=0).to(tl.int32)
        bit = (byte >> c) & 1
    else:
        byte = tl.load(M + k * stride_m + (e >> 3), mask=valid, other=0).to(tl.int32)
        bit = (byte >> (e & 7).to(tl.int32)) & 1
    return bit


@triton.jit
def _v64(X, stride_x, k, e, valid, keep, b, TASK_VECTORS: tl.constexpr):
    x = tl.load(X + k * stride_x + e, mask=valid, other=0.0).to(tl.float64)
    if TASK_VECTORS:
        x = x - b
    return tl.where(keep, x, 0.0)


@triton.jit
def _store_pair(out, i: tl.constexpr, k: tl.constexpr, acc):
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(out + i * 4 + k, total)
    if i != k:
        tl.store(out + k * 4 + i, total)


@triton.jit
def _program(L, BLOCK: tl.constexpr):
    """This program's segment and index in it, the tile's row and column indices, and the
    segment's first element."""
    s = tl.program_id(0)
    r = tl.arange(0, BLOCK // 8)[:, None]
    c = tl.arange(0, 8)[None, :]
    return s, tl.program_id(1), r, c, s.to(tl.int64) * L


@triton.jit
def _tile(L, seg0, start, r, c):
    """The tile at ``start`` of its segment: element validity [R, 8], byte-row validity
    [R, 1], chunk element indices [R, 8], its first mask byte."""
    col = start + r * 8 + c
    return col < L, (start + r * 8) < L, seg0 + col, (seg0 + start) >> 3


@triton.jit
def _gram_tile(X, B, M, L, seg0, start, stride_x, stride_m, r, c,
               a00, a01, a02, a03, a11, a12, a13, a22, a23, a33,
               N: tl.constexpr, TASK_VECTORS: tl.constexpr, ALIGNED: tl.constexpr,
               BLOCK: tl.constexpr):
    """Adds one tile's products into the running sums."""
    R: tl.constexpr = BLOCK // 8
    valid, bvalid, e, byte0 = _tile(L, seg0, start, r, c)
    union = _bits(M, stride_m, 0, byte0, r, c, e, valid, bvalid, ALIGNED)
    if N > 1:
        union = union | _bits(M, stride_m, 1, byte0, r, c, e, valid, bvalid, ALIGNED)
    if N > 2:
        union = union | _bits(M, stride_m, 2, byte0, r, c, e, valid, bvalid, ALIGNED)
    if N > 3:
        union = union | _bits(M, stride_m, 3, byte0, r, c, e, valid, bvalid, ALIGNED)
    keep = valid & (union == 0)
    b = tl.zeros([R, 8], tl.float64)
    if TASK_VECTORS:
        b = tl.load(B + e, mask=valid, other=0.0).to(tl.float64)
    v0 = _v64(X, stride_x, 0, e, valid, keep, b, TASK_VECTORS)
    a00 += v0 * v0
    if N > 1:
        v1 = _v64(X, stride_x, 1, e, valid, keep, b, TASK_VECTORS)
        a01 += v0 * v1
        a11 += v1 * v1
        if N > 2:
            v2 = _v64(X, stride_x, 2, e, valid, keep, b, TASK_VECTORS)
            a02 += v0 * v2
            a12 += v1 * v2
            a22 += v2 * v2
            if N > 3:
                v3 = _v64(X, stride_x, 3, e, valid, keep, b, TASK_VECTORS)
                a03 += v0 * v3
                a13 += v1 * v3
                a23 += v2 * v3
                a33 += v3 * v3
    return a00, a01, a02, a03, a11, a12, a13, a22, a23, a33


@triton.jit
def _gram_fast(X, B, M, P, L, GMAX, stride_x, stride_m,
               N: tl.constexpr, TASK_VECTORS: tl.constexpr, ALIGNED: tl.constexpr,
               PERSISTENT: tl.constexpr, BLOCK: tl.constexpr):
    s, g, r, c, seg0 = _program(L, BLOCK)
    z = tl.zeros([BLOCK // 8, 8], tl.float64)
    a00 = z
    a01 = z
    a02 = z
    a03 = z
    a11 = z
    a12 = z
    a13 = z
    a22 = z
    a23 = z
    a33 = z
    if PERSISTENT:  # each program walks its segment, the sums staying in registers
        for start in range(g * BLOCK, L, tl.num_programs(1) * BLOCK):
            a00, a01, a02, a03, a11, a12, a13, a22, a23, a33 = _gram_tile(
                X, B, M, L, seg0, start, stride_x, stride_m, r, c,
                a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, N, TASK_VECTORS, ALIGNED, BLOCK)
    else:  # one tile per program (the interpreter: Triton 3.6's cannot loop on run-time bounds)
        a00, a01, a02, a03, a11, a12, a13, a22, a23, a33 = _gram_tile(
            X, B, M, L, seg0, g * BLOCK, stride_x, stride_m, r, c,
            a00, a01, a02, a03, a11, a12, a13, a22, a23, a33, N, TASK_VECTORS, ALIGNED, BLOCK)
    out = P + (s.to(tl.int64) * GMAX + g) * 16
    _store_pair(out, 0, 0, a00)
    if N > 1:
        _store_pair(out, 0, 1, a01)
        _store_pair(out, 1, 1, a11)
    if N > 2:
        _store_pair(out, 0, 2, a02)
        _store_pair(out, 1, 2, a12)
        _store_pair(out, 2, 2, a22)
    if N > 3:
        _store_pair(out, 0, 3, a03)
        _store_pair(out, 1, 3, a13)
        _store_pair(out, 2, 3, a23)
        _store_pair(out, 3, 3, a33)


@triton.jit
def _take(X, stride_x, M, stride_m, k, e, valid, bvalid, byte0, r, c, b, ck, acc, best, picked,
          union, TASK_VECTORS: tl.constexpr, MAX_MAGNITUDE: tl.constexpr,
          ALIGNED: tl.constexpr, FIRST: tl.constexpr):
    """Task k's term of the combination, and its claim on core elements (strictly better score
    than the tasks before it: the first keeps a tie)."""
    x = tl.load(X + k * stride_x + e, mask=valid, other=0.0).to(tl.float32)
    v = x - b if TASK_VECTORS else x
    if FIRST:
        acc = ck * v
    else:
        acc = acc + ck * v
    bit = _bits(M, stride_m, k, byte0, r, c, e, valid, bvalid, ALIGNED)
    union = union | bit
    if MAX_MAGNITUDE:
        score = tl.abs(x - b)
    else:
        score = tl.zeros_like(x)
    better = (bit != 0) & (score > best)
    best = tl.where(better, score, best)
    picked = tl.where(better, x, picked)
    return acc, best, picked, union


@triton.jit
def _apply_tile(X, B, M, O, L, seg0, start, stride_x, stride_m, r, c, c0, c1, c2, c3,
                N: tl.constexpr, TASK_VECTORS: tl.constexpr, MAX_MAGNITUDE: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    R: tl.constexpr = BLOCK // 8
    valid, bvalid, e, byte0 = _tile(L, seg0, start, r, c)
    b = tl.load(B + e, mask=valid, other=0.0).to(tl.float32)
    best = tl.full([R, 8], -1.0, tl.float32)
    picked = tl.zeros([R, 8], tl.float32)
    union = tl.zeros([R, 8], tl.int32)
    acc, best, picked, union = _take(X, stride_x, M, stride_m, 0, e, valid, bvalid, byte0, r,
                                     c, b, c0, picked, best, picked, union, TASK_VECTORS,
                                     MAX_MAGNITUDE, ALIGNED, True)
    if N > 1:
        acc, best, picked, union = _take(X, stride_x, M, stride_m, 1, e, valid, bvalid,
                                         byte0, r, c, b, c1, acc, best, picked, union,
                                         TASK_VECTORS, MAX_MAGNITUDE, ALIGNED, False)
    if N > 2:
        acc, best, picked, union = _take(X, stride_x, M, stride_m, 2, e, valid, bvalid,
                                         byte0, r, c, b, c2, acc, best, picked, union,
                                         TASK_VECTORS, MAX_MAGNITUDE, ALIGNED, False)
    if N > 3:
        acc, best, picked, union = _take(X, stride_x, M, stride_m, 3, e, valid, bvalid,
                                         byte0, r, c, b, c3, acc, best, picked, union,
                                         TASK_VECTORS, MAX_MAGNITUDE, ALIGNED, False)
    if TASK_VECTORS:
        acc = acc + b
    res = tl.where(union != 0, picked, acc)
    tl.store(O + e, res.to(O.dtype.element_ty), mask=valid)


@triton.jit
def _apply_fast(X, B, M, C, O, L, stride_x, stride_m,
                N: tl.constexpr, TASK_VECTORS: tl.constexpr, MAX_MAGNITUDE: tl.constexpr,
                ALIGNED: tl.constexpr, PERSISTENT: tl.constexpr, BLOCK: tl.constexpr):
    s, g, r, c, seg0 = _program(L, BLOCK)
    c0 = tl.load(C + s * 4 + 0)
    c1 = tl.load(C + s * 4 + 1)
    c2 = tl.load(C + s * 4 + 2)
    c3 = tl.load(C + s * 4 + 3)
    if PERSISTENT:
        for start in range(g * BLOCK, L, tl.num_programs(1) * BLOCK):
            _apply_tile(X, B, M, O, L, seg0, start, stride_x, stride_m, r, c, c0, c1, c2, c3,
                        N, TASK_VECTORS, MAX_MAGNITUDE, ALIGNED, BLOCK)
    else:
        _apply_tile(X, B, M, O, L, seg0, g * BLOCK, stride_x, stride_m, r, c, c0, c1, c2, c3,
                    N, TASK_VECTORS, MAX_MAGNITUDE, ALIGNED, BLOCK)


def _autotune(configs, key):
    """``triton.autotune`` with a short benchmark per configuration (a few ms, not 125 ms),
    its choice kept in Triton's on-disk cache (a fresh ``cpift fuse`` process reuses it)."""
    def bench(fn, quantiles=None):
        return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)
    for extra in ({"do_bench": bench, "cache_results": True}, {"do_bench": bench}, {}):
        try:  # older Tritons lack these hooks
            return triton.autotune(configs=configs, key=key, **extra)
        except TypeError:
            continue
    raise AssertionError("unreachable")


_C = triton.Config
_KEY = ["N", "TASK_VECTORS", "ALIGNED"]  # and the tensors' dtypes (the autotuner adds them)
# Gram keeps N(N+1)/2 float64 sums per element of a thread's tile: small tiles per thread
_gram_tuned = _autotune([_C({"BLOCK": 512}, num_warps=4), _C({"BLOCK": 1024}, num_warps=4),
                         _C({"BLOCK": 1024}, num_warps=8), _C({"BLOCK": 2048}, num_warps=8)],
                        _KEY)(_gram_fast)
_apply_tuned = _autotune([_C({"BLOCK": 1024}, num_warps=4), _C({"BLOCK": 2048}, num_warps=4),
                          _C({"BLOCK": 2048}, num_warps=8), _C({"BLOCK": 4096}, num_warps=8)],
                         _KEY + ["MAX_MAGNITUDE"])(_apply_fast)
TUNED_FROM = 1 << 18  # smaller chunks take a fixed tile (launch-bound; not worth tuning)


# -- generic kernels (any number of tasks) -----------------------------------------------------
@triton.jit
def _gram_kernel(X, B, M, P, L, n_blocks, stride_x, stride_m,
                 N: tl.constexpr, NP2: tl.constexpr, TASK_VECTORS: tl.constexpr,
                 BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # 1-d grid: CUDA caps grid dims 1-2 at 65,535
    s = pid // n_blocks
    blk = pid % n_blocks
    col = blk * BLOCK + tl.arange(0, BLOCK)
    valid = col < L
    e = s.to(tl.int64) * L + col
    j = tl.arange(0, NP2)
    rows = j[:, None] < N
    both = rows & valid[None, :]
    x = tl.load(X + j[:, None] * stride_x + e[None, :], mask=both, other=0.0).to(tl.float64)
    if TASK_VECTORS:
        b = tl.load(B + e, mask=valid, other=0.0).to(tl.float64)
        x = x - b[None, :]
    byte = tl.load(M + j[:, None] * stride_m + (e >> 3)[None, :], mask=both, other=0)
    bits = (byte.to(tl.int32) >> (e & 7).to(tl.int32)[None, :]) & 1
    core = tl.max(bits, axis=0) > 0
    x = tl.where(both & (core == 0)[None, :], x, 0.0)
    out = P + (s.to(tl.int64) * n_blocks + blk) * NP2 * NP2
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
    e = s.to(tl.int64) * L + col
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
    bits = ((byte.to(tl.int32) >> (e & 7).to(tl.int32)[None, :]) & 1) > 0
    if MAX_MAGNITUDE:
        mag = tl.where(bits, tl.abs(x - b[None, :]), -1.0)
        best = tl.max(mag, axis=0)
        bits = bits & (mag == best[None, :])
    winner = tl.min(tl.where(bits, j[:, None], NP2), axis=0)  # first task among the best
    picked = tl.sum(tl.where(j[:, None] == winner[None, :], x, 0.0), axis=0)
    out = tl.where(winner < N, picked, acc)
    tl.store(O + e, out.to(O.dtype.element_ty), mask=valid)


# -- launchers --------------------------------------------------------------------------------
def _np2(n: int) -> int:
    return max(2, triton.next_power_of_2(n))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_INTERPRETER = threading.Lock()


def _one_at_a_time_when_interpreted(fn):
    """Launches of ``fn`` one thread at a time under the interpreter: Triton 3.6's keeps the
    launch's state in module globals, and two threads interpreting at once fail ("Did you
    forget to add @triton.jit?": seen fusing on 3 threads with ``--backend triton`` on CPU).
    On a device the launches stay concurrent."""
    @functools.wraps(fn)
    def launch(*args, **kw):
        if not _interpreted():
            return fn(*args, **kw)
        with _INTERPRETER:
            return fn(*args, **kw)
    return launch


def _programs(segments: int, L: int, x: torch.Tensor, block: int) -> int:
    """Programs per segment: enough for every SM several times over, none without a tile;
    under the interpreter one per tile (its kernels do not loop)."""
    if _interpreted():
        return triton.cdiv(L, block)
    sms = (torch.cuda.get_device_properties(x.device).multi_processor_count
           if x.is_cuda else 4)
    return max(1, min(triton.cdiv(L, block), triton.cdiv(8 * sms, segments)))


def _options(x: torch.Tensor) -> dict:
    return {} if _interpreted() or not x.is_cuda else {"enable_fp_fusion": False}


@_one_at_a_time_when_interpreted
def gram(x: torch.Tensor, base: torch.Tensor, packed: torch.Tensor, segments: int,
         task_vectors: bool, block: int | None = None) -> torch.Tensor:
    """float64 [S, N, N] Gram matrices of the non-core elements (see module doc). ``block``
    fixes the tile (no autotuning; the tests use it under the interpreter)."""
    n_tasks, n = x.shape
    L = n // segments
    if n_tasks > MAX_FAST:
        block = block or 1024
        np2 = _np2(n_tasks)
        n_blocks = triton.cdiv(L, block)
        partial = torch.empty((segments, n_blocks, np2, np2), dtype=torch.float64,
                              device=x.device)
        _gram_kernel[(segments * n_blocks,)](
            x, base, packed, partial, L, n_blocks, x.stride(0), packed.stride(0),
            N=n_tasks, NP2=np2, TASK_VECTORS=task_vectors, BLOCK=block)
        return partial.sum(dim=1)[:, :n_tasks, :n_tasks]
    if not block and (n < TUNED_FROM or _interpreted()):
        block = 1024
    gmax = _programs(segments, L, x, block or 512)
    partial = torch.zeros((segments, gmax, _PAD, _PAD), dtype=torch.float64, device=x.device)
    args = (x, base, packed, partial, L, gmax, x.stride(0), packed.stride(0))
    meta = dict(N=n_tasks, TASK_VECTORS=task_vectors, ALIGNED=L % 8 == 0,
                PERSISTENT=not _interpreted())
    # Every one of the gmax programs writes its partial sums (zeros when its first tile lies
    # past the segment), whatever the tile: the autotuner runs each configuration on the same
    # buffer, and a grid that shrank with the tile would leave the slots a smaller tile wrote
    # in the sum (the Gram came out 2x on an H200, caught by the CUDA test).
    if block:
        _gram_fast[(segments, gmax)](*args, **meta, BLOCK=block)
    else:
        _gram_tuned[(segments, gmax)](*args, **meta)
    return partial.sum(dim=1)[:, :n_tasks, :n_tasks]


@_one_at_a_time_when_interpreted
def apply(x: torch.Tensor, base: torch.Tensor, packed: torch.Tensor, coef: torch.Tensor,
          task_vectors: bool, overlap: str, out_dtype: torch.dtype,
          block: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused values [n] of one chunk (see module doc), into ``out`` when given; ``coef`` is
    [S, N] (any float dtype, used as float32)."""
    n_tasks, n = x.shape
    segments = coef.shape[0]
    L = n // segments
    if out is None:
        out = torch.empty(n, dtype=out_dtype, device=x.device)
    mm = overlap == "max-magnitude"
    if n_tasks > MAX_FAST:
        block = block or 1024
        np2 = _np2(n_tasks)
        c = torch.zeros((segments, np2), dtype=torch.float32, device=x.device)
        c[:, :n_tasks] = coef.to(device=x.device, dtype=torch.float32)
        n_blocks = triton.cdiv(L, block)
        _apply_kernel[(segments * n_blocks,)](
            x, base, packed, c, out, L, n_blocks, x.stride(0), packed.stride(0),
            N=n_tasks, NP2=np2, TASK_VECTORS=task_vectors, MAX_MAGNITUDE=mm, BLOCK=block)
        return out
    c = torch.zeros((segments, _PAD), dtype=torch.float32, device=x.device)
    c[:, :n_tasks] = coef.to(device=x.device, dtype=torch.float32)
    if not block and (n < TUNED_FROM or _interpreted()):
        block = 1024
    gmax = _programs(segments, L, x, block or 512)
    args = (x, base, packed, c, out, L, x.stride(0), packed.stride(0))
    meta = dict(N=n_tasks, TASK_VECTORS=task_vectors, MAX_MAGNITUDE=mm, ALIGNED=L % 8 == 0,
                PERSISTENT=not _interpreted(), **_options(x))
    if block:
        _apply_fast[(segments, min(gmax, triton.cdiv(L, block)))](*args, **meta, BLOCK=block)
    else:
        _apply_tuned[lambda m: (segments, min(gmax, triton.cdiv(L, m["BLOCK"])))](*args, **meta)
    return out


def tune(n_tasks: int, dtype: torch.dtype, task_vectors: bool, overlap: str,
         device: torch.device | str = "cuda") -> None:
    """Runs the autotuning of both kernels for these settings now (on a synthetic chunk), so
    that it happens once, in the calling thread, before worker threads launch them."""
    if n_tasks > MAX_FAST or _interpreted() or torch.device(device).type != "cuda":
        return  # the interpreter runs fixed tiles
    n = 1 << 22
    x = torch.randn((n_tasks, n), device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    p = torch.zeros((n_tasks, n // 8), dtype=torch.uint8, device=device)
    gram(x, b, p, 1, task_vectors)
    apply(x, b, p, torch.ones((1, n_tasks)) / n_tasks, task_vectors, overlap, dtype)
