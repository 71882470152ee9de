"""Per-task fine-tunes scheduled by Ray: one DeepSpeed job per task, several tasks at once.

Each task is a Ray Train ``TorchTrainer`` with N rank workers (one bundle each): Ray gives
every worker the environment torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, ...) and a gloo or
NCCL process group that DeepSpeed reuses; the worker runs :class:`SFTLoop` as is. Tasks run
concurrently as the cluster's resources allow. A worker that dies makes Ray Train restart the
group (``max_failures``), and the loop resumes from its last DeepSpeed checkpoint on
``storage``; a task that fails for good is reported with its cause after the others finish.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cpift_dist.errors import CpiftError
from cpift_dist.training.loop import FAULT_ENV, SFTJob, SFTLoop


def _worker(config: dict) -> None:
    """One rank of one task's job, inside a Ray Train worker."""
    import ray.train

    os.environ.update(config.get("env", {}))
    start = time.time()
    loop = SFTLoop(config["job"])
    loop.setup()
    loop.train()
    loop.save()
    rank = ray.train.get_context().get_world_rank()
    where = {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "start": start,
             "end": time.time(), "step": loop.step}
    ranks = Path(config["job"].out) / "ranks"  # where each rank ran: placement, for the record
    ranks.mkdir(exist_ok=True)
    (ranks / f"{rank}.json").write_text(json.dumps(where))
    ray.train.report({"step": loop.step, "loss": loop.losses[-1] if loop.losses else None})


def train_on_ray(name: str, job: SFTJob, num_workers: int = 2, max_failures: int = 1,
                 env: dict[str, str] | None = None, use_gpu: bool = False,
                 placement: str = "PACK") -> dict:
    """Runs one DeepSpeed job (a fine-tune or an SFT stage) on the connected Ray cluster.

    Args:
        name: the Ray Train run name (``finetune-<task>``, ``sft-stage-<k>``...).

    Returns:
        The job's last reported metrics (step, loss).
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = dict(env or {})
    if not use_gpu:
        env.setdefault("DS_ACCELERATOR", "cpu")
    if FAULT_ENV in os.environ:  # fault injection reaches the rank workers too
        env.setdefault(FAULT_ENV, os.environ[FAULT_ENV])
    job = dataclasses.replace(  # absolute paths: workers may start elsewhere
        job, model=Path(job.model).resolve(), out=Path(job.out).resolve(),
        data={t: Path(p).resolve() for t, p in job.data.items()},
        freeze=[Path(p).resolve() for p in job.freeze])
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": job, "env": env},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": 1},
                                     placement_strategy=placement),
        run_config=RunConfig(name=name,
                             storage_path=str(Path(job.out).resolve().parent / ".ray-train"),
                             failure_config=FailureConfig(max_failures=max_failures)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return dict(result.metrics or {})


def finetune_all(jobs: dict[str, SFTJob], num_workers: int = 2, max_failures: int = 1,
                 env: dict[str, dict[str, str]] | None = None, use_gpu: bool = False,
                 placement: str = "PACK") -> dict:
    """Fine-tunes every task concurrently; returns task -> metrics.

    Raises:
        CpiftError: after every task has ended, naming each task that failed and its cause.
    """
    env = env or {}
    with ThreadPoolExecutor(max(1, len(jobs))) as pool:
        futures = {t: pool.submit(train_on_ray, f"finetune-{t}", j, num_workers, max_failures,
                                  env.get(t), use_gpu, placement) for t, j in jobs.items()}
    results, failed = {}, {}
    for t, f in futures.items():
        try:
            results[t] = f.result()
        except Exception as e:  # Ray Train wraps the worker's error: its last line is the cause
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            failed[t] = lines[-1][:300] if lines else type(e).__name__
    if failed:
        raise CpiftError("; ".join(f"fine-tune of task {t!r} failed ({why})"
                                   for t, why in failed.items())
                         + (f" (finished: {', '.join(results)})" if results else ""))
    return results
