"""Tiny real checkpoints for tests: a 2-layer Llama saved sharded, and tuned variants of it."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from cpift_dist.fusion.slerp import slerp_reference
from cpift_dist.io import Checkpoint, ShardWriter


def make_llama(path: Path, dtype=torch.float32, seed: int = 0, shard_bytes: int = 40_000,
               hidden: int = 32) -> Path:
    """Saves a tiny random Llama (HF layout, several safetensors shards) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path, max_shard_size=shard_bytes)
    return path


def make_tied(path: Path, kind: str = "llama", store_head: bool = True, seed: int = 0,
              dtype=torch.float32) -> Path:
    """A tiny model with tied input/output embeddings (``tie_word_embeddings``): Llama, or
    Qwen2 (q/k/v biases). With ``store_head`` the checkpoint also stores ``lm_head.weight``, an
    exact copy of ``model.embed_tokens.weight``, as some exports do; otherwise only the
    embedding, as ``save_pretrained`` writes it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    conf, cls = {"llama": (LlamaConfig, LlamaForCausalLM),
                 "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[kind]
    cfg = conf(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
               tie_word_embeddings=True, bos_token_id=2, eos_token_id=3, pad_token_id=1)
    model = cls(cfg).to(dtype)
    model.save_pretrained(path)
    if store_head:
        ck = Checkpoint(path)
        sd = {n: ck.read(n) for n in ck.stored_names()}
        assert "lm_head.weight" not in sd
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def perturb(base: Path, out: Path, seed: int, density: float = 0.2, scale: float = 1e-2,
            quantum: float | None = 2.0 ** -10, shard_bytes: int = 30_000,
            edit=None) -> Path:
    """Writes a 'tuned' copy of ``base``: sparse random deltas rounded to ``quantum`` (ties).

    ``edit(name, tensor) -> tensor`` may change tensors further. Tensors are written with the
    project's ShardWriter (a different shard layout from the base's).
    """
    ck = Checkpoint(base)
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True)
    w = ShardWriter(out, max_shard_bytes=shard_bytes)
    for name in ck.names():
        t = ck.read(name)
        d = torch.randn(t.shape, generator=g) * scale
        d *= torch.rand(t.shape, generator=g) < density
        if quantum:
            d = torch.round(d / quantum) * quantum
        new = (t.float() + d).to(t.dtype)
        if edit is not None:
            new = edit(name, new)
        w.add(name, new)
        for alias in sorted(a for a, src in ck.tied.items() if src == name):
            w.add(alias, new)  # a stored tied copy stays a copy
    w.close()
    shutil.copy(base / "config.json", out / "config.json")
    return out


def make_case(case: str, n_tasks: int, n: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tasks, n, generator=g)
    base = torch.randn(n, generator=g)
    if case == "collinear":
        x[1] = 2.5 * x[0]
    elif case == "anti-parallel":
        x[1] = -x[0]
    elif case == "zero":
        x[0] = 0.0
    elif case == "nearly-collinear":
        x[1] = x[0] + 1e-3 * torch.randn(n, generator=g)
    masks = torch.rand(n_tasks, n, generator=g) < 0.07
    return x.to(dtype), base.to(dtype), masks


def slerp_elementwise(x, base, masks, segments, t, task_vectors, overlap):
    """Element by element, in float64: the fold on non-core, the winner's value on core."""
    n_tasks, n = x.shape
    L = n // segments
    xd, bd = x.double(), base.double()
    core = masks.any(0)
    out = torch.empty(n, dtype=torch.float64)
    for s in range(segments):
        sl = slice(s * L, (s + 1) * L)
        nc = ~core[sl]
        vs = [(xd[i, sl] - bd[sl] if task_vectors else xd[i, sl])[nc] for i in range(n_tasks)]
        seg = slerp_reference(vs, t)
        out[sl][nc] = seg + (bd[sl][nc] if task_vectors else 0)
    for e in torch.nonzero(core).reshape(-1).tolist():
        cands = [i for i in range(n_tasks) if masks[i, e]]
        if overlap == "max-magnitude":
            mags = [float((x[i, e].float() - base[e].float()).abs()) for i in cands]
            win = cands[mags.index(max(mags))]
        else:
            win = cands[0]
        out[e] = xd[win, e]
    return out


def oracle_masks(base: Path, tuned: Path, p: float) -> dict[str, torch.Tensor]:
    """Exact global top-k masks by a stable descending sort of the concatenated magnitudes."""
    b, t = Checkpoint(base), Checkpoint(tuned)
    names = [n for n in b.names() if b.tensors[n].dtype.is_floating_point]
    u = torch.cat([(t.read(n).float() - b.read(n).float()).abs().reshape(-1) for n in names])
    k = math.floor(p * u.numel())
    order = torch.sort(u, descending=True, stable=True).indices[:k]
    flat = torch.zeros(u.numel(), dtype=torch.bool)
    flat[order] = True
    if k:  # the k-th value agrees with torch.topk
        assert u[order[-1]] == torch.topk(u, k).values[-1]
    out, pos = {}, 0
    for n in names:
        shape = b.tensors[n].shape
        numel = math.prod(shape)
        out[n] = flat[pos:pos + numel].reshape(shape)
        pos += numel
    return out


from cpift_dist.models import char_tokenizer as make_chat_tokenizer  # noqa: E402,F401

# the tiny preset as the pipeline tests run it: 2 fine-tune steps, a checkpoint every step.
# 2 steps leave core overlaps of ~0.035-0.042 Jaccard (measured): tau 0.04 makes 2 CPI stages,
# so the freeze of stage 1's cores is exercised (tests/test_pipeline.py asserts >= 2 stages)
# CPU pinned: the suite runs the same path where a GPU is present (the GPU path has its own tests)
TINY = ("train.max_steps=2", "train.save_every=1", "train.progress=false", "grouping.tau=0.04",
        "finetune.use_gpu=false", "fusion.device=cpu")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a rendezvous)."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1: every socket stays bound until all are
    chosen, so the kernel cannot hand out the same port twice."""
    import contextlib
    import socket
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def write_mask(path: Path, model: Path, select, task: str = "t") -> dict[str, torch.Tensor]:
    """Writes a core-mask file for ``model`` with ``select(name, numel) -> bool tensor``."""
    from cpift_dist.analysis.masks import MaskWriter, pack_mask

    ck = Checkpoint(model)
    shapes = {n: tuple(ck.info(n).shape) for n in ck.names()}
    w = MaskWriter(path, shapes)
    masks = {}
    for n, s in shapes.items():
        m = select(n, math.prod(s)).reshape(-1).bool()
        w.write(n, 0, pack_mask(m))
        masks[n] = m
    w.close({"task": task, "p": "0", "k": str(sum(int(m.sum()) for m in masks.values()))})
    return masks


def run(cmd, timeout: float, **kw):
    """``subprocess.run(capture_output=True, text=True)`` that, on timeout, kills the command's
    whole process group (launchers, torchrun, their ranks), so a hung run cannot outlive its
    test and hold ports, locks or CPUs for the tests after it."""
    import os
    import signal
    import subprocess

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"timed out after {timeout} s: {cmd}\n{(err or '')[-3000:]}") from None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def torchrun_train(setup: Path, out: Path, tasks, *overrides, freeze=(), env=None,
                   timeout: float = 500, entry=("-m", "cpift_dist.training.run"), nproc=2):
    """The training entry point (``entry``: torchrun's program and its arguments) on ``nproc``
    (default 2) gloo ranks under torchrun, on ``setup``'s tiny model."""
    import os
    import sys

    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--log-dir", str(out / "torchrun"), *entry, "--model", str(setup / "model"), "--out", str(out)]
    for t in tasks:
        cmd += ["--data", f"{t}={setup / 'suite' / t / 'train.jsonl'}"]
    cmd += ["max_length=320", "micro_batch=2", "lr=3e-3", "progress=false", *overrides]
    for m in freeze:
        cmd += ["--freeze", str(m)]
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
    return run(cmd, timeout, env=full_env)


def listening_beyond_loopback(procs) -> tuple[set[str], dict[str, list[str]]]:
    """(names of the processes that listen, {name: addresses} of those listening beyond
    127.0.0.1 / ::1) over the given ``psutil.Process`` objects."""
    import ipaddress

    import psutil

    names, exposed = set(), {}
    for proc in procs:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            names.add(name)
            if not ipaddress.ip_address(c.laddr.ip.removeprefix("::ffff:")).is_loopback:
                exposed.setdefault(name, []).append(f"{c.laddr.ip}:{c.laddr.port}")
    return names, exposed


def own_tmp(d: Path) -> dict[str, str]:
    """``TMPDIR`` for the processes a test starts: ``d`` (created), to look into afterwards
    with :func:`left_in_tmp`."""
    d.mkdir(parents=True, exist_ok=True)
    return {"TMPDIR": str(d)}


def left_in_tmp(d: Path) -> list[str]:
    """What processes left behind in the temporary directory ``d``: a ``torchelastic_*``
    directory per torchrun launch that had no ``--log-dir`` (every launch of this project
    passes one), a ``pymp-*`` directory per Python process using ``multiprocessing`` (e.g.
    Ray's dashboard) that was killed before its exit handlers ran."""
    return sorted(p.name for pat in ("torchelastic_*", "pymp-*") for p in d.glob(pat))


def slurm_standins(bindir: Path, hosts: list[str], log: Path | None = None) -> dict[str, str]:
    """Stand-in ``srun`` and ``scontrol`` for an allocation of ``hosts`` on this machine.

    ``srun --nodes=K [--flags] CMD`` starts CMD K times at once (one per simulated node, with
    SLURM_NODEID / SLURM_PROCID set), waits for all and fails if any failed, appending
    ``start``/``end`` lines with times to ``log``. ``scontrol show hostnames`` prints ``hosts``.
    Returns the environment of such an allocation (PATH first)."""
    import os
    import stat
    import sys

    bindir.mkdir(parents=True, exist_ok=True)
    srun = r'''n=1
while [[ $1 == -* ]]; do case $1 in --nodes=*) n=${1#--nodes=};; esac; shift; done
id=$$
[ -n "$SRUN_LOG" ] && echo "start $id $(date +%s.%N) $n $*" >> "$SRUN_LOG"
pids=()
for i in $(seq 0 $((n - 1))); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
[ -n "$SRUN_LOG" ] && echo "end $id $(date +%s.%N) $rc" >> "$SRUN_LOG"
exit $rc'''
    scontrol = "printf '%s\\n' " + " ".join(hosts)
    for name, body in (("srun", srun), ("scontrol", scontrol)):
        f = bindir / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bindir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
            "SLURM_JOB_NODELIST": f"sim[1-{len(hosts)}]", "SLURM_NNODES": str(len(hosts)),
            "SLURM_JOB_ID": "77", "SRUN_LOG": str(log or bindir / "srun.log")}


def planted_scores(name: str, positions: torch.Tensor) -> torch.Tensor:
    """Known EPI importance scores of elements ``positions`` of tensor ``name``: 13 distinct
    values (many exact ties), multiples of 1/4 (so float64 layer sums are exact in any order)."""
    seed = sum(name.encode()) % 13
    return ((positions * 7919 + seed) % 13).to(torch.float32) / 4


def epi_oracle(model: Path, p: float) -> dict[str, torch.Tensor]:
    """The EPI selection of :func:`planted_scores` by a gathered stable sort: layer-normalised
    scores of every tensor (sorted names), the first floor(p * D) of a stable descending sort."""
    from cpift_dist.analysis.plan import selection_group

    ck = Checkpoint(model)
    names = sorted(ck.names())
    scores = {n: planted_scores(n, torch.arange(math.prod(ck.info(n).shape))) for n in names}
    sums, counts = {}, {}
    for n, s in scores.items():
        g = selection_group(n, "per-layer")
        sums[g] = sums.get(g, 0.0) + float(s.sum(dtype=torch.float64))
        counts[g] = counts.get(g, 0) + s.numel()
    norm = []
    for n, s in scores.items():
        m = sums[selection_group(n, "per-layer")] / counts[selection_group(n, "per-layer")]
        norm.append((s.double() / m).float() if m > 0 else torch.zeros_like(s))
    flat = torch.cat(norm)
    k = int(math.floor(p * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order] = True
    out, off = {}, 0
    for n, s in scores.items():
        out[n] = chosen[off:off + s.numel()]
        off += s.numel()
    return out


def record_read_ahead(monkeypatch) -> tuple[list, object]:
    """Records, in order, every ``ReadAhead.begin`` as ``("begin", elements)`` (once the
    read-ahead has caught up, before it can see the begin) and every ask to the kernel
    (``CheckpointReader.prefetch_rows``, not passed on) as ``("ask", checkpoint path, tensor,
    (row_start, row_stop), thread name)``; the read-ahead is let finish its steps before the
    work's end stops it. Returns the events and the lock that guards them."""
    import threading

    from cpift_dist.io.checkpoint import CheckpointReader
    from cpift_dist.io.read_ahead import ReadAhead

    events, lock = [], threading.Lock()
    begin = ReadAhead.begin

    def recorded_begin(self, elements):
        # first, the read-ahead is let catch up (asked up to its budget, or everything): on a
        # busy machine it can lag behind the work, whose end leaves its last steps unasked,
        # which these tests would read as missing asks
        with self._cv:
            self._cv.wait_for(lambda: self.finished or self.asked - self._begun >= self.budget,
                              timeout=10)
        with lock:
            events.append(("begin", elements))
        begin(self, elements)

    def recorded_ask(self, name, ranges):
        with lock:
            events.append(("ask", str(self.checkpoint.path), name, tuple(ranges[0]),
                           threading.current_thread().name))

    def recorded_exit(self, *exc):
        # and at the end: once the last begin is seen nothing holds the read-ahead back, but
        # the work can end (and stop it) before its thread asks for the last steps (a tiny
        # model's last chunks; 3 of 8 runs of the analysis's cold test here)
        with self._cv:
            self._cv.wait_for(lambda: self.finished, timeout=10)
        exit_(self, *exc)

    exit_ = ReadAhead.__exit__
    monkeypatch.setattr(ReadAhead, "begin", recorded_begin)
    monkeypatch.setattr(ReadAhead, "__exit__", recorded_exit)
    monkeypatch.setattr(CheckpointReader, "prefetch_rows", recorded_ask)
    return events, lock
