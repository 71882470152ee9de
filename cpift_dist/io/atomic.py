"""Outputs appear whole or not at all: write into a temporary sibling, then rename into place."""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cpift_dist.errors import CpiftError


_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}  # the disk said no


@contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``final``; renames it to ``final`` on success.

    On any exception (including KeyboardInterrupt) the temporary directory is removed and
    ``final`` is left as it was. With ``overwrite`` an existing ``final`` is replaced only after
    the new one is complete.

    Raises:
        CpiftError: ``final`` exists and ``overwrite`` is false, or its parent is not writable.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise CpiftError(f"{final}: output already exists (pass --overwrite to replace it)")
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise CpiftError(f"{parent}: cannot create output directory ({e.strerror})") from None
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _NO_SPACE:
            raise CpiftError(f"{final}: {e.strerror} while writing; nothing was written and "
                             "earlier outputs are untouched") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
