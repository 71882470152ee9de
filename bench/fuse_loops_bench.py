"""The fusion's compiled loops in cache: nanoseconds per element of the Gram and apply passes.

    .venv/bin/python bench/fuse_loops_bench.py [--n 262144] [--reps 200]
        [--against /path/to/another/checkout]

Per case (bf16 / fp32 chunks, 2 / 3 tasks, weight space / task vectors, no core element / 1%
random core masks), one chunk of ``--n`` elements in 3 segments, fused ``--reps`` times in a
row (its inputs stay in the caches): the best of 3 such timings, per element of the chunk.
NaN and infinite inputs included. ``--against`` runs the same cases on another checkout's
loops (a child process with that tree first on ``sys.path``), alternated with this one's, and
prints both side by side with whether their Gram matrices and fused bytes are bit for bit the
same: e.g. ``git worktree add /tmp/before HEAD~1`` for a change's before and after.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [(dtype, n_tasks, space, density) for dtype in ("bf16", "fp32") for n_tasks in (2, 3)
         for space in ("weights", "task-vectors") for density in (0.0, 0.01)]


def measure(n: int, reps: int) -> list[dict]:
    import numpy as np
    import torch

    from cpift_dist.fusion import fused

    fused.warm()
    res = []
    for dtype, n_tasks, space, density in CASES:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        b = torch.randn(n).to(torch.bfloat16 if dtype == "bf16" else torch.float32)
        x = (b + 0.01 * torch.randn(n_tasks, n)).to(b.dtype)
        x[0, 5], x[1, 7] = float("nan"), float("inf")
        packed = np.packbits(rng.random((n_tasks, n)) < density, axis=1, bitorder="little")
        bf16, base, xs = fused.inputs(b, x)
        addresses = np.array([a.ctypes.data for a in xs], dtype=np.uint64)
        tv = space == "task-vectors"
        seg = -(-n // 3)
        coef = rng.random((3, n_tasks)).astype(np.float32)
        grams = np.zeros((3, n_tasks, n_tasks))
        out = np.empty(n, np.uint16 if bf16 else np.float32)
        counts = np.zeros(2, np.int64)
        best_g = best_a = float("inf")
        for _ in range(3):
            grams[:] = 0
            t = time.perf_counter()
            for _ in range(reps):
                fused.gram(base, addresses, bf16, packed, tv, seg, grams)
            best_g = min(best_g, time.perf_counter() - t)
            t = time.perf_counter()
            for _ in range(reps):
                fused.apply(base, addresses, bf16, packed, tv, coef, seg, True, out, counts)
            best_a = min(best_a, time.perf_counter() - t)
        grams[:] = 0
        fused.gram(base, addresses, bf16, packed, tv, seg, grams)
        counts[:] = 0
        fused.apply(base, addresses, bf16, packed, tv, coef, seg, True, out, counts)
        digest = hashlib.sha256(grams.tobytes() + out.tobytes() + counts.tobytes()).hexdigest()
        res.append({"case": f"{dtype} {n_tasks} tasks {space:12s} {density:4.0%} core",
                    "gram": best_g / reps / n * 1e9, "apply": best_a / reps / n * 1e9,
                    "digest": digest})
    return res


def child(tree: Path, n: int, reps: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run([sys.executable, str(HERE / Path(__file__).name), "--n", str(n),
                          "--reps", str(reps), "--json"], env=env, check=True,
                         capture_output=True, text=True, cwd=tree).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1 << 18)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--against", type=Path)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.json:
        print(json.dumps(measure(a.n, a.reps)))
        return
    here = HERE.parent
    if a.against is None:
        print(f"{'case':40s} {'gram ns/el':>10s} {'apply ns/el':>11s}")
        for r in child(here, a.n, a.reps):
            print(f"{r['case']:40s} {r['gram']:10.3f} {r['apply']:11.3f}")
        return
    before, now = [], []
    for _ in range(2):  # alternated: the VM's drift lands on both
        before.append(child(a.against.resolve(), a.n, a.reps))
        now.append(child(here, a.n, a.reps))
    print(f"{'case':40s} {'gram ns/el, other / this':>26s} {'apply ns/el, other / this':>27s}"
          "  bytes")
    for i, case in enumerate(CASES):
        b = [r[i] for r in before]
        c = [r[i] for r in now]
        same = len({r["digest"] for r in b + c}) == 1
        print(f"{c[0]['case']:40s} {min(r['gram'] for r in b):12.3f} / "
              f"{min(r['gram'] for r in c):.3f}    {min(r['apply'] for r in b):12.3f} / "
              f"{min(r['apply'] for r in c):.3f}    {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
