"""The ZeRO-3 export's host memory on rank 0: streamed against gathered whole, side by side.

    .venv/bin/python bench/export_bench.py [--hidden 1024] [--layers 24] [--rounds 2]
                                           [--shard 100MB]

A Llama built here (default about 370M parameters, untied, fp32, so the whole state dict is
1.5 GB), trained one step by `cpift_dist.training.run` on 2 gloo ranks (torchrun, ZeRO-3),
then exported each way (``SFTLoop.save(stream=...)``; alternated, a fresh run each):
  streamed  each parameter gathered in turn, rank 0 writing it (the default)
  gathered  DeepSpeed's whole 16-bit state dict on rank 0, then ``save_pretrained``
Rank 0's resident anonymous memory is sampled every 2 ms during the export; the figure is its
peak above that when the export began (after ``malloc_trim``, so that memory training
freed is not reused unseen). Both write ``--shard`` shards (100 MB); the outputs are compared
tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def _rss() -> int:
    """Resident anonymous memory (``RssAnon``): not the pages of files read through maps
    (the stage input, read to check the frozen elements), which the kernel reclaims."""
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("RssAnon:"))


def worker() -> None:
    """torchrun's program: the training entry point, its export measured on rank 0."""
    import importlib

    loop = importlib.import_module("cpift_dist.training.loop")
    run = importlib.import_module("cpift_dist.training.run")
    save, stream = loop.SFTLoop.save, os.environ["EXPORT_BENCH_MODE"] == "streamed"

    def measured(self, stream_: bool = True) -> None:
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # what training freed goes back to the kernel
        base, peak, done = _rss(), [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.002):
                peak[0] = max(peak[0], _rss())

        t = threading.Thread(target=sample, daemon=True)
        t.start()
        t0 = time.perf_counter()
        save(self, stream=stream)
        seconds = time.perf_counter() - t0
        done.set()
        t.join()
        if self.rank == 0:
            print("EXPORT " + json.dumps({"seconds": seconds, "peak": max(peak) - base}),
                  flush=True)

    loop.SFTLoop.save = measured
    run._exit(run.main())


def build(root: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpift_dist.data import make_suite
    from helpers import make_chat_tokenizer

    model = root / "model"
    if not (model / "config.json").exists():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                          num_hidden_layers=layers, num_attention_heads=hidden // 64,
                          num_key_value_heads=hidden // 64, max_position_embeddings=512,
                          tie_word_embeddings=False)
        LlamaForCausalLM(cfg).save_pretrained(model, max_shard_size="500MB")
        make_chat_tokenizer(model)
        make_suite(root / "suite", n_train=16, n_eval=4)
    return model


def one(root: Path, model: Path, mode: str, shard: str, threshold: str | None) -> dict:
    from helpers import free_port

    out = root / mode
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--log-dir", str(root / "torchrun-logs"), str(Path(__file__).resolve()), "--worker", "--model", str(model), "--out", str(out),
           "--data", f"arithmetic={root / 'suite' / 'arithmetic' / 'train.jsonl'}",
           "zero_stage=3", "max_steps=1", "save_every=1", "micro_batch=1", "max_length=320",
           f"max_shard_size={shard}", "progress=false"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "EXPORT_BENCH_MODE": mode}
    if threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = threshold
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    if r.returncode:
        raise SystemExit(f"{mode}: exit {r.returncode}\n{r.stderr[-3000:]}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("EXPORT "))
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return json.loads(line[len("EXPORT "):])


def main() -> None:
    if "--worker" in sys.argv:
        sys.argv.remove("--worker")
        return worker()
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shard", default="100MB", help="max_shard_size of the export")
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parent / "_data" /
                    "export")
    a = ap.parse_args()
    import torch

    from cpift_dist.io import Checkpoint

    model = build(a.work, a.hidden, a.layers)
    ck = Checkpoint(model)
    params = sum(t.numel for t in ck.tensors.values())
    print(f"{params / 1e6:.0f}M parameters, {4 * params / 2**30:.2f} GiB in fp32; 2 gloo ranks, "
          f"ZeRO-3, {a.shard} shards")
    # glibc returns a freed block to the kernel only where it was mapped on its own: blocks
    # above the mmap threshold, which starts at 128 KiB and rises with each such block freed,
    # up to 32 MiB. This model's tensors are 4-16 MB (a 70B model's matrices 134-470 MB), so
    # each run also goes with the threshold held at 1 MiB, as such tensors are allocated
    ways = [(m, t) for t in (None, "1048576") for m in ("streamed", "gathered")]
    got: dict[tuple, list[dict]] = {w: [] for w in ways}
    for _ in range(a.rounds):
        for mode, threshold in ways:
            got[mode, threshold].append(one(a.work, model, mode, a.shard, threshold))
    x, y = Checkpoint(a.work / "streamed" / "model"), Checkpoint(a.work / "gathered" / "model")
    same = x.names() == y.names() and all(torch.equal(x.read(n), y.read(n)) for n in x.names())
    print("rank 0's anonymous memory during the export, peak above its start; export time")
    for (mode, threshold), runs in got.items():
        print(f"  {mode:9s} glibc mmap threshold {'1 MiB' if threshold else 'default':8s}: "
              + ", ".join(f"{r['peak'] / 2**30:.2f} GiB" for r in runs)
              + "; " + ", ".join(f"{r['seconds']:.1f} s" for r in runs))
    for threshold in (None, "1048576"):
        s = min(r["peak"] for r in got["streamed", threshold])
        g = min(r["peak"] for r in got["gathered", threshold])
        print(f"gathered / streamed peak, threshold {'1 MiB' if threshold else 'default'}: "
              f"{g / max(s, 1):.1f}x")
    print(f"outputs {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
