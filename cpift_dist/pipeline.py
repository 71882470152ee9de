"""``cpift run``: the whole CPI-FT pipeline, resumable stage by stage.

    finetune -> analyze -> group -> fuse -> sft -> baselines -> eval -> report

Everything lands in ``<runs_dir>/<name>/`` (DESIGN.md §2). Each stage writes its outputs
atomically (a temporary directory renamed into place, or a manifest written last) and then a
ledger entry ``.pipeline/<stage>.json`` holding the digest of its configuration and inputs. A
rerun skips a stage whose ledger key matches and whose outputs are still there; a changed
config field or input re-runs that stage, and the stages after it re-run when its output
changed (their inputs are digests of it). ``--from STAGE`` deletes that stage's outputs and
everything after it first. Ctrl-C or SIGTERM leaves at worst a stage that re-runs (or resumes
from its DeepSpeed checkpoints), never one that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from cpift_dist.config import RunConfig, TaskConfig
from cpift_dist.errors import CpiftError
from cpift_dist.io.manifest import (MANIFEST_NAME, checkpoint_digest, outputs_digest,
                                    outputs_intact, read_manifest, sha256_file, sha256_json)
from cpift_dist.ray_utils import resolve_use_gpu

STAGES = ("finetune", "analyze", "group", "fuse", "sft", "baselines", "eval", "report")


def output_digest(path: Path) -> str:
    """Digest of a stage output: its manifest's file hashes, else the checkpoint digest."""
    man = read_manifest(path)
    if man and man.get("outputs"):
        return outputs_digest(man)
    return checkpoint_digest(path)


def _intact(path: Path) -> bool:
    """Every manifest at or below ``path`` (hidden directories aside: partial outputs) lists
    only files that are there with the sizes it recorded; for a file, its directory's."""
    if path.is_file():
        return outputs_intact(path.parent)
    return all(outputs_intact(m.parent) for m in path.rglob(MANIFEST_NAME)
               if not any(part.startswith(".") for part in m.relative_to(path).parts))


class Pipeline:
    """One run of the pipeline over a validated config.

    Args:
        cfg: the run config.
        from_stage: restart point (its outputs and all later ones are deleted first).
        progress: progress bars.
        log: where one-line stage reports go.
    """

    def __init__(self, cfg: RunConfig, from_stage: str | None = None, progress: bool = True,
                 log: Callable[[str], None] = print):
        if from_stage is not None and from_stage not in STAGES:
            raise CpiftError(f"--from {from_stage!r}: one of {', '.join(STAGES)}")
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.from_stage = from_stage
        self.progress = progress
        self.log = log
        self.ledger = self.run_dir / ".pipeline"
        self.ran: list[str] = []

    # ---- bookkeeping ---------------------------------------------------------------------
    def outputs(self, stage: str) -> list[Path]:
        r = self.run_dir
        return {"finetune": [r / "finetune"], "analyze": [r / "analysis"],
                "group": [r / "groups.json", r / "groups.jaccard.png",
                          r / "groups.core-location.png"],
                "fuse": [r / "fusion"], "sft": [r / "sft"], "baselines": [r / "baselines"],
                "eval": [r / "eval"], "report": [r / "report"]}[stage]

    def _done(self, stage: str, key: str) -> bool:
        try:
            entry = json.loads((self.ledger / f"{stage}.json").read_text())
        except (OSError, ValueError):
            return False
        if stage == "finetune":  # every task's model, not just the directory that holds them
            wanted = [self.run_dir / "finetune" / t.name / "model" / "config.json"
                      for t in self.cfg.tasks if t.tuned is None]
        else:
            wanted = self.outputs(stage)
        return entry.get("key") == key and all(p.exists() and _intact(p) for p in wanted)

    def _record(self, stage: str, key: str, seconds: float) -> None:
        self.ledger.mkdir(parents=True, exist_ok=True)
        tmp = self.ledger / f".{stage}.json.tmp"
        tmp.write_text(json.dumps({"key": key, "seconds": round(seconds, 2),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                             time.gmtime())}) + "\n")
        os.replace(tmp, self.ledger / f"{stage}.json")

    def _stage(self, stage: str, key_parts: dict, fn: Callable[[], str | None]) -> None:
        key = sha256_json(key_parts)
        if self._done(stage, key):
            self.log(f"{stage:9s} complete: skipped")
            return
        t0 = time.time()
        note = fn()
        self._record(stage, key, time.time() - t0)
        self.ran.append(stage)
        self.log(f"{stage:9s} done in {time.time() - t0:.1f} s" + (f": {note}" if note else ""))

    # ---- inputs ----------------------------------------------------------------------------
    def _prepare(self) -> None:
        from cpift_dist.models import resolve_base

        cfg = self.cfg
        cfg.runs_dir = cfg.runs_dir.resolve()  # Ray workers and ranks may start elsewhere
        self.run_dir = cfg.run_dir
        self.ledger = self.run_dir / ".pipeline"
        self.base = resolve_base(cfg.base, cfg.runs_dir / "_cache")
        if cfg.suite is not None:
            from cpift_dist.data import make_suite
            from cpift_dist.data.suite import TASKS

            suite = self.run_dir / "data" / "suite"
            spec = cfg.suite.model_dump()
            meta = suite / "suite.json"
            try:
                same = {k: json.loads(meta.read_text())["config"].get(k) for k in spec} == spec
            except (OSError, ValueError, KeyError, AttributeError):
                same = False
            if not same:
                make_suite(suite, cfg.suite.n_train, cfg.suite.n_eval, cfg.suite.seed,
                           overwrite=True)
                data = json.loads(meta.read_text())
                data["config"] = spec
                meta.write_text(json.dumps(data, indent=2) + "\n")
            tasks = []
            for t in cfg.tasks:
                upd = {}
                if t.name in TASKS:
                    upd = {"train_data": t.train_data or suite / t.name / "train.jsonl",
                           "eval_data": t.eval_data or suite / t.name / "eval.jsonl"}
                tasks.append(t.model_copy(update=upd))
            cfg.tasks = tasks
        cfg.tasks = [t.model_copy(update={k: Path(getattr(t, k)).resolve() for k in
                                          ("train_data", "eval_data", "tuned")
                                          if getattr(t, k) is not None}) for t in cfg.tasks]
        for t in cfg.tasks:
            for what in ("train_data", "eval_data"):
                p = getattr(t, what)
                if p is not None and not Path(p).is_file():
                    raise CpiftError(f"{p}: {what} of task {t.name!r} does not exist")
        self.cfg = cfg.model_copy(update={"base": self.base})

    def tuned(self, t: TaskConfig) -> Path:
        return t.tuned or self.run_dir / "finetune" / t.name / "model"

    # ---- stages ----------------------------------------------------------------------------
    def run(self) -> dict:
        from cpift_dist.launchers import check_launcher

        check_launcher(self.cfg)  # e.g. SLURM without srun: before anything is written
        self._prepare()
        self.config_file = self.ledger / "run-config.json"  # the prepared config, for ranks
        self.ledger.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.cfg.model_dump_json())
        if self.from_stage:
            for stage in STAGES[STAGES.index(self.from_stage):]:
                for p in self.outputs(stage):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(
                        missing_ok=True)
                (self.ledger / f"{stage}.json").unlink(missing_ok=True)
        self.stage_finetune()
        self.stage_analyze()
        self.stage_group()
        self.stage_fuse()
        self.stage_sft()
        self.stage_baselines()
        self.stage_eval()
        return self.stage_report()

    def stage_finetune(self) -> None:
        cfg = self.cfg
        todo = [t for t in cfg.tasks if t.tuned is None]
        missing = [t.name for t in todo if t.train_data is None]
        if missing:
            raise CpiftError(f"task {missing[0]!r} has neither a tuned checkpoint nor "
                             "train_data to fine-tune on")
        keys = {t.name: {"base": checkpoint_digest(self.base), "data": sha256_file(t.train_data),
                         "shape": [t.data_shape, t.columns],
                         "train": cfg.train.key(),
                         "workers": cfg.finetune.workers_per_task} for t in todo}

        def run() -> str:
            from cpift_dist.launchers import resolve_launcher
            from cpift_dist.training.sft import finetune_job

            jobs = {}
            for t in todo:
                out = self.run_dir / "finetune" / t.name
                spec = out / "stage.json"
                try:
                    same = json.loads(spec.read_text()) == keys[t.name]
                except (OSError, ValueError):
                    same = False
                if same and (out / "model" / "config.json").is_file() and not (
                        out / "checkpoints").exists():
                    continue  # finished earlier (this stage was interrupted after it)
                if not same:
                    shutil.rmtree(out, ignore_errors=True)  # other inputs: no stale resume
                out.mkdir(parents=True, exist_ok=True)
                spec.write_text(json.dumps(keys[t.name]))
                jobs[t.name] = finetune_job(cfg, t.name)
                jobs[t.name].cfg = cfg.train.model_copy(update={"progress": self.progress
                                                                and cfg.train.progress})
            fc = cfg.finetune
            if jobs and resolve_launcher(cfg) == "ray":
                from cpift_dist.training.ray_finetune import finetune_all

                self._ray()
                finetune_all(jobs, fc.workers_per_task, fc.max_failures,
                             use_gpu=resolve_use_gpu(fc.use_gpu, fc.workers_per_task),
                             placement=fc.placement)
            elif jobs:
                self._launch_finetunes(list(jobs))
            for name in jobs:
                shutil.rmtree(self.run_dir / "finetune" / name / "checkpoints",
                              ignore_errors=True)
            return f"{len(jobs)} task(s) fine-tuned, {len(todo) - len(jobs)} reused"

        if todo:
            self._stage("finetune", keys, run)
        else:
            self.log("finetune  every task has a tuned checkpoint: nothing to do")

    def _launch_finetunes(self, tasks: list[str]) -> None:
        """Fine-tunes without Ray: torchrun jobs on this node or srun steps on the SLURM
        allocation's nodes, as many at once as the node's devices or the allocation allow."""
        from cpift_dist.launchers import Job, run_jobs

        fc = self.cfg.finetune
        quiet = [] if self.progress else ["train.progress=false"]
        jobs = [Job(f"fine-tune of task {t!r}", ["--run-config", str(self.config_file),
                                                 "--finetune", t, *quiet],
                    self.run_dir / "finetune" / t) for t in tasks]
        failed = run_jobs(self.cfg, jobs, fc.workers_per_task,
                          resolve_use_gpu(fc.use_gpu, fc.workers_per_task), log=self.log)
        if failed:
            done = [t for t, j in zip(tasks, jobs) if j.label not in failed]
            raise CpiftError("; ".join(f"{label} failed ({why})" for label, why in failed.items())
                             + (f" (finished: {', '.join(done)})" if done else ""))

    def _ray(self) -> None:
        if self.cfg.ray.enabled:
            from cpift_dist.ray_utils import init_ray

            init_ray(self.cfg.ray.address or os.environ.get("RAY_ADDRESS"),
                     self.cfg.ray.num_cpus)

    def _gpus(self) -> int:
        from cpift_dist.ray_utils import gpus_available

        self._ray()
        return gpus_available()

    def _executor(self, num_gpus: float = 0):
        from cpift_dist.executor import make_executor

        return make_executor(self.cfg.ray, num_gpus)

    def stage_analyze(self) -> None:
        cfg = self.cfg
        tuned = {t.name: self.tuned(t) for t in cfg.tasks}
        key = {"analysis": cfg.analysis.model_dump(mode="json"),
               "base": checkpoint_digest(self.base),
               "tuned": {n: checkpoint_digest(p) for n, p in tuned.items()}}

        def run() -> str:
            from cpift_dist.analysis import analyze

            res = analyze(self.base, tuned, self.run_dir / "analysis", cfg.analysis,
                          executor=self._executor(), overwrite=True, progress=self.progress)
            return f"{len(res.stats)} core masks (p={cfg.analysis.p})"

        self._stage("analyze", key, run)

    def stage_group(self) -> None:
        key = {"grouping": self.cfg.grouping.model_dump(mode="json"),
               "analysis": output_digest(self.run_dir / "analysis")}

        def run() -> str:
            from cpift_dist.grouping import group

            g = group(self.run_dir / "analysis", self.cfg.grouping, self.run_dir / "groups.json")
            return "; ".join(f"stage {s['stage']}: {', '.join(s['tasks'])}" for s in g["stages"])

        self._stage("group", key, run)

    def stage_fuse(self) -> None:
        cfg = self.cfg
        tuned = {t.name: self.tuned(t) for t in cfg.tasks}
        key = {"fusion": cfg.fusion.model_dump(mode="json"), "base": checkpoint_digest(self.base),
               "tuned": {n: checkpoint_digest(p) for n, p in tuned.items()},
               "analysis": output_digest(self.run_dir / "analysis")}

        def run() -> str:
            from cpift_dist.fusion import fuse

            gpu = 1 if cfg.fusion.device == "cuda" or (
                cfg.fusion.device == "auto" and cfg.ray.enabled and self._gpus()) else 0
            man = fuse(self.base, tuned, self.run_dir / "analysis" / "masks",
                       self.run_dir / "fusion" / "backbone", cfg.fusion,
                       executor=self._executor(gpu), overwrite=True, progress=self.progress)
            return f"{man['core_elements']:,} core elements transplanted ({man['backend']})"

        self._stage("fuse", key, run)

    def _sft(self, stage: str, methods: list[str]) -> None:
        from cpift_dist.training.sft import plan_stages, stage_complete

        def run() -> str:
            from cpift_dist.training.sft import run_sft

            notes = []
            for m in methods:
                mans = run_sft(self.cfg, m, progress=self.progress)
                frozen = sum(x.get("frozen_elements", 0) for x in mans)
                notes.append(f"{m}: {len(mans)} stage(s)" +
                             (f", {frozen:,} frozen elements checked" if frozen else ""))
            return "; ".join(notes)

        # the SFT keeps its own per-stage manifests (inputs, masks, data): the ledger key is
        # their upstream inputs, and a stage is re-run by run_sft itself when they changed
        key = {"sft": self.cfg.sft.model_dump(mode="json"), "methods": methods,
               "train": self.cfg.train.key(),
               "base": checkpoint_digest(self.base),
               "data": {t.name: sha256_file(t.train_data) for t in self.cfg.tasks
                        if t.train_data is not None}}
        if {"cpi", "multistage-heuristic"} & set(methods):  # they read the groups
            key["groups"] = sha256_file(self.run_dir / "groups.json")
        if "cpi" in methods:  # starts from the backbone, freezes the masks
            key["backbone"] = output_digest(self.run_dir / "fusion" / "backbone")
            key["analysis"] = output_digest(self.run_dir / "analysis")
        complete = all(stage_complete(self.cfg, s) for m in methods
                       for s in plan_stages(self.cfg, m))
        if not complete:
            (self.ledger / f"{stage}.json").unlink(missing_ok=True)
        if methods:
            self._stage(stage, key, run)

    def stage_sft(self) -> None:
        self._sft("sft", [self.cfg.sft.method])

    def stage_baselines(self) -> None:
        self._sft("baselines", [m for m in self.cfg.baselines if m != self.cfg.sft.method])

    def models(self) -> dict[str, Path]:
        """Every model the run produced, by label (what the eval scores)."""
        from cpift_dist.training.sft import plan_stages

        out = {"base": self.base}
        for t in self.cfg.tasks:
            out[f"single:{t.name}"] = self.tuned(t)
        out["fused"] = self.run_dir / "fusion" / "backbone"
        stages = plan_stages(self.cfg, self.cfg.sft.method)
        for s in stages:
            out[f"{s.method}:stage-{s.index}"] = s.out / "model"
        for m in self.cfg.baselines:
            if m != self.cfg.sft.method:
                stages = plan_stages(self.cfg, m)
                if self.cfg.eval.every_stage:
                    for s in stages[:-1]:
                        out[f"{m}:stage-{s.index}"] = s.out / "model"
                out[m] = stages[-1].out / "model"
        return out

    def stage_eval(self) -> None:
        from cpift_dist.evaluate import EvalTask

        cfg = self.cfg
        tasks = {}
        for t in cfg.tasks:
            if t.eval_data is None:
                continue
            from cpift_dist.data.suite import SCORERS

            scorer = t.scorer or (t.name if t.name in SCORERS else "exact")
            tasks[t.name] = EvalTask(Path(t.eval_data), t.data_shape, t.columns, scorer)
        if not tasks:
            self.log("eval      no task has eval_data: skipped")
            return
        models = self.models()
        key = {"eval": cfg.eval.model_dump(mode="json"),
               "tasks": {n: [sha256_file(t.path), t.scorer] for n, t in tasks.items()},
               "models": {m: output_digest(p) for m, p in models.items()}}

        def run() -> str:
            from cpift_dist.io import atomic_dir

            results = evaluate_all(models, tasks, cfg,
                                   self._executor(1 if cfg.ray.enabled and self._gpus() else 0))
            with atomic_dir(self.run_dir / "eval", overwrite=True) as tmp:
                (tmp / "scores.json").write_text(json.dumps(
                    {"tasks": list(tasks), "models": {m: str(p) for m, p in models.items()},
                     "scores": results}, indent=2) + "\n")
            return f"{len(models)} models x {len(tasks)} tasks"

        self._stage("eval", key, run)

    def stage_report(self) -> dict:
        from cpift_dist.report import write_report

        t0 = time.time()
        res = write_report(self.run_dir, self.cfg)
        self.log(f"report    done in {time.time() - t0:.1f} s")
        return res


def _eval_one(shared, label: str, path: str) -> tuple[str, dict]:
    """One model's scores, as a Ray task (its own process: one CPU, or as many GPUs as
    :func:`gpus_per_model` asked for)."""
    import torch

    from cpift_dist.evaluate import evaluate_model

    tasks, cfg = shared
    # the GPUs Ray gave this task (CUDA_VISIBLE_DEVICES): a model larger than one is spread
    # over all of them (gpus_per_model)
    spread = torch.cuda.is_available() and torch.cuda.device_count() > 1
    return label, evaluate_model(path, tasks, cfg, threads=1, device="auto" if spread else None)


def _eval_in_process(shared, label: str, path: str) -> tuple[str, dict]:
    """One model's scores on a thread of this process, on a device taken from the pool (one
    model per GPU at a time; the CPU's slots as memory allows: :func:`eval_slots`)."""
    from cpift_dist.evaluate import evaluate_model

    tasks, cfg, devices = shared
    device = devices.get()
    try:  # torch's threads: the executor's share per thread, not set from here (process-wide)
        return label, evaluate_model(path, tasks, cfg, device=device)
    finally:
        devices.put(device)


def eval_slots(models: dict[str, Path], threads: int, gpus: int | None = None,
               memory: int | None = None, gpu_memory: int | None = None) -> list[str]:
    """The devices that evaluate models at once in this process, one model each: every GPU
    this process sees (a model on each); where the largest model needs k > 1 GPUs
    (:func:`gpus_per_model`), groups of k (``auto:0,1``: spread over those by accelerate's
    ``device_map``), or ``auto`` alone (over every GPU, the CPU beyond) where the GPUs make
    less than one group; without GPUs the CPU, as many times as the largest model fits in 80%
    of the available memory (:func:`~cpift_dist.analysis.analyze.available_memory`; float32,
    plus a quarter for generation), at most ``threads`` and one per model.

    Without the bound every thread loaded its model at once: a 7B model is 28 GB in float32,
    so 16 threads of a SLURM node asked for 450 GB; on a GPU all of them went to the first."""
    import torch

    from cpift_dist.analysis.analyze import available_memory

    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus:
        if gpu_memory is None:
            gpu_memory = min(torch.cuda.get_device_properties(i).total_memory
                             for i in range(gpus))
        k = gpus_per_model(models, gpu_memory)
        if k >= gpus and k > 1:
            return ["auto"]
        if k > 1:
            return ["auto:" + ",".join(str(i) for i in range(g * k, (g + 1) * k))
                    for g in range(min(gpus // k, len(models)))]
        return [f"cuda:{i}" for i in range(min(gpus, len(models)))]
    memory = available_memory() if memory is None else memory
    return ["cpu"] * max(1, min(threads, len(models),
                                int(0.8 * memory) // max(1, eval_memory(models))))


def gpus_per_model(models: dict[str, Path], gpu_memory: int) -> int:
    """GPUs one model's evaluation spans: the largest model in bf16 and a quarter more
    (:func:`eval_memory` halved) over 90% of one GPU's memory, rounded up."""
    return max(1, math.ceil(eval_memory(models) / 2 / max(1.0, 0.9 * gpu_memory)))


def eval_memory(models: dict[str, Path]) -> int:
    """Host memory one model's evaluation on the CPU holds: its largest model in float32, and
    a quarter more (activations, the KV cache, the tokenizer)."""
    from cpift_dist.io import Checkpoint

    sizes = [0]
    for p in models.values():
        with contextlib.suppress(CpiftError):  # evaluate_model names what is wrong with it
            sizes.append(sum(t.numel for t in Checkpoint(p).tensors.values()))
    return 5 * max(sizes)


def evaluate_all(models: dict[str, Path], tasks: dict, cfg: RunConfig, executor) -> dict:
    """Scores every model on every task (one unit of work per model): as Ray tasks (on GPU
    nodes as many GPUs each as :func:`gpus_per_model` says, at most a node's; else one CPU
    and :func:`eval_memory` of Ray's memory resource), or on threads of this process, as many
    at once as :func:`eval_slots` has devices."""
    from cpift_dist.executor import InProcessExecutor, RayExecutor

    items = [(label, str(p)) for label, p in models.items()]
    fn, shared = _eval_one, (tasks, cfg.eval)
    if isinstance(executor, RayExecutor) and executor.num_gpus:
        from cpift_dist.ray_utils import ray_gpu_layout

        memory, per_node = ray_gpu_layout()
        executor.num_gpus = min(gpus_per_model(models, memory), per_node)
    elif isinstance(executor, RayExecutor):
        executor.memory = eval_memory(models)  # a CPU node runs as many as its memory holds
    if isinstance(executor, InProcessExecutor):
        import queue

        slots = eval_slots(models, executor.threads)
        devices: queue.Queue = queue.Queue()
        for d in slots:
            devices.put(d)
        fn, shared = _eval_in_process, (tasks, cfg.eval, devices)
        executor = InProcessExecutor(len(slots))
    if getattr(executor, "threads", 1) > 1:
        # transformers 5's lazy module is not thread-safe on first access: two threads
        # importing from it at once can fail with "cannot import name" (seen here, and as
        # vllm-project/vllm#40442); resolve the names in this thread before the threads run
        from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401
    out = {}
    for _, (label, res) in executor.map(fn, shared, items):
        out[label] = {t: r["score"] for t, r in res.items()}
        out[label]["_examples"] = {t: r["examples"] for t, r in res.items()}
        out[label]["_n"] = {t: r["n"] for t, r in res.items()}  # held-out examples scored
    return {label: out[label] for label, _ in items}
