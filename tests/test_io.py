"""Checkpoint IO: lazy row-chunk reads, the shard writer, atomic outputs, shipped configs."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cpift_dist.config import RunConfig, load_config
from cpift_dist.errors import CpiftError
from blake3 import blake3

from cpift_dist.io import (Checkpoint, ShardWriter, atomic_dir, checkpoint_digest,
                           verify_outputs, write_manifest)
from cpift_dist.io.manifest import sha256_json

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]


def test_row_chunks_reassemble(models):
    ck = Checkpoint(models["base"])
    with ck.reader() as r:
        for name in ck.names():
            info = ck.info(name)
            whole = r.read(name).reshape(-1)
            parts = [r.read_rows(name, s, min(info.rows, s + 3)).clone()  # a view: copy
                     for s in range(0, info.rows, 3)]
            assert torch.equal(torch.cat(parts), whole)


def test_mapped_rows_equal_the_read_rows_and_survive_dropping(models, bf16_models):
    """map_rows (the analysis's zero-copy reads) and gather_rows (the sample's scattered
    reads) give the same bytes as read_rows, for fp32 and bf16 files, chunk by chunk;
    drop_mapped leaves arrays still in use readable."""
    for m in (models, bf16_models):
        ck = Checkpoint(m["base"])
        with ck.reader() as r:
            for name in ck.names():
                info = ck.info(name)
                for s in range(0, info.rows, 5):
                    e = min(info.rows, s + 5)
                    mapped = r.map_rows(name, s, e)
                    assert not mapped.flags.writeable
                    want = r.read_rows(name, s, e).view(torch.uint8).numpy().copy()
                    r.drop_mapped()  # the pages leave the page tables; the array refaults them
                    assert (mapped == want).all()
                ranges = [(a, min(info.rows, a + 2)) for a in range(0, info.rows, 3)][::-1]
                out = np.full(info.numel * info.dtype.itemsize + 5, 0xAB, np.uint8)
                got = r.gather_rows([(name, np.array(ranges))], out)
                want = np.concatenate([r.read_rows(name, a, b).view(torch.uint8).numpy().copy()
                                       for a, b in ranges])
                assert np.shares_memory(got, out) and np.array_equal(got, want)
                assert (out[len(want):] == 0xAB).all()  # nothing written past the rows
            parts = [(n, np.array([(0, 1), (ck.info(n).rows - 1, ck.info(n).rows)]))
                     for n in ck.names()]  # several tensors (and files) in one call
            out = np.zeros(sum(2 * ck.info(n).numel * 4 for n in ck.names()), np.uint8)
            want = np.concatenate([r.read_row_ranges(n, rr.tolist()).view(torch.uint8).numpy()
                                   .copy() for n, rr in parts])
            assert np.array_equal(r.gather_rows(parts, out), want)


def test_a_file_truncated_after_opening_is_an_error_not_a_crash(models, tmp_path):
    """A file shorter than its header says (truncated after the checkpoint was opened) is a
    CheckpointError naming the file, not a numpy error or, for pages mapped before the
    truncation, a SIGBUS."""
    src = Path(models["base"])
    d = tmp_path / "ck"
    shutil.copytree(src, d)
    ck = Checkpoint(d)
    name = max(ck.names(), key=lambda n: ck.info(n).offset)  # the last tensor of its file
    info = ck.info(name)
    with open(info.file, "r+b") as f:
        f.truncate(info.offset + 8)
    with ck.reader() as r, pytest.raises(CpiftError, match=f"{info.file.name}.*truncated"):
        r.prefetch_rows(name, [(0, 1), (info.rows - 1, info.rows)])  # clipped at the end
        r.map_rows(name, 0, info.rows)
    first = min((n for n in ck.names() if ck.info(n).file == info.file),
                key=lambda n: ck.info(n).offset)  # whole: its rows are read
    out = np.zeros(2 * info.numel * info.dtype.itemsize + ck.info(first).numel * 4, np.uint8)
    with ck.reader() as r, pytest.raises(CpiftError,
                                         match=f"{info.file.name}.*truncated.*{name!r}"):
        r.gather_rows([(first, np.array([(0, 1)])),
                       (name, np.array([(0, 1), (info.rows - 1, info.rows)]))], out)


def test_read_chunk_reads_the_rows_of_every_checkpoint_at_once(models, bf16_models, tmp_path):
    """read_chunk (the analysis's full passes): the same rows of a tensor from several
    checkpoints, one after the other in the caller's buffer, equal to read_rows of each, fp32
    and bf16, nothing written past them; a file truncated after opening names that file and
    the tensor."""
    from cpift_dist.io.checkpoint import read_chunk

    for m in (models, bf16_models):
        cks = [Checkpoint(m[k]) for k in ("base", "a", "b")]
        with cks[0].reader() as r0, cks[1].reader() as r1, cks[2].reader() as r2:
            readers = [r0, r1, r2]
            for name in cks[0].names():
                info = cks[0].info(name)
                for s in range(0, info.rows, 7):
                    e = min(info.rows, s + 7)
                    nb = (e - s) * info.row_numel * info.dtype.itemsize
                    out = np.full(3 * nb + 5, 0xAB, np.uint8)
                    got = read_chunk(readers, name, s, e, out)
                    assert len(got) == 3 and all(np.shares_memory(g, out) for g in got)
                    for g, r in zip(got, readers):
                        want = r.read_rows(name, s, e).view(torch.uint8).numpy()
                        assert np.array_equal(g, want), (name, s)
                    assert (out[3 * nb:] == 0xAB).all()
            with pytest.raises(ValueError, match="holds"):
                read_chunk(readers, name, 0, info.rows, np.zeros(8, np.uint8))
    d = tmp_path / "b"
    shutil.copytree(models["b"], d)
    ck = Checkpoint(d)
    name = max(ck.names(), key=lambda n: ck.info(n).offset)  # the last tensor of its file
    info = ck.info(name)
    with Checkpoint(models["base"]).reader() as r0, ck.reader() as r1:
        r1._fd(info.file)  # opened before the truncation, as in a pass
        with open(info.file, "r+b") as f:
            f.truncate(info.offset + 8)
        out = np.zeros(2 * info.numel * info.dtype.itemsize, np.uint8)
        with pytest.raises(CpiftError, match=f"{d.name}.*{info.file.name}.*truncated.*{name!r}"):
            read_chunk([r0, r1], name, 0, info.rows, out)


def test_prefetch_asks_for_the_pages_of_each_range(models, monkeypatch):
    """A cold pass's prefetch: one MADV_WILLNEED per row range, from the page holding its first
    byte to its last byte."""
    import mmap

    from cpift_dist.io import checkpoint

    calls = []
    monkeypatch.setattr(checkpoint, "_advise",
                        lambda mm, option, start, length: calls.append((option, start, length)))
    ck = Checkpoint(models["base"])
    name = max(ck.names(), key=lambda n: ck.info(n).numel)
    info = ck.info(name)
    row_bytes = info.row_numel * info.dtype.itemsize
    ranges = [(0, 1), (2, 4), (info.rows - 1, info.rows)]
    with ck.reader() as r:
        r.prefetch_rows(name, ranges)
    want = []
    for a, b in ranges:
        begin, end = info.offset + a * row_bytes, info.offset + b * row_bytes
        page = begin - begin % mmap.PAGESIZE
        want.append((mmap.MADV_WILLNEED, page, end - page))
    assert calls == want


def test_advice_reaches_the_kernel_with_the_gil_released(tmp_path):
    """``_advise`` calls the C library's madvise on the map's own pages: MADV_DONTNEED drops a
    private copy-on-write page of the map (the file's bytes show again), which only a call on
    the right address can do; an address past the map is refused, not applied elsewhere."""
    import ctypes
    import mmap

    from cpift_dist.io import checkpoint

    f = tmp_path / "f"
    f.write_bytes(bytes(range(256)) * 64)  # 4 pages
    with open(f, "r+b") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    view = np.frombuffer(mm, np.uint8)
    addr = checkpoint._address(mm)
    assert addr == view.ctypes.data and checkpoint._address(mm) == addr  # looked up once
    mm[mmap.PAGESIZE + 7] = 0xEE  # a private copy of page 1
    mm[2 * mmap.PAGESIZE + 7] = 0xEE  # and of page 2
    checkpoint._advise(mm, mmap.MADV_DONTNEED, mmap.PAGESIZE, mmap.PAGESIZE)
    assert mm[mmap.PAGESIZE + 7] == 7  # page 1: the file's byte again
    assert mm[2 * mmap.PAGESIZE + 7] == 0xEE  # page 2 untouched
    if checkpoint._MADVISE is not None:  # a CDLL's functions drop the GIL (a PyDLL's keep it)
        assert not checkpoint._MADVISE._flags_ & ctypes._FUNCFLAG_PYTHONAPI
    del view


def test_sample_reads_use_their_own_descriptor_advised_random(models, monkeypatch):
    """gather_rows reads through a descriptor of its own, advised POSIX_FADV_RANDOM (a cold
    page reads itself alone), never the one the shared maps may use (its read-ahead stays)."""
    import os

    advised = []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise",
                        lambda fd, off, n, advice: (advised.append((fd, off, n, advice)),
                                                    real(fd, off, n, advice))[1])
    ck = Checkpoint(models["base"])
    name = ck.names()[0]
    info = ck.info(name)
    with ck.reader() as r:
        r.gather_rows([(name, np.array([(0, 1)]))], np.zeros(info.numel * info.dtype.itemsize, np.uint8))
        fd, mapped_fd = r._random_fds[info.file], r._fds[info.file]
        assert fd != mapped_fd and advised == [(fd, 0, 0, os.POSIX_FADV_RANDOM)]
        r.prefetch_gather([(name, np.array([(0, 1)]))])
        r.gather_rows([(name, np.array([(0, 1)]))], np.zeros(info.numel * info.dtype.itemsize, np.uint8))
        assert len(advised) == 1  # once per file and reader


def _rss_of_map(addr: int) -> int:
    """Resident bytes of the mapping holding ``addr`` (/proc/self/smaps)."""
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                rss = next(x for x in lines[i + 1:] if x.startswith("Rss:"))
                return int(rss.split()[1]) * 1024
    raise AssertionError("no mapping holds the address")


@pytest.mark.parametrize("compiled", [True, False])
def test_drop_mapped_drops_every_readers_pages_at_once(tmp_path, monkeypatch, compiled):
    """drop_mapped([readers]): the pages each reader mapped leave this process's page tables
    (each map's resident size falls back, but for the kernel's fault-around beyond the range),
    through the compiled batch or madvise one by one."""
    import sys

    from safetensors.torch import save_file

    from cpift_dist.io import checkpoint, gather
    if not compiled:
        monkeypatch.delitem(sys.modules, "cpift_dist.io.gather")
    cks = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        save_file({"w": torch.full((1024, 1024), float(i))},
                  str(tmp_path / str(i) / "model.safetensors"))
        cks.append(Checkpoint(tmp_path / str(i)))
    with cks[0].reader() as r0, cks[1].reader() as r1:
        arrays = [r.map_rows("w", 0, 1024) for r in (r0, r1)]  # 4 MiB each
        addrs = [a.ctypes.data for a in arrays]
        before = [_rss_of_map(a) for a in addrs]
        assert [int(a[3::4096].sum()) for a in arrays] == [0, 1024 * 0x3F]  # touched
        touched = [_rss_of_map(a) for a in addrs]
        assert all(t >= b + (4 << 20) - (64 << 10) for t, b in zip(touched, before)), touched
        checkpoint.drop_mapped([r0, r1])
        after = [_rss_of_map(a) for a in addrs]
        assert all(x <= b + (128 << 10) for x, b in zip(after, before)), (before, after)
        assert not r0._mapped and not r1._mapped
    assert gather.advise.signatures  # (loaded: the compiled path was there to take)


def test_read_ahead_asks_within_its_budget_and_stops_cleanly():
    """ReadAhead asks step by step on its own thread, never more than the budget beyond the
    elements begun; leaving it stops a thread waiting on the budget and closes the steps'
    generator; a failing step stops the asks without raising into the work."""
    import threading
    import time

    from cpift_dist.io.read_ahead import ReadAhead

    asked, closed = [], []

    def steps(n):
        try:
            for i in range(n):
                yield 10, lambda i=i: asked.append((i, threading.current_thread().name))
        finally:
            closed.append(True)

    with ReadAhead(steps(100), budget=25) as ahead:
        deadline = time.monotonic() + 10
        while len(asked) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert [i for i, _ in asked] == [0, 1, 2]  # 30 asked >= 25 + 0 begun: it waits
        ahead.begin(20)  # it asks on while fewer than 20 + 25 are asked: steps 3 and 4
        while len(asked) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert [i for i, _ in asked] == [0, 1, 2, 3, 4]
    assert closed == [True] and len(asked) == 5  # left while waiting: stopped and closed
    assert {t for _, t in asked} == {"read-ahead"}

    def failing():
        yield 1, lambda: asked.append("x")
        yield 1, lambda: 1 / 0
        yield 1, lambda: asked.append("never")

    asked.clear()
    with ReadAhead(failing(), budget=10) as ahead:
        ahead._thread.join(timeout=10)  # it ends by itself, at the error
        assert not ahead._thread.is_alive()
    assert asked == ["x"]  # the error stopped the asks; nothing was raised here


def test_cached_tells_pages_in_the_page_cache(models):
    """``cached`` (mincore) finds the pages of a checkpoint just read in the page cache."""
    ck = Checkpoint(models["base"])
    for f in {ck.info(n).file for n in ck.names()}:
        f.read_bytes()
    with ck.reader() as r:
        assert r.cached([(n, ck.info(n).rows - 1) for n in ck.names()])


@pytest.mark.parametrize("shard_bytes", [30_000, 10 << 20])
def test_shard_writer_output_loads_in_transformers(models, tmp_path, shard_bytes):
    from transformers import AutoModelForCausalLM

    src = Checkpoint(models["base"])
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        w = ShardWriter(tmp, max_shard_bytes=shard_bytes)
        for n in src.names():
            w.add(n, src.read(n))
        digests = w.close()
        shutil.copy(models["base"] / "config.json", tmp / "config.json")
        write_manifest(tmp, "copy", {}, {}, outputs=digests)
    multi = shard_bytes < 100_000
    assert (out / "model.safetensors.index.json").exists() == multi
    assert len(list(out.glob("*.safetensors"))) == (len(digests) - 1 if multi else 1)
    for f, d in digests.items():
        assert blake3((out / f).read_bytes()).hexdigest() == d
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    for n in src.names():
        assert torch.equal(sd[n], src.read(n)), n
    # the manifest's digests are what the checkpoint's digest is built from
    assert checkpoint_digest(out) == sha256_json({f: f"blake3:{d}" for f, d in digests.items()})
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 6)


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.bin").write_bytes(b"123")
            raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, overwrite=True) as tmp:
            raise KeyboardInterrupt
    assert (out / "old").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_a_resumable_atomic_dir_keeps_finished_work_only_when_asked(tmp_path):
    """``keep``: a stable, locked partial directory, kept on failure when ``keep()`` says
    so (with a note naming it; a full disk still one CpiftError), else removed; renamed into
    place on success."""
    import errno

    from cpift_dist.io.atomic import partial_dir

    out, part = tmp_path / "x", partial_dir(tmp_path / "x")
    with pytest.raises(CpiftError, match=r"x: No space left on device while writing; "
                                         r"earlier outputs are untouched") as e:
        with atomic_dir(out, keep=lambda: True) as tmp:
            assert tmp == part
            (tmp / "done.bin").write_bytes(b"1")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.__notes__ == [f"the finished part is kept in {part}: the same command "
                                 "resumes from it (remove it to start over)"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out, keep=lambda: False) as tmp:
            assert (tmp / "done.bin").read_bytes() == b"1"  # as the failure left it
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out, keep=lambda: True) as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in tmp_path.iterdir()] == ["x"] and (out / "a").read_text() == "a"


def test_atomic_dir_removes_what_dead_processes_left_and_nothing_in_use(tmp_path):
    """Temporary siblings of the output: a dead process's (unlocked, unchanged for a while)
    is removed; one locked by a live writer, or just created, is not; nor are another
    output's."""
    import fcntl

    def sibling(name: str, age: float) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "half.bin").write_bytes(b"123")
        os.utime(d, (time.time() - age, time.time() - age))
        return d

    dead, live = sibling(".x.tmp-dead0001", 3600), sibling(".x.tmp-live0001", 3600)
    fresh, other = sibling(".x.tmp-new00001", 0), sibling(".y.tmp-dead0001", 3600)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with atomic_dir(tmp_path / "x") as tmp:
            (tmp / "a").write_text("a")
            old = time.time() - 3600
            os.utime(tmp, (old, old))  # unchanged for an hour, but in use: locked
            with atomic_dir(tmp_path / "x"):  # a second writer of x sweeps again
                pass
            assert tmp.is_dir()
    finally:
        os.close(fd)
    assert not dead.exists()
    assert live.is_dir() and fresh.is_dir() and other.is_dir()
    assert (tmp_path / "x" / "a").read_text() == "a"
    # a process killed while it wrote: its directory is left, and swept by the next output
    code = ("import os, sys\nfrom cpift_dist.io import atomic_dir\n"
            f"with atomic_dir({str(tmp_path / 'z')!r}) as tmp:\n"
            "    (tmp / 'half.bin').write_bytes(b'1')\n    os._exit(9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    (left,) = tmp_path.glob(".z.tmp-*")
    os.utime(left, (time.time() - 60, time.time() - 60))
    with atomic_dir(tmp_path / "z"):
        assert not left.exists()


def test_unwritable_output_is_a_clear_error(tmp_path):
    # a regular file where a directory should be: fails even for root, unlike chmod
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CpiftError, match="cannot create output directory"):
        with atomic_dir(blocker / "out"):
            pass
    assert blocker.read_text() == "x"


def test_digest_changes_with_weights(models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(models["a"], d)
    before = checkpoint_digest(d)
    f = sorted(d.glob("model-*.safetensors"))[0]
    f.write_bytes(f.read_bytes())  # same bytes, new mtime
    import os
    os.utime(f, ns=(1, 1))
    assert checkpoint_digest(d) != before


def test_every_shipped_config_validates():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    presets = sorted((ROOT / "cpift_dist" / "presets").glob("*.yaml"))
    assert configs and {p.stem for p in presets} == {"default", "tiny"}
    for c in configs + presets:
        cfg = load_config(c)
        assert isinstance(cfg, RunConfig)
        assert c.read_text().startswith("# "), f"{c}: no command line at the top"


def test_overrides_and_schema_docs(tmp_path):
    c = load_config(ROOT / "configs" / "analyze-example.yaml",
                    ["analysis.p=0.02", "analysis.selection=per-layer", "ray.num_cpus=2"])
    assert c.analysis.p == 0.02 and c.analysis.selection == "per-layer" and c.ray.num_cpus == 2
    from cpift_dist.config import EPIConfig, EvalConfig, SFTConfig, SuiteConfig
    for model in (RunConfig, type(c.analysis), type(c.ray), type(c.tasks[0]), SFTConfig, EPIConfig,
                  EvalConfig, SuiteConfig, type(c.train), type(c.fusion), type(c.finetune)):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"


def test_use_gpu_resolves_to_what_the_machine_has(monkeypatch):
    from cpift_dist import ray_utils

    monkeypatch.setattr(ray_utils, "gpus_available", lambda: 0)
    assert not ray_utils.resolve_use_gpu(None, 2) and not ray_utils.resolve_use_gpu(False, 2)
    with pytest.raises(CpiftError, match=r"finetune.use_gpu: 2 rank\(s\) need a GPU each; 0"):
        ray_utils.resolve_use_gpu(True, 2)
    monkeypatch.setattr(ray_utils, "gpus_available", lambda: 2)
    assert ray_utils.resolve_use_gpu(None, 2) and not ray_utils.resolve_use_gpu(None, 3)
    assert ray_utils.resolve_use_gpu(False, 2) is False


def test_manifests_old_and_new_digests_and_cpift_verify(tmp_path, capsys):
    """New manifests record each output's BLAKE3; one written before them (sha256) keeps the
    checkpoint digest it had then (so that a finished run resumes after the upgrade), and both
    are re-hashed by `cpift verify`, which names a changed, resized or missing file."""
    import hashlib
    import json

    from cpift_dist.cli import main

    d = tmp_path / "stage"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(bytes(range(256)) * 4096)
    (d / "sub" / "b.json").write_text('{"x": 1}\n')
    man = write_manifest(d, "copy", {}, {})
    files = {"a.bin": d / "a.bin", "sub/b.json": d / "sub" / "b.json"}
    assert man["outputs"] == {f: {"blake3": blake3(p.read_bytes()).hexdigest(),
                                  "bytes": p.stat().st_size} for f, p in files.items()}
    assert checkpoint_digest(d) == sha256_json(
        {f: "blake3:" + blake3(p.read_bytes()).hexdigest() for f, p in files.items()})
    assert verify_outputs(d) == [] and main(["verify", str(d)]) == 0
    assert "2 files match the manifest" in capsys.readouterr().out

    old = tmp_path / "old"
    shutil.copytree(d, old)
    legacy = json.loads((old / "manifest.json").read_text())
    legacy["outputs"] = {f: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(),
                             "bytes": p.stat().st_size} for f, p in files.items()}
    (old / "manifest.json").write_text(json.dumps(legacy))
    # the digest the code before BLAKE3 computed for this manifest, literally, both where a
    # checkpoint is named and where the pipeline's ledger keys a stage's output
    from cpift_dist.pipeline import output_digest

    was = sha256_json({f: o["sha256"] for f, o in legacy["outputs"].items()})
    assert checkpoint_digest(old) == was and output_digest(old) == was
    assert verify_outputs(old) == []

    for stage, algo in ((d, "blake3"), (old, "sha256")):
        raw = bytearray((stage / "a.bin").read_bytes())
        raw[5000] ^= 1  # same size, one bit
        (stage / "a.bin").write_bytes(bytes(raw))
        problems = verify_outputs(stage)
        assert len(problems) == 1 and f"a.bin: {algo} " in problems[0], problems
        (stage / "sub" / "b.json").write_text('{"x": 10}\n')
        assert any("b.json: 10 bytes, the manifest says 9" in p for p in verify_outputs(stage))
        (stage / "sub" / "b.json").unlink()
        assert any("b.json: missing" in p for p in verify_outputs(stage))
        assert main(["verify", str(stage)]) == 1
        assert "a.bin" in capsys.readouterr().err
    # a tree: every stage below (both now fail), and a directory with no manifest below it
    assert main(["verify", str(tmp_path)]) == 1
    assert "0 of 2 stage directories match" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["verify", str(tmp_path / "empty")]) == 2
    assert "no manifest.json there or below" in capsys.readouterr().err
    (old / "manifest.json").write_text("{")  # unreadable
    assert main(["verify", str(old)]) == 2
    assert "no readable manifest" in capsys.readouterr().err
