"""One readable DeepSpeed SFT loop (ZeRO-3 or ZeRO-2; fp32 or bf16; CPU/gloo or CUDA/NCCL).

    s = SFTLoop(cfg); s.setup(); s.train(); s.save()

The launcher owns the processes (torchrun, the deepspeed launcher, srun, Ray workers): this
code only reads RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. Data order comes
from a seeded :class:`~cpift_dist.data.TaskMixture` identical on every rank; its position, the
step, the optimizer and the LR schedule are saved in DeepSpeed checkpoints every
``save_every`` steps, so a killed run resumes where its last checkpoint left it and ends with
the weights of an uninterrupted run. The result is exported as HF sharded safetensors.

SIGTERM or SIGUSR1 to a rank (a SLURM time limit, preemption or ``--signal=USR1@SECONDS``;
torchrun and the launcher forward theirs) saves a checkpoint at the end of the current step
and stops the run there (:class:`Stopped`): the ranks agree on the step with one all-reduce of
a flag per step, so all of them save the same one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cpift_dist.config import EPIConfig, TrainConfig
from cpift_dist.data import IGNORE_INDEX, Encoded, TaskMixture, encode_all, load_records
from cpift_dist.errors import CpiftError
from cpift_dist.io.manifest import checkpoint_digest, sha256_file, write_manifest
from cpift_dist.training.freeze import (CoreUnion, ElementFreezer, check_frozen,
                                        check_frozen_tensor, freeze_problem)

FAULT_ENV = "CPIFT_FAULT_AFTER_STEP"  # tests: die right after this step's checkpoint
SIGNAL_ENV = "CPIFT_FAULT_SIGTERM_AT_STEP"  # tests: rank 0 gets SIGTERM during this step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
"""Signals that stop a run after a checkpoint of the step under way."""


class Stopped(Exception):
    """A run stopped by a signal after it saved a checkpoint; the same command resumes."""

    def __init__(self, signum: int, step: int, where: Path):
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: its "
                         f"checkpoint is in {where}; the same command resumes from it")
        self.signum = signum


class _StopAsked:
    """Within it, :data:`STOP_SIGNALS` only record that they came (the main thread alone can
    take signals; elsewhere, as in a Ray Train worker's thread, nothing changes)."""

    def __init__(self, wanted: bool) -> None:
        self.signum = 0
        self.active = wanted and threading.current_thread() is threading.main_thread()
        self.before: dict = {}

    def __enter__(self) -> "_StopAsked":
        if self.active:
            for sig in STOP_SIGNALS:
                self.before[sig] = signal.signal(sig, self._asked)
        return self

    def _asked(self, signum, frame) -> None:
        self.signum = self.signum or signum

    def __exit__(self, *exc) -> None:
        for sig, h in self.before.items():
            signal.signal(sig, h)


@dataclass
class SFTJob:
    """What one training run reads and writes."""

    model: Path
    """HF checkpoint to start from (config, tokenizer with a chat template, safetensors)."""
    data: dict[str, Path]
    """Task -> training file (JSONL / JSON / Parquet, alpaca or messages shape)."""
    out: Path
    """Output: the exported model; ``checkpoints/`` and ``metrics.jsonl`` while training."""
    cfg: TrainConfig = field(default_factory=TrainConfig)
    formats: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)
    """Task -> (data shape, column mapping) where not ``("auto", {})``."""
    samples: dict[str, int] | None = None
    """Task -> examples per epoch of the mix (default: ``cfg.samples_per_task`` or all)."""
    freeze: list[Path] = field(default_factory=list)
    """Core-mask files whose union is frozen element by element (masked SFT stages)."""
    epi: EPIConfig | None = None
    """Evolving isolation: frozen masks refreshed from online importance (training/epi.py)."""


def _ds_config(cfg: TrainConfig, world: int) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch * cfg.grad_accum * world,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if cfg.dtype == "bf16":
        ds["bf16"] = {"enabled": True}
    zero = ds["zero_optimization"]
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": cfg.offload_optimizer, "pin_memory": True}
    if cfg.offload_params != "none":
        zero["offload_param"] = {"device": cfg.offload_params, "pin_memory": True}
    return _merged(ds, cfg.deepspeed)


def _merged(ds: dict, more: dict) -> dict:
    """``ds`` with ``more`` merged in, section by section (``train.deepspeed``; the validator
    already refused the keys the train fields own)."""
    out = dict(ds)
    for k, v in more.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _checkpoint_activations(model, where) -> None:
    """Activation (gradient) checkpointing of every decoder layer, non-reentrant (the variant
    that works under ZeRO-3's parameter hooks). transformers 5 names it
    ``activation_checkpointing_enable``; 4.x ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:  # "... does not support activation checkpointing"
        raise CpiftError(f"{where}: train.gradient_checkpointing: {e}") from None


def _write_engine_facts(path: Path, engine, ds_config: dict) -> None:
    """``deepspeed.json`` of a run's output: the DeepSpeed config it passed, and what the engine
    made of it (read back from the engine and its ZeRO optimizer, not from the config)."""
    opt, module = engine.optimizer, engine.module
    checkpointing = getattr(module, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(module, "is_gradient_checkpointing", False)
    facts = {
        "zero_stage": engine.zero_optimization_stage(),
        "world": engine.dp_world_size,
        "offload_optimizer": bool(getattr(opt, "offload_optimizer",
                                          getattr(opt, "cpu_offload", False))),
        "offload_param": bool(getattr(opt, "offload_param", False)),
        "activation_checkpointing": bool(checkpointing),
        "optimizer": type(opt.optimizer).__name__,
        "fused_step": bool(opt.optimizer.defaults.get("fused")),
        "config": ds_config,
    }
    path.write_text(json.dumps(facts, indent=2) + "\n")


def _skip_shm_comm_op() -> None:
    """Keeps DeepSpeed's CPU backend from JIT-compiling its shared-memory all-reduce op.

    On CPU, ``deepspeed.init_distributed`` g++-compiles ``deepspeed_shm_comm`` into
    ``~/.cache/torch_extensions`` (about a minute on 2 cores), under torch's ``FileBaton`` lock.
    Only DeepSpeed's inference all-reduce uses that op, never training; and a process killed
    while holding the lock (a stopped job, a timed-out test) leaves the lock file behind, so
    that every later start on the machine waits on it forever. DeepSpeed's own compatibility
    table is the switch that turns it off.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _weights_only_resume(engine) -> None:
    """Makes DeepSpeed read its resume state with ``torch.load(weights_only=True)``.

    DeepSpeed's checkpoint engine unpickles with ``weights_only=False``: a checkpoint planted in
    a run's ``checkpoints/`` would run code on resume. Its files hold tensors, plain containers
    and three DeepSpeed types (checked on ZeRO-2/3 fp32/bf16 checkpoints), which alone are
    allowed here; anything else fails to load.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


class SFTLoop:
    """Setup, train, save: a DeepSpeed SFT run you can read top to bottom."""

    def __init__(self, job: SFTJob):
        self.job = job
        self.cfg = job.cfg
        self.step = 0
        self.losses: list[float] = []
        self.after_step: list = []
        """Callables ``f(loop)`` run after every optimizer step (and its EPI refresh)."""

    # ---- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations import HfDeepSpeedConfig

        cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu"
        if not cuda:
            _skip_shm_comm_op()
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        torch.manual_seed(self.cfg.seed)
        self.job.out.mkdir(parents=True, exist_ok=True)

        tok = AutoTokenizer.from_pretrained(self.job.model)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.examples: dict[str, list[Encoded]] = {}
        for task, path in self.job.data.items():
            shape, columns = self.job.formats.get(task, ("auto", {}))
            convs = load_records(path, shape, columns or None)
            self.examples[task], _ = encode_all(tok, convs, self.cfg.max_length, str(path))
        samples = {t: (self.job.samples or {}).get(t) or self.cfg.samples_per_task or len(e)
                   for t, e in self.examples.items()}
        self.mixture = TaskMixture({t: len(e) for t, e in self.examples.items()}, samples,
                                   seed=self.cfg.seed)

        ds_config = _ds_config(self.cfg, self.world)
        self._hf_ds = HfDeepSpeedConfig(ds_config) if self.cfg.zero_stage == 3 else None
        dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.job.model, dtype=dtype)
        if self.cfg.gradient_checkpointing:
            _checkpoint_activations(model, self.job.model)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        # offloaded, the step runs on the host's fp32 partitions: torch's fused CPU kernel, one
        # pass per element, is 9x faster there than its default (bench/adamw_bench.py)
        fused = True if self.cfg.offload_optimizer == "cpu" else None
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.cfg.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.cfg.lr,
                                fused=fused)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, config=ds_config,  # scheduler on ZeRO's wrapped optimizer
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, self._lr_factor))
        if self.rank == 0:
            _write_engine_facts(self.job.out / "deepspeed.json", self.engine, ds_config)
        self.ckpt_dir = self.job.out / "checkpoints"
        resumed = (self.ckpt_dir / "latest").is_file()
        if resumed:
            _weights_only_resume(self.engine)
            try:
                _, state = self.engine.load_checkpoint(str(self.ckpt_dir))
            except pickle.UnpicklingError as e:
                raise CpiftError(f"{self.ckpt_dir}: refusing to resume from a checkpoint that "
                                 f"is not plain tensors and DeepSpeed state "
                                 f"({str(e).splitlines()[0][:200]})") from None
            self.step = state["step"]
            self.mixture.load_state_dict(state["mixture"])
        self.freezer = None
        if self.job.freeze:  # after load_checkpoint: keeps the values the partitions hold now
            self.union = CoreUnion(self.job.freeze)
            self.freezer = ElementFreezer(self.engine, self.union)
        self.epi = None
        if self.job.epi is not None:
            from cpift_dist.training.epi import EvolvingIsolation

            self.epi = EvolvingIsolation(self.engine, self.job.epi, self.job.out,
                                         self.cfg.max_steps, static=self.freezer)
            if resumed:
                tag = (self.ckpt_dir / "latest").read_text().strip()
                self.epi.load(self.ckpt_dir / tag, self.step)

    def _lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% of the peak."""
        warm = self.cfg.warmup_steps
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, self.cfg.max_steps - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    # ---- train ------------------------------------------------------------------------------
    def _batch(self) -> dict[str, torch.Tensor]:
        items = self.mixture.take(self.cfg.micro_batch * self.world, self.rank, self.world)
        exs = [self.examples[t][i] for t, i in items]
        n = max(len(e.input_ids) for e in exs)
        ids = torch.full((len(exs), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(exs), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(exs), n), dtype=torch.long)
        for r, e in enumerate(exs):
            ids[r, :len(e.input_ids)] = torch.tensor(e.input_ids)
            labels[r, :len(e.labels)] = torch.tensor(e.labels)
            mask[r, :len(e.input_ids)] = 1
        dev = self.engine.device
        return {"input_ids": ids.to(dev), "labels": labels.to(dev), "attention_mask": mask.to(dev)}

    def train(self, stop_on_signals: bool = False) -> None:
        """Trains to ``max_steps``, saving checkpoints every ``save_every`` steps. With
        ``stop_on_signals`` (the launchers' entry point; not Ray Train's workers, whose
        SIGTERM is Ray's), a stop signal ends it early: see :data:`STOP_SIGNALS`.

        Raises:
            Stopped: a stop signal came; the checkpoint of the step it came in was saved.
        """
        from tqdm.auto import tqdm

        self.engine.train()
        bar = tqdm(total=self.cfg.max_steps, initial=self.step, desc="train", unit="step",
                   disable=self.rank != 0 or not self.cfg.progress)
        metrics = self.job.out / "metrics.jsonl"
        tb = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(str(self.job.out / "tensorboard"))
        with _StopAsked(stop_on_signals) as asked:
            self._steps(bar, metrics, tb, asked)
        bar.close()
        if tb is not None:
            tb.close()
        if self.stopped:
            raise Stopped(self.stopped, self.step, self.ckpt_dir / f"step-{self.step}")

    def _steps(self, bar, metrics: Path, tb, asked: _StopAsked) -> None:
        self.stopped = 0
        while self.step < self.cfg.max_steps:
            if asked.active and self.rank == 0 and os.environ.get(SIGNAL_ENV) == str(self.step + 1):
                os.kill(os.getpid(), signal.SIGTERM)
            total, tokens = 0.0, 0
            for _ in range(self.cfg.grad_accum):
                batch = self._batch()
                tokens += int(batch["attention_mask"].sum())
                loss = self.engine(**batch, use_cache=False).loss  # no KV cache to train
                self.engine.backward(loss)
                self.engine.step()
                total += float(loss.detach()) / self.cfg.grad_accum
            self.step += 1
            self.losses.append(total)
            if self.epi is not None:
                self.epi.after_step(self.step)
            for f in self.after_step:
                f(self)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}")
            if tb is not None:
                lr = self.scheduler.get_last_lr()[0]
                row = {"step": self.step, "loss": total, "lr": lr, "tokens": tokens,
                       "time": time.time()}
                if getattr(self.engine.device, "type", None) == "cuda":  # rank 0's peak so far
                    row["gpu_peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
                with open(metrics, "a") as f:  # tokens: this rank's (ranks see equal shares)
                    f.write(json.dumps(row) + "\n")
                tb.add_scalar("train/loss", total, self.step)
                tb.add_scalar("train/lr", lr, self.step)
            self.stopped = self._agreed(asked.signum) if asked.active else 0
            if (self.step % self.cfg.save_every == 0 or self.step == self.cfg.max_steps
                    or self.stopped):
                if self.epi is not None:  # before DeepSpeed's: its ``latest`` marks a whole one
                    self.epi.save(self.ckpt_dir / f"step-{self.step}")
                self.engine.save_checkpoint(str(self.ckpt_dir), tag=f"step-{self.step}",
                                            client_state={"step": self.step,
                                                          "mixture": self.mixture.state_dict()})
                if tb is not None:
                    tb.flush()
                if os.environ.get(FAULT_ENV) == str(self.step):
                    os._exit(17)  # a crash right after a checkpoint (fault-injection tests)
            if self.stopped:
                return

    def _agreed(self, signum: int) -> int:
        """The stop signal any rank got by now (0: none), the same on every rank: one
        all-reduce (max) of a flag, on the engine's device."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return signum
        flag = torch.tensor([signum], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    # ---- save -------------------------------------------------------------------------------
    def save(self, stream: bool = True) -> None:
        """Exports HF sharded safetensors (rank 0 writes; every rank takes part in the gather).

        Under ZeRO-3 the export streams (:meth:`_export_streamed`): each parameter is gathered
        in turn, and rank 0 checks its frozen elements and writes it, so rank 0 holds one
        tensor and one shard at a time, not the whole 16-bit model (140 GB for 70B, beside
        the offloaded optimizer's host memory). Where transformers would convert the keys on
        save (:meth:`_streamed_keys` is None), and under ZeRO-1/2, the whole state dict is
        gathered and ``save_pretrained`` writes it (``stream=False``: always)."""
        out, tmp = self.job.out / "model", self.job.out / ".model.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        keys = self._streamed_keys() if stream and self.cfg.zero_stage == 3 else None
        try:
            if keys is not None:
                compared = self._export_streamed(tmp, keys)
                if self.freezer is not None or self.epi is not None:
                    self._verify_frozen(None, compared)
            else:
                sd = (self.engine._zero3_consolidated_16bit_state_dict()
                      if self.cfg.zero_stage == 3 else self.engine.module.state_dict())
                if self.freezer is not None or self.epi is not None:
                    self._verify_frozen(sd)
                if self.rank == 0:
                    self.engine.module.save_pretrained(tmp, state_dict=sd,
                                                       max_shard_size=self.cfg.max_shard_size)
        except BaseException:
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.rank == 0:
            for f in Path(self.job.model).iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                    shutil.copy(f, tmp / f.name)
            # each file's digest, hashed once here: later stages' keys then name this model by
            # its content, so a retrained, bit-identical model re-runs nothing downstream
            write_manifest(tmp, "train", self.cfg.key(),
                           {"init": checkpoint_digest(self.job.model),
                            **{f"data:{t}": sha256_file(p) for t, p in self.job.data.items()}},
                           extra={"steps": self.step,
                                  "export": "gathered" if keys is None else "streamed"})
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        torch.distributed.barrier()

    def _streamed_keys(self) -> list[str] | None:
        """The names ``save_pretrained`` would write for this model (tied copies dropped, as
        transformers drops them), or None where it would also convert them
        (``revert_weight_conversion`` changes the keys: fused experts and the like) or this
        transformers lacks the functions: the export then gathers the whole model. The same
        answer on every rank (it depends on the model alone)."""
        module = self.engine.module
        try:
            from transformers.core_model_loading import revert_weight_conversion
            from transformers.modeling_utils import remove_tied_weights_from_state_dict
        except ImportError:
            return None
        meta = {n: torch.empty(tuple(getattr(t, "ds_shape", t.shape)), dtype=t.dtype,
                               device="meta")
                for n, t in module.state_dict(keep_vars=True).items()}
        try:
            kept = remove_tied_weights_from_state_dict(dict(meta), module)
            back = revert_weight_conversion(module, dict(kept))  # (sorted by name)
            if set(back) != set(kept) or any(back[k] is not kept[k] for k in kept):
                return None
        except Exception:  # noqa: BLE001 - whatever it cannot do on shapes alone: gather
            return None
        ignored = set(getattr(module, "_keys_to_ignore_on_save", None) or ())
        return [k for k in kept if k not in ignored]

    def _export_streamed(self, tmp: Path, keys: list[str]) -> tuple[int, list[str]] | None:
        """Gathers each ZeRO-3 parameter in turn (every rank takes part); rank 0 compares the
        frozen elements of each with the stage input's, bit for bit, and writes the ``keys``
        among its names into ``tmp`` (safetensors shards of ``max_shard_size``, the HF index,
        ``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them).
        Returns (elements compared, tensors that differ) on rank 0 where cores are frozen and
        not released (evolving isolation), else None."""
        import deepspeed

        module = self.engine.module
        released = self.epi is not None and self.epi.released_at
        check = self.freezer is not None and not released and self.rank == 0
        union = set(self.union.names()) if check else set()
        groups: dict[int, tuple[torch.Tensor, list[str]]] = {}
        for name, t in module.state_dict(keep_vars=True).items():
            groups.setdefault(id(t), (t, []))[1].append(name)  # tied names: one tensor
        writer, reference, dtype = None, None, None
        if self.rank == 0:
            from transformers.utils.hub import convert_file_size_to_int

            from cpift_dist.io import Checkpoint, ShardWriter

            tmp.mkdir(parents=True)
            writer = ShardWriter(tmp, convert_file_size_to_int(self.cfg.max_shard_size))
            reference = Checkpoint(self.job.model) if check else None
            dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
        wanted, checked, bad, seen = set(keys), 0, [], set()
        for t, names in groups.values():
            gather = (deepspeed.zero.GatheredParameters([t]) if hasattr(t, "ds_id")
                      else contextlib.nullcontext())
            with gather:
                if self.rank != 0:
                    continue
                full = t.detach().to("cpu", copy=True)
                for name in names:
                    if name in union:
                        n, same = check_frozen_tensor(name, full, reference, self.union, dtype)
                        checked += n
                        seen.add(name)
                        if not same:
                            bad.append(name)
                    if name in wanted:
                        flushed = writer.shards_written
                        writer.add(name, full)
                        if writer.shards_written > flushed:
                            _return_free_heap()
        if self.rank != 0:
            return None
        writer.close()
        config = module.config
        config.dtype = str(module.dtype).split(".")[1]  # as save_pretrained sets them
        config.architectures = [type(module).__name__]
        config.save_pretrained(tmp)
        if module.can_generate() and getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(tmp)
        bad += sorted(union - seen)  # a mask for a tensor the model does not have
        return (checked, bad) if check else None

    def _verify_frozen(self, sd: dict | None, compared: tuple[int, list[str]] | None = None
                       ) -> None:
        """Checks every frozen element; fails the stage on a mismatch.

        Static cores: each rank checks its own fp32 partitions; rank 0 compares the gathered
        weights with the stage input's, bit for bit (in ``sd``, or already done while
        streaming the export: ``compared``). Evolving isolation: each rank checks that the
        current set kept its values since the last refresh. Rank 0 writes ``freeze.json``
        (the counts the manifest records).
        """
        report: dict = {}
        if self.freezer is not None:
            report = self._static_facts(sd, compared)
        if self.epi is not None:
            report["epi"] = self.epi.facts()
        verdict = [None]
        if self.rank == 0:
            (self.job.out / "freeze.json").write_text(json.dumps(report, indent=2) + "\n")
            problem = freeze_problem(report)
            if problem:
                verdict[0] = f"frozen elements changed during training: {problem} ({self.job.out})"
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0]:
            raise CpiftError(verdict[0])

    def _static_facts(self, sd: dict | None, compared: tuple[int, list[str]] | None) -> dict:
        released = self.epi.released_at if self.epi is not None else None
        bad_local = torch.tensor([0 if released else self.freezer.check_partitions(),
                                  self.freezer.frozen_here], device=self.engine.device)
        torch.distributed.all_reduce(bad_local)
        held = [None] * self.world
        torch.distributed.all_gather_object(held, self.freezer.tensors_here())
        if self.rank != 0:
            return {}
        from cpift_dist.io import Checkpoint

        dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
        # three independent counts: the masks' popcount, the elements compared bit for bit
        # in the gathered weights, and the elements the ranks' partitions keep frozen
        frozen = self.union.popcount()
        checked, bad = ((0, []) if released else compared if compared is not None
                        else check_frozen(sd, Checkpoint(self.job.model), self.union, dtype))
        split = sorted({n for h in held for n in h if sum(n in g for g in held) > 1})
        return {"masks": [str(p) for p in self.job.freeze], "frozen": frozen,
                "checked": checked, "mismatched_tensors": bad,
                "partition_mismatches": int(bad_local[0]),
                "frozen_in_partitions": int(bad_local[1]),
                "tensors_split_across_ranks": split, "released_at_step": released}


def _return_free_heap() -> None:
    """Hands the free pages of glibc's heap back to the kernel (``malloc_trim``). A tensor
    below glibc's mmap threshold (128 KiB at first, rising to each mapped block freed, up to 32
    MiB) lives in the heap, whose freed pages glibc keeps: a streamed export of a model made of
    such tensors otherwise grew by about one shard per shard written (bench/export_bench.py).
    Nothing where the C library has no ``malloc_trim`` (musl, macOS)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # no malloc_trim: nothing to hand back
        ctypes.CDLL(None).malloc_trim(0)


def run(job: SFTJob) -> SFTLoop:
    """The four-line recipe; returns the loop (losses, final step)."""
    if not job.data:
        raise CpiftError("no training data given")
    s = SFTLoop(job)
    s.setup()
    s.train(stop_on_signals=True)
    s.save()
    return s
