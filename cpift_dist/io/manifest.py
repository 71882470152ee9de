"""Stage manifests: what a stage read (digests), what it wrote (sha256) and whether it finished."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import time
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
_MAP_BLOCK = 1 << 26


def sha256_update(h, fd: int, start: int, end: int) -> None:
    """Adds bytes ``[start, end)`` of the open file ``fd`` to the hash ``h``, read through a
    map of each block (no copy into Python buffers; measured on 2 cores from page cache: 1.4-1.5
    GB/s against 1.0-1.15 GB/s for ``pread`` of the same blocks; hashlib releases the GIL)."""
    while start < end:
        stop = min(end, start + _MAP_BLOCK)
        lo = start - start % mmap.ALLOCATIONGRANULARITY
        with mmap.mmap(fd, stop - lo, access=mmap.ACCESS_READ, offset=lo) as m:
            with memoryview(m) as mv, mv[start - lo:stop - lo] as part:
                h.update(part)
        start = stop


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        sha256_update(h, fd, 0, os.fstat(fd).st_size)
    finally:
        os.close(fd)
    return h.hexdigest()


def sha256_files(paths: list) -> list[str]:
    """:func:`sha256_file` of each path, on up to one thread per core (hashlib releases the
    GIL on large blocks)."""
    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def checkpoint_digest(path: str | Path) -> str:
    """A digest that changes whenever a checkpoint directory's weights change.

    A checkpoint written by this project carries a manifest with each file's sha256: the digest
    is taken over those (free). Otherwise it is taken over each safetensors file's name, size,
    mtime and header, so that a multi-GB model is not re-hashed on every run.
    """
    path = Path(path)
    man = read_manifest(path)
    if man and man.get("status") == "complete" and man.get("outputs"):
        outs = man["outputs"]
        if all((path / f).is_file() and (path / f).stat().st_size == o["bytes"]
               for f, o in outs.items()):
            return sha256_json({f: o["sha256"] for f, o in outs.items()})
    parts = []
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.json")):
        if f.name == MANIFEST_NAME:
            continue
        st = f.stat()
        with open(f, "rb") as fh:
            head = fh.read(1 << 16)
        parts.append([f.name, st.st_size, st.st_mtime_ns, hashlib.sha256(head).hexdigest()])
    return sha256_json(parts)


def write_manifest(directory: str | Path, stage: str, config: Any, inputs: dict[str, str],
                   outputs: dict[str, str] | None = None, extra: dict | None = None,
                   known: dict[str, str] | None = None) -> dict:
    """Writes ``directory/manifest.json`` marking the stage complete.

    Args:
        directory: the stage's (temporary) output directory.
        stage: the stage name (``analyze``, ``fuse``...).
        config: the stage's effective configuration (its digest is recorded).
        inputs: input name -> digest.
        outputs: relative file path -> sha256; by default every file in ``directory``.
        extra: stage-specific facts to record.
        known: with the default ``outputs``, the sha256 of files already hashed (relative
            path -> digest), e.g. while other work ran; the others are hashed here.
    """
    directory = Path(directory)
    if outputs is None:
        known = known or {}
        files = [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME]
        names = [str(p.relative_to(directory)) for p in files]
        todo = [(n, p) for n, p in zip(names, files) if n not in known]
        fresh = dict(zip((n for n, _ in todo), sha256_files([p for _, p in todo])))
        outputs = {n: known[n] if n in known else fresh[n] for n in names}
    man = {
        "stage": stage,
        "status": "complete",
        "config_digest": sha256_json(config),
        "config": config,
        "inputs": inputs,
        "outputs": {f: {"sha256": d, "bytes": (directory / f).stat().st_size}
                    for f, d in outputs.items()},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "pid": os.getpid(),
        **(extra or {}),
    }
    (directory / MANIFEST_NAME).write_text(json.dumps(man, indent=2, default=str) + "\n")
    return man


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a stage directory, or None when there is none or it is unreadable."""
    p = Path(directory) / MANIFEST_NAME
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
