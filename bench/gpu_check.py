"""Every GPU check of the project in one run, one table at the end (about 7 minutes on an H100).

    python bench/gpu_check.py [--work /tmp/gpucheck] [--only SECTION,...] [--out DIR]
                              [--deadline SECONDS]

Sections, in order (``--only`` picks some; each runs even if an earlier one failed):
  bandwidth  the Triton kernels (gram, apply; fp32 and bf16; 2-4 tasks; 1% core masks) in GB/s
             against a device-to-device copy of the same bytes, and the generic kernel (5+
             tasks) and torch eager for comparison
  build      a Llama-shaped 1.1B bf16 base + 3 tuned checkpoints (hidden 2048, 22 layers,
             intermediate 5632, vocab 32000, untied), generated on the GPU
  analyze    `cpift analyze` of the 3 tasks (p 1%) on 1 thread and on every core, against a
             raw read of the 4 checkpoints (page cache)
  fuse       `cpift fuse` of a pair (empty masks, weights, omega 0.5) and of the 3 tasks with
             their masks: CUDA (Triton) vs CPU (numba, every core) vs `mergekit-yaml --cuda`
             (pair), elements that differ between them; each run's phases, and the
             fusion's tasks' time split into loops or kernels, reads, writes and the rest
  writes     bench/write_bench.py in --work: 2 GiB written in 8 MiB blocks by 1 thread, by
             every core into one file (as the fuser's threads write one shard), into one
             file each, and into a shared map of one file
  zero3      a masked SFT stage, DeepSpeed ZeRO-3 bf16 on NCCL (one rank per GPU), then an
             independent check with safetensors and numpy: every frozen element bit-identical;
             again with activation checkpointing and ZeRO-Offload (optimizer and parameters)
  tests      the test files that touch the GPU path, on this machine (Triton CPU-reference tests
             run under the interpreter in a subprocess, CUDA tests on the device)
  masked     bench/masked_step_bench.py: the freezer's step overhead on NCCL
  memory     the 1.1B base (build) trained 4 steps, ZeRO-3 bf16: plain, with activation
             checkpointing, and with ZeRO-Offload too: rank 0's peak GPU memory, s/step
  eval       the 1.1B base evaluated on one GPU, spread by device_map (auto, auto:0), and 3
             models on the eval threads: the same scores each way, seconds
  profile    py-spy profiles (when py-spy is installed) of the analysis and of fusion on every
             core, into --out; fusion with 256 MB output shards

On a machine with no internet, carry what it lacks as wheels (README, "GPU check").
Every figure comes from this one run; each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

SECTIONS = ["bandwidth", "build", "analyze", "fuse", "writes", "zero3", "tests", "masked",
            "memory", "eval", "profile"]
OUT: Path | None = None
SHAPE = dict(hidden=2048, layers=22, inter=5632, vocab=32000, heads=32, kv=4)
# --dry: a small model and "cuda" replaced by the CPU, to check this script where no GPU is
DRY = os.environ.get("GPU_CHECK_DRY") == "1"
if DRY:
    SHAPE = dict(hidden=256, layers=2, inter=512, vocab=1000, heads=4, kv=2)
GPU = "cpu" if DRY else "cuda"
ROWS: list[tuple[str, str, str]] = []  # (section, what, figure)


def row(section: str, what: str, figure: str) -> None:
    """Records a figure: printed at once, and with --out the JSON rewritten, so that a run cut
    short (a lent machine's time limit) still leaves every figure taken until then."""
    ROWS.append((section, what, figure))
    print(f"[{section}] {what}: {figure}", flush=True)
    if OUT is not None:
        (OUT / "gpu_check.json").write_text(json.dumps(ROWS, indent=1))


# ---- measurements run in fresh processes -------------------------------------------------------
PHASES: list[str] = []  # cpift's own debug timings of the measured call


def _collect_phases() -> None:
    from analyze_bench import debug_lines
    debug_lines("cpift_dist", PHASES)


def m_analyze(base: str, tuned: list[str], out: str, threads: int, read: str = "pread",
              chunk: int | None = None) -> dict:
    from cpift_dist.analysis import analyze
    from cpift_dist.config import AnalysisConfig
    from cpift_dist.executor import InProcessExecutor

    from cpift_dist.analysis import fused

    t0 = time.perf_counter()
    fused.warm()  # numba's per-process start, timed apart (analyze would do it first)
    t1 = time.perf_counter()
    cfg = AnalysisConfig(p=0.01, read=read, **({"chunk_elements": chunk} if chunk else {}))
    analyze(base, {Path(t).name: t for t in tuned}, out, cfg,
            executor=InProcessExecutor(threads), overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "start": t1 - t0, "phases": PHASES}


def m_fuse(base: str, tuned: list[str], masks: str, out: str, device: str, space: str,
           omega, threads: int, shard_bytes: int = 2 << 30, chunk: int | None = None,
           read: str = "pread") -> dict:
    import torch

    from cpift_dist.config import FusionConfig
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.fusion import fuse

    if DRY:
        device = "cpu"
    if device == "cuda":
        torch.zeros(1, device=GPU)  # the CUDA context, as any GPU program pays once
    t0 = time.perf_counter()
    man = fuse(base, {Path(t).name: t for t in tuned}, masks, out,
               FusionConfig(space=space, omega=omega, device=device,
                            max_shard_bytes=shard_bytes, read=read,
                            **({"chunk_elements": chunk} if chunk else {})),
               InProcessExecutor(threads), overwrite=True, progress=False)
    return {"seconds": time.perf_counter() - t0, "backend": man["backend"], "phases": PHASES}


SPY_RATE = 250  # py-spy samples per second


def py_spy() -> str | None:
    """py-spy on PATH or beside this Python (a venv's bin), if installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def child(kind: str, *args, timeout: float = 300, profile: Path | None = None) -> dict:
    """One measurement in a fresh process; under py-spy (every thread, idle samples too,
    collapsed stacks into ``profile``) when given."""
    cmd = [sys.executable, __file__, "--measure", kind, json.dumps(args)]
    if profile:
        cmd = [py_spy() or "py-spy", "record", "-r", str(SPY_RATE), "--threads",
               "--idle", "-f", "raw", "-o", str(profile), "--", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        raise RuntimeError(f"{kind} failed:\n{r.stderr[-3000:]}")
    return json.loads([x for x in r.stdout.splitlines() if x.startswith("{")][-1])


# ---- sections ------------------------------------------------------------------------------
def s_bandwidth(work: Path) -> None:
    import torch
    import triton

    from cpift_dist.kernels import slerp as K

    n = 1 << 27
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)

    def copy_gbs(nbytes):
        src = torch.empty(nbytes // 4, device=dev)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src))
        return 2 * nbytes / ms / 1e6

    for dtype, N in ((torch.float32, 2), (torch.bfloat16, 2), (torch.bfloat16, 3),
                     (torch.bfloat16, 4), (torch.float32, 4), (torch.bfloat16, 5)):
        x = torch.randn((N, n), device=dev, generator=g).to(dtype)
        b = torch.randn(n, device=dev, generator=g).to(dtype)
        p = (torch.rand((N, n // 8), device=dev, generator=g) < 0.08).to(torch.uint8)
        coef = torch.full((1, N), 1.0 / N)
        out = torch.empty(n, dtype=dtype, device=dev)
        K.gram(x, b, p, 1, True)  # autotune
        K.apply(x, b, p, coef, True, "max-magnitude", dtype, out=out)
        ms_g = triton.testing.do_bench(lambda: K.gram(x, b, p, 1, True))
        ms_a = triton.testing.do_bench(
            lambda: K.apply(x, b, p, coef, True, "max-magnitude", dtype, out=out))
        read = (N + 1) * n * x.element_size() + N * n // 8
        copy = copy_gbs(read)
        name = f"{str(dtype).split('.')[-1]:8s} {N} tasks"
        kind = "generic" if N > K.MAX_FAST else "unrolled"
        row("bandwidth", f"gram  {name} ({kind})",
            f"{read / ms_g / 1e6:6.0f} GB/s = {read / ms_g / 1e6 / copy:4.0%} of a copy "
            f"({copy:.0f} GB/s)")
        moved = read + n * x.element_size()
        copy2 = copy_gbs(moved)
        row("bandwidth", f"apply {name} ({kind})",
            f"{moved / ms_a / 1e6:6.0f} GB/s = {moved / ms_a / 1e6 / copy2:4.0%} of a copy")
        if dtype == torch.bfloat16 and N == 3:
            def eager():
                v = x.float() - b.float()
                keep = torch.ones(n, dtype=torch.bool, device=dev)
                gm = (v * keep).double() @ (v * keep).double().T
                return (coef.to(dev)[0, :, None] * v).sum(0).add_(b.float()).to(dtype), gm
            ms_e = triton.testing.do_bench(eager)
            row("bandwidth", "torch eager gram+apply, bf16 3 tasks",
                f"{ms_e:.1f} ms against {ms_g + ms_a:.1f} ms: kernels {ms_e / (ms_g + ms_a):.1f}x "
                "faster")
        torch.cuda.empty_cache()


def build(root: Path) -> dict[str, Path]:
    """Base + 3 tuned 1.1B bf16 checkpoints, generated on the GPU, written in 4 threads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpift_dist.io import ShardWriter, write_manifest

    paths = {"base": root / "base", **{t: root / t for t in ("t1", "t2", "t3")}}
    if all((p / "manifest.json").exists() for p in paths.values()):
        return paths
    s = SHAPE
    cfg = LlamaConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"],
                      intermediate_size=s["inter"], vocab_size=s["vocab"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(cfg).state_dict().items()}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    writers = {k: ShardWriter(p, max_shard_bytes=2 << 30) for k, p in paths.items()}
    lock = threading.Lock()

    def one(i: int, key: str) -> None:
        for j, (name, shape) in enumerate(sorted(shapes.items())):
            with lock:  # the GPU generates; the threads copy, write and hash in parallel
                g = torch.Generator(device=GPU).manual_seed(1000 * j)
                t = torch.randn(shape, generator=g, device=GPU) * 0.02
                if i:
                    g.manual_seed(1000 * j + i)
                    t += torch.randn(shape, generator=g, device=GPU) * 1e-3 * (
                        torch.rand(shape, generator=g, device=GPU) < 0.2)
                    if len(shape) == 2:  # a band of rows takes large updates
                        band = max(1, shape[0] // 20)
                        r0 = (j * 7919 + i * 104729) % (shape[0] - band + 1)
                        t[r0:r0 + band] += torch.randn((band, shape[1]), generator=g,
                                                       device=GPU) * 2e-2
                host = t.to(torch.bfloat16).cpu()
            writers[key].add(name, host)
        digests = writers[key].close()
        cfg.save_pretrained(paths[key])
        write_manifest(paths[key], "bench-model", {"size": "1.1b"}, {}, outputs=digests)

    threads = [threading.Thread(target=one, args=(i, k)) for i, k in enumerate(paths)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if not all((p / "manifest.json").exists() for p in paths.values()):
        raise RuntimeError("building the checkpoints failed (see above)")
    return paths


def s_build(work: Path) -> None:
    t0 = time.perf_counter()
    paths = build(work / "1b")
    size = sum(f.stat().st_size for p in paths.values() for f in p.glob("*.safetensors"))
    row("build", "1.1B bf16 base + 3 tuned", f"{size / 1e9:.1f} GB in "
        f"{time.perf_counter() - t0:.0f} s")


def s_analyze(work: Path) -> None:
    from analyze_bench import child as raw_child

    paths = {k: str(v) for k, v in build(work / "1b").items()}
    tuned = [paths[t] for t in ("t1", "t2", "t3")]
    raw_child("raw", list(paths.values()))  # into page cache
    raw = raw_child("raw", list(paths.values()), best_of=2)
    row("analyze", "raw read, base + 3 tuned", f"{raw['seconds']:.2f} s "
        f"({raw['bytes'] / raw['seconds'] / 1e9:.1f} GB/s)")
    child("analyze", paths["base"], tuned, str(work / "an-warm"), os.cpu_count())  # numba cache
    res = {}
    cores = os.cpu_count()
    for n in sorted({1, 2, 4, cores // 2, cores}):
        res[n] = child("analyze", paths["base"], tuned, str(work / f"an-{n}"), n)
        s, st = res[n]["seconds"], res[n]["start"]
        row("analyze", f"3 tasks, {n:2d} thread(s)",
            f"{s:6.2f} s = {raw['seconds'] / s:.2f}x raw-read throughput, "
            f"{res[1]['seconds'] / s:.1f}x one thread; without numba's start ({st:.2f} s): "
            f"{raw['seconds'] / (s - st):.2f}x raw, {(res[1]['seconds'] - res[1]['start']) / (s - st):.1f}x")
        row("analyze", f"   phases, {n} thread(s)", "; ".join(res[n]["phases"]))
    a, b = work / "an-1" / "masks", work / f"an-{os.cpu_count()}" / "masks"
    same = all((a / f.name).read_bytes() == f.read_bytes() for f in b.glob("*.safetensors"))
    row("analyze", "masks on 1 thread == on every core", "byte-identical" if same else "DIFFER")
    # the full passes' reads: chunks copied into per-thread buffers (the default since
    # 0724c62, measured on 2 cores only) against the files' maps with 4M-element chunks (the
    # way before), and the buffered reads on other chunk sizes, on 1 thread and every core
    for read, chunk in (("map", 1 << 22), ("pread", 1 << 18), ("pread", 1 << 22)):
        for n in sorted({1, cores}):
            r = child("analyze", paths["base"], tuned, str(work / f"an-{read}-{n}"), n, read,
                      chunk)
            s, st = r["seconds"], r["start"]
            row("analyze", f"3 tasks, {n:2d} thread(s), read {read}, {chunk >> 10}K chunks",
                f"{s:6.2f} s against {res[n]['seconds']:.2f} s (pread, 1M); without numba's "
                f"start {s - st:.2f} s against {res[n]['seconds'] - res[n]['start']:.2f} s")
            c = work / f"an-{read}-{n}" / "masks"
            if not all((a / f.name).read_bytes() == f.read_bytes()
                       for f in c.glob("*.safetensors")):
                row("analyze", f"   masks, read {read}, {chunk >> 10}K chunks", "DIFFER")


def _differ(x: Path, y: Path) -> tuple[int, int]:
    from cpift_dist.io import Checkpoint

    a, b = Checkpoint(x), Checkpoint(y)
    differ = total = 0
    for n in a.names():
        u, v = a.read(n), b.read(n).to(a.read(n).dtype)
        differ += int((u != v).sum())
        total += u.numel()
    return differ, total


def _mergekit(a: str, b: str, out: Path) -> float:
    cfg = out.with_suffix(".yml")
    cfg.write_text(f"merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n"
                   f"  - model: {b}\nparameters:\n  t: 0.5\ndtype: bfloat16\n")
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()",
                        str(cfg), str(out), *([] if DRY else ["--cuda"]), "--no-copy-tokenizer",
                        "--quiet", "--no-write-model-card"],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(f"mergekit-yaml failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t0


def s_fuse(work: Path) -> None:
    from analyze_bench import child as raw_child

    from cpift_dist.analysis import analyze
    from cpift_dist.config import AnalysisConfig
    from cpift_dist.executor import InProcessExecutor

    paths = {k: str(v) for k, v in build(work / "1b").items()}
    pair = [paths["t1"], paths["t2"]]
    three = [paths[t] for t in ("t1", "t2", "t3")]
    ex = InProcessExecutor(os.cpu_count())
    if not (work / "empty" / "masks").exists():
        analyze(paths["base"], {Path(t).name: t for t in pair}, work / "empty",
                AnalysisConfig(p=1e-12), executor=ex, overwrite=True, progress=False)
    masks3 = work / f"an-{os.cpu_count()}" / "masks"
    if not masks3.exists():
        analyze(paths["base"], {Path(t).name: t for t in three}, masks3.parent,
                AnalysisConfig(p=0.01), executor=ex, overwrite=True, progress=False)
    raw = raw_child("raw", pair, best_of=2)
    row("fuse", "raw read of the pair", f"{raw['seconds']:.2f} s")
    cores = os.cpu_count()
    runs = {}
    for label, tuned, masks, space, omega in (
            ("pair", pair, work / "empty" / "masks", "weights", 0.5),
            ("3 tasks", three, masks3, "task-vectors", "uniform")):
        for device in ("cuda", "cpu"):
            out = work / f"fuse-{label.replace(' ', '')}-{device}"
            first = child("fuse", paths["base"], tuned, str(masks), str(out), device, space,
                          omega, cores)  # compiles or loads the kernels and their tuning
            r = child("fuse", paths["base"], tuned, str(masks), str(out), device, space, omega,
                      cores)
            row("fuse", f"{label}, {device}, first run in this machine",
                f"{first['seconds']:6.2f} s (compiling and tuning included)")
            runs[label, device] = r["seconds"]
            row("fuse", f"   phases, {label}, {device}", "; ".join(r["phases"]))
            row("fuse", f"{label}, {device} ({r['backend']}, {cores} threads)",
                f"{r['seconds']:6.2f} s" + (f" = {r['seconds'] / raw['seconds']:.1f}x the raw read"
                                            if label == "pair" else ""))
        d, t = _differ(work / f"fuse-{label.replace(' ', '')}-cuda",
                       work / f"fuse-{label.replace(' ', '')}-cpu")
        row("fuse", f"{label}: CUDA vs CPU output", f"{d:,} of {t:,} elements differ; CUDA "
            f"{runs[label, 'cpu'] / runs[label, 'cuda']:.2f}x the CPU path's speed")
    from cpift_dist.config import FusionConfig

    # the other chunk size on each device (defaults: 1M on the CPU loops, 4M on CUDA), and on
    # CPU the maps path at both sizes (read: map; pread, the default, reads runs into buffers)
    variants = [("cuda", 1 << 20, "pread"), ("cpu", 1 << 22, "pread"), ("cpu", 1 << 20, "map"),
                ("cpu", 1 << 22, "map")]
    for device, chunk, read in variants:
        default = FusionConfig().chunk_for("numba" if device == "cpu" else "triton")
        r = child("fuse", paths["base"], pair, str(work / "empty" / "masks"),
                  str(work / f"fuse-chunk-{device}"), device, "weights", 0.5, cores,
                  2 << 30, chunk, read)
        d, t = _differ(work / f"fuse-pair-{device}", work / f"fuse-chunk-{device}")
        row("fuse", f"pair, {device}, chunks of {chunk >> 20}M elements"
            + (f", read: {read}" if device == "cpu" else "") + f" (default {default >> 20}M"
            + (", pread)" if device == "cpu" else ")"),
            f"{r['seconds']:6.2f} s against {runs['pair', device]:.2f} s; {d:,} elements "
            "differ from the default's output")
    try:
        mk = _mergekit(pair[0], pair[1], work / "mk")
        d, t = _differ(work / "fuse-pair-cuda", work / "mk")
        row("fuse", "pair, mergekit-yaml --cuda", f"{mk:6.2f} s; cpift CUDA "
            f"{mk / runs['pair', 'cuda']:.1f}x faster; {d:,} of {t:,} elements differ")
    except Exception as e:  # noqa: BLE001
        row("fuse", "pair, mergekit-yaml --cuda", f"not run: {str(e)[-300:]}")


def s_profile(work: Path) -> None:
    """py-spy profiles (collapsed stacks per thread) of the analysis and of CUDA and CPU fusion
    on every core, into --out; and fusion with 256 MB output shards (several files written at
    once), timed without the profiler."""
    paths = {k: str(v) for k, v in build(work / "1b").items()}
    pair = [paths["t1"], paths["t2"]]
    three = [paths[t] for t in ("t1", "t2", "t3")]
    cores = os.cpu_count()
    out = OUT or work
    masks = work / "empty" / "masks"
    if not masks.exists():
        from cpift_dist.analysis import analyze
        from cpift_dist.config import AnalysisConfig
        from cpift_dist.executor import InProcessExecutor

        analyze(paths["base"], {Path(t).name: t for t in pair}, work / "empty",
                AnalysisConfig(p=1e-12), executor=InProcessExecutor(cores), overwrite=True,
                progress=False)
    if py_spy():
        r = child("analyze", paths["base"], three, str(work / "an-prof"), cores,
                  profile=out / "profile-analyze.txt")
        row("profile", f"analyze, {cores} threads, under py-spy", f"{r['seconds']:.2f} s")
        for device in ("cuda", "cpu"):
            r = child("fuse", paths["base"], pair, str(masks), str(work / f"fp-{device}"),
                      device, "weights", 0.5, cores, profile=out / f"profile-fuse-{device}.txt")
            row("profile", f"fuse pair {device}, {cores} threads, under py-spy",
                f"{r['seconds']:.2f} s")
    for device in ("cuda", "cpu"):
        r = child("fuse", paths["base"], pair, str(masks), str(work / f"fs-{device}"),
                  device, "weights", 0.5, cores, 256 << 20)
        row("profile", f"fuse pair {device}, {cores} threads, 256 MB output shards",
            f"{r['seconds']:.2f} s")


MEMORY_OPTIONS = ("gradient_checkpointing=true", "offload_optimizer=cpu", "offload_params=cpu")


def _train(model: Path, data: Path, out: Path, *overrides: str, freeze: Path | None = None,
           timeout: float = 300) -> float:
    """One training run under torchrun (one rank per GPU; gloo on the CPU in dry mode); its
    wall time."""
    import torch

    from helpers import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
           str(max(1, torch.cuda.device_count())), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "--log-dir", str(out.parent / f"{out.name}-logs"),
           "-m", "cpift_dist.training.run", "--model", str(model), "--out", str(out),
           "--data", f"arithmetic={data}", *overrides, "progress=false"]
    if freeze is not None:
        cmd += ["--freeze", str(freeze)]
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    if DRY:
        env["DS_ACCELERATOR"] = "cpu"
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode:
        raise RuntimeError(f"training failed ({' '.join(overrides)}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def s_zero3(work: Path) -> None:
    """A masked stage, then an independent check; again with activation checkpointing and
    ZeRO-Offload of the optimizer and the parameters (the freezer's hook then runs on the
    host's fp32 partitions)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from cpift_dist.data import make_suite
    from helpers import make_chat_tokenizer, make_llama, write_mask

    d = work / "zero3"
    shutil.rmtree(d, ignore_errors=True)
    make_llama(d / "model", hidden=256, dtype=torch.bfloat16)
    make_chat_tokenizer(d / "model")
    make_suite(d / "suite", n_train=64, n_eval=8)
    g = torch.Generator().manual_seed(0)
    write_mask(d / "m.safetensors", d / "model", lambda n, k: torch.rand(k, generator=g) < 0.2,
               "arithmetic")
    ngpu = max(1, torch.cuda.device_count())
    masks = load_file(str(d / "m.safetensors"))

    def tensors(p):
        out = {}
        for f in sorted(p.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    base = tensors(d / "model")
    failed = []
    for label, extra in (("", ()), (", checkpointing + offload", MEMORY_OPTIONS)):
        out = d / ("o" if not extra else "o-offload")
        seconds = _train(d / "model", d / "suite" / "arithmetic" / "train.jsonl", out,
                         "zero_stage=3", "dtype=bf16", "max_steps=8", "max_length=320",
                         "micro_batch=4", "lr=3e-3", "weight_decay=0.05", *extra,
                         freeze=d / "m.safetensors")
        # independent of the freezer's own check: safetensors, numpy, the mask bits by hand
        got = tensors(out / "model")
        frozen = same = moved = free = 0
        for name, b in base.items():
            bits = torch.from_numpy(np.unpackbits(masks[name].numpy(), bitorder="little")[
                :b.numel()].astype(bool))
            if got[name].dtype != b.dtype:
                raise RuntimeError(f"{name}: saved as {got[name].dtype}, trained from {b.dtype}")
            bb, tt = b.reshape(-1).view(torch.int16), got[name].reshape(-1).view(torch.int16)
            frozen += int(bits.sum())
            same += int((bb[bits] == tt[bits]).sum())
            free += int((~bits).sum())
            moved += int((bb[~bits] != tt[~bits]).sum())
        facts = json.loads((out / "freeze.json").read_text())
        ran = json.loads((out / "deepspeed.json").read_text())
        row("zero3", f"ZeRO-3 bf16 on NCCL, {ngpu} rank(s), 8 steps{label}",
            f"{same:,} of {frozen:,} frozen elements bit-identical; {moved / free:.0%} of the "
            f"rest moved; freezer's own check {facts.get('checked')}; the engine: offload "
            f"optimizer {ran['offload_optimizer']}, parameters {ran['offload_param']}, "
            f"checkpointing {ran['activation_checkpointing']} ({seconds:.0f} s)")
        if same != frozen or moved < 0.5 * free:
            failed.append(label or "plain")
    if failed:
        raise RuntimeError(f"frozen elements moved, or the rest did not train: {failed}")


def _chat_model(work: Path, name: str) -> tuple[Path, Path]:
    """The 1.1B bf16 base (build) linked into ``work/name/model`` with a chat tokenizer beside
    it, and the generated task suite in ``work/name/suite``."""
    from cpift_dist.data import make_suite
    from helpers import make_chat_tokenizer

    base = build(work / "1b")["base"]
    d = work / name
    shutil.rmtree(d, ignore_errors=True)
    model = d / "model"
    model.mkdir(parents=True)
    for f in base.iterdir():  # the weights linked, a chat tokenizer beside them
        (model / f.name).symlink_to(f.resolve())
    make_chat_tokenizer(model)
    make_suite(d / "suite", n_train=64, n_eval=16)
    return model, d / "suite"


def s_eval(work: Path) -> None:
    """Evaluation on the GPU: the 1.1B bf16 base on one GPU, spread by accelerate's
    ``device_map`` over every GPU (``auto``) and over a group (``auto:0``, as the eval threads
    run a model larger than one GPU); the same scores each way, and three models at once on
    the eval threads (one per GPU, then queued)."""
    from types import SimpleNamespace

    from cpift_dist.config import EvalConfig
    from cpift_dist.evaluate import EvalTask, evaluate_model
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.pipeline import evaluate_all

    model, suite = _chat_model(work, "eval")
    tasks = {t: EvalTask(suite / t / "eval.jsonl", scorer=t) for t in ("arithmetic", "format")}
    cfg = EvalConfig(max_new_tokens=16, limit=16)
    got, seconds = {}, {}
    for device in (f"{GPU}:0" if not DRY else "cpu", "auto", *(() if DRY else ("auto:0",))):
        t0 = time.perf_counter()
        got[device] = evaluate_model(model, tasks, cfg, device=device)
        seconds[device] = time.perf_counter() - t0
    first = next(iter(got.values()))
    same = all(g == first for g in got.values())
    row("eval", "1.1B bf16, " + " / ".join(got) + ", 2 tasks x 16",
        " / ".join(f"{s:.1f} s" for s in seconds.values()) +
        f"; scores {'the same' if same else 'DIFFER'} each way")
    t0 = time.perf_counter()
    res = evaluate_all({f"m{i}": model for i in range(3)}, tasks,
                       SimpleNamespace(eval=cfg), InProcessExecutor(os.cpu_count() or 1))
    again = all({t: r[t] for t in tasks} == {t: v["score"] for t, v in first.items()}
                for r in res.values())
    row("eval", "3 models on the eval threads", f"{time.perf_counter() - t0:.1f} s; scores "
        f"{'as above' if again else 'DIFFER'}")
    if not (same and again):
        raise RuntimeError(f"eval scores differ: {got}, {res}")


def s_memory(work: Path) -> None:
    """The memory options on the 1.1B bf16 base (build): a few ZeRO-3 bf16 steps without and
    with activation checkpointing and ZeRO-Offload, rank 0's peak GPU memory and time per
    step (the steps after the first)."""
    model, suite = _chat_model(work, "memory")
    d = model.parent
    steps = 4
    for label, extra in (("plain", ()), ("checkpointing", MEMORY_OPTIONS[:1]),
                         ("checkpointing + offload", MEMORY_OPTIONS)):
        out = d / label.replace(" + ", "-")
        seconds = _train(model, suite / "arithmetic" / "train.jsonl", out,
                         "zero_stage=3", "dtype=bf16", f"max_steps={steps}",
                         f"save_every={steps}", "max_length=512", "micro_batch=8", "lr=1e-5",
                         *extra, timeout=420)
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        per = (rows[-1]["time"] - rows[0]["time"]) / max(1, len(rows) - 1)
        peak = rows[-1].get("gpu_peak_gib")
        row("memory", f"1.1B bf16, ZeRO-3, {label}",
            (f"peak {peak:.1f} GiB on rank 0" if peak is not None else "no GPU") +
            f", {per:.2f} s/step after the first ({seconds:.0f} s in all)")
        shutil.rmtree(out / "checkpoints", ignore_errors=True)


def s_masked(work: Path) -> None:
    import torch

    r = subprocess.run([sys.executable, str(HERE / "masked_step_bench.py"), "--stages", "3,2",
                        "--dtype", "bf16", "--hidden", "128" if DRY else "1024", "--nproc",
                        str(max(1, torch.cuda.device_count())), "--blocks", "4", "--epi", "0.01",
                        "--data", str(work / "masked")],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    for line in r.stdout.splitlines():
        if line.startswith("ZeRO-"):
            row("masked", line.split(":")[0], line.split(":", 1)[1].strip())
        elif line.strip().startswith("EPI"):
            row("masked", "  " + line.strip().split(":")[0], line.split(":", 1)[1].strip())


def s_writes(work: Path) -> None:
    import write_bench

    size, times = write_bench.run(work / "writes", 0.25 if DRY else 2.0, os.cpu_count() or 1)
    for way, fig in write_bench.lines(size, times):
        row("writes", write_bench.WHAT[way].format(n=os.cpu_count()), fig.strip())


def s_tests(work: Path) -> None:
    files = ["tests/test_kernels.py", "tests/test_fusion.py", "tests/test_fused_cpu.py",
             "tests/test_analyze.py", "tests/test_radix_select.py", "tests/test_tied.py"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    if importlib.util.find_spec("xdist"):
        cmd += ["-n", str(min(8, os.cpu_count()))]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-500:]
    row("tests", " ".join(Path(f).stem for f in files),
        f"{tail} ({time.perf_counter() - t0:.0f} s)")
    if r.returncode:
        print(r.stdout[-6000:], r.stderr[-2000:])
        raise RuntimeError("tests failed")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/gpucheck"))
    ap.add_argument("--only", default=",".join(SECTIONS))
    ap.add_argument("--out", type=Path, help="also write the figures as JSON here (rewritten "
                    "after each one)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds after which no further section starts (each is reported as "
                         "skipped), so that the table prints before a time limit ends the run")
    ap.add_argument("--measure")
    ap.add_argument("args", nargs="?")
    a = ap.parse_args()
    global OUT
    OUT = a.out
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
    if a.measure:
        _collect_phases()
        print(json.dumps({"analyze": m_analyze, "fuse": m_fuse}[a.measure](*json.loads(a.args))))
        return
    # what the image may lack (README, "GPU check"): fail before the device time is spent
    missing = [m for m in ("pydantic", "blake3", "numba", "safetensors", "transformers", "yaml")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"gpu_check: {', '.join(missing)} not importable: carry the wheels "
                         "(README, 'GPU check') and put them on PYTHONPATH")
    import torch
    import triton

    if not torch.cuda.is_available() and not DRY:
        raise SystemExit("gpu_check: no CUDA device here (GPU_CHECK_DRY=1 checks the script on "
                         "CPU with a small model)")
    name = torch.cuda.get_device_name() if not DRY else "dry run on CPU"
    a.work.mkdir(parents=True, exist_ok=True)
    print(f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    failed = []
    start = time.perf_counter()
    for section in a.only.split(","):
        t0 = time.perf_counter()
        if a.deadline is not None and t0 - start > a.deadline:
            row(section, "skipped", f"--deadline {a.deadline:.0f} s passed "
                f"({t0 - start:.0f} s in)")
            continue
        try:
            globals()[f"s_{section}"](a.work)
        except Exception as e:  # noqa: BLE001  one failed section must not hide the others
            traceback.print_exc()
            row(section, "FAILED", f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            failed.append(section)
        print(f"-- {section} took {time.perf_counter() - t0:.0f} s", flush=True)
    width = max(len(w) for _, w, _ in ROWS)
    print(f"\n== gpu_check: {name}, {os.cpu_count()} cores ==")
    for section, what, fig in ROWS:
        print(f"{section:9s} {what:{width}s}  {fig}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
