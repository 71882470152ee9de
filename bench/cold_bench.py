"""Cold-input benchmark: the analysis and the fuser reading checkpoints that are not in the page
cache, against a raw read of the same files, with the bytes each reads from disk.

    .venv/bin/python bench/cold_bench.py [--size 348m] [--threads 2] [--data bench/_data]

Uses (and builds once) the bf16 checkpoints of ``bench/analyze_bench.py``. Each measurement
runs in a fresh process after the inputs are dropped from the page cache
(``posix_fadvise(DONTNEED)``: clean pages of files no process maps; on tmpfs it does nothing,
which the "read" column shows); bytes read are the process's ``read_bytes`` (``/proc/self/io``),
peak RSS its ``ru_maxrss``:
  raw            sequential read of base + 3 tuned (16 MiB blocks), the best of 3: on a VM
                 whose disk the host caches, the first cold read can be several times slower
  analyze        ``analyze`` of 3 tasks, p = 1%, in-process on --threads threads
  analyze, evicted between passes
                 the same, with the inputs dropped again after the sample pass: what happens
                 when they are larger than memory
  fuse           ``fuse`` of the 3 tasks with the analysis's masks (weight space)
and, for comparison, the analysis and the fusion from a warm cache.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from analyze_bench import build, files_of, m_raw  # noqa: E402


def evict(dirs: list[str]) -> None:
    for d in dirs:
        for f in files_of(Path(d)):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def read_bytes() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def measure(kind: str, base: str, tuned: list[str], out: str, threads: int, cold: bool,
            masks: str) -> dict:
    from cpift_dist.config import AnalysisConfig, FusionConfig
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.fusion import fuse

    analysis = importlib.import_module("cpift_dist.analysis.analyze")
    inputs = [base, *tuned]
    names = {Path(t).name: t for t in tuned}
    if kind == "analyze-evict":
        window_pass = analysis._window_pass

        def evicting(*a, **kw):
            evict(inputs)
            return window_pass(*a, **kw)
        analysis._window_pass = evicting
    if cold:
        evict(inputs + ([masks] if kind == "fuse" else []))
    r0, t0 = read_bytes(), time.perf_counter()
    if kind == "raw":
        m_raw(inputs)
    elif kind.startswith("analyze"):
        analysis.analyze(base, names, out, AnalysisConfig(p=0.01),
                         executor=InProcessExecutor(threads), overwrite=True, progress=False)
    else:
        fuse(base, names, masks, out, FusionConfig(device="cpu"),
             executor=InProcessExecutor(threads), overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "read": read_bytes() - r0,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def child(*args) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", json.dumps(args)],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="348m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(__file__).parent / "_data")
    ap.add_argument("--measure")
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(*json.loads(a.measure))))
        return
    paths = build(a.data, a.size, "bf16")
    base, tuned = str(paths["base"]), [str(paths[t]) for t in ("t1", "t2", "t3")]
    out = a.data / f"cold-{a.size}"
    masks = str(out / "an" / "masks")
    total = sum(f.stat().st_size for p in [base, *tuned] for f in files_of(Path(p)))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    print(f"== {a.size} bf16, base + 3 tuned ({total / 1e9:.2f} GB), p = 1%, "
          f"{a.threads} threads, {os.cpu_count()} cores, {memory / 2**30:.1f} GiB memory ==")
    if total > memory:  # the page cache cannot hold them: no run starts warm
        print("the inputs exceed memory: the 'warm' rows start from whatever the previous run "
              "left in the page cache")
    rows = [("raw read", "raw", True), ("analyze, warm", "analyze", False),
            ("analyze, cold", "analyze", True),
            ("analyze, evicted between passes", "analyze-evict", True),
            ("fuse 3 tasks, warm", "fuse", False), ("fuse 3 tasks, cold", "fuse", True)]
    res = {}
    for label, kind, cold in rows:
        dest = str(out / ("an" if kind.startswith("analyze") else "fu"))
        runs = 3 if kind == "raw" else 1
        res[label] = r = min((child(kind, base, tuned, dest, a.threads, cold, masks)
                              for _ in range(runs)), key=lambda x: x["seconds"])
        extra = ""
        if label != "raw read" and cold:
            extra = (f"   throughput {res['raw read']['seconds'] / r['seconds']:.2f}x the cold "
                     "raw read's")
        print(f"{label:34s} {r['seconds']:6.2f} s   read {r['read'] / 1e9:5.2f} GB "
              f"({r['read'] / total:.2f}x the inputs), peak RSS {r['peak_rss'] / 2**30:.2f} "
              f"GiB{extra}", flush=True)


if __name__ == "__main__":
    main()
