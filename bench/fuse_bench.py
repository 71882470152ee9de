"""Fusion benchmark: cpift fuse against a naive load-everything SLERP and mergekit-yaml.

    .venv/bin/python bench/fuse_bench.py [--size 348m] [--dtype bf16|fp32|mixed] [--threads 1,2]
        [--data bench/_data] [--no-mergekit] [--out-dir /dev/shm/fb] [--rounds 2]

Uses the checkpoints of bench/analyze_bench.py (built if missing). In one run, each in a fresh
process reading from page cache, with peak RSS from the process's own high-water mark:
  pair      t1 + t2, empty masks, omega 0.5, weight space, 200 MB output shards: exactly
            mergekit's SLERP. cpift fuse (in-process, 2 threads) vs naive torch (load both
            whole, SLERP per tensor, save) vs `mergekit-yaml` (when installed; default shards
            and 200 MB shards).
  3-task    t1..t3 with their p = 1% core masks, task-vector space, uniform omega.
  raw       a sequential read of the pair's inputs (page cache): fusion's target is 2x it;
            and a raw write of the output's bytes into a new file beside the outputs (8 MB
            pwrites, as the fuser's chunks): the floor no fuser goes below, since every byte of
            a new file lands in freshly allocated page cache (on the 2-core VM this costs 5-20x
            an overwrite of cached pages, and varies run to run).
  threads   the pair on each of --threads threads (they share the work of every shard), each
            beside `read: map` on 4M-element chunks (the path before runs, alternated), and
            on the most threads with backend torch (the unfused reference ops) side by side;
            also printed without the fixed per-process start of numba's loops (timed apart);
            --rounds alternated rounds, the best and the median printed.
  resume    the pair on the most threads, SIGKILLed right after its first shard was journaled
            (CPIFT_FAULT_TASK=fuse_journal:DIR), then the same fuse again: it re-hashes and
            keeps that shard and fuses the others (--rounds times, the median printed).
--out-dir puts every output (and the raw writes) there, e.g. in tmpfs (/dev/shm) so that the
disk's write-back does not time the fuser; emptied at the end (and removed if the bench made it).
On a CUDA machine it also times the Triton apply kernel against a device-to-device copy and
against torch eager SLERP of the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from analyze_bench import _vm_hwm, build, warm_read  # noqa: E402

SHARD = 200_000_000


def m_cpift(base, tuned, masks, out, space, omega, threads=2, backend="auto", read="pread",
            chunk=None):
    from cpift_dist.config import FusionConfig
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.fusion import fuse

    t0 = time.perf_counter()
    if backend != "torch":  # numba's per-process start, timed apart (fuse would do it first)
        from cpift_dist.fusion import fused
        fused.warm()  # both dtypes (a widened model fuses in float32)
    t1 = time.perf_counter()
    man = fuse(base, {Path(t).name: t for t in tuned}, masks, out,
               FusionConfig(space=space, omega=omega, max_shard_bytes=SHARD, backend=backend,
                            read=read, chunk_elements=chunk),
               InProcessExecutor(threads), overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "start": t1 - t0,
            "resumed": man["resumed_shards"], "shards": sum(
                f.endswith(".safetensors") for f in man["outputs"])}


def m_naive(a, b, out):
    """Load both whole, SLERP each tensor (float64 norms), save in 200 MB shards."""
    import torch
    from safetensors.torch import load_file, save_file

    from cpift_dist.fusion.slerp import fold_coefficients

    t0 = time.perf_counter()
    A, B = {}, {}
    for f in sorted(Path(a).glob("*.safetensors")):
        A.update(load_file(f))
    for f in sorted(Path(b).glob("*.safetensors")):
        B.update(load_file(f))
    res = {}
    for n in sorted(A):
        x, y = A[n].double().reshape(-1), B[n].double().reshape(-1)
        g = torch.stack([torch.stack([x @ x, x @ y]), torch.stack([x @ y, y @ y])])
        c = fold_coefficients(g[None].numpy(), [0.5])[0]
        res[n] = (c[0] * A[n] + c[1] * B[n]).float()
    Path(out).mkdir(parents=True, exist_ok=True)
    shard, size, i = {}, 0, 0
    for n, v in res.items():
        shard[n] = v
        size += v.numel() * 4
        if size > SHARD:
            save_file(shard, f"{out}/model-{i:05d}.safetensors")
            shard, size, i = {}, 0, i + 1
    if shard:
        save_file(shard, f"{out}/model-{i:05d}.safetensors")
    return {"seconds": time.perf_counter() - t0}


def m_write(path: str, nbytes: int) -> dict:
    """A new file of ``nbytes`` written in 8 MB ``pwrite``s from one reused buffer (kept until
    the caller removes it, as a fused output stays: removing it at once would hand its pages
    to the next write warm): what writing the fused output costs before any fusing."""
    import numpy as np

    buf = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, nbytes)
        for at in range(0, nbytes, len(buf)):
            os.pwrite(fd, buf[:min(len(buf), nbytes - at)], at)
    finally:
        os.close(fd)
    return {"seconds": time.perf_counter() - t0, "bytes": nbytes}


def m_gpu():
    import torch
    import triton

    from cpift_dist.kernels import slerp as K

    n = 1 << 28
    x = torch.randn(2, n, device="cuda")
    b = torch.randn(n, device="cuda")
    packed = torch.zeros(2, n // 8, dtype=torch.uint8, device="cuda")
    coef = torch.tensor([[0.6, 0.4]], device="cuda")
    ms_apply = triton.testing.do_bench(lambda: K.apply(x, b, packed, coef, True, "max-magnitude",
                                                       torch.float32))
    dst = torch.empty(3 * n, device="cuda")
    src = torch.randn(3 * n, device="cuda")
    ms_copy = triton.testing.do_bench(lambda: dst.copy_(src))

    def eager():
        v0, v1 = x[0] - b, x[1] - b
        d = (v0.double() @ v1.double()) / (v0.double().norm() * v1.double().norm())
        th = torch.acos(d.clamp(-1, 1))
        s = torch.sin(th)
        return b + (torch.sin(0.5 * th) / s) * v0 + (torch.sin(0.5 * th) / s) * v1
    ms_eager = triton.testing.do_bench(eager)
    moved = (3 * n * 4 + 2 * n // 8 + n * 4)  # apply: read 2 tasks + base + masks, write 1
    return {"seconds": 0, "apply_GBs": moved / ms_apply / 1e6,
            "copy_GBs": 2 * 3 * n * 4 / ms_copy / 1e6, "eager_ms": ms_eager, "apply_ms": ms_apply}


def child(kind: str, *args, env: dict | None = None) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", kind, json.dumps(args)],
                       capture_output=True, text=True, env=env)
    if env and r.returncode == -9:  # killed by the fault it was given
        return {}
    if r.returncode:
        raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def mergekit(a, b, out, shard_params: str | None) -> dict | None:
    exe = Path(sys.executable).parent / "mergekit-yaml"
    if not exe.exists():
        return None
    cfg = Path(out + ".yml")
    cfg.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  t: 0.5\ndtype: float32\n")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(exe), str(cfg), out, "--no-copy-tokenizer", "--quiet", "--no-write-model-card"]
    if shard_params:
        cmd += ["--out-shard-size", shard_params]
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if status:
        raise SystemExit(f"mergekit-yaml failed: {p.stderr.read().decode()[-2000:]}")
    return {"seconds": dt, "peak_rss": usage.ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="348m")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "mixed"], default="bf16")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--data", type=Path, default=HERE / "_data")
    ap.add_argument("--out-dir", type=Path, help="where outputs go (default: beside the data)")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds of the sweep")
    ap.add_argument("--measure")
    ap.add_argument("args", nargs="?")
    a = ap.parse_args()
    if a.measure:
        measure = {"cpift": m_cpift, "naive": m_naive, "gpu": m_gpu, "write": m_write}
        res = measure[a.measure](*json.loads(a.args))
        res["peak_rss"] = _vm_hwm()
        print(json.dumps(res))
        return
    subprocess.run([sys.executable, str(HERE / "analyze_bench.py"), "--build", a.size,
                    "--data", str(a.data), "--dtype", a.dtype], check=True)
    paths = {k: str(v) for k, v in build(a.data, a.size, a.dtype).items()}
    d = a.data / f"fuse-{a.size}-{a.dtype}"
    d.mkdir(exist_ok=True)
    o = a.out_dir or d  # the outputs
    made = not o.exists()
    o.mkdir(parents=True, exist_ok=True)
    from cpift_dist.analysis import analyze
    from cpift_dist.config import AnalysisConfig

    pair = {"t1": paths["t1"], "t2": paths["t2"]}
    tuned3 = {t: paths[t] for t in ("t1", "t2", "t3")}
    analyze(paths["base"], pair, d / "empty", AnalysisConfig(p=1e-12), overwrite=True,
            progress=False)
    analyze(paths["base"], tuned3, d / "masks3", AnalysisConfig(p=0.01), overwrite=True,
            progress=False)
    gib = 1 << 30

    def drop(name: str) -> None:  # with --out-dir (memory), each output goes once measured:
        if a.out_dir:  # the 1.1B model's would not fit beside its inputs in 23 GiB
            shutil.rmtree(o / name, ignore_errors=True)

    warm_read([paths["base"], *tuned3.values()])
    ours = child("cpift", paths["base"], list(pair.values()), str(d / "empty" / "masks"),
                 str(o / "out-pair"), "weights", 0.5)
    warm_read([paths["t1"], paths["t2"]])
    drop("out-pair")
    naive = child("naive", paths["t1"], paths["t2"], str(o / "out-naive"))
    drop("out-naive")
    mk_default = mk_200 = None
    if not a.no_mergekit:
        warm_read([paths["t1"], paths["t2"]])
        mk_default = mergekit(paths["t1"], paths["t2"], str(o / "out-mk"), None)
        drop("out-mk")
        warm_read([paths["t1"], paths["t2"]])
        mk_200 = mergekit(paths["t1"], paths["t2"], str(o / "out-mk200"), "50M")
        drop("out-mk200")
    from analyze_bench import child as raw_child

    threads = [int(x) for x in a.threads.split(",")]
    warm_read([paths["base"], paths["t1"], paths["t2"]])
    raw = raw_child("raw", [paths["t1"], paths["t2"]], best_of=3)
    out_bytes = raw["bytes"] // 2  # the fused pair: one model of the inputs' dtype
    writes = sorted(child("write", str(o / f"raw-write-{i}.bin"), out_bytes)["seconds"]
                    for i in range(3))
    for i in range(3):
        (o / f"raw-write-{i}.bin").unlink()
    write = {"seconds": writes[1]}
    sweep, maps = {}, {}
    for n in threads:  # the default and the maps path before it (4M chunks), alternated
        warm_read([paths["t1"], paths["t2"]])
        runs = [(child("cpift", paths["base"], list(pair.values()), str(d / "empty" / "masks"),
                       str(o / f"out-pair-{n}"), "weights", 0.5, n),
                 child("cpift", paths["base"], list(pair.values()), str(d / "empty" / "masks"),
                       str(o / f"out-pair-{n}"), "weights", 0.5, n, "auto", "map", 1 << 22))
                for _ in range(a.rounds)]
        sweep[n] = min((r for r, _ in runs), key=lambda r: r["seconds"])
        sweep[n]["median"] = statistics.median(r["seconds"] for r, _ in runs)
        maps[n] = min((m for _, m in runs), key=lambda r: r["seconds"])
        drop(f"out-pair-{n}")

    # killed (SIGKILL) right after its first shard was journaled, then resumed
    from cpift_dist.executor import FAULT_TASK_ENV

    n = max(threads)
    resumes = []
    for _ in range(a.rounds):
        killed = o / "killed"
        killed.mkdir(exist_ok=True)
        shutil.rmtree(o / "out-resume", ignore_errors=True)
        warm_read([paths["t1"], paths["t2"]])
        child("cpift", paths["base"], list(pair.values()), str(d / "empty" / "masks"),
              str(o / "out-resume"), "weights", 0.5, n,
              env=dict(os.environ, **{FAULT_TASK_ENV: f"fuse_journal:{killed}"}))
        if not (killed / "fuse_journal.killed").exists():
            raise SystemExit("the fuse to resume was not killed")
        shutil.rmtree(killed)
        warm_read([paths["t1"], paths["t2"]])
        resumes.append(child("cpift", paths["base"], list(pair.values()),
                             str(d / "empty" / "masks"), str(o / "out-resume"), "weights", 0.5,
                             n))
        drop("out-resume")
    resumed = resumes[0]
    resumed["median"] = statistics.median(r["seconds"] - r["start"] for r in resumes)

    warm_read([paths["t1"], paths["t2"]])
    unfused = child("cpift", paths["base"], list(pair.values()), str(d / "empty" / "masks"),
                    str(o / "out-pair-torch"), "weights", 0.5, max(threads), "torch")
    drop("out-pair-torch")
    warm_read([paths["base"], *tuned3.values()])
    three = child("cpift", paths["base"], list(tuned3.values()), str(d / "masks3" / "masks"),
                  str(o / "out-3"), "task-vectors", "uniform")
    if a.out_dir:
        for f in o.iterdir():
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        if made:
            o.rmdir()
    print(f"\n== fuse, {a.size} {a.dtype} ({os.cpu_count()} cores), output shards 200 MB, "
          f"outputs in {o}, sweep: best of {a.rounds} ==")
    print(f"pair  raw read of its inputs {raw['seconds']:6.2f} s")
    floor = raw["seconds"] + write["seconds"]
    print(f"pair  raw write of its output ({out_bytes / 1e9:.2f} GB, new file) "
          f"{write['seconds']:6.2f} s (median of {', '.join(f'{w:.2f}' for w in writes)}); raw "
          f"read + raw write {floor:.2f} s")
    for n, r in sweep.items():
        loops = {m: sweep[m]["seconds"] - sweep[m]["start"] for m in sweep}
        print(f"pair  cpift, {n:2d} thread(s)     {r['seconds']:6.2f} s (median "
              f"{r['median']:.2f} s)   {r['seconds'] / raw['seconds']:.2f}x the raw read   "
              f"speed-up vs {min(threads)} thread(s) "
              f"{sweep[min(threads)]['seconds'] / r['seconds']:.2f}x (medians "
              f"{sweep[min(threads)]['median'] / r['median']:.2f}x)"
              f"   without numba's start ({r['start']:.2f} s): {loops[n]:.2f} s, "
              f"{loops[n] / raw['seconds']:.2f}x the raw read, speed-up "
              f"{loops[min(threads)] / loops[n]:.2f}x; {r['seconds'] / floor:.2f}x the raw read "
              "+ write")

    for n, r in maps.items():
        print(f"pair  cpift, {n:2d} thread(s), read: map, 4M chunks (the path before runs) "
              f"{r['seconds']:6.2f} s   the default {r['seconds'] / sweep[n]['seconds']:.2f}x "
              "faster")
    full = sweep[n]["median"] - sweep[n]["start"]
    print(f"pair  cpift, {n:2d} thread(s), resumed after a SIGKILL with {resumed['resumed']} of "
          f"its {resumed['shards']} shards finished (re-hashed, kept): median "
          f"{resumed['median']:.2f} s without numba's start, against {full:.2f} s uninterrupted "
          f"(the sweep's median less its start): {resumed['median'] / full:.2f}x")
    print(f"pair  cpift, {max(threads):2d} thread(s), backend torch (unfused ops) "
          f"{unfused['seconds']:6.2f} s   numba {unfused['seconds'] / sweep[max(threads)]['seconds']:.2f}x faster")
    print(f"pair  cpift fuse            {ours['seconds']:6.2f} s  peak RSS "
          f"{ours['peak_rss'] / gib:5.2f} GiB")
    print(f"pair  naive torch SLERP     {naive['seconds']:6.2f} s  peak RSS "
          f"{naive['peak_rss'] / gib:5.2f} GiB   cpift {naive['seconds'] / ours['seconds']:.1f}x "
          f"faster, {ours['peak_rss'] / naive['peak_rss']:.2f}x the RSS")
    for label, mk in (("mergekit, default shards", mk_default), ("mergekit, 200 MB shards", mk_200)):
        if mk is None:
            print(f"pair  {label}: mergekit not installed")
            continue
        print(f"pair  {label:24s}{mk['seconds']:6.2f} s  peak RSS {mk['peak_rss'] / gib:5.2f} GiB"
              f"   cpift {mk['seconds'] / ours['seconds']:.1f}x faster, "
              f"{ours['peak_rss'] / mk['peak_rss']:.2f}x the RSS")
    print(f"3-task cpift fuse (masks)   {three['seconds']:6.2f} s  peak RSS "
          f"{three['peak_rss'] / gib:5.2f} GiB")
    import torch
    if torch.cuda.is_available():
        g = child("gpu")
        print(f"GPU apply kernel {g['apply_GBs']:.0f} GB/s = {g['apply_GBs'] / g['copy_GBs']:.0%} "
              f"of a device copy ({g['copy_GBs']:.0f} GB/s); {g['eager_ms'] / g['apply_ms']:.1f}x "
              f"torch eager SLERP")
    else:
        print("no CUDA device: the GPU kernel figures are not measured on this machine")


if __name__ == "__main__":
    main()
