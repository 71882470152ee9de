"""Delta-analysis benchmark: cpift analyze against a naive whole-model analysis and a raw read.

    .venv/bin/python bench/analyze_bench.py [--sizes 348m,90m] [--dtype bf16|fp32|mixed]
        [--threads 1,2] [--data bench/_data] [--no-ray] [--no-naive]

Sizes: 90m, 348m, 1.1b (the shape of issue #12's H100 figures; run it with --no-naive on a
machine with less than ~32 GiB of memory), 3b (larger than this VM's memory: cold_bench.py).

Builds (once, cached under --data) Llama-shaped checkpoints in ``--dtype`` (bf16 by default,
as real checkpoints are; ``mixed``: a bf16 base with fp32 fine-tunes, as DeepSpeed's
``zero_to_fp32`` saves them): a base and 3 tuned variants per size, with sparse deltas on 20% of
the elements and, as real fine-tunes do, larger updates concentrated in a band of rows of
every matrix (a sample of the first rows of each chunk misses them). Then, in one run, each
measurement in a fresh process (peak RSS from VmHWM; for Ray, sampled over the process tree):
  raw       sequential read of the files from page cache (16 MiB blocks)
  naive     load base and one tuned model whole, torch.topk on the concatenated magnitudes
  cpift     cpift's analysis of 1 and of 3 tasks into a fresh output directory, in-process
            on each of --threads threads and on a local Ray (in-process runs also print
            their throughput without the fixed per-process start of numba's loops, timed
            apart); and, side by side, with the full passes reading through the files'
            memory maps on 4M-element chunks (``read: map``, the default until 0724c62)
and prints the ratios the targets are stated in (throughput against the raw read, the thread
speed-up) and how each selection was resolved (sample-window: one full pass). Raw reads are
the best of 3 runs, cpift runs the best of 2, the naive analysis runs once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

SIZES = {  # name -> (hidden, layers, intermediate, vocab)
    "348m": (1024, 22, 2816, 32000),
    "90m": (512, 16, 1408, 32000),
    # the Llama shape of issue #12's H100 figures, with every head its own keys and values:
    # 1.26B parameters, 2.5 GB per checkpoint in bf16 (base + 3 tuned: 10.1 GB)
    "1.1b": (2048, 22, 5632, 32000),
    # 3.96B: base + 3 tuned in bf16 are 31.7 GB, more than this VM's 23 GiB of memory, so
    # their pages cannot all stay in the page cache (bench/cold_bench.py --size 3b)
    "3b": (3072, 28, 8192, 128256),
}


def build(root: Path, size: str, dtype: str = "bf16") -> dict[str, Path]:
    """Base + 3 tuned checkpoints (cached); tensors written one at a time (bounded memory)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpift_dist.io import ShardWriter, write_manifest

    d = root / size if dtype == "fp32" else root / f"{size}-{dtype}"
    tdtype = torch.bfloat16 if dtype == "bf16" else torch.float32  # mixed: the tuned ones
    paths = {"base": d / "base", **{t: d / t for t in ("t1", "t2", "t3")}}
    if all((p / "manifest.json").exists() for p in paths.values()):
        for p in paths.values():  # older caches lacked `architectures` (mergekit needs it)
            c = json.loads((p / "config.json").read_text())
            if not c.get("architectures"):
                c["architectures"] = ["LlamaForCausalLM"]
                (p / "config.json").write_text(json.dumps(c, indent=2))
        return paths
    h, layers, inter, vocab = SIZES[size]
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=inter,
                      vocab_size=vocab, num_attention_heads=h // 64, num_key_value_heads=h // 64,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    for i, (name, path) in enumerate(paths.items()):
        print(f"building {size}/{name} ...", file=sys.stderr, flush=True)
        path.mkdir(parents=True, exist_ok=True)
        w = ShardWriter(path, max_shard_bytes=500 << 20)
        for j, (n, shape) in enumerate(sorted(shapes.items())):
            g = torch.Generator().manual_seed(1000 * j)
            t = torch.randn(shape, generator=g) * 0.02
            if i:
                gt = torch.Generator().manual_seed(1000 * j + i)
                delta = torch.randn(shape, generator=gt) * 1e-3
                t += delta * (torch.rand(shape, generator=gt) < 0.2)
                if dtype != "fp32" and len(shape) == 2:  # a band of rows takes large updates
                    band = max(1, shape[0] // 20)
                    r0 = int(torch.randint(0, shape[0] - band + 1, (1,), generator=gt))
                    t[r0:r0 + band] += torch.randn(band, shape[1], generator=gt) * 2e-2
            w.add(n, t.to(torch.bfloat16 if dtype == "mixed" and not i else tdtype))
        digests = w.close()
        cfg.save_pretrained(path)
        write_manifest(path, "bench-model", {"size": size}, {}, outputs=digests)
    return paths


def files_of(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


# ---- measurements, each run in a fresh process -------------------------------------------------

def m_raw(paths: list[str]) -> dict:
    t0 = time.perf_counter()
    n = 0
    for p in paths:
        for f in files_of(Path(p)):
            with open(f, "rb", buffering=0) as fh:
                while block := fh.read(16 << 20):
                    n += len(block)
    return {"seconds": time.perf_counter() - t0, "bytes": n}


def m_naive(base: str, tuned: str, p: float) -> dict:
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    b, t = {}, {}
    for f in files_of(Path(base)):
        b.update(load_file(f))
    for f in files_of(Path(tuned)):
        t.update(load_file(f))
    u = torch.cat([(t[n].float() - b[n].float()).abs().reshape(-1) for n in sorted(b)])
    k = math.floor(p * u.numel())
    idx = torch.topk(u, k, sorted=False).indices
    mask = torch.zeros(u.numel(), dtype=torch.bool)
    mask[idx] = True
    return {"seconds": time.perf_counter() - t0, "k": k}


def m_cpift(base: str, tuned: list[str], p: float, executor: str, out: str,
            threads: int = 2, read: str = "pread", chunk: int | None = None) -> dict:
    from cpift_dist.analysis import analyze
    from cpift_dist.config import AnalysisConfig
    from cpift_dist.executor import InProcessExecutor, RayExecutor
    from cpift_dist.ray_utils import init_ray

    tree_peak = [0]
    if executor == "ray":
        init_ray(None, num_cpus=2)
        ex = RayExecutor()
        stop = threading.Event()
        threading.Thread(target=_sample_tree, args=(tree_peak, stop), daemon=True).start()
    else:
        ex = InProcessExecutor(threads=threads)
    shutil.rmtree(out, ignore_errors=True)  # a fresh output, as a first run writes: replacing
    # the previous one (overwrite) cost 0.04-0.05 s more here, and is not the analysis's work
    baseline = _tree_rss()
    t0 = time.perf_counter()
    if executor != "ray":  # numba's per-process start, timed apart (analyze would do it first,
        import numpy as np  # for the dtypes of the checkpoint: the same loops)
        import torch

        from cpift_dist.analysis import fused
        from cpift_dist.io import Checkpoint, widened
        ck = Checkpoint(base)
        wide = widened(ck, [Checkpoint(t) for t in tuned])
        fused.warm({np.uint16 if ck.info(n).dtype == torch.bfloat16 and n not in wide
                    else np.float32 for n in ck.names() if ck.info(n).dtype.is_floating_point})
    t_loops = time.perf_counter()
    cfg = AnalysisConfig(p=p, read=read, **({"chunk_elements": chunk} if chunk else {}))
    phases = debug_lines()
    res = analyze(base, {Path(t).name: t for t in tuned}, out, cfg,
                  executor=ex, overwrite=True, progress=False)
    dt = time.perf_counter() - t0
    out_d = {"seconds": dt, "start": t_loops - t0, "k": next(iter(res.stats.values()))["k"],
             "phases": "; ".join(phases),
             "methods": sorted({g["method"] for s in res.stats.values()
                                for g in s["groups"].values()})}
    if executor == "ray":
        stop.set()
        out_d["tree_peak_rss"] = tree_peak[0]
        out_d["tree_rss_before"] = baseline
    return out_d


def _tree_rss() -> int:
    import psutil

    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _sample_tree(peak: list, stop: threading.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _tree_rss())
        time.sleep(0.05)


def warm_read(paths: list[str]) -> None:
    """Reads the checkpoints once so that what follows reads them from page cache, after
    flushing what earlier measurements wrote: their writeback would compete for the cores."""
    os.sync()
    m_raw(paths)


def debug_lines(logger: str = "cpift_dist.analysis.analyze",
                lines: list[str] | None = None) -> list[str]:
    """``lines`` (a new list by default), to which ``logger``'s debug lines are appended as
    they are logged (the analysis's: each phase's time, and the driver's own work in each
    pass)."""
    import logging
    lines = [] if lines is None else lines

    class _Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
    log = logging.getLogger(logger)
    log.setLevel(logging.DEBUG)
    log.addHandler(_Keep())
    return lines


def child(kind: str, *args, best_of: int = 1) -> dict:
    """Runs one measurement in a fresh interpreter (``best_of`` times, keeping the fastest);
    returns its result and its peak RSS."""
    cmd = [sys.executable, __file__, "--measure", kind, json.dumps(args)]
    runs = []
    for _ in range(best_of):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"{kind} failed:\n{r.stderr[-3000:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return min(runs, key=lambda x: x["seconds"])


def _measure(kind: str, args: list) -> None:
    res = {"raw": m_raw, "naive": m_naive, "cpift": m_cpift}[kind](*args)
    res["peak_rss"] = _vm_hwm()
    print(json.dumps(res))


def _vm_hwm() -> int:
    """Peak RSS of this process's address space (VmHWM). Not ru_maxrss: Linux carries that
    across fork+exec, so a child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="348m,90m")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "mixed"], default="bf16")
    ap.add_argument("--threads", default="1,2", help="in-process thread counts to sweep")
    ap.add_argument("--no-ray", action="store_true", help="skip the local-Ray measurement")
    ap.add_argument("--no-naive", action="store_true",
                    help="skip the naive analysis (it holds the magnitudes of the whole model "
                         "in float32: at 1.1B about 15 GiB)")
    ap.add_argument("--data", type=Path, default=Path(__file__).parent / "_data")
    ap.add_argument("--p", type=float, default=0.01)
    ap.add_argument("--measure")
    ap.add_argument("--build")
    ap.add_argument("args", nargs="?")
    a = ap.parse_args()
    if a.measure:
        return _measure(a.measure, json.loads(a.args))
    if a.build:
        build(a.data, a.build, a.dtype)
        return None
    gib = 1 << 30
    rows = []
    for size in a.sizes.split(","):  # build in a child: keeps this process (and so it) small
        subprocess.run([sys.executable, __file__, "--build", size, "--data", str(a.data),
                        "--dtype", a.dtype], check=True)
        paths = {k: str(v) for k, v in build(a.data, size, a.dtype).items()}
        tuned3 = [paths["t1"], paths["t2"], paths["t3"]]
        out = str(a.data / f"out-{size}")
        threads = [int(x) for x in a.threads.split(",")]

        def warm(*ps):  # every measurement reads from page cache, as the raw read does
            child("raw", list(ps))
            return paths["base"]

        warm(paths["base"], *tuned3)
        raw1 = child("raw", [paths["base"], paths["t1"]], best_of=3)
        raw3 = child("raw", [paths["base"], *tuned3], best_of=3)
        naive = None if a.no_naive else child("naive", warm(paths["base"], paths["t1"]),
                                              paths["t1"], a.p)
        c1 = child("cpift", warm(paths["base"], paths["t1"]), [paths["t1"]], a.p, "in-process",
                   out, max(threads), best_of=2)
        c3 = {n: child("cpift", warm(paths["base"], *tuned3), tuned3, a.p, "in-process", out, n,
                       best_of=2) for n in threads}
        maps = {n: child("cpift", warm(paths["base"], *tuned3), tuned3, a.p, "in-process", out,
                         n, "map", 1 << 22, best_of=2) for n in threads}
        r3 = None if a.no_ray else child("cpift", warm(paths["base"], *tuned3), tuned3, a.p,
                                         "ray", out, best_of=2)
        assert naive is None or naive["k"] == c1["k"]
        rows.append((size, raw1, raw3, naive, c1, c3[max(threads)], r3))
        print(f"\n== {size} {a.dtype}: {raw1['bytes'] / 2 / 1e9:.2f} GB per checkpoint, "
              f"p={a.p}, {os.cpu_count()} cores ==")
        print(f"raw read, base+1 tuned       {raw1['seconds']:7.2f} s")
        print(f"raw read, base+3 tuned       {raw3['seconds']:7.2f} s")
        if naive:
            print(f"naive 1 task (load+topk)     {naive['seconds']:7.2f} s  peak RSS "
                  f"{naive['peak_rss'] / gib:5.2f} GiB")
        vs = (lambda sec: f"{naive['seconds'] / sec:5.1f}x") if naive else (lambda sec: "  (not run)")
        print(f"cpift 1 task, {max(threads)} threads     {c1['seconds']:7.2f} s  peak RSS "
              f"{c1['peak_rss'] / gib:5.2f} GiB   speed-up vs naive {vs(c1['seconds'])}"
              f"   throughput vs raw read {raw1['seconds'] / c1['seconds']:.2f}x")
        for n, c in c3.items():
            print(f"cpift 3 tasks, {n:2d} thread(s) {c['seconds']:7.2f} s  peak RSS "
                  f"{c['peak_rss'] / gib:5.2f} GiB   per task vs naive "
                  f"{vs(c['seconds'] / 3)}   throughput vs raw read "
                  f"{raw3['seconds'] / c['seconds']:.2f}x ({raw3['seconds'] / (c['seconds'] - c['start']):.2f}x "
                  f"without numba's start, {c['start']:.2f} s)   speed-up vs {min(threads)} thread(s) "
                  f"{c3[min(threads)]['seconds'] / c['seconds']:.2f}x   resolved by "
                  f"{', '.join(c['methods'])}")
            print(f"    phases: {c['phases']}")
        for n, c in maps.items():  # the full passes' reads as before 0724c62
            print(f"cpift 3 tasks, {n:2d} thread(s), read through maps, 4M-element chunks "
                  f"{c['seconds']:7.2f} s ({c['seconds'] - c['start']:.2f} s without numba's "
                  f"start): the default (pread, 1M) {c['seconds'] / c3[n]['seconds']:.2f}x as fast")
        if r3:
            print(f"cpift 3 tasks, local Ray     {r3['seconds']:7.2f} s  driver RSS "
                  f"{r3['peak_rss'] / gib:5.2f} GiB, process tree peak "
                  f"{r3['tree_peak_rss'] / gib:5.2f} GiB (Ray alone "
                  f"{r3['tree_rss_before'] / gib:.2f})   throughput vs raw read "
                  f"{raw3['seconds'] / r3['seconds']:.2f}x")
    if len(rows) > 1:
        print("\npeak RSS of the 3-task in-process analysis by model size: " + ", ".join(
            f"{r[0]}: {r[5]['peak_rss'] / gib:.2f} GiB" for r in rows))


if __name__ == "__main__":
    main()
