"""Entry point of one training run, for any launcher that sets the torchrun environment.

    torchrun --nproc_per_node 2 -m cpift_dist.training.run \
        --model runs/x/base --data arithmetic=data/suite/arithmetic/train.jsonl --out runs/x/ft \
        zero_stage=3 max_steps=100 lr=1e-4 [epi.p=0.01 epi.refresh_every=10 ...]

One stage of a run's final SFT (the job is planned from the run config; rank 0 writes the
stage manifest at the end):

    torchrun --nproc_per_node 2 -m cpift_dist.training.run \
        --run-config configs/tiny.yaml --method cpi --stage 1 [sft.steps=40 ...]

One task's fine-tune of a run (what ``cpift run`` starts without Ray, per task):

    torchrun --nproc_per_node 2 -m cpift_dist.training.run \
        --run-config runs/tiny/.pipeline/run-config.json --finetune arithmetic

On CPU set DS_ACCELERATOR=cpu (gloo); with CUDA it uses NCCL.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from cpift_dist.config import EPIConfig, TrainConfig, apply_overrides, load_config, validate
from cpift_dist.errors import CpiftError
from cpift_dist.training.loop import SFTJob, Stopped, run


@record  # under torchrun: a rank's uncaught exception goes to its error file, and torchrun's
# failure summary prints the first failed rank's traceback (the files lie in --log-dir)
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cpift-train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="HF checkpoint to start from")
    ap.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                    help="a task's training file (repeat per task)")
    ap.add_argument("--out", type=Path, help="output directory")
    ap.add_argument("--freeze", action="append", default=[], type=Path, metavar="MASK",
                    help="core-mask file whose elements stay frozen (repeat; union)")
    ap.add_argument("--samples", action="append", default=[], metavar="TASK=N",
                    help="examples of a task per epoch of the mix (repeat per task)")
    ap.add_argument("--run-config", type=Path, help="a run config: train one of its SFT stages")
    ap.add_argument("--method", help="SFT method of the stage (default: the config's)")
    ap.add_argument("--stage", type=int, help="1-based SFT stage number")
    ap.add_argument("--finetune", metavar="TASK",
                    help="with --run-config: fine-tune this task of the run instead of a stage")
    ap.add_argument("--local_rank", "--local-rank", type=int,
                    help=argparse.SUPPRESS)  # the deepspeed launcher adds it; LOCAL_RANK is read
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="TrainConfig fields, epi.* EPIConfig fields (evolving isolation); "
                         "run-config fields with --run-config")
    args = ap.parse_args(argv)
    try:
        if args.run_config and args.finetune:
            return _finetune(args)
        if args.run_config:
            return _stage(args)
        if not args.model or not args.out:
            raise CpiftError("--model and --out are required (or --run-config and --stage)")
        data = {t: Path(v) for t, v in _pairs("--data", args.data, "TASK=FILE").items()}
        samples = {}
        for t, v in _pairs("--samples", args.samples, "TASK=N").items():
            if not v.isdigit() or int(v) < 1 or t not in data:
                raise CpiftError(f"--samples {t}={v}: expected a task of --data and N >= 1")
            samples[t] = int(v)
        plain = [o for o in args.overrides if not o.startswith("epi.")]
        cfg = validate(TrainConfig, apply_overrides({}, plain), "command line")
        epi = [o for o in args.overrides if o.startswith("epi.")]
        epi_cfg = validate(EPIConfig, apply_overrides({}, epi)["epi"], "command line epi") \
            if epi else None
        loop = run(SFTJob(args.model, data, args.out, cfg, samples=samples or None,
                          freeze=args.freeze, epi=epi_cfg))
        if loop.rank == 0:
            print(f"trained {loop.step} steps; final loss {loop.losses[-1]:.4f}; "
                  f"wrote {args.out / 'model'}", flush=True)
        return 0
    except CpiftError as e:
        print(f"cpift-train: error: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"cpift-train: {e}", file=sys.stderr)
        return 128 + e.signum
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Destroys the process group once the run is over (PyTorch asks every trainer to)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _exit(code: int) -> None:
    """Ends the process without interpreter finalisation, output flushed first.

    DeepSpeed keeps references to its gloo groups, so their worker threads outlive
    ``destroy_process_group``; one of them may still be releasing a finished all-gather's
    tensors when Python finalises. Taking the GIL then ends that thread by forced unwinding
    through a noexcept destructor: ``terminate called without an active exception``, SIGABRT,
    and torchrun fails a run whose outputs are all written (seen in CI; 8 of 360 runs on 2 busy
    cores, ``bench/exit_stress.py``; gdb on the core shows ``~AsyncAllgatherWork`` in ``ProcessGroupGloo::runLoop``
    waiting for the GIL while the main thread is in ``Py_FinalizeEx``; pytorch/pytorch#190489).
    Everything this entry point writes is closed before ``main`` returns.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stage(args) -> int:
    """One SFT stage of a run config; the directory was readied by ``cpift sft --prepare``."""
    from cpift_dist.training.sft import finish_stage, plan_stages, stage_complete, stage_job

    cfg = load_config(args.run_config, args.overrides)
    stages = plan_stages(cfg, args.method)
    if args.stage is None or not 1 <= args.stage <= len(stages):
        raise CpiftError(f"--stage must be 1..{len(stages)} for this run's "
                         f"{stages[0].method} plan")
    stage = stages[args.stage - 1]
    if stage_complete(cfg, stage):
        print(f"stage {stage.index} ({stage.method}) is complete: skipped", flush=True)
        return 0
    job = stage_job(cfg, stage)
    loop = run(job)
    if loop.rank == 0:
        finish_stage(cfg, stage, job)
        print(f"stage {stage.index} ({stage.method}): {loop.step} steps; wrote "
              f"{stage.out / 'model'}", flush=True)
    return 0


def _finetune(args) -> int:
    """One task's fine-tune, exactly as the pipeline plans it (same job, same output)."""
    from cpift_dist.training.sft import finetune_job

    cfg = load_config(args.run_config, args.overrides)
    loop = run(finetune_job(cfg, args.finetune))
    if loop.rank == 0:
        print(f"fine-tune {args.finetune}: {loop.step} steps; wrote {loop.job.out / 'model'}",
              flush=True)
    return 0


def _pairs(flag: str, items: list[str], form: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CpiftError(f"{flag} {item!r}: expected {form}")
        out[key] = value
    return out


if __name__ == "__main__":
    _exit(main())
