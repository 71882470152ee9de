"""Fused per-chunk loops of the analysis, compiled with numba (``nogil``: threads run them in
parallel).

One call reads a chunk of the base and of every task's tuned checkpoint once and does all of a
pass's work per element in registers: widen to float32, subtract, absolute value, then the
pass's action on the magnitude's bit pattern (histogram its high or low 16 bits, set its mask
bit, collect it as a window candidate). Before, each of these was a whole-array numpy/torch
operation over fresh float32 temporaries, about 50 bytes of memory traffic per value against
the 2 bytes of a bf16 input, and the torch ops ran on thread pools that oversubscribed the
cores when several units ran at once.

Exactness: the magnitude is the same IEEE float32 ``|float32(tuned) - float32(base)|`` the
torch path computed (no fast-math, no contraction; bf16 widens exactly by a 16-bit shift), so
its bit pattern, and every mask built from it, is unchanged (tested against the torch
definition and the ``torch.topk`` oracle).

Inputs are read-only 1-d arrays, usually straight over memory maps of the checkpoint files (no
copy): the base, and the tasks as a tuple of exactly :data:`GROUP` arrays (a loop compiles once
per dtype, not once per task count: fewer tasks are padded with inactive entries, more run in
groups). ``uint16`` holds bf16 bits, ``float32`` is as is (any other float dtype is widened to
float32 by the caller). Per-task outputs are indexed by the task's place in the group.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import sys

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from cpift_dist.io import gather

BLOCK = 4096  # elements widened at a time: the scratch stays in L1/L2
GROUP = 4  # tasks per call
NONFINITE = 0x7F800000  # bits of +Inf; NaN magnitudes lie above


@njit(nogil=True, cache=True, inline="always")
def _widen(src, start, m, bf16, out_u32, out_f32):
    """``out_f32[:m]`` = float32 values of ``src[start:start + m]``.

    Inner loops index with the loop variable only, on slices: an index such as ``start + i``
    keeps numba's negative-index wraparound in the loop, which stops LLVM from vectorising it
    (measured: 10x slower)."""
    s = src[start:start + m]
    if bf16:
        for i in range(m):
            out_u32[i] = np.uint32(s[i]) << np.uint32(16)
    else:
        for i in range(m):
            out_f32[i] = s[i]


@njit(nogil=True, cache=True)
def widen_bf16(src, out):
    """``out[:n]`` = the float32 values of the bf16 ``src`` (uint16 bits, read-only), exactly
    (:func:`_widen` over the whole array): a parameter whose checkpoints differ in dtype is
    compared in float32 (:func:`cpift_dist.analysis.scan.kernel_view`), into a buffer the
    caller reuses."""
    _widen(src, 0, src.size, True, out.view(np.uint32), out)


@njit(nogil=True, cache=True, inline="always")
def _magnitude_bits(base_f32, tuned, start, m, bf16, tu, tf):
    """``tu[:m]`` = bit patterns of |tuned - base| (float32) for the block."""
    _widen(tuned, start, m, bf16, tu, tf)
    for i in range(m):
        tf[i] = abs(tf[i] - base_f32[i])


@njit(nogil=True, cache=True)
def high_histograms(base, tuned, bf16, active, hists):
    """Adds the high 16 bits of every magnitude into ``hists[task]`` (int64, 32,768 bins) for
    each task with ``active[task]``. Non-finite magnitudes land in bins >= 0x7F80. (The sample
    pass hands it the sampled rows alone, gathered in buffers.)

    Most magnitudes are often exactly zero (elements a fine-tune left unchanged, or whose
    update bf16 rounded away: 77% in the benchmark's checkpoints). Incrementing ``h[0]`` for
    each made every increment wait for the previous one's store (about 5 cycles per element);
    zeros are counted in a register instead, and add 0 to one of bins 0-7 in turn so that the
    loop stays branch-free (measured: 1.95 ns per element and task before, 0.94 ns now, with
    the same histograms)."""
    n = base.size
    bu = np.empty(BLOCK, np.uint32)
    bf = bu.view(np.float32)
    tu = np.empty(BLOCK, np.uint32)
    tf = tu.view(np.float32)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _widen(base, start, m, bf16, bu, bf)
        for k in range(len(tuned)):
            if not active[k]:
                continue
            _magnitude_bits(bf, tuned[k], start, m, bf16, tu, tf)
            h = hists[k]
            nonzero = 0
            for i in range(m):
                u = tu[i]
                nz = np.int64(u != np.uint32(0))
                h[(u >> np.uint32(16)) if u != np.uint32(0) else np.uint32(i & 7)] += nz
                nonzero += nz
            h[0] += m - nonzero  # the zero magnitudes, counted in a register


@njit(nogil=True, cache=True)
def low_histograms(base, tuned, bf16, active, high, hists):
    """For each task with ``active[task]``: adds the low 16 bits of the magnitudes whose
    high 16 bits equal ``high[task]`` into ``hists[task]`` (int64, 65,536 bins)."""
    n = base.size
    bu = np.empty(BLOCK, np.uint32)
    bf = bu.view(np.float32)
    tu = np.empty(BLOCK, np.uint32)
    tf = tu.view(np.float32)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _widen(base, start, m, bf16, bu, bf)
        for k in range(len(tuned)):
            if not active[k]:
                continue
            hb = np.uint32(high[k])
            _magnitude_bits(bf, tuned[k], start, m, bf16, tu, tf)
            h = hists[k]
            for i in range(m):
                if tu[i] >> np.uint32(16) == hb:
                    h[tu[i] & np.uint32(0xFFFF)] += 1


_ONES = np.uint64(0x0101010101010101)  # bit 0 of each byte of a word
_GATHER = np.uint64(0x0102040810204080)  # a multiply that gathers bit 0 of 8 bytes into one


@njit(nogil=True, cache=True, inline="always")
def _from_bf16(u):
    """The float32 value of bf16 bits ``u`` (exact: a 16-bit shift)."""
    return np.uint32(np.uint32(u) << np.uint32(16)).view(np.float32)


@njit(nogil=True, cache=True, inline="always")
def _magnitude(x, base):
    """Bit pattern of the float32 |x - base|: the magnitude every mask is selected on."""
    return np.float32(abs(x - base)).view(np.uint32)


@njit(nogil=True, cache=True, inline="always")
def _bits_at(src, i, bf16, base_f32):
    """Bit pattern of |src[i] - base| (float32) for one element, as the loops compute it."""
    if bf16:
        x = _from_bf16(src[i])
    else:
        x = src[i]
    return _magnitude(x, base_f32)


@njit(nogil=True, cache=True, inline="always")
def _window_flags(src, start, m, bf16, base_f32, h, low, flags):
    """``flags[i]`` = (bits >= h) | (bits >= low) << 1 for the block's magnitudes, computed in
    registers (no scratch array of magnitudes); returns the largest bit pattern.

    Written for LLVM's vectoriser: one store per element, 32-bit compares only (an expression
    such as ``b - low < width`` on uint32 is typed uint64 by numba, which halves the lanes: a
    two-flag sweep measured 1.6x slower with it), and no counters (counters in the sweep made
    it 2.4x slower than the flags alone; they are counted from the packed words instead)."""
    s = src[start:start + m]
    top = np.uint32(0)
    if bf16:
        for i in range(m):
            b = _magnitude(_from_bf16(s[i]), base_f32[i])
            flags[i] = np.uint8(b >= h) | (np.uint8(b >= low) << np.uint8(1))
            top = max(top, b)
    else:
        for i in range(m):
            b = _magnitude(s[i], base_f32[i])
            flags[i] = np.uint8(b >= h) | (np.uint8(b >= low) << np.uint8(1))
            top = max(top, b)
    return top


@njit(nogil=True, cache=True)
def window(base, tuned, bf16, active, lo, hi, packed, above, nonfinite):
    """The window pass of a chunk, for each task with ``active[task]``.

    Writes every byte of ``packed[task]`` once, without reading it (see :func:`_pack_flags`):
    bit i (little bit order) set where the magnitude's bits are >= ``hi[task]``. Counts those
    into ``above[task]``, flags ``nonfinite[task]`` when a bit pattern is >= +Inf's, and returns
    the elements with ``lo <= bits < hi`` as three arrays (task, flat index in the chunk, int32
    bits), in task then index order.

    Per block and task: one vectorised sweep writes two flag bits per element
    (:func:`_window_flags`); one pass over the flags, 8 at a time as a uint64 word, packs the
    mask bits and counts both flags (a multiply each); the window's few elements are found
    from the words (a zero word, the usual case, is skipped) and their bits computed again.
    Measured on 2 cores, chunks of real checkpoints in memory, 3 tasks, the plan's window:
    0.41 ns per task and element against 0.67 ns (bf16), 0.69 against 1.23 ns (fp32) for the
    loop it replaced (a magnitude scratch array, then a sweep with counters).
    """
    n = base.size
    bu = np.empty(BLOCK, np.uint32)
    bf = bu.view(np.float32)
    cap = 1024
    c_task = np.empty(cap, np.int32)
    c_idx = np.empty(cap, np.int64)
    c_bits = np.empty(cap, np.int32)
    count = 0
    flags = np.zeros(BLOCK, np.uint8)
    words = flags.view(np.uint64)
    for start in range(0, n, BLOCK):  # BLOCK is a multiple of 8: a block fills whole bytes
        m = min(BLOCK, n - start)
        nb = (m + 7) >> 3
        _widen(base, start, m, bf16, bu, bf)
        for k in range(len(tuned)):
            if not active[k]:
                continue
            h = np.uint32(hi[k])
            low = np.uint32(min(lo[k], hi[k]))  # an empty window when lo >= hi
            top = _window_flags(tuned[k], start, m, bf16, bf, h, low, flags)
            flags[m:] = 0
            o = packed[k][start >> 3:(start >> 3) + nb]
            n_above = np.uint64(0)
            n_low = np.uint64(0)
            for j in range(nb):
                w = words[j]
                a = w & _ONES
                o[j] = np.uint8((a * _GATHER) >> np.uint64(56))
                n_above += (a * _ONES) >> np.uint64(56)  # the byte sum lands in the top byte
                n_low += (((w >> np.uint64(1)) & _ONES) * _ONES) >> np.uint64(56)
            above[k] += n_above
            if top >= NONFINITE:
                nonfinite[k] = True
            n_in = n_low - n_above  # low <= bits < hi
            if n_in == 0:  # the usual case: the window is narrow
                continue
            if count + n_in > cap:
                cap = max(2 * cap, count + n_in)
                c_task = _grow(c_task, cap)
                c_idx = _grow(c_idx, cap)
                c_bits = _grow(c_bits, cap)
            for j in range(nb):
                inside = (words[j] >> np.uint64(1)) & ~words[j] & _ONES
                while inside:  # one step per candidate: its byte from the trailing zeros
                    i = 8 * j + np.int64(_trailing_zeros(inside) >> np.uint64(3))
                    c_task[count] = k
                    c_idx[count] = start + i
                    c_bits[count] = np.int32(_bits_at(tuned[k], start + i, bf16, bf[i]))
                    count += 1
                    inside &= inside - np.uint64(1)
    return _by_task(c_task[:count], c_idx[:count], c_bits[:count], len(tuned))


@njit(nogil=True, cache=True, inline="always")
def _task_view(buf, nb, k, n_tasks, kind):
    """Task ``k``'s chunk in a buffer laid out as :func:`window_run` reads it (the base
    first, then each task's ``nb`` bytes); past the last task, the base (an inactive pad)."""
    if k < n_tasks:
        return buf[(k + 1) * nb:(k + 2) * nb].view(kind)
    return buf[:nb].view(kind)


@njit(nogil=True, cache=True)
def window_run(fds, starts, nbytes, buf, kind, bf16, active, lo, hi, packed, poff, above,
               nonfinite, short):
    """:func:`window` over a run of chunks of one dtype and selection group, each read here
    from the files (``pread`` of the base's and every task's bytes into ``buf``, as
    :func:`cpift_dist.io.checkpoint.read_chunk` does): the whole run in one call that releases
    the GIL once, where a Python loop per chunk held it for about a tenth of each thread's time
    (py-spy, 2 threads, 1M-element chunks), which would cap many threads.

    ``fds``/``starts``: ``[C, 1 + tasks]`` descriptors and byte offsets of each chunk in each
    checkpoint (the base first); ``nbytes[c]``: the chunk's bytes per checkpoint; ``kind``:
    ``np.uint16`` (bf16 bits) or ``np.float32``. ``active``/``lo``/``hi``/``above``/
    ``nonfinite``: per task, padded to a multiple of :data:`GROUP`. Chunk c's mask bytes go
    to ``packed[poff[c]:poff[c + 1]]``, laid out ``[tasks padded, (n + 7) // 8]``. Returns the
    window's candidates as (chunk, task, flat index in the chunk, int32 bits), ordered by
    chunk, then task, then index. A chunk that reads short sets ``short[0]`` to its number and
    ends the run (the caller names the file)."""
    n_chunks, n_read = starts.shape
    n_tasks = n_read - 1
    t_pad = active.size
    lengths = np.empty(n_read, np.int64)
    cap = 1024
    o_ci = np.empty(cap, np.int32)
    o_task = np.empty(cap, np.int32)
    o_idx = np.empty(cap, np.int64)
    o_bits = np.empty(cap, np.int32)
    count = 0
    for ci in range(n_chunks):
        nb = nbytes[ci]
        lengths[:] = nb
        if gather.gather(fds[ci], starts[ci], lengths, buf) != nb * n_read:
            short[0] = ci
            break
        b = buf[:nb].view(kind)
        pb = (b.size + 7) >> 3
        pk = packed[poff[ci]:poff[ci] + t_pad * pb].reshape((t_pad, pb))
        for g0 in range(0, t_pad, GROUP):
            t = (_task_view(buf, nb, g0, n_tasks, kind),
                 _task_view(buf, nb, g0 + 1, n_tasks, kind),
                 _task_view(buf, nb, g0 + 2, n_tasks, kind),
                 _task_view(buf, nb, g0 + 3, n_tasks, kind))
            g1 = g0 + GROUP
            c_task, c_idx, c_bits = window(b, t, bf16, active[g0:g1], lo[g0:g1], hi[g0:g1],
                                           pk[g0:g1], above[g0:g1], nonfinite[g0:g1])
            m = c_task.size
            if m == 0:
                continue
            if count + m > cap:
                cap = max(2 * cap, count + m)
                o_ci = _grow(o_ci, cap)
                o_task = _grow(o_task, cap)
                o_idx = _grow(o_idx, cap)
                o_bits = _grow(o_bits, cap)
            for j in range(m):
                o_ci[count + j] = ci
                o_task[count + j] = c_task[j] + g0
                o_idx[count + j] = c_idx[j]
                o_bits[count + j] = c_bits[j]
            count += m
    return o_ci[:count], o_task[:count], o_idx[:count], o_bits[:count]


@njit(nogil=True, cache=True)
def _by_task(task, idx, bits, n_tasks):
    """The candidates ordered by task, index order kept within a task: a counting sort
    (one pass to count, one to place; an ``argsort`` here cost 100+ ns per candidate)."""
    start = np.zeros(n_tasks + 1, np.int64)
    for j in range(task.size):
        start[task[j] + 1] += 1
    for t in range(n_tasks):
        start[t + 1] += start[t]
    o_task = np.empty_like(task)
    o_idx = np.empty_like(idx)
    o_bits = np.empty_like(bits)
    for j in range(task.size):
        p = start[task[j]]
        o_task[p] = task[j]
        o_idx[p] = idx[j]
        o_bits[p] = bits[j]
        start[task[j]] = p + 1
    return o_task, o_idx, o_bits


@intrinsic
def _trailing_zeros(typingctx, word):
    """Trailing zero bits of a nonzero uint64 (LLVM's ``cttz``: one instruction)."""
    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))
    return types.uint64(types.uint64), codegen


@njit(nogil=True, cache=True)
def _pack_flags(flags, m, out, byte0):
    """Writes the 0/1 bytes ``flags[:m]`` (zero-padded to a multiple of 8) as the bits of
    ``out[byte0:]``: 8 flags read as one uint64 and gathered into a byte by a multiply.

    The mask loops store each byte once and never read it (no ``|=``): the caller's fresh
    ``np.zeros`` array is memory the kernel has not backed yet, and a read before the first write
    maps the shared zero page, so that the write then faults again to copy it and flushes the
    other cores' TLBs by interrupt (``do_wp_page``). Measured on 2 cores (348M bf16, 3 tasks,
    2 threads): those faults were 12-18% of the window pass's thread samples; the pass took
    0.62-0.64 s with ``|=`` against 0.49-0.55 s now (4 alternated runs each)."""
    words = flags.view(np.uint64)
    nb = (m + 7) >> 3
    o = out[byte0:byte0 + nb]
    for j in range(nb):
        o[j] = np.uint8((words[j] * _GATHER) >> np.uint64(56))


@njit(nogil=True, cache=True)
def set_bits(packed, positions, first):
    """Sets bit ``positions[j] - first`` (little bit order) of the bytes ``packed``, for
    every j (any order, repeats allowed)."""
    for j in range(positions.size):
        p = positions[j] - first
        packed[p >> 3] |= np.uint8(1) << np.uint8(p & 7)


@njit(nogil=True, cache=True)
def kth_largest_bits(bits, need):
    """The ``need``-th largest of the non-negative int32 ``bits`` (1 <= need <= bits.size),
    and how many are strictly greater: a two-level radix select, two passes over ``bits``.
    Four interleaved high histograms: a window's candidates fall in a few bins, and one
    histogram would make every increment wait on the one before (a store chain)."""
    h = np.zeros((4, 1 << 15), np.int64)
    n = bits.size
    q = n - n % 4
    for i in range(0, q, 4):
        h[0, bits[i] >> 16] += 1
        h[1, bits[i + 1] >> 16] += 1
        h[2, bits[i + 2] >> 16] += 1
        h[3, bits[i + 3] >> 16] += 1
    for i in range(q, n):
        h[0, bits[i] >> 16] += 1
    above = 0
    hb = (1 << 15) - 1
    while True:
        c = h[0, hb] + h[1, hb] + h[2, hb] + h[3, hb]
        if above + c >= need:
            break
        above += c
        hb -= 1
    low = np.zeros(1 << 16, np.int64)
    for i in range(n):
        b = bits[i]
        if (b >> 16) == hb:
            low[b & 0xFFFF] += 1
    lb = 0xFFFF
    while above + low[lb] < need:
        above += low[lb]
        lb -= 1
    return (hb << 16) | lb, above


@njit(nogil=True, cache=True)
def set_winners(bits, idx, first, thr, left, packed):
    """Sets, in the packed mask bytes ``packed``, bit ``idx[j] + first`` (little bit order) of
    every candidate j above ``thr`` and of the first ``left`` equal to it; returns how many
    ties are left for the next segment. Branch-free: every candidate ORs its flag in."""
    for j in range(bits.size):
        b = bits[j]
        tie = (b == thr) & (left > 0)
        left -= np.int64(tie)
        p = idx[j] + first
        packed[p >> 3] |= np.uint8((b > thr) | tie) << np.uint8(p & 7)
    return left


@njit(nogil=True, cache=True)
def _grow(a, cap):
    out = np.empty(cap, a.dtype)
    out[:a.size] = a
    return out


@njit(nogil=True, cache=True)
def threshold_masks(base, tuned, bf16, active, thr, quota, taken, packed):
    """Radix pass 3, for each task with ``active[task]``: writes ``packed[task]``, bit i set
    when the magnitude's bits exceed ``thr[task]``, or equal it while ``taken[task] <
    quota[task]`` (the first ties in index order; ``taken`` is updated)."""
    n = base.size
    bu = np.empty(BLOCK, np.uint32)
    bf = bu.view(np.float32)
    tu = np.empty(BLOCK, np.uint32)
    tf = tu.view(np.float32)
    flags = np.zeros(BLOCK, np.uint8)
    for start in range(0, n, BLOCK):
        m = min(BLOCK, n - start)
        _widen(base, start, m, bf16, bu, bf)
        for k in range(len(tuned)):
            if not active[k]:
                continue
            t = np.uint32(thr[k])
            _magnitude_bits(bf, tuned[k], start, m, bf16, tu, tf)
            ties = 0
            for i in range(m):
                f = np.uint8(tu[i] > t)
                flags[i] = f
                ties += tu[i] == t
            if ties and taken[k] < quota[k]:  # the first ties in index order, up to the quota
                for i in range(m):
                    if tu[i] == t and taken[k] < quota[k]:
                        flags[i] = 1
                        taken[k] += 1
            flags[m:] = 0
            _pack_flags(flags, m, packed[k], start >> 3)


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view of ``a``. numba compiles a loop once per writability of its array
    arguments: window candidates come back writable from threads and read-only from Ray's
    object store, so they are always passed read-only (one signature, loaded by :func:`warm`)."""
    v = a.view()
    v.flags.writeable = False
    return v


_BLAS_PROBE = "scipy.linalg.cython_blas"


def load_registries() -> None:
    """Loads numba's array-math registries without SciPy's BLAS probe, once per process.

    numba's first compile or cache load in a process imports ``numba.np.arraymath``, which
    imports ``scipy.linalg.cython_blas`` only to learn whether ``np.dot``/``np.vdot`` may call
    BLAS (``numba.np.linalg.ensure_blas``). With SciPy installed that import is slow (0.42 s
    alone, ``python -X importtime``; SciPy's array-API shim imports ``numpy.f2py``); measured
    on 2 cores, loading every loop from the cache took 0.48-0.57 s without the probe against
    0.57-0.67 s with it, in fresh processes. These loops call no
    BLAS: while ``numba.np.arraymath`` is imported the probe's module reads as absent, so
    numba's ``np.vdot`` falls back to its own loop in this process; every other linear-algebra
    function probes SciPy again when it is compiled (the entry is removed right after)."""
    if "numba.np.arraymath" in sys.modules:
        return
    blocked = _BLAS_PROBE not in sys.modules
    if blocked:
        sys.modules[_BLAS_PROBE] = None  # "import" of it raises ImportError
    try:
        importlib.import_module("numba.np.arraymath")
    finally:
        if blocked and sys.modules.get(_BLAS_PROBE, 0) is None:
            del sys.modules[_BLAS_PROBE]


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the block or the decorated function (then
    restored as it was).

    Loading numba's registries and cached loops creates tens of thousands of objects, and each
    collection they trigger walks every object of the process, torch's and transformers'
    included: measured on 2 cores in fresh processes, 0.12-0.14 s of a 0.34-0.42 s
    :func:`warm` went to the collector. What is loaded lives as long as the process, so there
    is nothing to collect."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@gc_paused()
def warm(dtypes=(np.uint16, np.float32)) -> None:
    """Compiles every loop for bf16 and float32 chunks (or loads them from numba's on-disk
    cache), with the argument types :mod:`cpift_dist.analysis.scan` passes: done once up front,
    in the driver before its threads start and before worker processes are started (they load
    the cache instead of compiling at the same time)."""
    load_registries()
    i64 = np.zeros(GROUP, np.int64)
    active = np.ones(GROUP, np.bool_)
    for dt in dtypes:
        b = np.zeros(16, dt)
        b.flags.writeable = False  # as the memory-mapped chunks are
        t, bf16 = (b,) * GROUP, dt == np.uint16
        high_histograms(b, t, bf16, active, np.zeros((GROUP, 1 << 15), np.int64))
        low_histograms(b, t, bf16, active, i64, np.zeros((GROUP, 1 << 16), np.int64))
        window(b, t, bf16, active, i64, i64, np.zeros((GROUP, 2), np.uint8),
               np.zeros(GROUP, np.int64), np.zeros(GROUP, np.bool_))
        window_run(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int64), np.zeros(0, np.int64),
                   np.zeros(16, np.uint8), dt, bf16, active, i64, i64, np.zeros(0, np.uint8),
                   np.zeros(1, np.int64), np.zeros(GROUP, np.int64), np.zeros(GROUP, np.bool_),
                   np.full(1, -1, np.int64))
        threshold_masks(b, t, bf16, active, i64, i64, np.zeros(GROUP, np.int64),
                        np.zeros((GROUP, 2), np.uint8))
    set_bits(np.zeros(1, np.uint8), np.zeros(1, np.int64), 0)
    widen_bf16(readonly(np.zeros(1, np.uint16)), np.zeros(1, np.float32))
    kth_largest_bits(readonly(np.zeros(1, np.int32)), 1)
    set_winners(readonly(np.zeros(1, np.int32)), readonly(np.zeros(1, np.int64)), 0, 0, 1,
                np.zeros(1, np.uint8))
    gather.warm()
