"""How writing one output scales with threads: the ceiling of a fuser that writes its shards'
bytes at their offsets from many threads.

    .venv/bin/python bench/write_bench.py [--dir bench/_data] [--gib 0.7] [--threads 2]

Writes ``--gib`` of bytes in 8 MiB blocks into new files under ``--dir``, in four ways,
alternated, 3 rounds, and prints the median of each and its rate against one thread:
  one       1 thread, ``pwrite`` into one file (what the fuser's writes cost on one thread)
  same      N threads, ``pwrite`` of interleaved blocks into one file (the fuser's threads
            writing the chunks of one output shard)
  files     N threads, each ``pwrite`` into its own file (N output shards written at once)
  map       N threads copying into a shared writable map of one file (no write syscalls)
Before each measurement the process touches and frees as much anonymous memory as it writes,
so that the new file's pages come from memory the machine already backs (on a VM whose host
reclaims freed guest memory, a first touch otherwise costs more than the write itself and
varies run to run). Every file is removed after its measurement.

On Linux a buffered write takes the file's inode lock (ext4, XFS, tmpfs), so ``same`` is
expected to run at one thread's rate; ``files`` and ``map`` show what parallel writers get.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

BLOCK = 8 << 20


def _new(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    return fd


def _run(n_threads: int, fn) -> None:
    ts = [threading.Thread(target=fn, args=(k,)) for k in range(n_threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def measure(way: str, d: Path, size: int, threads: int, buf: np.ndarray) -> float:
    """Seconds to write ``size`` bytes one way (files closed, not synced)."""
    warm = np.ones(size, np.uint8)  # memory the machine backs, freed for the file's pages
    del warm
    paths = [d / f"write-bench-{k}.bin" for k in range(threads if way == "files" else 1)]
    t0 = time.perf_counter()
    if way in ("one", "same"):
        n = 1 if way == "one" else threads
        fd = _new(paths[0], size)
        _run(n, lambda k: [os.pwrite(fd, buf, off) for off in range(k * BLOCK, size, n * BLOCK)])
        os.close(fd)
    elif way == "files":
        part = size // threads
        fds = [_new(p, part) for p in paths]
        _run(threads, lambda k: [os.pwrite(fds[k], buf, off) for off in range(0, part, BLOCK)])
        for fd in fds:
            os.close(fd)
    else:
        fd = _new(paths[0], size)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        arr = np.frombuffer(mm, np.uint8)

        def copy(k: int) -> None:
            for off in range(k * BLOCK, size, threads * BLOCK):
                arr[off:off + BLOCK] = buf  # numpy's copy releases the GIL
        _run(threads, copy)
        del arr
        mm.close()
        os.close(fd)
    dt = time.perf_counter() - t0
    for p in paths:
        p.unlink()
    return dt


WAYS = ["one", "same", "files", "map"]
WHAT = {"one": "1 thread, one file", "same": "{n} threads, one file",
        "files": "{n} threads, a file each", "map": "{n} threads, a shared map of one file"}


def run(d: Path, gib: float, threads: int, rounds: int = 3) -> tuple[int, dict[str, list[float]]]:
    """The bytes written and each way's seconds, ``rounds`` alternated rounds."""
    d.mkdir(parents=True, exist_ok=True)
    step = BLOCK * max(1, threads)  # every way writes the same bytes: whole blocks per file
    size = max(1, int(gib * (1 << 30)) // step) * step
    buf = np.random.default_rng(0).integers(0, 256, BLOCK, dtype=np.uint8)
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for _ in range(rounds):
        for w in WAYS:
            times[w].append(measure(w, d, size, threads, buf))
    return size, times


def lines(size: int, times: dict[str, list[float]]) -> list[tuple[str, str]]:
    """(way, figure) per way: median seconds, GB/s, rate against one thread, every run."""
    base = statistics.median(times["one"])
    out = []
    for w in WAYS:
        t = statistics.median(times[w])
        out.append((w, f"{t:6.2f} s  {size / t / 1e9:6.2f} GB/s  {base / t:5.2f}x one thread   "
                       f"({', '.join(f'{x:.2f}' for x in times[w])})"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", type=Path, default=Path(__file__).parent / "_data")
    ap.add_argument("--gib", type=float, default=0.7)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    size, times = run(a.dir, a.gib, a.threads)
    print(f"\n== writing {size / 1e9:.2f} GB into new files under {a.dir}, {a.threads} threads "
          f"({os.cpu_count()} cores), 8 MiB blocks, median of 3 ==")
    for w, fig in lines(size, times):
        print(f"{w:5s} {WHAT[w].format(n=a.threads):38s} {fig}")


if __name__ == "__main__":
    main()
