"""How much of a fuse thread's time is Python between the compiled calls (the part that holds
the GIL, so that on N threads it runs one thread at a time), on 1 thread, in one process.

    .venv/bin/python bench/fuse_python.py [--tasks pair|3] [--fuses 6] [--threads 1]
        [--chunk N] [--read pread|map] [--cprofile] [--out DIR] [--data bench/_data]

Uses the 348M bf16 checkpoints and masks of ``bench/fuse_bench.py`` (run it once first). After
one fuse that loads everything, times ``--fuses`` fuses of the pair (weight space, omega 0.5,
empty masks) or of 3 tasks (task vectors, p = 1% masks), 200 MB output shards, outputs beside
the data (or in ``--out``, e.g. a tmpfs). Wrappers time every fuse task, and within it the compiled calls (the numba loops,
the pages dropped from the maps) and ``pwrite``; what is left of a task is Python. Prints per
fuse: wall time, the tasks' time, the compiled calls' and writes' time, the Python, and its
share (on 1 thread only: with more, a task's wall time includes waiting for the GIL).
``--cprofile``: the fuse thread's ``cProfile`` instead, by own time. Figures from
``py-spy --gil`` are not this: py-spy credits the GIL to the last thread that held it, so a
thread inside a ``nogil`` loop counts as holding it while nobody else asks.

To compare code versions, run it with ``PYTHONPATH`` at a worktree of the other version,
alternating the two process by process (this VM's page allocation drifts).
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import importlib
import pstats
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", choices=["pair", "3"], default="pair")
    ap.add_argument("--fuses", type=int, default=6)
    ap.add_argument("--chunk", type=int, default=None)
    ap.add_argument("--read", choices=["pread", "map"], default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--data", type=Path, default=HERE / "_data")
    a = ap.parse_args()

    from cpift_dist.config import FusionConfig
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.fusion import fused
    from cpift_dist.io import safetensors_stream

    F = importlib.import_module("cpift_dist.fusion.fuse")
    checkpoint = importlib.import_module("cpift_dist.io.checkpoint")
    data = a.data / "348m-bf16"
    masks = a.data / "fuse-348m-bf16" / ("empty" if a.tasks == "pair" else "masks3") / "masks"
    if not masks.exists():
        raise SystemExit(f"{masks} is missing: run bench/fuse_bench.py once first")
    extra = {k: v for k, v in (("chunk_elements", a.chunk), ("read", a.read)) if v is not None}
    if a.tasks == "pair":
        tuned = {t: str(data / t) for t in ("t1", "t2")}
        cfg = FusionConfig(space="weights", omega=0.5, max_shard_bytes=200_000_000, **extra)
    else:
        tuned = {t: str(data / t) for t in ("t1", "t2", "t3")}
        cfg = FusionConfig(max_shard_bytes=200_000_000, **extra)

    acc: collections.Counter = collections.Counter()
    inside = threading.local()

    def timed(owner, name: str, key: str) -> None:
        f = getattr(owner, name)

        def wrapper(*args, **kw):
            outer = not getattr(inside, key, False)  # a call inside one of its kind: once
            setattr(inside, key, True)
            t0 = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                if outer:
                    setattr(inside, key, False)
                    acc[key] += time.perf_counter() - t0
        setattr(owner, name, wrapper)

    if not a.cprofile:
        for name in ("gram_chunk", "apply_chunk", "gram_run", "apply_run"):
            if hasattr(fused, name):  # (code before the runs has no run loops)
                timed(fused, name, "compiled")
        timed(safetensors_stream.PositionalWriter, "_pwrite", "compiled")
        timed(checkpoint, "drop_mapped", "compiled")
        F.drop_mapped = checkpoint.drop_mapped
        for name in ("_run", "_whole", "_gram_part", "_apply_part", "_copy_base"):
            if hasattr(F._ShardFuser, name):
                timed(F._ShardFuser, name, "tasks")
    profiles: list[cProfile.Profile] = []
    if a.cprofile:
        worker = F._Scheduler._worker

        def profiled(self):
            p = cProfile.Profile()
            profiles.append(p)
            p.enable()
            try:
                worker(self)
            finally:
                p.disable()
        F._Scheduler._worker = profiled

    fused.warm()
    out = a.out or a.data / "fuse-348m-bf16"

    def one(i: int) -> float:
        t0 = time.perf_counter()
        F.fuse(data / "base", tuned, masks, out / f"out-python-{i % 2}", cfg,
               InProcessExecutor(a.threads), overwrite=True, progress=False)
        return time.perf_counter() - t0

    one(0)
    profiles.clear()
    acc.clear()
    walls = [one(i) for i in range(a.fuses)]
    n = a.fuses
    print(f"== fuse {a.tasks}, 348m bf16, {a.threads} thread(s), {n} fuses, config "
          f"{extra or 'default'} ==")
    print("wall per fuse: " + " ".join(f"{w:.3f}" for w in walls) + " s")
    if a.threads > 1:
        return
    if a.cprofile:
        st = pstats.Stats(profiles[0])
        for p in profiles[1:]:
            st.add(p)
        st.sort_stats("tottime").print_stats(20)
        return
    py = acc["tasks"] - acc["compiled"]
    print(f"tasks {acc['tasks'] / n:.3f} s per fuse, compiled calls and writes "
          f"{acc['compiled'] / n:.3f} s, Python {py / n:.3f} s ({py / acc['tasks']:.1%})")


if __name__ == "__main__":
    main()
