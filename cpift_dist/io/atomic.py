"""Outputs appear whole or not at all: write into a temporary sibling, then rename into place.

A temporary sibling is locked (``flock``) while its process writes it. One that a dead process
left (SIGKILL, the OOM killer, a preempted job's SIGTERM: no clean-up ran) is unlocked; the
next output to the same place removes it, so killed runs do not pile up hidden copies of
multi-GB outputs.

A resumable output (the fuser's, whose shards can take an hour on a 70B model) writes into a
sibling with a stable name instead, ``.<name>.partial``, locked against a second writer; on
failure it is kept when it holds finished work, and the next call with the same output resumes
from it (the caller decides what in it can be kept: :func:`atomic_dir`'s ``keep``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from cpift_dist.errors import CpiftError


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # the disk said no


def partial_dir(final: str | Path) -> Path:
    """Where a resumable output is written before it is renamed to ``final``."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


STALE_SECONDS = 10
"""A temporary sibling unchanged this long and unlocked is a dead process's (a live one locks
its directory right after creating it)."""


def _sweep(final: Path) -> None:
    """Removes the temporary siblings of ``final`` that dead processes left (unlocked and
    unchanged for :data:`STALE_SECONDS`); those in use, or on a file system without
    ``flock``, are left alone."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime < STALE_SECONDS:
                continue
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            with contextlib.suppress(OSError):  # in use (BlockingIOError), or no flock here:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # not ours to remove
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)


def _lock(tmp: Path, final: Path) -> int:
    """An exclusive ``flock`` on the directory ``tmp`` (released when the returned descriptor
    closes, also when the process dies): two runs never write one partial output."""
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise CpiftError(f"{final}: another process is writing this output (its partial "
                         f"output {tmp} is locked); wait for it or stop it") from None
    except OSError:  # a file system without flock (some NFS mounts): unlocked, as before
        pass
    return fd


def check_room(directory: Path, need: int, final: Path, what: str) -> None:
    """Refuses to start writing ``need`` bytes into ``directory`` (an output's temporary
    directory) when its file system has less free: a full disk found an hour into a 70B
    fusion, or as a SIGBUS in a mapped mask file, is worse than one line before the work.

    Raises:
        CpiftError: naming the output, what it needs and what is free.
    """
    from tqdm import tqdm

    try:
        free = shutil.disk_usage(directory).free
    except OSError:  # no figure to go by: the writes will tell
        return
    if free < need:
        raise CpiftError(f"{final}: {what} needs {tqdm.format_sizeof(need, 'B')}, and its file "
                         f"system has {tqdm.format_sizeof(free, 'B')} free; free some space or "
                         "write the output elsewhere")


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False,
               keep: Callable[[], bool] | None = None) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``final``; renames it to ``final`` on success.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``final`` is left as it was. With ``overwrite`` an existing ``final`` is replaced only after
    the new one is complete.

    With ``keep`` the output is resumable: the directory is :func:`partial_dir` (created, or
    as an earlier call left it), locked while in use, and on an exception it is kept when
    ``keep()`` is true; the exception then carries a note saying where.

    Raises:
        CpiftError: ``final`` exists and ``overwrite`` is false, its parent is not writable, or
            another process holds the partial output.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise CpiftError(f"{final}: output already exists (pass --overwrite to replace it)")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if keep is None:
            _sweep(final)
            tmp = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        else:
            tmp = partial_dir(final)
            tmp.mkdir(exist_ok=True)
    except OSError as e:
        raise CpiftError(f"{parent}: cannot create output directory ({e.strerror})") from None
    lock = _lock(tmp, final)
    try:
        try:
            yield tmp
        except BaseException as e:
            kept = keep is not None and keep()
            if kept:
                e.add_note(f"the finished part is kept in {tmp}: the same command resumes "
                           "from it (remove it to start over)")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError) and e.errno in _NO_SPACE:
                err = CpiftError(f"{final}: {e.strerror} while writing; " + (
                    "earlier outputs are untouched" if kept else
                    "nothing was written and earlier outputs are untouched"))
                for n in getattr(e, "__notes__", []):
                    err.add_note(n)
                raise err from None
            raise
        try:
            if final.exists():
                old = parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CpiftError(f"{final}: cannot move output into place ({e.strerror})") from None
    finally:
        if lock >= 0:
            os.close(lock)
