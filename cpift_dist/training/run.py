"""Entry point of one training run, for any launcher that sets the torchrun environment.

    torchrun --nproc_per_node 2 -m cpift_dist.training.run \
        --model runs/x/base --data arithmetic=data/suite/arithmetic/train.jsonl --out runs/x/ft \
        zero_stage=3 max_steps=100 lr=1e-4

On CPU set DS_ACCELERATOR=cpu (gloo); with CUDA it uses NCCL.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpift_dist.config import TrainConfig, apply_overrides, validate
from cpift_dist.errors import CpiftError
from cpift_dist.training.loop import SFTJob, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpift-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="HF checkpoint to start from")
    ap.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                    help="a task's training file (repeat per task)")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--local_rank", "--local-rank", type=int,
                    help=argparse.SUPPRESS)  # the deepspeed launcher adds it; LOCAL_RANK is read
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="TrainConfig fields")
    args = ap.parse_args(argv)
    try:
        data = {}
        for item in args.data:
            task, sep, path = item.partition("=")
            if not sep:
                raise CpiftError(f"--data {item!r}: expected TASK=FILE")
            data[task] = Path(path)
        cfg = validate(TrainConfig, apply_overrides({}, args.overrides), "command line")
        loop = run(SFTJob(args.model, data, args.out, cfg))
        if loop.rank == 0:
            print(f"trained {loop.step} steps; final loss {loop.losses[-1]:.4f}; "
                  f"wrote {args.out / 'model'}", flush=True)
        return 0
    except CpiftError as e:
        print(f"cpift-train: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
