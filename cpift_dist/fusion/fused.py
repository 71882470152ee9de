"""The fusion's two passes on CPU as fused numba loops (``nogil``: threads run them in parallel).

One call reads a chunk of the base and of every task once and does a pass's whole work per
element block in caches: widen bf16 by a 16-bit shift, OR the tasks' packed mask bytes (each
byte read once per 8 elements, never unpacked to a bool array), subtract, then either the Gram
products (:func:`gram`) or the SLERP combination, the core transplant and the rounding to the
output dtype (:func:`apply`). The torch path this replaces made about ten whole-array passes
over float64/float32 temporaries per value and unpacked every mask three times.

Same contract as :func:`cpift_dist.fusion.slerp.gram_torch` / ``apply_torch`` and the Triton
kernels (tests hold all three against each other and the float64 definition):

* Gram: ``v = float64(x) - float64(base)`` (task vectors) or ``float64(x)``, non-core elements
  only; products of float32-representable values are exact in float64, so the only rounding is
  the float64 summation (relative error below ``n * 2**-53`` per entry, far under the
  ``DOT_THRESHOLD`` decision it feeds). The sum is reassociated into vector lanes
  (``fastmath={"reassoc"}``), which changes only that summation order.
* Apply: float32 arithmetic ``acc = sum_j c_j v_j (+ base)`` in task order, no contraction
  into FMAs; core elements take the winning task's value bit for bit; bf16 output rounds to
  nearest even (a NaN becomes the quiet NaN 0x7FC0), as ``torch.Tensor.to(torch.bfloat16)``.

Inputs: the base, a 1-d array, and the tasks as a ``uint64`` array of the addresses of their
1-d arrays (same dtype and size as the base): a loop compiles once per dtype whatever the task
count, and the tasks' arrays can lie anywhere, straight over memory maps of the checkpoint files
included (no copy). ``uint16`` holds bf16 bits, ``float32`` is as is (the caller widens other
float dtypes). :func:`gram_chunk` and :func:`apply_chunk` take the arrays and keep them alive
for the call. ``packed`` is ``uint8 [N, ceil(n / 8)]``: the chunk's mask bytes per task, bit i
of the chunk at byte i >> 3, bit i & 7 (chunks start on a byte, see ``plan_units``). In weight
space a chunk without core elements never reads the base, so callers may pass any array of the
right dtype and size there (the fuser passes the first task's, so as not to read the base file).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, types
from numba.extending import intrinsic, overload

from cpift_dist.analysis.fused import _from_bf16, gc_paused, load_registries
from cpift_dist.io import gather

BLOCK = 2048  # elements per block: the Gram pass's N float64 rows stay in L1/L2
RUN_LIKE = {torch.bfloat16: np.empty(0, np.uint16), torch.float32: np.empty(0, np.float32)}
"""The run loops' ``like`` argument per input dtype: bf16 as its bits, float32 as is."""


def inputs(base, tuned) -> tuple[bool, np.ndarray, list[np.ndarray]]:
    """(bf16?, base, [task arrays]) as the loops take them, the base read-only (one signature
    whatever the caller holds). Either torch tensors (``base [n]``, ``tuned [N, n]``): bf16 as
    its uint16 bits (no copy), float32 as is, other float dtypes widened to float32; or numpy
    arrays already in that form (``uint16`` or ``float32``, e.g. views over memory maps)."""
    if isinstance(base, np.ndarray):
        b, xs = base, list(tuned)
    elif base.dtype == torch.bfloat16:
        b, xs = _u16(base), list(_u16(tuned).reshape(len(tuned), -1))
    else:
        b, xs = base.float().numpy(), list(tuned.float().numpy().reshape(len(tuned), -1))
    if b.dtype not in (np.uint16, np.float32):
        raise TypeError(f"fusion loops take uint16 (bf16 bits) or float32 arrays, not {b.dtype}")
    for x in xs:
        if x.dtype != b.dtype or x.size != b.size or not x.flags.c_contiguous:
            raise ValueError(f"task array {x.dtype} [{x.size}] does not match the base "
                             f"{b.dtype} [{b.size}] (or is not contiguous)")
    b = b.view()
    b.flags.writeable = False
    return b.dtype == np.uint16, b, xs


def _addresses(xs: list[np.ndarray]) -> np.ndarray:
    return np.array([x.ctypes.data for x in xs], dtype=np.uint64)


def _u16(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def gram_chunk(base, tuned, packed: np.ndarray, segments: int,
               task_vectors: bool) -> np.ndarray:
    """float64 ``[S, N, N]`` Gram matrices of one chunk's non-core elements (CPU tensors,
    ``tuned`` ``[N, n]``, or arrays: see :func:`inputs`; the chunk's elements are S equal
    consecutive segments)."""
    bf16, b, xs = inputs(base, tuned)
    out = np.zeros((segments, len(xs), len(xs)))
    gram(b, _addresses(xs), bf16, np.ascontiguousarray(packed), task_vectors,
         b.size // segments, out)
    return out


def apply_chunk(base, tuned, packed: np.ndarray, coef: np.ndarray, task_vectors: bool,
                overlap: str, out_dtype: torch.dtype,
                buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """Fused values of one chunk (``out_dtype``; in ``buffer``, uint8 of the right size, when
    given), and its elements in any core and in two or more cores; ``coef`` is ``[S, N]``
    (float32 in the arithmetic)."""
    bf16, b, xs = inputs(base, tuned)
    kind = np.uint16 if bf16 else np.float32
    out = np.empty(b.size, kind) if buffer is None else buffer.numpy().view(kind)
    counts = np.zeros(2, np.int64)
    apply(b, _addresses(xs), bf16, np.ascontiguousarray(packed), task_vectors,
          np.ascontiguousarray(coef, dtype=np.float32), b.size // len(coef),
          overlap == "max-magnitude", out, counts)
    res = torch.from_numpy(out)
    res = res.view(torch.bfloat16) if bf16 else res.to(out_dtype)
    return res, int(counts[0]), int(counts[1])


def _bit_table() -> np.ndarray:
    """``table[byte]``: the byte's 8 bits as 8 bytes (0 or 1, little bit order) in a uint64."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.ascontiguousarray(bits).view(np.uint64).reshape(256)


_BITS = _bit_table()


@intrinsic
def _at(typingctx, like, address):
    """A pointer to ``like``'s dtype at ``address`` (an integer): with ``numba.carray``, a task's
    array from the address the caller took of it."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[1], context.get_value_type(ptr))
    return ptr(like, address), codegen


@njit(nogil=True, cache=True, inline="always")
def _task(base, addresses, k):
    """Task k's array: ``base.size`` elements of the base's dtype at ``addresses[k]``."""
    return numba.carray(_at(base, addresses[k]), base.size)


# Inner loops index their arrays with the loop variable only (slices taken per block): an
# index such as ``start + i`` keeps numba's negative-index wraparound in the loop, which stops
# LLVM from vectorising it (measured: 10x slower).


@njit(nogil=True, cache=True, fastmath={"reassoc"})
def _dot(a, b):
    s = 0.0
    for i in range(a.size):
        s += a[i] * b[i]
    return s


@njit(nogil=True, cache=True)
def _union(packed, b0, nb, union):
    """``union[:nb]``: OR of the tasks' mask bytes ``b0:b0 + nb``; returns whether any is set."""
    u = union[:nb]
    u[:] = 0
    for k in range(packed.shape[0]):
        pk = packed[k, b0:b0 + nb]
        for j in range(nb):
            u[j] |= pk[j]
    anyset = np.uint8(0)
    for j in range(nb):
        anyset |= u[j]
    return anyset != 0


def _f32(x):
    """The float32 value of one element of a chunk: bf16 bits (``uint16``) widened by a 16-bit
    shift, or a float32 as is (compiled per type by the overload below)."""


@overload(_f32, inline="always")
def _f32_typed(x):
    if isinstance(x, types.Integer):
        return lambda x: _from_bf16(x)  # the analysis's widening, shared
    return lambda x: np.float32(x)


# The passes widen each element where they use it (:func:`_f32`) instead of widening a block
# of every task into float32 scratch rows first: one pass over each task's block fewer, and
# apply touches no task row at all outside its arithmetic. Measured in cache, 256K-element
# chunks, 2-core VM (bf16, 2 tasks, weight space / task vectors): gram 0.51 -> 0.41 /
# 0.69 -> 0.60 ns per element, apply 0.31 -> 0.21 / 0.46 -> 0.31; with 1% core masks apply
# 1.00 -> 0.64. The arithmetic and its order are unchanged: outputs bit for bit the same.


@njit(nogil=True, cache=True)
def gram(base, tuned, bf16, packed, task_vectors, seg_len, out):
    """Adds the Gram matrices of the chunk's non-core elements into ``out[s]``
    (float64 ``[S, N, N]``); segment s of the chunk is elements ``s*seg_len:(s+1)*seg_len``.
    ``tuned``: the tasks' array addresses (see the module's docstring)."""
    n = base.size
    N = tuned.size
    bf = np.zeros(BLOCK, np.float32)  # the base's block, widened once for every task
    v = np.zeros((N, BLOCK))
    union = np.empty(BLOCK // 8, np.uint8)
    core = np.zeros(BLOCK // 8, np.uint64)  # per element: 1 in a core (8 bytes per mask byte)
    core8 = core.view(np.uint8)
    for start in range(0, n, BLOCK):  # BLOCK is a multiple of 8: blocks hold whole bytes
        m = min(BLOCK, n - start)
        nb = (m + 7) >> 3
        masked = _union(packed, start >> 3, nb, union)
        if masked:
            for j in range(nb):
                core[j] = _BITS[union[j]]
        if task_vectors:
            bs = base[start:start + m]
            for i in range(m):
                bf[i] = _f32(bs[i])
        for k in range(N):
            x = _task(base, tuned, k)[start:start + m]
            vk = v[k]
            if task_vectors:
                if masked:
                    for i in range(m):
                        vk[i] = 0.0 if core8[i] else (np.float64(_f32(x[i]))
                                                      - np.float64(bf[i]))
                else:
                    for i in range(m):
                        vk[i] = np.float64(_f32(x[i])) - np.float64(bf[i])
            elif masked:
                for i in range(m):
                    vk[i] = 0.0 if core8[i] else np.float64(_f32(x[i]))
            else:
                for i in range(m):
                    vk[i] = np.float64(_f32(x[i]))
        lo = 0
        while lo < m:  # the block's pieces that lie in one segment
            s = (start + lo) // seg_len
            hi = min(m, (s + 1) * seg_len - start)
            for j in range(N):
                for k in range(j, N):
                    d = _dot(v[j][lo:hi], v[k][lo:hi])
                    out[s, j, k] += d
                    if k != j:
                        out[s, k, j] += d
            lo = hi


@njit(nogil=True, cache=True)
def apply(base, tuned, bf16, packed, task_vectors, coef, seg_len, max_magnitude, out, counts):
    """Fused values of the chunk into ``out`` (``uint16`` bf16 bits when ``bf16``, else
    ``float32``); ``coef`` is float32 ``[S, N]`` for the chunk's segments. Adds the elements in
    any core and in two or more cores to ``counts[0]`` and ``counts[1]``.

    A core element takes the value of the task whose core holds it, among several the one with
    the larger ``|x_j - base|`` (``max_magnitude``; ties: task order) or the first.
    ``tuned``: the tasks' array addresses (see the module's docstring).
    """
    n = base.size
    acc = np.empty(BLOCK, np.float32)
    au = acc.view(np.uint32)
    union = np.empty(BLOCK // 8, np.uint8)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        masked = _union(packed, start >> 3, (m + 7) >> 3, union)
        lo = 0
        while lo < m:
            s = (start + lo) // seg_len
            hi = min(m, (s + 1) * seg_len - start)
            _combine(base, tuned, start + lo, start + hi, coef[s], task_vectors, acc[lo:hi])
            lo = hi
        if masked:
            _transplant(packed, start, m, union, base, tuned, max_magnitude, acc, counts)
        o = out[start:start + m]
        if bf16:
            for i in range(m):
                o[i] = _round_bf16(au[i])
        else:
            for i in range(m):
                o[i] = acc[i]


@njit(nogil=True, cache=True, inline="always")
def _combine(base, tuned, a0, a1, c, task_vectors, acc):
    """``acc = sum_k c[k] * v_k`` over elements ``a0:a1`` of the chunk, in task order (float32,
    no FMA), ``+ base`` for task vectors (``acc`` is already that range)."""
    m = acc.size
    b = base[a0:a1]  # ranges of the arrays: contiguous, indexed by i only, so loops vectorise
    x0 = _task(base, tuned, 0)[a0:a1]
    c0 = c[0]
    if task_vectors:
        for i in range(m):
            acc[i] = c0 * (_f32(x0[i]) - _f32(b[i]))
    else:
        for i in range(m):
            acc[i] = c0 * _f32(x0[i])
    for k in range(1, tuned.size):
        xk = _task(base, tuned, k)[a0:a1]
        ck = c[k]
        if task_vectors:
            for i in range(m):
                acc[i] = acc[i] + ck * (_f32(xk[i]) - _f32(b[i]))
        else:
            for i in range(m):
                acc[i] = acc[i] + ck * _f32(xk[i])
    if task_vectors:
        for i in range(m):
            acc[i] = acc[i] + _f32(b[i])


@njit(nogil=True, cache=True)
def _transplant(packed, start, m, union, base, tuned, max_magnitude, acc, counts):
    """Core elements of the block at ``start``: the winning task's value into ``acc``; counts
    them."""
    b0 = start >> 3
    N = packed.shape[0]
    for j in range((m + 7) >> 3):
        u = union[j]
        if u == 0:
            continue
        multi = 0
        seen = 0
        for k in range(N):
            p = packed[k, b0 + j]
            multi |= seen & p
            seen |= p
        counts[0] += _popcount8(u)
        counts[1] += _popcount8(multi)
        for q in range(min(8, m - 8 * j)):
            if (u >> q) & 1 == 0:
                continue
            i = start + 8 * j + q
            bi = _f32(base[i])
            best = np.float32(-1.0)
            picked = np.float32(0.0)
            for k in range(N):
                if (packed[k, b0 + j] >> q) & 1:
                    xi = _f32(_task(base, tuned, k)[i])
                    score = abs(xi - bi) if max_magnitude else np.float32(0.0)
                    if score > best:  # strict: the first task keeps a tie
                        best = score
                        picked = xi
            acc[i - start] = picked


@njit(nogil=True, cache=True)
def gram_run(fds, starts, nbytes, boff, mfds, mstarts, mbytes, poff, buf, packed, like, bf16,
             task_vectors, seg_len, goff, grams, based, short):
    """Reads and takes the Gram matrices of a run of chunks in one call that releases the GIL
    once, where the fuser's Python per chunk (maps, masks, dispatch) held it for a tenth of a
    thread's time (348M bf16, 1 thread); :func:`apply_run` then fuses the chunks.

    Chunk c: ``fds``/``starts`` ``[C, 1 + N]``, its bytes' descriptor and offset in the base's
    and each task's checkpoint, ``nbytes[c]`` bytes each, read to ``buf[boff[c]:]`` (base, then
    the tasks); ``mfds``/``mstarts`` ``[C, N]``, its packed mask bytes (``mbytes[c]`` per task)
    read to ``packed[poff[c]:]``. Offsets may repeat: chunks read to the same place one after
    the other (a large tensor's Gram pass). In weight space the base is read only where a mask
    of the chunk has a bit set (``based[c]``), as :meth:`_ShardFuser._map` does. Segments of
    ``seg_len[c]`` elements, their Gram matrices at ``grams[goff[c]:goff[c + 1]]``. A read
    that comes short sets ``short[0]`` to the chunk and ``short[1]`` to 0 (masks) or 1 (values)
    and ends the run: the caller names the file. ``like``: an empty array of the values' type
    in the loops (:data:`RUN_LIKE`; numba types an array argument in C, a dtype class in
    Python: 3 us a call)."""
    N = starts.shape[1] - 1
    lengths = np.empty(N + 1, np.int64)
    for ci in range(starts.shape[0]):
        if _read_chunk(ci, fds, starts, nbytes, boff, mfds, mstarts, mbytes, poff, buf, packed,
                       task_vectors, based, lengths, short):
            return
        nb, mb = nbytes[ci], mbytes[ci]
        b, addresses = _run_inputs(buf[boff[ci]:boff[ci] + (N + 1) * nb], nb, N, based[ci],
                                   like)
        gram(b, addresses, bf16, packed[poff[ci]:poff[ci] + N * mb].reshape((N, mb)),
             task_vectors, seg_len[ci], grams[goff[ci]:goff[ci + 1]])


@njit(nogil=True, cache=True)
def apply_run(read, fds, starts, nbytes, boff, mfds, mstarts, mbytes, poff, buf, packed, like,
              bf16, task_vectors, coef, seg_len, goff, max_magnitude, based, out, counts,
              short):
    """:func:`apply` over a run's chunks (arguments as :func:`gram_run`'s), each with its
    segments' float32 coefficients ``coef[goff[c]:goff[c + 1]]``: chunk c's fused bytes to
    ``out`` right after chunk c - 1's (a run is contiguous in the output file), its core
    counts to ``counts[c]``. ``read``: each chunk is read first (else :func:`gram_run` read
    them, to their own offsets)."""
    N = starts.shape[1] - 1
    lengths = np.empty(N + 1, np.int64)
    at = 0
    for ci in range(nbytes.size):
        if read and _read_chunk(ci, fds, starts, nbytes, boff, mfds, mstarts, mbytes, poff, buf,
                                packed, task_vectors, based, lengths, short):
            return
        nb, mb = nbytes[ci], mbytes[ci]
        b, addresses = _run_inputs(buf[boff[ci]:boff[ci] + (N + 1) * nb], nb, N, based[ci],
                                   like)
        apply(b, addresses, bf16, packed[poff[ci]:poff[ci] + N * mb].reshape((N, mb)),
              task_vectors, coef[goff[ci]:goff[ci + 1]], seg_len[ci], max_magnitude,
              out[at:at + nb].view(like.dtype), counts[ci])
        at += nb


@njit(nogil=True, cache=True, inline="always")
def _read_chunk(ci, fds, starts, nbytes, boff, mfds, mstarts, mbytes, poff, buf, packed,
                task_vectors, based, lengths, short):
    """Chunk ``ci``'s masks, then its tasks' and (where needed) its base's bytes, as
    :func:`gram_run` lays them out; True (and ``short`` set) where a read came short."""
    N = starts.shape[1] - 1
    mb = mbytes[ci]
    pk = packed[poff[ci]:poff[ci] + N * mb]
    lengths[:N] = mb
    if gather.gather(mfds[ci], mstarts[ci], lengths[:N], pk) != N * mb:
        short[0], short[1] = ci, 0
        return True
    anyset = np.uint8(0)
    for j in range(pk.size):
        anyset |= pk[j]
    nb = nbytes[ci]
    region = buf[boff[ci]:boff[ci] + (N + 1) * nb]
    based[ci] = task_vectors or anyset != 0
    lengths[:] = nb
    if based[ci]:
        got = gather.gather(fds[ci], starts[ci], lengths, region)
    else:
        got = nb + gather.gather(fds[ci, 1:], starts[ci, 1:], lengths[1:], region[nb:])
    if got != (N + 1) * nb:
        short[0], short[1] = ci, 1
        return True
    return False


@njit(nogil=True, cache=True, inline="always")
def _run_inputs(region, nb, N, based, like):
    """The chunk's base array and its tasks' addresses in a run's buffer (base, then the
    tasks); where the base was not read, the first task's array stands in for it."""
    addresses = np.empty(N, np.uint64)
    for k in range(N):
        addresses[k] = region[(k + 1) * nb:].ctypes.data
    b = region[:nb].view(like.dtype) if based else region[nb:2 * nb].view(like.dtype)
    return b, addresses


@njit(nogil=True, cache=True, inline="always")
def _popcount8(x):
    x = x - ((x >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


@njit(nogil=True, cache=True, inline="always")
def _round_bf16(bits):
    """float32 bits -> bf16 bits, round to nearest even; a NaN becomes 0x7FC0 (as torch's
    scalar conversion)."""
    r = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    rounded = np.uint16((bits + r) >> np.uint32(16))
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.uint16(0x7FC0) if nan else rounded


@gc_paused()
def warm(dtypes=(torch.bfloat16, torch.float32)) -> None:
    """Compiles both passes for bf16 and float32 chunks (or loads them from numba's on-disk
    cache), with the argument types :func:`gram_chunk` and :func:`apply_chunk` pass: done in
    the driver before the fuse threads start (threads that each load them at once serialise
    on numba's compiler lock: 31% of the workers' samples on 16 cores)."""
    load_registries()
    for dtype in dtypes:
        b, x = torch.zeros(16, dtype=dtype), torch.zeros((2, 16), dtype=dtype)
        p = np.zeros((2, 2), np.uint8)
        gram_chunk(b, x, p, 1, True)
        apply_chunk(b, x, p, np.ones((1, 2)), True, "max-magnitude", dtype)
        _warm_runs(RUN_LIKE[dtype])
    gather.warm()  # the chunks' pages are dropped in one compiled call


def _warm_runs(like: np.ndarray) -> None:
    """:func:`gram_run` and :func:`apply_run` with the argument types the fuser passes (no
    chunks: nothing is read)."""
    i64, u8 = np.zeros(1, np.int64), np.zeros(0, np.uint8)
    fds, starts = np.zeros((0, 3), np.int32), np.zeros((0, 3), np.int64)
    none = np.zeros(0, np.int64)
    based = np.zeros(0, np.bool_)
    gram_run(fds, starts, none, i64, fds[:, 1:].copy(), starts[:, 1:].copy(), none, i64, u8, u8,
             like, like.dtype == np.uint16, True, none, i64, np.zeros((0, 2, 2)), based,
             np.full(2, -1, np.int64))
    apply_run(True, fds, starts, none, i64, fds[:, 1:].copy(), starts[:, 1:].copy(), none, i64,
              u8, u8, like, like.dtype == np.uint16, True, np.zeros((0, 2), np.float32), none, i64,
              True, based, u8, np.zeros((0, 2), np.int64), np.full(2, -1, np.int64))
