"""The final SFT: CPI-FT's masked pipelined stages and the paper's baselines, on one loop.

    stages = plan_stages(cfg)            # from groups.json (cpi) or a split of the tasks
    for stage in stages:
        run_stage(cfg, stage)            # Ray Train job; or the launcher entry, one per stage

Every method trains with the same loop (:class:`~cpift_dist.training.loop.SFTLoop`) and the same
budget (``sft.steps`` optimizer steps in all, split across stages in proportion to their
number of tasks):

* ``cpi``: stage k trains the tasks of group k (``groups.json`` order) from the previous stage's
  output (stage 1: the fused backbone), with the union of the core masks of every task of
  stages 1..k-1 frozen element by element; the end of each stage checks those elements bit for
  bit against the stage input.
* ``multitask``: one stage on the mix of all tasks, from the base.
* ``multistage-random``: ``num_stages`` stages of a seeded random split, from the base.
* ``multistage-heuristic``: ``num_stages`` stages of tasks with similar core regions
  (average-linkage clustering of the Jaccard matrix in ``groups.json``), from the base.
* ``epi``: one stage on the mix of all tasks, from the base, with evolving isolation
  (``sft.epi``; :mod:`cpift_dist.training.epi`). With ``cpi``, a set ``sft.epi`` adds evolving
  masks inside every CPI-FT stage, on top of the static cores.

Layout: ``<run>/sft/stage-<k>/`` for cpi, ``<run>/baselines/<method>/stage-<k>/`` for the
others; each holds ``model/`` (HF checkpoint), ``metrics.jsonl``, ``freeze.json`` (cpi) and a
``manifest.json`` written last. A stage whose manifest matches its inputs is skipped; a stage
directory left by an interrupted run of the same stage resumes from its DeepSpeed checkpoints;
one left by different inputs is cleared first.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cpift_dist.config import EPIConfig, RunConfig, TrainConfig
from cpift_dist.errors import CpiftError
from cpift_dist.io.manifest import (checkpoint_digest, file_digest, file_digests, read_manifest,
                                    sha256_file, sha256_json, write_manifest)
from cpift_dist.launchers import resolve_launcher
from cpift_dist.ray_utils import resolve_use_gpu
from cpift_dist.training.freeze import CoreUnion, freeze_problem
from cpift_dist.training.loop import SFTJob

METHODS = ("cpi", "multitask", "multistage-random", "multistage-heuristic", "epi")
SPEC_NAME = "stage.json"


@dataclass
class Stage:
    """One SFT stage: what it trains, what it keeps frozen, where it starts and writes."""

    method: str
    index: int
    """1-based stage number."""
    tasks: list[str]
    """Tasks of this stage (its balanced mix)."""
    frozen_tasks: list[str]
    """Tasks whose core regions stay frozen (cpi: every task of earlier stages)."""
    steps: int
    init: Path
    """The checkpoint the stage starts from."""
    out: Path

    @property
    def name(self) -> str:
        return f"{self.method}-stage-{self.index}"


# ---- planning ---------------------------------------------------------------------------------
def split_budget(total: int, sizes: list[int]) -> list[int]:
    """``total`` steps split in proportion to ``sizes`` (largest remainders), each at least 1."""
    if total < len(sizes):
        raise CpiftError(f"sft.steps={total} is fewer than the {len(sizes)} stages")
    share = np.array(sizes, dtype=float) / sum(sizes) * total
    steps = np.maximum(1, np.floor(share)).astype(int)
    for i in np.argsort(-(share - np.floor(share)), kind="stable"):
        if steps.sum() >= total:
            break
        steps[i] += 1
    while steps.sum() > total:  # the at-least-1 floor overshot: take from the largest
        steps[int(np.argmax(steps))] -= 1
    return [int(s) for s in steps]


def random_split(tasks: list[str], k: int, seed: int) -> list[list[str]]:
    """A seeded random partition of ``tasks`` into ``k`` near-equal stages."""
    order = np.random.default_rng(seed).permutation(len(tasks))
    return [[tasks[i] for i in part] for part in np.array_split(order, k) if len(part)]


def similarity_split(tasks: list[str], jaccard: list[list[float]], k: int) -> list[list[str]]:
    """Average-linkage clustering of tasks by core-region Jaccard into ``k`` stages.

    Clusters are merged while more than ``k`` remain (the most similar pair first; ties: the
    earlier pair in task order); stages keep the task order of their first task.
    """
    s = np.asarray(jaccard, dtype=float)
    clusters = [[i] for i in range(len(tasks))]
    while len(clusters) > k:
        best, pair = -1.0, (0, 1)
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                sim = float(s[np.ix_(clusters[a], clusters[b])].mean())
                if sim > best:
                    best, pair = sim, (a, b)
        a, b = pair
        clusters[a] = sorted(clusters[a] + clusters.pop(b))
    clusters.sort(key=min)
    return [[tasks[i] for i in c] for c in clusters]


def _groups_json(cfg: RunConfig) -> dict:
    path = cfg.run_dir / "groups.json"
    try:
        data = json.loads(path.read_text())
    except OSError:
        raise CpiftError(f"{path}: no groups (run `cpift group` or the pipeline's group "
                         "stage first)") from None
    except ValueError as e:
        raise CpiftError(f"{path}: malformed groups file ({e})") from None
    names = [t.name for t in cfg.tasks]
    if sorted(data.get("tasks", [])) != sorted(names):
        raise CpiftError(f"{path}: groups are for tasks {data.get('tasks')}, the config has "
                         f"{names}")
    return data


def stage_dir(cfg: RunConfig, method: str) -> Path:
    return cfg.run_dir / "sft" if method == "cpi" else cfg.run_dir / "baselines" / method


def plan_stages(cfg: RunConfig, method: str | None = None) -> list[Stage]:
    """The stages of ``method`` (default ``cfg.sft.method``) for this run."""
    method = method or cfg.sft.method
    if method not in METHODS:
        raise CpiftError(f"unknown SFT method {method!r} (one of {', '.join(METHODS)})")
    names = [t.name for t in cfg.tasks]
    k = min(cfg.sft.num_stages, len(names))
    if method == "cpi":
        groups = [list(st["tasks"]) for st in _groups_json(cfg)["stages"]]
        init = cfg.run_dir / "fusion" / "backbone"
    elif method in ("multitask", "epi"):
        groups, init = [names], cfg.base
    elif method == "multistage-random":
        groups, init = random_split(names, k, cfg.sft.seed), cfg.base
    else:
        g = _groups_json(cfg)
        order = [g["tasks"].index(n) for n in names]
        jac = [[g["jaccard"][i][j] for j in order] for i in order]
        groups, init = similarity_split(names, jac, k), cfg.base
    steps = split_budget(cfg.sft.steps, [len(g) for g in groups])
    root = stage_dir(cfg, method)
    stages, frozen = [], []
    for i, (tasks, n) in enumerate(zip(groups, steps), start=1):
        out = root / f"stage-{i}"
        stages.append(Stage(method, i, tasks, list(frozen) if method == "cpi" else [], n,
                            init, out))
        frozen += tasks
        init = out / "model"
    return stages


def stage_job(cfg: RunConfig, stage: Stage) -> SFTJob:
    """The training job of one stage: its mix, its budget and its frozen masks."""
    tasks = {t.name: t for t in cfg.tasks}
    missing = [t for t in tasks if tasks[t].train_data is None]
    if missing:
        raise CpiftError(f"task {missing[0]!r} has no train_data (needed by the SFT)")
    calib = cfg.sft.calibration_samples
    chosen = stage.tasks + ([t for t in tasks if t not in stage.tasks] if calib else [])
    samples = {t: (cfg.sft.samples_per_task if t in stage.tasks else calib) for t in chosen}
    train = (cfg.sft.train or cfg.train).model_copy(update={"max_steps": stage.steps})
    train = TrainConfig.model_validate(train.model_dump())
    masks = [cfg.run_dir / "analysis" / "masks" / f"{t}.safetensors" for t in stage.frozen_tasks]
    epi = cfg.sft.epi
    if stage.method == "epi":
        epi = epi or EPIConfig()
    elif stage.method != "cpi" or (epi is not None and not epi.cpi_stages):
        epi = None
    return SFTJob(stage.init, {t: tasks[t].train_data for t in chosen}, stage.out, train,
                  {t: (tasks[t].data_shape, tasks[t].columns) for t in chosen},
                  samples={t: n for t, n in samples.items() if n}, freeze=masks, epi=epi)


def finetune_job(cfg: RunConfig, task: str) -> SFTJob:
    """The fine-tune of one task of the run: from the base, on its own data, into
    ``<run>/finetune/<task>/`` (the same job whatever starts it: Ray Train, torchrun, srun)."""
    tasks = {t.name: t for t in cfg.tasks}
    if task not in tasks:
        raise CpiftError(f"no task named {task!r} in the run config (tasks: {', '.join(tasks)})")
    t = tasks[task]
    if t.train_data is None:
        raise CpiftError(f"task {task!r} has no train_data to fine-tune on")
    return SFTJob(cfg.base, {task: t.train_data}, cfg.run_dir / "finetune" / task, cfg.train,
                  {task: (t.data_shape, t.columns)})


# ---- state on disk ----------------------------------------------------------------------------
def _spec(cfg: RunConfig, stage: Stage, job: SFTJob) -> tuple[dict, dict]:
    """(the stage's configuration, its inputs' digests): what decides whether it must re-run."""
    for p in [*job.data.values(), *job.freeze]:
        if not Path(p).is_file():
            raise CpiftError(f"{p}: input of SFT stage {stage.index} ({stage.method}) is missing")
    if not (Path(stage.init) / "config.json").is_file():
        raise CpiftError(f"{stage.init}: start checkpoint of SFT stage {stage.index} "
                         f"({stage.method}) is missing")
    config = {"method": stage.method, "stage": stage.index, "tasks": stage.tasks,
              "frozen_tasks": stage.frozen_tasks, "samples": job.samples,
              "train": job.cfg.key(),
              "formats": {t: list(v) for t, v in job.formats.items()},
              "workers": cfg.sft.workers or cfg.finetune.workers_per_task}
    if job.epi is not None:  # only then: the digests of stages without it stay as they were
        config["epi"] = job.epi.model_dump(mode="json")
    inputs = {"init": checkpoint_digest(stage.init),
              **{f"data:{t}": sha256_file(p) for t, p in job.data.items()},
              **{f"mask:{Path(p).stem}": sha256_file(p) for p in job.freeze}}
    return config, inputs


def stage_complete(cfg: RunConfig, stage: Stage) -> bool:
    """True when the stage's manifest is complete and matches its current inputs."""
    man = read_manifest(stage.out)
    if not man or man.get("status") != "complete":
        return False
    try:
        config, inputs = _spec(cfg, stage, stage_job(cfg, stage))
    except CpiftError:
        return False
    return man.get("config_digest") == sha256_json(config) and man.get("inputs") == inputs


def prepare_stage(cfg: RunConfig, stage: Stage) -> SFTJob:
    """Readies a stage directory: keeps an interrupted run of the same stage (to resume),
    clears anything else, and records what the stage is. A complete stage is left alone."""
    job = stage_job(cfg, stage)
    if stage_complete(cfg, stage):
        return job
    config, inputs = _spec(cfg, stage, job)
    spec = {"config_digest": sha256_json(config), "inputs": inputs}
    spec_file = stage.out / SPEC_NAME
    try:
        same = json.loads(spec_file.read_text()) == spec and read_manifest(stage.out) is None
    except (OSError, ValueError):
        same = False
    if stage.out.exists() and not same:
        shutil.rmtree(stage.out)
    stage.out.mkdir(parents=True, exist_ok=True)
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    return job


def finish_stage(cfg: RunConfig, stage: Stage, job: SFTJob) -> dict:
    """Writes the stage's manifest (last: it marks the stage complete)."""
    config, inputs = _spec(cfg, stage, job)
    model = stage.out / "model"
    if not (model / "config.json").is_file():
        raise CpiftError(f"{model}: SFT stage {stage.index} ({stage.method}) wrote no model")
    extra = {"tasks": stage.tasks, "frozen_tasks": stage.frozen_tasks, "steps": stage.steps}
    freeze = stage.out / "freeze.json"
    if job.freeze:
        try:
            facts = json.loads(freeze.read_text())
        except (OSError, ValueError) as e:
            raise CpiftError(f"{freeze}: no readable freeze report ({e})") from None
        union = CoreUnion(job.freeze)  # the driver's own count, from the planned masks
        try:
            problem = freeze_problem(facts, expected=union.popcount())
        finally:
            union.close()
        if problem:
            raise CpiftError(f"{freeze}: SFT stage {stage.index} ({stage.method}): {problem}")
        extra.update(frozen_elements=facts["frozen"], checked_elements=facts["checked"])
    if job.epi is not None:
        extra.update(_epi_facts(stage, freeze))
    if not cfg.sft.keep_checkpoints:
        shutil.rmtree(stage.out / "checkpoints", ignore_errors=True)
    files = [p for p in sorted(model.rglob("*")) if p.is_file()]  # hashed one per core
    outputs = {str(p.relative_to(stage.out)): d for p, d in zip(files, file_digests(files))}
    return write_manifest(stage.out, f"sft-{stage.method}", config, inputs, outputs, extra)


def _epi_facts(stage: Stage, freeze: Path) -> dict:
    """The evolving isolation's end-of-stage check and its refresh masks (for the manifest)."""
    try:
        facts = json.loads(freeze.read_text())
        log = json.loads((stage.out / "epi" / "epi.json").read_text()) \
            if (stage.out / "epi" / "epi.json").is_file() else {"refreshes": []}
    except (OSError, ValueError) as e:
        raise CpiftError(f"{stage.out}: no readable EPI report ({e})") from None
    if "epi" not in facts:
        raise CpiftError(f"{freeze}: SFT stage {stage.index} ({stage.method}) has no EPI check")
    problem = freeze_problem(facts)
    if problem:
        raise CpiftError(f"{freeze}: SFT stage {stage.index} ({stage.method}): {problem}")
    masks = {r["mask"]: file_digest(stage.out / r["mask"]) for r in log["refreshes"]}
    if len(masks) != facts["epi"]["refreshes"]:
        raise CpiftError(f"{stage.out}: {facts['epi']['refreshes']} EPI refreshes, "
                         f"{len(masks)} masks recorded")
    return {"epi_refreshes": len(masks), "epi_masks": masks,
            "epi_frozen_elements": facts["epi"]["frozen_in_partitions"]}


# ---- running ----------------------------------------------------------------------------------
def run_stage(cfg: RunConfig, stage: Stage, progress: bool = True) -> dict:
    """Runs one stage on the connected Ray cluster (or torchrun on this node when Ray is off);
    returns its manifest. A complete stage is skipped."""
    if stage_complete(cfg, stage):
        return read_manifest(stage.out)
    job = prepare_stage(cfg, stage)
    job.cfg = job.cfg.model_copy(update={"progress": progress and job.cfg.progress})
    fc = cfg.finetune
    workers = cfg.sft.workers or fc.workers_per_task
    if resolve_launcher(cfg) == "ray":
        from cpift_dist.ray_utils import init_ray
        from cpift_dist.training.ray_finetune import train_on_ray

        init_ray(cfg.ray.address or os.environ.get("RAY_ADDRESS"), cfg.ray.num_cpus)
        try:
            train_on_ray(f"sft-{stage.name}", job, workers, fc.max_failures,
                         use_gpu=resolve_use_gpu(fc.use_gpu, workers), placement=fc.placement)
        except Exception as e:  # Ray Train wraps the worker's error: its last line is the cause
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise CpiftError(f"SFT stage {stage.index} ({stage.method}) failed: "
                             f"{lines[-1][:300] if lines else type(e).__name__}") from None
    else:
        _launch_stage(cfg, stage, workers, progress)
    return finish_stage(cfg, stage, job)


def _launch_stage(cfg: RunConfig, stage: Stage, nproc: int, progress: bool = True) -> None:
    """Runs a stage without Ray: torchrun on this node, or an srun step over the whole SLURM
    allocation (``finetune.launcher``)."""
    from cpift_dist.launchers import Job, run_jobs

    spec = stage.out / "run-config.json"
    spec.write_text(cfg.model_dump_json())  # JSON is YAML: the entry reads it with load_config
    label = f"SFT stage {stage.index} ({stage.method})"
    quiet = [] if progress else ["train.progress=false", "sft.train.progress=false"] \
        if cfg.sft.train else ["train.progress=false"]
    failed = run_jobs(cfg, [Job(label, ["--run-config", str(spec), "--method", stage.method,
                                        "--stage", str(stage.index), *quiet], stage.out)],
                      nproc, resolve_use_gpu(cfg.finetune.use_gpu, nproc),
                      whole_allocation=True)
    if failed:
        raise CpiftError(f"{label} failed ({failed[label]})")


def run_sft(cfg: RunConfig, method: str | None = None, progress: bool = True) -> list[dict]:
    """Runs every stage of ``method`` in order (Ray must be connected when enabled)."""
    manifests = []
    for stage in plan_stages(cfg, method):
        manifests.append(run_stage(cfg, stage, progress))
    return manifests


def describe(stages: list[Stage]) -> list[dict]:
    """The plan as plain data (``cpift sft --plan``)."""
    return [{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(s).items()}
            for s in stages]
