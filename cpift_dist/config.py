"""The one typed configuration schema (pydantic). YAML is its serialised form.

Every model rejects unknown keys; every field documents itself. :func:`load_config` reads a
YAML file, applies ``key.sub=value`` overrides and validates once, turning every problem into a
one-line :class:`~cpift_dist.errors.ConfigError` that names the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, ValidationError,
                      ValidationInfo, field_validator)

from cpift_dist.errors import ConfigError

TASK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True,
                              validate_assignment=True)


class AnalysisConfig(_Model):
    """Delta analysis: which elements form each task's core region."""

    p: float = Field(0.01, gt=0, le=1)
    """Share of parameters in each task's core region, in (0, 1] (paper default 0.01)."""
    selection: Literal["global", "per-tensor", "per-layer"] = "global"
    """Top-k over the whole model (the paper's), within each tensor, or within each layer."""
    chunk_elements: int = Field(1 << 20, ge=1024)
    """Largest row chunk per tensor handed to the compiled loops at once (elements). With
    ``read: pread`` each thread holds one chunk of every checkpoint in a buffer that should
    stay in the CPU's caches (8 MiB for 3 tasks in bf16 at the default); measured fastest on
    2 cores at 1M against 512K, 2M and 4M (docs/benchmarks.md)."""
    read: Literal["pread", "map"] = "pread"
    """How the full passes read the checkpoints: ``pread`` copies each chunk of every
    checkpoint into a per-thread buffer in one call that releases the GIL; ``map`` reads
    through the files' memory maps (no copy; the kernel maps and unmaps every page),
    the default until 0724c62. The sample pass reads its rows with ``pread`` either way."""
    unit_elements: int = Field(1 << 25, ge=1024)
    """Elements per unit of work (one Ray task holds one chunk per model at a time)."""
    sample_every: int = Field(64, ge=0)
    """Sample 1 row in N to predict each threshold (one full pass instead of two); 0 = off."""
    collect_limit: int | None = Field(None, ge=0)
    """Most window candidates held at once, all tasks and selection groups together (24 bytes
    each counted: the 12 the driver keeps, the bits of the selection being resolved, room). Selections whose windows do not fit take the radix path: 2 full passes instead
    of 1, or 3 when even the threshold's bin does not fit. None: as many as fit in a quarter
    of the memory available when the analysis starts (the machine's, or its cgroup's)."""
    check_finite: bool = True
    """Reject NaN or Inf weights (naming the tensor and file)."""


class GroupingConfig(_Model):
    """Grouping tasks into SFT stages by core-region overlap."""

    tau: float = Field(0.1, ge=0, le=1)
    """Link two tasks when the Jaccard index of their core regions is >= tau (paper: 0.1)."""
    order: Literal["random", "core-size", "task-order"] = "random"
    """Stage order: seeded random (the paper's), larger core union first, or task order."""
    seed: int = 0
    """Seed of the random stage order."""


class FusionConfig(_Model):
    """Fusing one backbone from the task models."""

    omega: Literal["uniform"] | Annotated[float, Field(gt=0, le=1)] = "uniform"
    """SLERP weight of each next task: 'uniform' (1/i, equal shares) or a fixed float."""
    space: Literal["weights", "task-vectors"] = "task-vectors"
    """Interpolate the weights theta_i, or the task vectors theta_i - theta0."""
    overlap: Literal["max-magnitude", "task-order"] = "max-magnitude"
    """Who wins an element in several cores: the larger |theta_i - theta0|, or the first task."""
    granularity: Literal["tensor", "row"] = "tensor"
    """One SLERP angle per tensor (as mergekit-yaml) or per row of dim 0."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to compute: auto picks CUDA when present."""
    backend: Literal["auto", "numba", "torch", "triton"] = "auto"
    """Kernels: auto = Triton on CUDA, numba's fused loops on CPU; torch = the unfused
    reference ops (slow; a cross-check); triton on CPU needs TRITON_INTERPRET=1."""
    max_shard_bytes: Annotated[ByteSize, Field(ge=1024)] = 2 << 30
    """Largest output safetensors shard: bytes, or a size (``5GB`` = 5e9, ``2GiB`` = 2^30, as
    pydantic's ``ByteSize`` reads them; stored as bytes, so either spelling is one config)."""
    chunk_elements: int | None = Field(None, ge=1024)
    """Largest row chunk of a tensor processed at once; bounds memory (per thread: the chunk
    of every input and the output; on the numba loops the output of up to
    ``fusion.fuse.GROUP_CHUNKS`` chunks). None: 1M elements on the numba loops (with ``read:
    pread`` a thread's inputs then stay in the CPU's caches: measured on 2 cores, 348M bf16,
    a pair took 0.96 s of thread time at 1M against 1.19-1.28 s at 4M), 4M on torch and
    Triton (fewer kernel launches and copies per byte). Outputs are the same bytes at either
    size on 348M bf16 (a tensor's Gram partials are summed per chunk in float64)."""
    read: Literal["pread", "map"] = "pread"
    """How the numba loops read bf16 and fp32 inputs: ``pread`` copies runs of chunks of
    every input into a per-thread buffer in one compiled call that releases the GIL (and
    groups small tensors into runs); ``map`` reads chunk by chunk through the files' memory
    maps (no copy), the path until this option. On either path, one read-ahead thread asks
    the kernel for cold inputs (not in the page cache) ahead of their reads."""
    widened_dtype: Literal["float32", "base"] = "float32"
    """How a parameter whose checkpoints differ in dtype (a bf16 base with fp32 fine-tunes),
    fused in float32, is written: ``float32`` keeps the transplanted core values of an fp32
    fine-tune bit for bit (and the config says float32); ``base`` rounds the fused float32
    values to the base's dtype (round to nearest even), half the bytes for a bf16 base."""
    cache_bytes: Annotated[ByteSize, Field(ge=0)] = 2 << 30
    """Bytes (or a size, as ``max_shard_bytes``) of inputs of multi-chunk tensors kept in
    memory (or on the device) between the Gram and apply passes by the torch and Triton
    backends (per output shard being fused: all its tensors in flight together); a tensor
    beyond what is left is read twice. The numba loops read each chunk again instead (from
    the page cache)."""

    def chunk_for(self, backend: str) -> int:
        """The chunk size on ``backend`` (``numba``, ``torch`` or ``triton``)."""
        if self.chunk_elements is not None:
            return self.chunk_elements
        return 1 << 20 if backend == "numba" else 1 << 22


class TrainConfig(_Model):
    """One DeepSpeed SFT run (fine-tunes and SFT stages)."""

    zero_stage: Literal[2, 3] = 3
    """DeepSpeed ZeRO stage."""
    dtype: Literal["fp32", "bf16"] = "fp32"
    """Training precision (bf16 keeps fp32 master weights)."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (linear warm-up, cosine decay to 10%)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay of matrices (not of norms and biases)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps."""
    max_steps: int = Field(100, ge=1)
    """Optimizer steps."""
    micro_batch: int = Field(4, ge=1)
    """Examples per rank per forward pass."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    grad_clip: float = Field(1.0, gt=0)
    """Gradient norm clipping."""
    max_length: int = Field(512, ge=8)
    """Tokens per example (longer ones are cut at the end; see cpift_dist.data.sft)."""
    save_every: int = Field(50, ge=1)
    """Checkpoint (DeepSpeed, with data position) every N steps; a resume starts there."""
    samples_per_task: int | None = Field(None, ge=1)
    """Examples drawn per task per epoch (equal numbers: a balanced mix); default: all."""
    seed: int = 0
    """Seed of the data order and initialisation."""
    max_shard_size: str = "2GB"
    """Largest safetensors shard of the exported model."""
    progress: bool = True
    """Progress bar on rank 0."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them
    (transformers' gradient checkpointing, non-reentrant): activation memory falls from all
    layers' to about one layer's, for one more forward pass per step. For long sequences and
    large models."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """ZeRO-Offload: the fp32 master weights and AdamW's moments in host memory (12 of the 16
    bytes per parameter leave the GPUs), the gradients copied there, and the optimizer step
    (torch's fused AdamW, the frozen elements restored after it) on the CPU: what a 70B full
    fine-tune on one node of 8x80 GB needs (docs/training.md)."""
    offload_params: Literal["none", "cpu"] = "none"
    """ZeRO-3 only: the 16-bit parameters in host memory between their uses (ZeRO-Infinity's
    parameter offload to the CPU)."""
    deepspeed: dict[str, Any] = {}
    """More DeepSpeed config, merged into the one generated from the fields above, e.g.
    ``{zero_optimization: {overlap_comm: true, stage3_prefetch_bucket_size: 5e8}}``. The keys
    those fields set (batch sizes, clipping, precision, the ZeRO stage, offload) and
    ``optimizer`` / ``scheduler`` (this project builds AdamW and its schedule) are refused
    here: set the fields instead."""

    def key(self) -> dict:
        """What of these settings a finished stage's identity holds (its digest decides whether
        a rerun skips it): all but ``progress``, and the memory options only where set, so
        that stages finished before they existed still count as done."""
        memory = {"gradient_checkpointing", "offload_optimizer", "offload_params", "deepspeed"}
        return self.model_dump(mode="json", exclude={"progress"} | {
            f for f in memory if getattr(self, f) == type(self).model_fields[f].default})

    @field_validator("deepspeed")
    @classmethod
    def _own_keys(cls, v: dict) -> dict:
        for key in _leaf_keys(v):
            if any(key == k or key.startswith(k + ".") for k in DS_OWNED):
                raise ValueError(f"deepspeed.{key} is set by this project (its train.* fields "
                                 "or its own AdamW); set the train field instead")
        return v

    @field_validator("offload_params")
    @classmethod
    def _offload_params_needs_zero3(cls, v: str, info: ValidationInfo) -> str:
        if v != "none" and info.data.get("zero_stage") != 3:
            raise ValueError("needs zero_stage 3 (ZeRO-2 does not partition the parameters)")
        return v


DS_OWNED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
            "gradient_clipping", "bf16", "fp16", "amp", "optimizer", "scheduler",
            "zero_optimization.stage", "zero_optimization.offload_optimizer",
            "zero_optimization.offload_param", "zero_optimization.cpu_offload",
            "zero_optimization.cpu_offload_params")
"""DeepSpeed config keys that :class:`TrainConfig`'s fields set (``train.deepspeed`` may not)."""


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaf_keys(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


class EPIConfig(_Model):
    """Evolving parameter isolation (EPI, arXiv 2604.14010): frozen masks that follow the
    training, refreshed from online gradient importance (docs/training.md)."""

    p: float = Field(0.01, gt=0, lt=1)
    """Share of the model frozen at each refresh: the exact global top-p of the layer-normalised
    importance scores, in (0, 1)."""
    beta: float = Field(0.9, ge=0, lt=1)
    """EMA decay of the importance: s = beta * s + (1 - beta) * score, in [0, 1)."""
    refresh_every: int = Field(10, ge=1)
    """Optimizer steps between refreshes of the frozen set."""
    warmup_steps: int = Field(0, ge=0)
    """Steps before the first refresh (importance accumulates; nothing EPI-frozen yet)."""
    score: Literal["fisher", "taylor"] = "fisher"
    """Per-step importance: fisher = g^2 (diagonal Fisher), taylor = |g * theta| (first-order
    Taylor), from the clipped gradient of the rank's fp32 partition."""
    release_cores: bool = False
    """With sft.method cpi: let a refresh release the static cores of earlier stages (default:
    they stay frozen for the whole stage, united with the evolving set)."""
    cpi_stages: bool = True
    """Evolving masks inside CPI-FT's stages when sft.epi is set; false keeps CPI-FT's stages
    static (these settings then serve the epi method or baseline only)."""


class SFTConfig(_Model):
    """The final SFT: CPI-FT's masked stages, or one of the paper's baselines."""

    method: Literal["cpi", "multitask", "multistage-random", "multistage-heuristic",
                    "epi"] = "cpi"
    """cpi: grouped stages from the fused backbone, earlier stages' cores frozen; multitask:
    one stage on all tasks from the base; multistage-*: num_stages stages from the base, no
    isolation (random split, or tasks with similar core regions together); epi: one stage on
    all tasks from the base with evolving isolation (``sft.epi``)."""
    steps: int = Field(100, ge=1)
    """Optimizer steps over all stages (every method gets the same budget), split across
    stages in proportion to their number of tasks."""
    samples_per_task: int | None = Field(None, ge=1)
    """Examples of each of a stage's tasks per epoch of its mix (a balanced mix); default: all."""
    calibration_samples: int = Field(0, ge=0)
    """Examples of every task outside the stage added to each stage's mix (0: none)."""
    num_stages: int = Field(3, ge=1)
    """K of the multi-stage baselines (at most the number of tasks)."""
    seed: int = 0
    """Seed of the multistage-random split."""
    train: TrainConfig | None = None
    """Training settings of every stage (default: the run's ``train``); max_steps is set per
    stage from ``steps``."""
    keep_checkpoints: bool = False
    """Keep each finished stage's DeepSpeed checkpoints (optimizer state); default: delete."""
    workers: int | None = Field(None, ge=1)
    """Rank workers of each stage's DeepSpeed job (default: finetune.workers_per_task)."""
    epi: EPIConfig | None = None
    """Evolving isolation: the settings of method epi (default: EPIConfig's), and, when set with
    method cpi, evolving masks inside every CPI-FT stage on top of the static cores."""


class FinetuneConfig(_Model):
    """How each DeepSpeed job (per-task fine-tunes and SFT stages) is scheduled on Ray."""

    workers_per_task: int = Field(2, ge=1)
    """Rank workers (one CPU or GPU bundle each) of every task's DeepSpeed job."""
    max_failures: int = Field(1, ge=0)
    """Restarts of a task's job after a worker dies (it resumes from its last checkpoint)."""
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement of a job's rank bundles across nodes."""
    use_gpu: bool | None = None
    """One GPU per rank worker (NCCL) instead of CPU (gloo); unset: yes where the Ray cluster
    (without Ray, this machine) has a GPU for every rank, else CPU."""
    launcher: Literal["auto", "ray", "torchrun", "slurm"] = "auto"
    """What starts the DeepSpeed jobs (fine-tunes and SFT stages): Ray Train, torchrun on this
    node, or srun + torchrun steps inside a SLURM allocation; auto: Ray when ``ray.enabled``,
    else torchrun."""
    local_jobs: int | None = Field(None, ge=1)
    """torchrun launcher: fine-tunes at once on this node; unset: floor(GPUs /
    workers_per_task) with CUDA (each job its own GPUs), floor(CPU cores / workers_per_task)
    on CPU; at least 1."""
    nodes_per_task: int = Field(1, ge=1)
    """slurm launcher: nodes of each task's fine-tune (NPROC_PER_NODE ranks on each); tasks
    run at once on disjoint nodes of the allocation while enough are free."""


class TaskConfig(_Model):
    """One task of the run."""

    name: str = Field(pattern=TASK_NAME)
    """Task name: letters, digits, '_', '-', '.'; used in file names."""
    tuned: Path | None = None
    """This task's fine-tuned HF checkpoint directory (given, or made by the finetune stage)."""
    train_data: Path | None = None
    """This task's training file (.jsonl/.json/.parquet; alpaca or messages shape)."""
    data_shape: Literal["auto", "alpaca", "messages"] = "auto"
    """Shape of the task's records (auto: messages if a 'messages' field exists)."""
    columns: dict[str, str] = {}
    """File field -> shape field renames, e.g. {question: instruction, answer: output}."""
    eval_data: Path | None = None
    """This task's held-out file (same shapes), scored by ``scorer`` in the eval stage."""
    scorer: Literal["arithmetic", "strings", "logic", "format", "exact", "contains"] | None = None
    """How a response is scored: a suite scorer, 'exact' (the reference answer, stripped) or
    'contains'; default: the task's name when it is a suite task, else 'exact'."""


class SuiteConfig(_Model):
    """The bundled generated task suite as the run's data (written to ``<run>/data/suite``)."""

    n_train: int = Field(512, ge=1)
    """Training examples per task."""
    n_eval: int = Field(64, ge=1)
    """Held-out examples per task."""
    seed: int = 0
    """Generation seed."""


class EvalConfig(_Model):
    """Scoring every model of the run on every task's held-out split."""

    max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per answer (greedy)."""
    batch_size: int = Field(16, ge=1)
    """Prompts per generate() call."""
    limit: int | None = Field(None, ge=1)
    """Score at most this many held-out examples per task (default: all)."""
    every_stage: bool = False
    """Also score every intermediate stage of the baselines (CPI-FT's stages always are)."""


class RayConfig(_Model):
    """Where the work runs."""

    address: str | None = None
    """Ray cluster address; unset starts a private local Ray on 127.0.0.1 (RAY_ADDRESS works)."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of a local Ray (default: all of this machine's)."""
    enabled: bool = True
    """False runs every unit in this process, without Ray (small models, debugging)."""


class RunConfig(_Model):
    """A cpift-dist run: a base model, its tasks, and each stage's settings."""

    name: str = Field("default", pattern=TASK_NAME)
    """Run name: outputs go to ``<runs_dir>/<name>/``."""
    runs_dir: Path = Path("runs")
    """Directory that holds runs (shared storage on a cluster)."""
    base: Path
    """Base checkpoint (theta0): an HF directory with safetensors weights, or a built-in model
    (``builtin:tiny``, ``builtin:smollm2-135m-instruct``; see cpift_dist.models)."""
    tasks: list[TaskConfig] = Field(min_length=1)
    """The tasks, in task order (order breaks overlap ties and folds SLERP)."""
    analysis: AnalysisConfig = AnalysisConfig()
    """Delta analysis settings."""
    grouping: GroupingConfig = GroupingConfig()
    """Grouping settings."""
    fusion: FusionConfig = FusionConfig()
    """Fusion settings."""
    train: TrainConfig = TrainConfig()
    """Training settings of each per-task fine-tune."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Ray scheduling of each DeepSpeed job (the per-task fine-tunes and the SFT stages)."""
    sft: SFTConfig = SFTConfig()
    """The final SFT (CPI-FT stages or a baseline)."""
    baselines: list[Literal["multitask", "multistage-random", "multistage-heuristic",
                            "epi"]] = ["multitask"]
    """Baselines that ``cpift run`` trains with the same loop and budget as CPI-FT."""
    suite: SuiteConfig | None = None
    """Use the bundled suite: tasks named after its tasks get its train and eval files."""
    eval: EvalConfig = EvalConfig()
    """Evaluation settings."""
    ray: RayConfig = RayConfig()
    """Ray settings."""

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        seen = set()
        for t in tasks:
            if t.name in seen:
                raise ValueError(f"duplicate task name {t.name!r}")
            seen.add(t.name)
        return tasks

    @property
    def run_dir(self) -> Path:
        return self.runs_dir / self.name


def _field(loc: tuple) -> str:
    """A dotted field path without pydantic's union-member tags (``literal['x']``, ``float``)."""
    parts = [str(x) for x in loc]
    while parts and ("[" in parts[-1] or parts[-1] in _TAGS):
        parts.pop()
    return ".".join(parts) or "<root>"


_TAGS = {"float", "int", "str", "bool", "constrained-float", "constrained-int", "function-after"}


def _format_error(e: ValidationError, source: str) -> str:
    errors = e.errors()
    loc = _field(errors[0]["loc"])
    same = [err for err in errors if _field(err["loc"]) == loc]
    msgs = ["unknown key" if err["type"] == "extra_forbidden" else err["msg"] for err in same]
    more = len(errors) - len(same)
    tail = f" (and {more} more)" if more else ""
    return f"{source}: field '{loc}': {' or '.join(dict.fromkeys(msgs))}{tail}"


def validate(model: type[BaseModel], data: Any, source: str) -> Any:
    """Validates ``data`` against ``model``; errors name ``source`` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def apply_overrides(data: dict, overrides: list[str], source: str = "override") -> dict:
    """Applies ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{source}: {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return data


def read_yaml(path: str | Path) -> dict:
    """Reads a YAML mapping; errors name the file (and line for syntax errors)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} malformed YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping of fields")
    return data


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Loads, overrides and validates a run config."""
    data = apply_overrides(read_yaml(path), list(overrides), source=str(path))
    return validate(RunConfig, data, str(path))
