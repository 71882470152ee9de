"""Training benchmark: the ZeRO-3 loop against plain PyTorch DDP, and what Ray adds to start a job.

    .venv/bin/python bench/train_bench.py [--steps 30] [--hidden 256]

Same model (a Llama built here), same data (the bundled arithmetic task, character tokenizer),
same micro-batch and sequence lengths, 2 ranks on CPU (gloo) launched by torchrun, in one run:
  zero3   cpift_dist.training.run (DeepSpeed ZeRO-3, fp32)
  zero2   the same loop with ZeRO-2
  ddp     a plain torch DDP loop over the same batches (below)
Throughput: rank 0's non-padding tokens x 2 ranks per second, over the steps after the first 3
(warm-up excluded). Then the start-up cost: the same 1-step job through Ray Train
(TorchTrainer, local Ray already up) against torchrun, wall clock from launch to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import free_port  # noqa: E402


def _env() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def ddp_worker(model: str, data: str, steps: int, micro: int, max_length: int, out: str) -> None:
    """A plain DDP loop over the same mixture and batches as SFTLoop (one rank)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpift_dist.data import IGNORE_INDEX, TaskMixture, encode_all, load_records

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model)
    exs, _ = encode_all(tok, load_records(data), max_length, data)
    mix = TaskMixture({"t": len(exs)}, seed=0)
    net = torch.nn.parallel.DistributedDataParallel(AutoModelForCausalLM.from_pretrained(model))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    log = []
    for step in range(steps):
        items = mix.take(micro * world, rank, world)
        batch = [exs[i] for _, i in items]
        n = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), n), tok.pad_token_id)
        labels = torch.full((len(batch), n), IGNORE_INDEX)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for r, e in enumerate(batch):
            ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[r, :len(e.labels)] = torch.tensor(e.labels)
            mask[r, :len(e.input_ids)] = 1
        loss = net(input_ids=ids, labels=labels, attention_mask=mask).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step + 1, "tokens": int(mask.sum()), "time": time.time()})
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in log))
    dist.destroy_process_group()


def throughput(out: Path, world: int = 2, skip: int = 3) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = rows[skip - 1:]
    toks = sum(r["tokens"] for r in rows[1:]) * world
    return toks / (rows[-1]["time"] - rows[0]["time"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--data", type=Path, default=HERE / "_data" / "train")
    ap.add_argument("--ddp-worker", nargs=6)
    a = ap.parse_args()
    if a.ddp_worker:
        m, d, s, mb, ml, o = a.ddp_worker
        return ddp_worker(m, d, int(s), int(mb), int(ml), o)

    from helpers import make_chat_tokenizer, make_llama

    from cpift_dist.data import make_suite

    d = a.data
    model = d / f"model-{a.hidden}"
    if not model.exists():
        make_llama(model, hidden=a.hidden)  # 2 layers, vocab 128 (the character tokenizer's)
        make_chat_tokenizer(model)
    if not (d / "suite").exists():
        make_suite(d / "suite", n_train=256, n_eval=8)
    data = str(d / "suite" / "arithmetic" / "train.jsonl")
    common = ["max_length=320", "micro_batch=4", "lr=1e-4", "progress=false", "save_every=100000"]
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
          "--master_addr", "127.0.0.1", "--log-dir", str(d / "torchrun")]  # not /tmp
    res = {}
    for name, stage in (("zero3", 3), ("zero2", 2)):
        out = d / f"out-{name}"
        subprocess.run(["rm", "-rf", str(out)])
        subprocess.run(tr + ["--master_port", str(free_port()), "-m", "cpift_dist.training.run",
                             "--model", str(model), "--data", f"arithmetic={data}", "--out",
                             str(out), f"zero_stage={stage}", f"max_steps={a.steps}", *common],
                       check=True, capture_output=True, env=_env())
        res[name] = throughput(out)
    out = d / "out-ddp"
    subprocess.run(tr + ["--master_port", str(free_port()), __file__, "--ddp-worker", str(model), data,
                         str(a.steps), "4", "320", str(out)], check=True, capture_output=True,
                   env=_env())
    res["ddp"] = throughput(out)

    # start-up: a 1-step job through torchrun vs through Ray Train (Ray already running)
    t0 = time.perf_counter()
    subprocess.run(tr + ["--master_port", str(free_port()), "-m", "cpift_dist.training.run",
                         "--model", str(model), "--data", f"arithmetic={data}", "--out",
                         str(d / "out-start-tr"), "max_steps=1", *common], check=True,
                   capture_output=True, env=_env())
    t_torchrun = time.perf_counter() - t0
    from cpift_dist.config import TrainConfig
    from cpift_dist.ray_utils import init_ray
    from cpift_dist.training import SFTJob
    from cpift_dist.training.ray_finetune import train_on_ray

    init_ray(None, num_cpus=2)
    subprocess.run(["rm", "-rf", str(d / "out-start-ray")])
    job = SFTJob(model, {"arithmetic": Path(data)}, d / "out-start-ray",
                 TrainConfig(max_steps=1, max_length=320, micro_batch=4, progress=False))
    t0 = time.perf_counter()
    train_on_ray("finetune-bench", job, num_workers=2, max_failures=0)
    t_ray = time.perf_counter() - t0

    print(f"\n== training, Llama hidden {a.hidden} x 2 layers, 2 CPU ranks (gloo), "
          f"micro-batch 4, {a.steps} steps ==")
    for name in ("ddp", "zero2", "zero3"):
        print(f"{name:6s} {res[name]:8.0f} tokens/s   {res[name] / res['ddp']:.2f}x DDP")
    print(f"1-step job start to finish: torchrun {t_torchrun:.1f} s, Ray Train {t_ray:.1f} s "
          f"(Ray adds {t_ray - t_torchrun:+.1f} s)")


if __name__ == "__main__":
    main()
