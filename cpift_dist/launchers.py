"""Starting DeepSpeed jobs without Ray: torchrun on this node, or srun + torchrun steps in a
SLURM allocation.

Every job runs the one training entry point (``python -m cpift_dist.training.run``) with the
arguments the caller gives, under the torchrun environment; this module only decides where and
when. Jobs are queued on *slots* and run as slots free up:

* ``torchrun``: a slot is a share of this node: with CUDA, ``workers_per_task`` GPUs of its own
  (``CUDA_VISIBLE_DEVICES``), floor(GPUs / workers_per_task) slots; on CPU, floor(cores /
  workers_per_task) slots (``finetune.local_jobs`` overrides both).
* ``slurm``: a slot is ``finetune.nodes_per_task`` nodes of the allocation (disjoint), an srun
  step starts one torchrun per node, and the ranks meet at the slot's first node (c10d
  rendezvous). ``NPROC_PER_NODE`` (default ``SLURM_GPUS_ON_NODE``, else 1) ranks per node.

Each job leaves ``launch.json`` in its output directory (command, slot, start, end, exit
status), and torchrun's log directory there (``torchrun/``: per attempt, the ``error.json``
with the traceback of a rank that failed, which torchrun's failure summary prints), instead of
a fresh ``/tmp/torchelastic_*`` on every node at every launch. Nothing here imports Ray.

Each job runs in a session of its own, and an exception in the caller (Ctrl-C, or SIGTERM
under ``cpift``: a preempted or cancelled SLURM job, ``kill``) stops them all: no queued job
starts, each running job's process group (torchrun or srun, and the ranks under it) gets
SIGTERM, and after :data:`STOP_WAIT` seconds SIGKILL, before the exception goes on. The
DeepSpeed checkpoints they saved are where the same command resumes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from cpift_dist.errors import CpiftError

ENTRY = ("-m", "cpift_dist.training.run")

TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""What torchrun passes on to its ranks (``--signals-to-handle``, set through its environment
variable ``PET_SIGNALS_TO_HANDLE`` where the caller has not): its default and SIGUSR1, which
SLURM's ``--signal=USR1@T`` sends and which would end torchrun itself by default; the ranks
save a checkpoint and stop on it (:data:`cpift_dist.training.loop.STOP_SIGNALS`). torchrun
versions without the option ignore the variable."""

STOP_WAIT = 30.0
"""Seconds the running jobs get to end after SIGTERM when the launcher is stopped, before
SIGKILL (SLURM's default ``KillWait``; torchrun gives its ranks as long)."""


@dataclass
class Job:
    """One DeepSpeed job: what the training entry point gets, where it reports."""

    label: str
    """How failures name it (``fine-tune of task 'logic'``, ``SFT stage 2 (cpi)``)."""
    args: list[str]
    """Arguments of ``cpift_dist.training.run``."""
    out: Path
    """Its output directory (``launch.json`` goes there)."""
    env: dict[str, str] = field(default_factory=dict)


def resolve_launcher(cfg) -> str:
    """``finetune.launcher`` made definite: auto is Ray when ``ray.enabled``, else torchrun."""
    launcher = cfg.finetune.launcher
    if launcher == "auto":
        return "ray" if cfg.ray.enabled else "torchrun"
    return launcher


def cuda_devices() -> int:
    """CUDA devices on this node (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def slurm_nodes() -> list[str]:
    """The allocation's host names, first node first (``scontrol show hostnames``).

    Raises:
        CpiftError: not inside an allocation, or ``scontrol`` missing or failing.
    """
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise CpiftError("finetune.launcher=slurm: not inside a SLURM allocation "
                         "(SLURM_JOB_NODELIST is unset; submit with sbatch launch/slurm_run.sbatch)")
    if shutil.which("scontrol") is None:
        raise CpiftError("finetune.launcher=slurm: scontrol is not on PATH")
    r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                       text=True)
    hosts = r.stdout.split()
    if r.returncode or not hosts:
        raise CpiftError(f"scontrol show hostnames {nodelist} failed: "
                         f"{(r.stderr.strip() or 'no hosts')[:200]}")
    return hosts


def ranks_per_node() -> int:
    """SLURM: ranks each node starts (``NPROC_PER_NODE``, else ``SLURM_GPUS_ON_NODE``, else 1)."""
    for var in ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE"):
        v = os.environ.get(var, "")
        if v.isdigit() and int(v) >= 1:
            return int(v)
    return 1


def check_launcher(cfg) -> None:
    """Refuses a configuration the launcher cannot run, before anything is written.

    Raises:
        CpiftError: slurm without ``srun``, outside an allocation, with fewer nodes than
            ``finetune.nodes_per_task``, or with a relative ``runs_dir`` or input path (every
            node must find the same files: shared storage, absolute paths).
    """
    if resolve_launcher(cfg) != "slurm":
        return
    if shutil.which("srun") is None:
        raise CpiftError("finetune.launcher=slurm: srun is not on PATH (run inside a SLURM "
                         "allocation: sbatch launch/slurm_run.sbatch CONFIG)")
    if not Path(cfg.runs_dir).is_absolute():
        raise CpiftError(f"runs_dir: {cfg.runs_dir} is relative; under SLURM every node must "
                         "read and write the same files: give an absolute path on shared storage")
    for t in cfg.tasks:
        for what in ("train_data", "eval_data", "tuned"):
            p = getattr(t, what)
            if p is not None and not Path(p).is_absolute():
                raise CpiftError(f"tasks[{t.name}].{what}: {p} is relative; under SLURM give an "
                                 "absolute path on shared storage")
    if not str(cfg.base).startswith("builtin:") and not Path(cfg.base).is_absolute():
        raise CpiftError(f"base: {cfg.base} is relative; under SLURM give an absolute path on "
                         "shared storage")
    nodes = slurm_nodes()
    if len(nodes) < cfg.finetune.nodes_per_task:
        raise CpiftError(f"finetune.nodes_per_task={cfg.finetune.nodes_per_task} but the "
                         f"allocation has {len(nodes)} node(s) ({', '.join(nodes)})")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_slots(cfg, ranks: int, use_gpu: bool, jobs: int | None = None) -> list[dict]:
    """Per slot, the environment that confines a job to its share of this node."""
    if use_gpu:
        n = cuda_devices()
        count = max(1, min(jobs or n // ranks, n // ranks))
        return [{"CUDA_VISIBLE_DEVICES": ",".join(str(d) for d in range(i * ranks,
                                                                        (i + 1) * ranks))}
                for i in range(count)]
    count = max(1, jobs or (os.cpu_count() or 1) // ranks)
    threads = max(1, (os.cpu_count() or 1) // (count * ranks))
    return [{"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": os.environ.get(
        "OMP_NUM_THREADS", str(threads))} for _ in range(count)]


LOG_DIR = "torchrun"
"""torchrun's ``--log-dir`` inside a job's output directory."""


def _command(launcher: str, slot, ranks: int, args: list[str], rdzv_id: str,
             log_dir: Path) -> list[str]:
    port = str(_free_port())
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                "--master_addr", "127.0.0.1", "--master_port", port, "--log-dir", str(log_dir),
                *ENTRY, *args]
    nodes = slot
    return ["srun", f"--nodes={len(nodes)}", f"--ntasks={len(nodes)}", "--ntasks-per-node=1",
            f"--nodelist={','.join(nodes)}", "--kill-on-bad-exit=1",
            sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(nodes)),
            "--nproc_per_node", str(ranks), "--rdzv_backend", "c10d",
            "--rdzv_endpoint", f"{nodes[0]}:{port}", "--rdzv_id", rdzv_id,
            "--log-dir", str(log_dir), *ENTRY, *args]


def run_jobs(cfg, jobs: list[Job], ranks: int, use_gpu: bool, whole_allocation: bool = False,
             log=None) -> dict[str, str]:
    """Runs ``jobs`` with the configured launcher (torchrun or slurm), as slots allow.

    Args:
        cfg: the run config (``finetune.*`` decides slots).
        jobs: what to run.
        ranks: torchrun: ranks of each job on this node; slurm: ranks per node are
            :func:`ranks_per_node` and this is ignored.
        use_gpu: torchrun: give each job GPUs of its own.
        whole_allocation: slurm: each job spans every node (an SFT stage) instead of
            ``nodes_per_task`` of them.
        log: a one-line reporter (``print``-like), or None.

    Returns:
        label -> a one-line cause, for every job that failed (empty when all succeeded).
    """
    launcher = resolve_launcher(cfg)
    if launcher == "slurm":
        hosts = slurm_nodes()
        per = len(hosts) if whole_allocation else cfg.finetune.nodes_per_task
        slots = [hosts[i:i + per] for i in range(0, len(hosts) - per + 1, per)]
        ranks = ranks_per_node()
        envs = [{} for _ in slots]
        if not use_gpu:
            envs = [{"DS_ACCELERATOR": "cpu"} for _ in slots]
    elif launcher == "torchrun":
        envs = _local_slots(cfg, ranks, use_gpu, cfg.finetune.local_jobs)
        slots = list(range(len(envs)))
    else:
        raise CpiftError(f"launcher {launcher!r} does not start jobs through this module")
    free: queue.Queue = queue.Queue()
    for i in range(len(slots)):
        free.put(i)
    running = _Running()

    def one(job: Job) -> str | None:
        i = free.get()
        try:
            if running.stopped:
                return "not started: the launcher was stopped"
            cmd = _command(launcher, slots[i], ranks, job.args,
                           f"{os.environ.get('SLURM_JOB_ID', 'local')}-{job.out.name}-{time.time_ns()}",
                           job.out / LOG_DIR)
            env = {**os.environ, "PET_SIGNALS_TO_HANDLE": os.environ.get(
                "PET_SIGNALS_TO_HANDLE", TORCHRUN_SIGNALS), **envs[i], **job.env}
            job.out.mkdir(parents=True, exist_ok=True)
            record = {"label": job.label, "launcher": launcher, "slot": slots[i], "cmd": cmd,
                      "env": {**envs[i], **job.env}, "start": time.time()}
            if log:
                where = (f"nodes {','.join(slots[i])}" if launcher == "slurm" else
                         f"slot {i}" + (f" (GPUs {envs[i]['CUDA_VISIBLE_DEVICES']})"
                                        if "CUDA_VISIBLE_DEVICES" in envs[i] else ""))
                log(f"  {job.label}: {launcher}, {where}")
            rc = running.run(cmd, env)
            if rc is None:
                return "not started: the launcher was stopped"
            record.update(end=time.time(), returncode=rc)
            (job.out / "launch.json").write_text(json.dumps(record, indent=2) + "\n")
            if rc:
                return f"{launcher} exit {rc}; rerun to resume from its last checkpoint"
            return None
        finally:
            free.put(i)

    pool = ThreadPoolExecutor(max(1, min(len(slots), len(jobs))))
    try:
        results = dict(zip([j.label for j in jobs], pool.map(one, jobs)))
    except BaseException:
        running.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {label: why for label, why in results.items() if why}


class _Running:
    """The launcher's running jobs, each a process group of its own (torchrun or srun and
    what they start), to be stopped together."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopped = False

    def run(self, cmd: list[str], env: dict[str, str]) -> int | None:
        """Runs ``cmd`` to its end: its exit status, or None where :meth:`stop` came first."""
        with self.lock:
            if self.stopped:
                return None
            p = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            self.procs.add(p)
        try:
            return p.wait()
        finally:
            with self.lock:
                self.procs.discard(p)

    def stop(self, wait: float | None = None) -> None:
        """No job starts after this; every running one gets SIGTERM, and SIGKILL where it has
        not ended ``wait`` seconds later (:data:`STOP_WAIT`), or at once on an exception (a
        second Ctrl-C) while they end."""
        with self.lock:
            self.stopped = True
            procs = list(self.procs)
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + (STOP_WAIT if wait is None else wait)
        try:
            for p in procs:
                try:
                    p.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(p, signal.SIGKILL)
                    p.wait()
        except BaseException:  # a second Ctrl-C while they stop: now
            for p in procs:
                _signal_group(p, signal.SIGKILL)
            raise


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """``sig`` to the process group that ``p`` leads (where it still exists)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, sig)
