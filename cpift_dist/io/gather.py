"""Compiled scattered reads and advice: many byte ranges of a checkpoint's files read into one
buffer, asked from the kernel ahead, or dropped from the page tables, each in one call that
releases the GIL once (numba, ``nogil``). They call the C library's ``pread``,
``posix_fadvise`` and ``madvise`` by their symbols, which numba's on-disk cache
allows (a ctypes function pointer would be baked in as an address)."""

from __future__ import annotations

import os

import numpy as np
from numba import njit, types

_pread = types.ExternalFunction(
    "pread", types.intp(types.int32, types.uintp, types.uintp, types.int64))
_madvise = types.ExternalFunction(
    "madvise", types.int32(types.uintp, types.uintp, types.int32))
_fadvise = types.ExternalFunction(
    "posix_fadvise", types.int32(types.int32, types.int64, types.int64, types.int32))
WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", 3)
HAS_FADVISE = hasattr(os, "posix_fadvise")
"""Whether the C library has ``posix_fadvise`` (macOS lacks it): :func:`willneed` is compiled,
and its symbol resolved, only where it has."""


@njit(nogil=True, cache=True)
def gather(fds, starts, lengths, out):
    """Reads ``lengths[i]`` bytes at offset ``starts[i]`` of file descriptor ``fds[i]``, for
    each i in order, into ``out`` (uint8, contiguous) one after the other. Returns the bytes
    read: less than ``lengths.sum()`` where a file ends early or a read fails (the caller
    reports it)."""
    at = 0
    dst = out.ctypes.data
    for i in range(starts.size):
        n = lengths[i]
        if at + n > out.size:
            return at
        done = 0
        while done < n:
            got = _pread(fds[i], dst + at + done, n - done, starts[i] + done)
            if got <= 0:
                return at + done
            done += got
        at += n
    return at


@njit(nogil=True, cache=True)
def willneed(fds, starts, lengths, advice):
    """``posix_fadvise(fds[i], starts[i], lengths[i], advice)`` for each i: the kernel starts
    reading the ranges into the page cache and returns at once."""
    for i in range(starts.size):
        _fadvise(fds[i], starts[i], lengths[i], advice)


@njit(nogil=True, cache=True)
def advise(addresses, lengths, advice):
    """``madvise(addresses[i], lengths[i], advice)`` for each i (page-aligned ranges of maps)."""
    for i in range(addresses.size):
        _madvise(addresses[i], lengths[i], advice)


def warm() -> None:
    """Loads the loops (from numba's cache) before threads would wait on its compiler lock."""
    none = np.zeros(0, np.int64)
    gather(np.zeros(0, np.int32), none, none, np.zeros(0, np.uint8))
    if HAS_FADVISE:
        willneed(np.zeros(0, np.int32), none, none, WILLNEED)
    advise(np.zeros(0, np.uint64), np.zeros(0, np.uint64), 0)
