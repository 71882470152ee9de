"""Masked-step benchmark: a training step with element-wise freezing against the same step without.

    .venv/bin/python bench/masked_step_bench.py [--hidden 512] [--tasks 3] [--p 0.01]
        [--blocks 8] [--block-steps 4] [--stages 3,2] [--dtype fp32]

One torchrun job of 2 ranks per ZeRO stage (gloo on CPU, NCCL on CUDA when present) trains a
Llama built here on the bundled arithmetic task with the union of ``--tasks`` random core masks
(``--p`` of the elements each) frozen. In the same process, on the same engine, blocks of
steps alternate between the freezer's post-step hook attached and detached; the figure is the
ratio of the median step times (target <= 1.05x). Also printed: the freezer's set-up time
(slicing the masks to this rank's partitions) and the frozen elements per rank.

``--epi``: a third mode in the same alternation, evolving isolation (EMA importance update
before every step, the refreshed frozen set restored after it, on top of the static masks), and
the median time of one refresh (exact distributed top-k, mask written), against a step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import free_port  # noqa: E402


def worker(model: str, data: str, masks: list[str], stage: int, dtype: str, blocks: int,
           block_steps: int, out: str, epi_p: float = 0.0) -> None:
    import torch

    from cpift_dist.config import TrainConfig
    from cpift_dist.training.freeze import ElementFreezer
    from cpift_dist.training.loop import SFTJob, SFTLoop

    cfg = TrainConfig(zero_stage=stage, dtype=dtype, max_length=320, micro_batch=4,
                      weight_decay=0.01, progress=False, max_steps=10 ** 6)
    loop = SFTLoop(SFTJob(Path(model), {"arithmetic": Path(data)}, Path(out), cfg,
                          freeze=[Path(m) for m in masks]))
    loop.setup()
    loop.freezer.detach()
    t0 = time.perf_counter()
    freezer = ElementFreezer(loop.engine, loop.union)  # timed: what a stage pays at setup
    t_setup = time.perf_counter() - t0
    engine = loop.engine
    batches = [loop._batch() for _ in range(block_steps)]  # the same batches in both modes

    def step(batch):
        t = time.perf_counter()
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    epi, refresh_s = None, []
    if epi_p:
        from cpift_dist.config import EPIConfig
        from cpift_dist.training.epi import EvolvingIsolation

        epi = EvolvingIsolation(engine, EPIConfig(p=epi_p, refresh_every=10 ** 6), Path(out),
                                10 ** 6)
    for b in batches:  # warm-up (and the EMA's first values)
        step(b)
    if epi is not None:
        for i in range(3):  # timed: what one refresh costs (all ranks, mask written)
            if engine.device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            epi.refresh(i + 1)
            refresh_s.append(time.perf_counter() - t)
    modes = ["masked", "plain"] + (["epi"] if epi is not None else [])
    times = {m: [] for m in modes}
    for i in range(len(modes) * blocks):
        mode = modes[i % len(modes)]
        freezer.attach() if mode in ("masked", "epi") else freezer.detach()
        if epi is not None:
            epi.attach() if mode == "epi" else epi.detach()
        times[mode] += [step(b) for b in batches]
    if loop.rank == 0:
        res = {"setup_s": t_setup, "frozen_rank0": freezer.frozen_here,
               **{f"{m}_s": statistics.median(v) for m, v in times.items()}}
        if epi is not None:
            res.update(refresh_s=statistics.median(refresh_s), epi_k=epi.k)
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "bench.json").write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--p", type=float, default=0.01)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--block-steps", type=int, default=4)
    ap.add_argument("--stages", default="3,2")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--data", type=Path, default=HERE / "_data" / "masked")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (one per GPU on CUDA)")
    ap.add_argument("--epi", type=float, default=0.0, metavar="P",
                    help="also time evolving isolation freezing the top P (e.g. 0.01)")
    ap.add_argument("--worker", nargs=9)
    a = ap.parse_args()
    if a.worker:
        m, d, masks, st, dt, bl, bs, o, ep = a.worker
        return worker(m, d, masks.split(","), int(st), dt, int(bl), int(bs), o, float(ep))

    import torch

    from cpift_dist.data import make_suite
    from cpift_dist.io import Checkpoint
    from helpers import make_chat_tokenizer, make_llama, write_mask

    d = a.data
    model = d / f"model-{a.hidden}"
    if not model.exists():
        make_llama(model, hidden=a.hidden)
        make_chat_tokenizer(model)
    if not (d / "suite").exists():
        make_suite(d / "suite", n_train=64, n_eval=8)
    masks = []
    for t in range(a.tasks):
        g = torch.Generator().manual_seed(t)
        path = d / f"mask-{a.hidden}-{t}-{a.p}.safetensors"
        if not path.exists():
            write_mask(path, model, lambda n, k: torch.rand(k, generator=g) < a.p, f"t{t}")
        masks.append(str(path))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    ck = Checkpoint(model)
    nparams = sum(ck.info(n).numel for n in ck.names())
    print(f"\n== masked step, Llama hidden {a.hidden} x 2 layers, {a.nproc} rank(s), {a.dtype}, "
          f"{a.tasks} masks of p={a.p} ==")
    for stage in (int(s) for s in a.stages.split(",")):
        out = d / f"out-z{stage}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
               "--log-dir", str(d / "torchrun"), __file__,
               "--worker", str(model), str(d / "suite" / "arithmetic" / "train.jsonl"),
               ",".join(masks), str(stage), a.dtype, str(a.blocks), str(a.block_steps),
               str(out), str(a.epi)]
        subprocess.run(cmd, check=True, capture_output=True, env=env)
        r = json.loads((out / "bench.json").read_text())
        print(f"ZeRO-{stage}: step {r['plain_s'] * 1e3:7.1f} ms plain, "
              f"{r['masked_s'] * 1e3:7.1f} ms masked: {r['masked_s'] / r['plain_s']:.3f}x "
              f"(median of {a.blocks * a.block_steps} each); freezer set-up "
              f"{r['setup_s'] * 1e3:.0f} ms, {r['frozen_rank0']:,} frozen elements on rank 0 "
              f"of {nparams:,} parameters")
        if "epi_s" in r:
            print(f"         EPI (p={a.epi}, static masks too): {r['epi_s'] * 1e3:7.1f} ms: "
                  f"{r['epi_s'] / r['plain_s']:.3f}x plain, {r['epi_s'] / r['masked_s']:.3f}x "
                  f"masked; one refresh {r['refresh_s'] * 1e3:.0f} ms = "
                  f"{r['refresh_s'] / r['plain_s']:.1f} steps ({r['epi_k']:,} frozen)")


if __name__ == "__main__":
    main()
