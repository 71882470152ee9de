"""cpift fuse and cpift group end to end on tiny real checkpoints."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from blake3 import blake3

from cpift_dist.analysis import MaskFile, analyze
from cpift_dist.cli import main
from cpift_dist.config import AnalysisConfig, FusionConfig, GroupingConfig
from cpift_dist.errors import MaskError
from cpift_dist.executor import InProcessExecutor, RayExecutor
from cpift_dist.fusion import fold_weights, fuse, slerp_reference
from cpift_dist.grouping import connected_groups, group
from cpift_dist.io import Checkpoint, sha256_file
from cpift_dist.io.safetensors_stream import PositionalWriter
from helpers import perturb, record_read_ahead

pytestmark = pytest.mark.timeout(300)
# device pinned: the same path with or without a GPU (the CUDA path has its own tests below)
FAST = dict(max_shard_bytes=30_000, chunk_elements=1024, device="cpu")
CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def three(models, tmp_path_factory):
    """Base, three tuned models (c overlaps a a lot) and their analysis (p = 5%)."""
    d = tmp_path_factory.mktemp("three")
    tuned = {"a": models["a"], "b": models["b"],
             "c": perturb(models["base"], d / "c", seed=1, density=0.25, quantum=None)}
    analyze(models["base"], tuned, d / "analysis", AnalysisConfig(p=0.05), progress=False)
    return {"base": models["base"], "tuned": tuned, "masks": d / "analysis" / "masks",
            "analysis": d / "analysis"}


def expected(three, space, overlap, omega="uniform"):
    """Per tensor, in float64: the fold on non-core elements and the winners on core ones."""
    base = Checkpoint(three["base"])
    tasks = list(three["tuned"])
    tuned = [Checkpoint(three["tuned"][t]) for t in tasks]
    masks = [MaskFile(three["masks"] / f"{t}.safetensors") for t in tasks]
    t = fold_weights(len(tasks), omega)
    out = {}
    for name in base.names():
        b = base.read(name).double().reshape(-1)
        xs = [c.read(name).double().reshape(-1) for c in tuned]
        m = torch.stack([mf.read(name).reshape(-1) for mf in masks])
        core = m.any(0)
        vs = [x - b if space == "task-vectors" else x for x in xs]
        res = torch.empty_like(b)
        res[~core] = slerp_reference([v[~core] for v in vs], t) + (
            b[~core] if space == "task-vectors" else 0)
        mags = torch.stack([(x.float() - b.float()).abs() for x in xs]).double()
        score = torch.where(m, mags, -1.0) if overlap == "max-magnitude" else m.double()
        win = score.argmax(0)
        res[core] = torch.stack(xs)[win, torch.arange(b.numel())][core]
        out[name] = (res, core, m.sum(0) >= 2)
    return out


@pytest.mark.parametrize("space", ["task-vectors", "weights"])
@pytest.mark.parametrize("overlap", ["max-magnitude", "task-order"])
def test_fused_backbone_matches_definition_and_loads(three, tmp_path, space, overlap):
    cfg = FusionConfig(space=space, overlap=overlap, **FAST)
    man = fuse(three["base"], three["tuned"], three["masks"], tmp_path / "fused", cfg,
               progress=False)
    out = Checkpoint(tmp_path / "fused")
    assert len(out.files) > 1 and (tmp_path / "fused" / "model.safetensors.index.json").exists()
    want = expected(three, space, overlap)
    n_core = n_overlap = 0
    for name, (ref, core, multi) in want.items():
        got = out.read(name).double().reshape(-1)
        assert torch.equal(got[core], ref[core]), name  # transplanted bit for bit
        assert torch.allclose(got[~core], ref[~core], rtol=1e-5, atol=1e-6), name
        n_core += int(core.sum())
        n_overlap += int(multi.sum())
    assert man["core_elements"] == n_core and man["overlap_elements"] == n_overlap > 0
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fused")
    ids = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, 7)
    assert (tmp_path / "fused" / "config.json").exists()


def test_row_granularity_and_fixed_omega(three, tmp_path):
    cfg = FusionConfig(granularity="row", omega=0.3, space="weights", **FAST)
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "f", cfg, progress=False)
    out = Checkpoint(tmp_path / "f")
    base = Checkpoint(three["base"])
    tasks = list(three["tuned"])
    name = "model.layers.0.mlp.up_proj.weight"
    m = torch.stack([MaskFile(three["masks"] / f"{t}.safetensors").read(name) for t in tasks])
    xs = [Checkpoint(three["tuned"][t]).read(name).double() for t in tasks]
    got = out.read(name).double()
    for r in range(base.info(name).shape[0]):
        nc = ~m[:, r].any(0)
        ref = slerp_reference([x[r][nc] for x in xs], [0.3, 0.3])
        assert torch.allclose(got[r][nc], ref, rtol=1e-5, atol=1e-6)


def test_triton_backend_ray_and_threads_agree(three, tmp_path, ray_local):
    cfg = FusionConfig(**FAST)
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "seq", cfg,
         InProcessExecutor(1), progress=False)
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "thr", cfg,
         InProcessExecutor(3), progress=False)
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "ray", cfg, RayExecutor(),
         progress=False)
    for f in sorted(p.name for p in (tmp_path / "seq").glob("*.safetensors")):
        assert sha256_file(tmp_path / "seq" / f) == sha256_file(tmp_path / "thr" / f) \
            == sha256_file(tmp_path / "ray" / f)
    pytest.importorskip("triton")
    # the kernels: on the GPU where there is one, else on CPU under the Triton interpreter
    man = fuse(three["base"], three["tuned"], three["masks"], tmp_path / "tri",
               FusionConfig(backend="triton", **dict(FAST, device="cuda" if CUDA else "cpu")),
               progress=False)
    assert man["backend"] == "triton" and man["device"] == ("cuda" if CUDA else "cpu")
    a, b = Checkpoint(tmp_path / "seq"), Checkpoint(tmp_path / "tri")
    for n in a.names():
        assert torch.allclose(a.read(n), b.read(n), rtol=1e-6, atol=1e-7), n


@pytest.mark.slow
def test_equals_mergekit_yaml_slerp(models, tmp_path):
    """Empty masks, two models, omega 0.5, weight space: mergekit-yaml's SLERP."""
    if not shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent)):
        pytest.skip("mergekit is not installed")
    tuned = {"a": models["a"], "b": models["b"]}
    analyze(models["base"], tuned, tmp_path / "an", AnalysisConfig(p=1e-9), progress=False)
    fuse(models["base"], tuned, tmp_path / "an" / "masks", tmp_path / "ours",
         FusionConfig(omega=0.5, space="weights", **FAST), progress=False)
    (tmp_path / "mk.yml").write_text(
        f"merge_method: slerp\nbase_model: {models['a']}\nmodels:\n  - model: {models['a']}\n"
        f"  - model: {models['b']}\nparameters:\n  t: 0.5\ndtype: float32\n")
    r = subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"),
                        str(tmp_path / "mk.yml"), str(tmp_path / "mk"), "--no-copy-tokenizer",
                        "--quiet", "--no-write-model-card"], capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, theirs = Checkpoint(tmp_path / "ours"), Checkpoint(tmp_path / "mk")
    assert set(ours.names()) == set(theirs.names())
    for n in ours.names():
        assert torch.allclose(ours.read(n), theirs.read(n), rtol=1e-5, atol=1e-7), n


def test_bad_masks_are_rejected(three, tmp_path, capsys):
    args = ["fuse", "--base", str(three["base"]), "--out", str(tmp_path / "o"), "--no-ray",
            "--quiet"]
    tuned = [a for t, p in three["tuned"].items() for a in ("--tuned", f"{t}={p}")]
    # a missing mask file
    d = tmp_path / "m1"
    shutil.copytree(three["masks"], d)
    (d / "b.safetensors").unlink()
    assert main(args + tuned + ["--masks", str(d)]) == 2
    assert "b.safetensors: mask file does not exist" in capsys.readouterr().err
    # a mask of another task under this task's name
    d = tmp_path / "m2"
    shutil.copytree(three["masks"], d)
    shutil.copy(d / "a.safetensors", d / "b.safetensors")
    assert main(args + tuned + ["--masks", str(d)]) == 2
    assert "core mask of task 'a', not 'b'" in capsys.readouterr().err
    # masks made for another model
    other = tmp_path / "other"
    from helpers import make_llama
    make_llama(other / "base", hidden=48)
    ob = perturb(other / "base", other / "b", seed=1)
    analyze(other / "base", {"a": ob, "b": ob, "c": ob}, other / "an", progress=False)
    assert main(args + tuned + ["--masks", str(other / "an" / "masks")]) == 2
    assert "made for another model" in capsys.readouterr().err
    assert main(args + tuned + ["--masks", str(three["masks"]), "--omega", "1.5"]) == 2
    assert "field 'fusion.omega'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_threads_and_cache_budget_give_the_same_bytes(three, tmp_path):
    """Multi-chunk tensors (1,024-element chunks) fused on 1 thread and on 3 give
    byte-identical files: the Gram partials are summed in chunk order whatever finishes first.
    The numba loops map every chunk again for the apply pass; the torch path (as the Triton
    one) keeps a tensor's chunks in memory between its passes, within ``cache_bytes``: kept on
    1 thread, with no cache (every such tensor read twice) on 3, the same bytes."""
    cfg = dict(FAST, space="task-vectors")
    for backend in ("numba", "torch"):
        a = fuse(three["base"], three["tuned"], three["masks"], tmp_path / backend / "a",
                 FusionConfig(**cfg, backend=backend), InProcessExecutor(1), progress=False)
        b = fuse(three["base"], three["tuned"], three["masks"], tmp_path / backend / "b",
                 FusionConfig(**cfg, backend=backend, cache_bytes=0), InProcessExecutor(3),
                 progress=False)
        assert a["backend"] == b["backend"] == backend
        assert len([f for f in a["outputs"] if f.endswith(".safetensors")]) > 1
        assert a["outputs"] == b["outputs"] and a["per_tensor"] == b["per_tensor"], backend


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_the_debug_log_splits_the_tasks_time(three, tmp_path, monkeypatch, caplog, backend):
    """The line gpu_check prints for fusion on many cores: the tasks' time summed over the
    threads, split into the compiled loops (or kernels), separate reads, writes and the rest
    (the tasks' own Python, waits for the GIL and for locks). Planted 5 ms waits in each write,
    loop and read call land in their own shares; the shares add up to no more than the tasks'
    time, and that to no more than the threads' time."""
    import logging
    import re
    import sys
    import threading
    import time

    mod = sys.modules["cpift_dist.fusion.fuse"]
    planted = {"loops": 0, "reads": 0, "writes": 0}

    def slowed(fn, what):
        def call(*args, **kwargs):
            if threading.current_thread().name.startswith("fuse-"):  # in the tasks
                planted[what] += 1
                time.sleep(0.005)
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(PositionalWriter, "_pwrite", slowed(PositionalWriter._pwrite, "writes"))
    if backend == "numba":  # runs: two compiled calls each, reading their own inputs
        for name in ("gram_run", "apply_run"):
            monkeypatch.setattr(mod.fused, name, slowed(getattr(mod.fused, name), "loops"))
    else:  # a chunk at a time: read into a buffer, then the torch passes
        for name in ("gram_torch", "apply_torch"):
            monkeypatch.setattr(mod, name, slowed(getattr(mod, name), "loops"))
        monkeypatch.setattr(mod._ShardFuser, "_read", slowed(mod._ShardFuser._read, "reads"))
    caplog.set_level(logging.DEBUG, logger="cpift_dist.fusion.fuse")
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "out",
         FusionConfig(**FAST, space="weights", backend=backend), InProcessExecutor(2),
         progress=False)
    msgs = [r.getMessage() for r in caplog.records]
    [work] = [float(m.group(1)) for x in msgs if (m := re.search(r"work (\d+\.\d\d) s", x))]
    [line] = [x for x in msgs if x.startswith("fuse tasks: ")]
    m = re.fullmatch(r"fuse tasks: (\S+) s on 2 thread\(s\) \(\d+% of the work's time\): "
                     r"compiled loops and kernels (\S+) s, reads (\S+) s, writes (\S+) s, the "
                     r"rest \(Python, waits for the GIL and for locks\) (\S+) s", line)
    busy, loops, reads, writes, rest = map(float, m.groups())
    assert planted["loops"] and planted["writes"] and (planted["reads"] or backend == "numba")
    for share, what in ((loops, "loops"), (reads, "reads"), (writes, "writes")):
        assert share >= 0.005 * planted[what] - 0.01, (what, share, planted)
    assert rest >= -0.01 and loops + reads + writes <= busy + 0.02
    assert busy <= 2 * work + 0.02


@pytest.mark.parametrize("space,threads", [("task-vectors", 1), ("weights", 2)])
def test_cold_inputs_are_asked_ahead_by_one_thread_and_fuse_the_same(three, tmp_path,
                                                                     monkeypatch, space,
                                                                     threads):
    """Where the page cache lacks the inputs, one read-ahead thread asks the kernel for every
    chunk of every tuned checkpoint once, in the order of the chunks' first reads (on one
    working thread: exactly that order), never more than ``READ_AHEAD`` elements per working
    thread beyond the chunks begun; the base only where it is read (task vectors, or a chunk
    holding a core element); the working threads ask for nothing. A warm cache asks for
    nothing; the output is the same bytes."""
    import importlib

    from cpift_dist.io.checkpoint import CheckpointReader

    fuse_module = importlib.import_module("cpift_dist.fusion.fuse")
    read_ahead = 700
    monkeypatch.setattr(fuse_module, "READ_AHEAD", read_ahead)
    events, lock = record_read_ahead(monkeypatch)
    real_begin = fuse_module._ShardFuser._begin

    def begin(self, c):
        with lock:
            events.append(("first read", c.name, (c.row_start, c.row_stop)))
        real_begin(self, c)

    monkeypatch.setattr(fuse_module._ShardFuser, "_begin", begin)
    mask_dir = three["masks"]
    if space == "weights":  # small cores: chunks without any, whose base is not read
        analyze(three["base"], three["tuned"], tmp_path / "an", AnalysisConfig(p=0.002),
                progress=False)
        mask_dir = tmp_path / "an" / "masks"
    outs = {}
    for cold in (False, True):
        events.clear()
        monkeypatch.setattr(CheckpointReader, "cached", lambda self, points, c=cold: not c)
        outs[cold] = fuse(three["base"], three["tuned"], mask_dir, tmp_path / str(cold),
                          FusionConfig(**FAST, space=space), InProcessExecutor(threads),
                          progress=False)
        assert any(e[0] == "ask" for e in events) == cold
    assert outs[False]["outputs"] == outs[True]["outputs"]
    assert len(outs[True]["outputs"]) > 2  # several shards, one read-ahead across them
    asks = [e for e in events if e[0] == "ask"]
    assert {e[4] for e in asks} == {"read-ahead"}
    ck = Checkpoint(three["base"])
    fused_names = [n for n in ck.names()
                   if ck.info(n).dtype.is_floating_point and n not in ck.tied]
    first = str(Checkpoint(three["tuned"]["a"]).path)
    asked_order = [(e[2], e[3]) for e in asks if e[1] == first]
    read_order = [(e[1], e[2]) for e in events if e[0] == "first read"]
    assert sorted(asked_order) == sorted(read_order)
    assert any(ck.info(n).rows > 1 and (b - a) < ck.info(n).rows for n, (a, b) in read_order)
    if threads == 1:
        assert asked_order == read_order
    for path in three["tuned"].values():  # every chunk of every tuned model, asked once
        got = [(n, r) for _, p, n, r, _ in asks if p == str(Checkpoint(path).path)]
        assert got == asked_order
        rows = {n: set() for n in fused_names}
        for n, (a, b) in got:
            rows[n].update(range(a, b))
        assert all(rows[n] == set(range(ck.info(n).rows)) for n in fused_names)
    begun = asked = 0  # elements: never more than the budget asked beyond those begun
    for e in events:
        if e[0] == "begin":
            begun += e[1]
        elif e[0] == "ask" and e[1] == first:
            assert asked - begun < read_ahead * threads
            asked += (e[3][1] - e[3][0]) * ck.info(e[2]).row_numel
    base_rows = {(n, r) for _, p, n, r, _ in asks if p == str(ck.path)}
    masks = [MaskFile(mask_dir / f"{t}.safetensors") for t in three["tuned"]]
    want = set()
    for n, (a, b) in asked_order:
        row = ck.info(n).row_numel
        if space == "task-vectors" or any(m.read(n).reshape(-1)[a * row:b * row].any()
                                          for m in masks):
            want.add((n, (a, b)))
    assert base_rows == want
    if space == "weights":
        assert len(want) < len(asked_order)  # some chunks hold no core


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU path is tested above)")
@pytest.mark.parametrize("space", ["task-vectors", "weights"])
def test_cuda_fusion_threads_cache_and_cpu_agree(three, tmp_path, space):
    """On the GPU (page-locked buffers, a stream per thread): 1 thread with the chunk cache and
    3 threads without give byte-identical files, and they equal the CPU loops' output wherever
    the float64 Gram sums (summed in another order) fold to the same float32 coefficients."""
    cfg = dict(FAST, space=space, device="cuda")
    a = fuse(three["base"], three["tuned"], three["masks"], tmp_path / "a",
             FusionConfig(**cfg), InProcessExecutor(1), progress=False)
    b = fuse(three["base"], three["tuned"], three["masks"], tmp_path / "b",
             FusionConfig(**cfg, cache_bytes=0), InProcessExecutor(3), progress=False)
    assert a["backend"] == "triton" and a["device"] == "cuda"
    assert a["outputs"] == b["outputs"] and a["per_tensor"] == b["per_tensor"]
    c = fuse(three["base"], three["tuned"], three["masks"], tmp_path / "c",
             FusionConfig(**dict(cfg, device="cpu")), InProcessExecutor(2), progress=False)
    assert c["per_tensor"] == a["per_tensor"]
    x, y = Checkpoint(tmp_path / "a"), Checkpoint(tmp_path / "c")
    differ = total = 0
    for n in x.names():
        assert torch.allclose(x.read(n), y.read(n), rtol=1e-6, atol=1e-7), n
        differ += int((x.read(n) != y.read(n)).sum())
        total += x.info(n).numel
    assert differ <= 1e-3 * total, (differ, total)


def test_the_writer_hashes_in_order_writes_from_memory_and_the_rest_from_the_file(
        tmp_path, monkeypatch):
    """Writes that extend the hashed prefix are hashed from the caller's buffer (nothing read
    back); writes ahead of it are read back by the background hasher; any mix of the two, from
    several threads, gives the file's BLAKE3; a failed in-memory update fails close()."""
    import random
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from cpift_dist.io import safetensors_stream

    read_back = []
    real = safetensors_stream.hash_update
    monkeypatch.setattr(safetensors_stream, "hash_update",
                        lambda h, fd, a, b: (read_back.append(b - a), real(h, fd, a, b)))
    entries = {"x": (torch.float32, (300, 64))}
    x = torch.randn(300, 64)
    rows = [(r, r + 10) for r in range(0, 300, 10)]

    def write_all(name, order, threads=1):
        read_back.clear()
        w = PositionalWriter(tmp_path / name, entries, hash_block=1000)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda ab: w.write("x", x[ab[0]:ab[1]], ab[0] * 64 * 4), order))
        digest = w.close()
        assert digest == blake3((tmp_path / name).read_bytes()).hexdigest(), name
        return sum(read_back)

    assert write_all("in-order.safetensors", rows) == 0
    assert write_all("reversed.safetensors", rows[::-1]) == 300 * 64 * 4 - 10 * 64 * 4
    for seed in range(5):
        order = rows[:]
        random.Random(seed).shuffle(order)
        write_all(f"mixed{seed}.safetensors", order, threads=4)

    class Failing:
        def __init__(self):
            self.h, self.n = blake3(), 0

        def update(self, data):
            self.n += 1
            if self.n == 3:
                raise MemoryError("hash broke")
            self.h.update(data)

    monkeypatch.setattr(safetensors_stream, "file_hash", Failing)
    w = PositionalWriter(tmp_path / "failing.safetensors", entries)
    w.write("x", x[:10], 0)
    with pytest.raises(MemoryError):
        w.write("x", x[10:], 10 * 64 * 4)
    with pytest.raises(Exception, match="hashing failed .hash broke"):
        w.close()

    # abort() after a writer died mid-hash (its turn never given back, as an asynchronous
    # KeyboardInterrupt could leave it) stops the hasher at once instead of waiting for it
    monkeypatch.setattr(safetensors_stream, "file_hash", blake3)
    w = PositionalWriter(tmp_path / "aborted.safetensors", entries)
    w.write("x", x[10:20], 10 * 64 * 4)  # ahead of the prefix: left to the hasher
    with w._cv:
        w._hashing = True
    done = threading.Event()
    threading.Thread(target=lambda: (w.abort(), done.set()), daemon=True).start()
    assert done.wait(10), "abort() waited for a hash turn that never ends"


def test_positional_writer_any_order_threads_and_refusals(tmp_path):
    """Pieces written out of order from several threads give the file safetensors reads, and
    the digest computed as they were written (BLAKE3) equals the file's; a double write and a
    missing piece are refused by name."""
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file
    entries = {"x": (torch.bfloat16, (64, 40)), "y": (torch.float32, (5,)),
               "z": (torch.bfloat16, (64, 40))}
    x = torch.randn(64, 40).bfloat16()
    w = PositionalWriter(tmp_path / "f.safetensors", entries, {"format": "pt"}, hash_block=256)
    pieces = [(r, r + 4) for r in range(0, 64, 4)][::-1]  # last rows first
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda ab: w.write("x", x[ab[0]:ab[1]], ab[0] * 40 * 2), pieces))
    w.write("y", torch.arange(5.0))
    w.copy("x", "z")
    digest = w.close()
    got = load_file(tmp_path / "f.safetensors")
    assert torch.equal(got["x"], x) and torch.equal(got["z"], x)
    assert torch.equal(got["y"], torch.arange(5.0))
    assert digest == blake3((tmp_path / "f.safetensors").read_bytes()).hexdigest()
    w = PositionalWriter(tmp_path / "g.safetensors", entries)
    w.write("y", torch.arange(5.0))
    with pytest.raises(Exception, match="written twice"):
        w.write("y", torch.arange(5.0))
    with pytest.raises(Exception, match="outside"):
        w.write("y", torch.arange(6.0))
    with pytest.raises(Exception, match="dtype"):
        w.write("x", torch.zeros(3))
    with pytest.raises(Exception, match="'x' was not written whole"):
        w.close()
    # a range over consecutive tensors (the fuser's runs), refused outside the tensors' data
    w = PositionalWriter(tmp_path / "h.safetensors", entries)
    y, z = torch.arange(5.0), torch.randn(64, 40).bfloat16()
    w.write("x", x)
    both = np.concatenate([y.view(torch.uint8).numpy(), z.reshape(-1).view(torch.uint8).numpy()])
    w.write_range(w.offsets["y"], both)
    with pytest.raises(Exception, match="written twice"):
        w.write_range(w.offsets["y"], both[:4])
    for start in (w.data_start - 1, w.size - 3):
        with pytest.raises(Exception, match="outside the tensors' data"):
            w.write_range(start, both[:4])
    w.close()
    got = load_file(tmp_path / "h.safetensors")
    assert torch.equal(got["y"], y) and torch.equal(got["z"], z) and torch.equal(got["x"], x)


def test_connected_groups_and_tau():
    tasks = ["a", "b", "c", "d", "e"]
    J = np.eye(5)
    J[0, 1] = J[1, 0] = 0.2   # a-b
    J[1, 2] = J[2, 1] = 0.1   # b-c exactly tau: linked
    J[3, 4] = J[4, 3] = 0.05  # d-e below tau
    assert connected_groups(tasks, J.tolist(), 0.1) == [["a", "b", "c"], ["d"], ["e"]]
    assert connected_groups(tasks, J.tolist(), 0.0) == [tasks]
    assert connected_groups(tasks, J.tolist(), 0.15) == [["a", "b"], ["c"], ["d"], ["e"]]


def test_group_outputs_orders_and_plots(three, tmp_path, capsys):
    jac = json.loads((three["analysis"] / "overlap.json").read_text())["jaccard"]
    tau = max(v for i, row in enumerate(jac) for j, v in enumerate(row) if i != j)  # top pair
    r1 = group(three["analysis"], GroupingConfig(tau=tau, order="random", seed=1),
               tmp_path / "g1.json")
    r2 = group(three["analysis"], GroupingConfig(tau=tau, order="random", seed=1),
               tmp_path / "g2.json")
    assert r1["groups"] == r2["groups"] and sorted(map(len, r1["groups"])) == [1, 2]
    rc = group(three["analysis"], GroupingConfig(tau=tau, order="core-size"), tmp_path / "g3.json")
    sizes = [s["core_union"] for s in rc["stages"]]
    assert sizes == sorted(sizes, reverse=True)
    # a two-task group's core union is |A| + |B| - |A & B| from overlap.json
    ov = json.loads((three["analysis"] / "overlap.json").read_text())
    pair = next(g for g in rc["stages"] if len(g["tasks"]) == 2)
    i, j = (ov["tasks"].index(t) for t in pair["tasks"])
    assert pair["core_union"] == ov["union"][i][j]
    saved = json.loads((tmp_path / "g1.json").read_text())
    assert saved["tau"] == tau and saved["seed"] == 1 and saved["order"] == "random"
    assert saved["jaccard"] == jac
    for suffix in (".jaccard.png", ".core-location.png"):
        png = (tmp_path / "g1.json").with_suffix(suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert main(["group", "--analysis", str(three["analysis"]), "--tau", "2",
                 "--out", str(tmp_path / "bad.json")]) == 2
    assert "field 'tau'" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_fusion_reads_odd_layouts_from_file_maps_exactly(tmp_path):
    """The numba loops read each chunk straight from the files' maps. Tensors stored at odd
    offsets (safetensors does not pad: a 3-byte uint8 buffer first), a float16 tensor (widened)
    and weight space without any core element (the base is then not read at all), or with
    competing cores (their values compared with the base), give exactly
    the loops' result on the same values held in memory, in both spaces."""
    from cpift_dist.analysis.masks import MaskFile as Masks
    from cpift_dist.fusion import fused
    from cpift_dist.fusion.slerp import fold_coefficients

    shapes = {"a.buffer": (torch.uint8, (3,)), "b.weight": (torch.bfloat16, (7, 5)),
              "c.weight": (torch.float16, (4, 6)), "d.weight": (torch.float32, (5, 3))}

    def write(path: Path, seed: int, base=None) -> dict:
        g = torch.Generator().manual_seed(seed)
        values = {}
        for name, (dtype, shape) in shapes.items():
            if dtype == torch.uint8:
                values[name] = torch.arange(3, dtype=torch.uint8)
            elif base is None:
                values[name] = torch.randn(shape, generator=g).to(dtype)
            else:
                step = 0.1 * torch.randn(shape, generator=g)
                values[name] = (base[name].float() + step).to(dtype)
        path.mkdir()
        w = PositionalWriter(path / "model.safetensors", shapes, {"format": "pt"})
        for name, v in values.items():
            w.write(name, v)
        w.close()
        return values

    b = write(tmp_path / "base", 0)
    tuned = {t: tmp_path / t for t in ("x", "y", "z")}
    vals = {t: write(p, i + 1, b) for i, (t, p) in enumerate(tuned.items())}
    ck = Checkpoint(tmp_path / "base")
    assert [ck.info(n).offset % 2 for n in ("b.weight", "c.weight")] == [1, 1]  # odd offsets
    for p, space in ((0.1, "task-vectors"), (0.5, "weights"), (1e-12, "weights")):
        d = tmp_path / f"{space}-{p}"
        analyze(tmp_path / "base", tuned, d / "an", AnalysisConfig(p=p), progress=False)
        cfg = FusionConfig(space=space, device="cpu")
        man = fuse(tmp_path / "base", tuned, d / "an" / "masks", d / "fu", cfg, progress=False)
        assert man["backend"] == "numba"
        out = Checkpoint(d / "fu")
        masks = [Masks(d / "an" / "masks" / f"{t}.safetensors") for t in tuned]
        assert (man["overlap_elements"] > 0) == (p > 0.01)  # cores that compete
        for name, (dtype, _) in shapes.items():
            got = out.read(name)
            if dtype == torch.uint8:
                assert torch.equal(got, b[name])
                continue
            x = torch.stack([vals[t][name].reshape(-1) for t in tuned])
            packed = np.stack([m.read_packed(name) for m in masks])
            tv = space == "task-vectors"
            coef = fold_coefficients(fused.gram_chunk(b[name].reshape(-1), x, packed, 1, tv),
                                     fold_weights(3, "uniform"))
            want, _, _ = fused.apply_chunk(b[name].reshape(-1), x, packed, coef, tv,
                                           "max-magnitude", dtype)
            assert got.dtype == dtype and torch.equal(got.reshape(-1), want), (space, p, name)


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_runs_read_into_buffers_fuse_the_bytes_of_the_maps(three, bf16_models, tmp_path,
                                                          monkeypatch, granularity, dtype):
    """``read: pread`` (the default) fuses whole chunks in runs read into per-thread buffers,
    and a multi-chunk tensor's chunks in groups, each group read chunk by chunk into one buffer
    by one compiled call per pass; ``read: map`` goes chunk by chunk through the files' maps.
    Same files and counts, in both spaces, on 1 and 3 threads; runs hold several chunks
    (several tensors), groups several chunks of a tensor."""
    import importlib

    from cpift_dist.fusion import fused

    if dtype == "bf16":
        m = bf16_models
        tuned = {"a": m["a"], "b": m["b"]}
        an = tmp_path / "an"
        analyze(m["base"], tuned, an, AnalysisConfig(p=0.05), progress=False)
        base, masks = m["base"], an / "masks"
    else:
        base, tuned, masks = three["base"], three["tuned"], three["masks"]
    runs = []
    real_gram, real_apply = fused.gram_run, fused.apply_run

    def gram_run(fds, *args):
        if fds.shape[0]:  # (warm() calls it with none)
            runs.append(("gram", fds.shape[0]))
        return real_gram(fds, *args)

    def apply_run(read, fds, *args):
        if fds.shape[0]:
            runs.append(("apply, read" if read else "apply", fds.shape[0]))
        return real_apply(read, fds, *args)

    loops = importlib.import_module("cpift_dist.fusion.fuse").fused
    monkeypatch.setattr(loops, "gram_run", gram_run)
    monkeypatch.setattr(loops, "apply_run", apply_run)
    for space in ("task-vectors", "weights"):
        cfg = dict(FAST, space=space, granularity=granularity,
                   max_shard_bytes=1 << 30)  # one file: a run stops where bytes do not follow
        want = fuse(base, tuned, masks, tmp_path / space / "map",
                    FusionConfig(**cfg, read="map"), InProcessExecutor(1), progress=False)
        assert not runs
        for threads in (1, 3):
            got = fuse(base, tuned, masks, tmp_path / space / str(threads),
                       FusionConfig(**cfg), InProcessExecutor(threads), progress=False)
            assert got["outputs"] == want["outputs"], (space, threads)
            assert got["per_tensor"] == want["per_tensor"]
            assert got["core_elements"] == want["core_elements"] > 0
        kinds = {k for k, _ in runs}
        assert max(n for k, n in runs if k == "apply") > 1  # runs of several small tensors
        if granularity == "tensor":  # tensors of several 1024-element chunks: a task reads
            assert kinds == {"gram", "apply", "apply, read"}  # several in each pass
            assert max(n for k, n in runs if k == "apply, read") > 1
        else:  # every chunk is whole: one angle per row
            assert kinds == {"gram", "apply"}
        runs.clear()


def test_one_fuse_thread_writes_in_file_order_so_nothing_is_read_back_to_hash(
        three, tmp_path, monkeypatch):
    """The shard's tasks are queued in file order (a run of small tensors is queued before the
    multi-chunk tensor after it, not after its Gram pass): on one thread every write extends
    the hashed prefix and is hashed from memory, nothing read back from the file. The digests
    are the files' BLAKE3 either way."""
    from cpift_dist.io import safetensors_stream

    read_back = []
    real = safetensors_stream.hash_update
    monkeypatch.setattr(safetensors_stream, "hash_update",
                        lambda h, fd, a, b: (read_back.append(b - a), real(h, fd, a, b)))
    for space in ("task-vectors", "weights"):
        cfg = FusionConfig(**dict(FAST, space=space, max_shard_bytes=1 << 30))
        out = tmp_path / space
        man = fuse(three["base"], three["tuned"], three["masks"], out, cfg,
                   InProcessExecutor(1), progress=False)
        assert read_back == [], space
        names = Checkpoint(three["base"]).names()
        assert any(Checkpoint(three["base"]).info(n).numel > 1024 for n in names)  # multi-chunk
        for f, digest in man["outputs"].items():
            if f.endswith(".safetensors"):
                assert digest["blake3"] == blake3((out / f).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def mixed(mixed_models, tmp_path_factory):
    """A bf16 base with fine-tunes in fp32, in bf16 with an fp32 MLP, and in bf16; masks."""
    d = tmp_path_factory.mktemp("mixed")
    tuned = {t: mixed_models[t] for t in ("fp32", "mlp", "bf16")}
    analyze(mixed_models["base"], tuned, d / "analysis", AnalysisConfig(p=0.05),
            progress=False)
    return {"base": mixed_models["base"], "tuned": tuned, "masks": d / "analysis" / "masks"}


def check_fuses_widened(mixed, tmp_path, tasks, variants):
    """Fuses ``tasks`` of ``mixed`` with each of ``variants`` (FusionConfig fields) on 1 and 3
    threads, in both spaces, and checks every output against the float64 definition: the
    widened parameters in float32 (core bit for bit), the others in bf16; the config says
    float32 and transformers loads the values as written. With ``widened_dtype: base`` every
    tensor is the float32 output's rounded to the base's dtype, bit for bit."""
    from transformers import AutoModelForCausalLM

    three = dict(mixed, tuned={t: mixed["tuned"][t] for t in tasks})
    base = Checkpoint(mixed["base"])
    wide = {n for n in base.names() if any(
        Checkpoint(three["tuned"][t]).info(n).dtype != torch.bfloat16 for t in tasks)}
    assert wide and (len(tasks) == 3) == (wide == set(base.names()))
    for space in ("task-vectors", "weights"):
        want = expected(three, space, "max-magnitude")
        for kind, extra in variants.items():
            for threads in (1, 3):
                out = tmp_path / f"{space}-{kind}-{threads}"
                fuse(three["base"], three["tuned"], three["masks"], out,
                     FusionConfig(space=space, **dict(FAST, **extra)),
                     InProcessExecutor(threads), progress=False)
                ck = Checkpoint(out)
                for name, (ref, core, _) in want.items():
                    dtype = ck.info(name).dtype
                    assert dtype == (torch.float32 if name in wide else torch.bfloat16), name
                    got = ck.read(name).double().reshape(-1)
                    assert torch.equal(got[core], ref[core]), (kind, name)
                    tol = dict(rtol=1e-5, atol=1e-6) if name in wide else dict(rtol=2 ** -7,
                                                                              atol=1e-6)
                    assert torch.allclose(got[~core], ref[~core], **tol), (kind, name)
                # written in the base's dtype instead: the same float32 values, rounded
                narrow = tmp_path / f"{space}-{kind}-{threads}-base"
                fuse(three["base"], three["tuned"], three["masks"], narrow,
                     FusionConfig(space=space, widened_dtype="base", **dict(FAST, **extra)),
                     InProcessExecutor(threads), progress=False)
                nk = Checkpoint(narrow)
                for name in want:
                    got = nk.read(name)
                    assert got.dtype == base.info(name).dtype, name
                    rounded = ck.read(name).to(got.dtype)
                    if kind != "triton":
                        assert torch.equal(got, rounded), (kind, name)
                    else:  # Triton's interpreter truncates float32 to bf16 (a GPU's store
                        # rounds to nearest even: the CUDA twin below checks it exactly)
                        step = got.view(torch.int16).int() - rounded.view(torch.int16).int()
                        assert step.abs().max() <= 1, (kind, name)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert json.loads((narrow / "config.json").read_text()).get("dtype") != "float32"
    man = json.loads((narrow / "manifest.json").read_text())
    assert man["widened"] == {"parameters": sorted(wide), "written_in": "base"}
    model = AutoModelForCausalLM.from_pretrained(out)
    name = sorted(wide)[0]
    assert torch.equal(model.state_dict()[name], ck.read(name))


@pytest.mark.parametrize("tasks", [("mlp", "bf16"), ("fp32", "mlp", "bf16")])
def test_fine_tunes_in_another_dtype_fuse_in_float32(mixed, tmp_path, tasks):
    """A parameter whose checkpoints differ in dtype is fused in float32 and written in
    float32 (core values of an fp32 fine-tune transplanted bit for bit); the others keep the
    base's bf16. The same definition on every CPU path: the compiled loops reading runs (only
    the uniform tensors go in runs) and maps, the torch path, and the Triton kernels
    (interpreted on CPU, one launch at a time), on 1 and 3 threads."""
    variants = {"runs": dict(), "maps": dict(read="map"), "torch": dict(backend="torch")}
    if len(tasks) == 3 and importlib.util.find_spec("triton"):  # once for the slower path
        variants["triton"] = dict(backend="triton")
    check_fuses_widened(mixed, tmp_path, tasks, variants)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU paths are tested above)")
def test_fine_tunes_in_another_dtype_fuse_in_float32_on_cuda(mixed, tmp_path):
    """The same on the GPU: widened in the page-locked buffers, the kernels in float32."""
    check_fuses_widened(mixed, tmp_path, ("mlp", "bf16"), {"cuda": dict(device="cuda")})


@pytest.mark.parametrize("which", ["tuned", "mask"])
def test_a_run_of_a_file_truncated_after_opening_names_it(three, tmp_path, monkeypatch, which):
    """A run's compiled read that comes short (a tuned checkpoint or a mask file truncated
    after the fuser opened it) is an error naming that file and tensor; no output is left."""
    import importlib

    from cpift_dist.errors import CheckpointError
    from cpift_dist.io.checkpoint import CheckpointReader

    fuse_module = importlib.import_module("cpift_dist.fusion.fuse")
    d = tmp_path / "in"
    tuned = dict(three["tuned"])
    shutil.copytree(tuned["b"], d / "b")
    shutil.copytree(three["masks"], d / "masks")
    tuned["b"] = d / "b"
    ck = Checkpoint(d / "b")
    first = next(n for n in ck.names() if ck.info(n).dtype.is_floating_point)
    if which == "tuned":
        path, cut, error = ck.info(first).file, ck.info(first).offset + 8, CheckpointError
    else:
        path = d / "masks" / "b.safetensors"
        cut, error = MaskFile(path)._offsets[first] + 1, MaskError
    real = fuse_module.fused.gram_run

    def gram_run(*args):
        if args[0].shape[0] and path.stat().st_size > cut:  # the fuser holds the files open
            with open(path, "r+b") as f:
                f.truncate(cut)
        return real(*args)

    monkeypatch.setattr(fuse_module.fused, "gram_run", gram_run)
    monkeypatch.setattr(CheckpointReader, "cached", lambda self, points: True)  # runs, not maps
    with pytest.raises(error, match=f"{path.name}.*truncated.*{first!r}"):
        fuse(three["base"], tuned, d / "masks", tmp_path / "out",
             FusionConfig(**dict(FAST, max_shard_bytes=1 << 30)), InProcessExecutor(1),
             progress=False)
    assert not (tmp_path / "out").exists()


def _with_empty_tensor(src: Path, dst: Path) -> Path:
    """A copy of checkpoint ``src`` whose first shard also holds an empty float tensor."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    first = sorted(dst.glob("*.safetensors"))[0]
    sd = load_file(first)
    sd["model.empty_scale"] = torch.zeros(0)
    save_file(sd, first, metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.exists():
        j = json.loads(index.read_text())
        j["weight_map"]["model.empty_scale"] = first.name
        index.write_text(json.dumps(j))
    return dst


def test_an_empty_float_tensor_is_analysed_and_fused(three, tmp_path):
    """Some exports store zero-size float tensors. The fuser's page-cache probe once planned
    every float tensor's chunks again and failed on one (IndexError, no file named): now the
    empty tensor is written with its shape, and every other tensor equals the fusion of the
    same models without it."""
    from safetensors.torch import load_file
    base = _with_empty_tensor(three["base"], tmp_path / "base")
    tuned = {t: _with_empty_tensor(three["tuned"][t], tmp_path / t) for t in ("a", "b")}
    analyze(base, tuned, tmp_path / "analysis", AnalysisConfig(p=0.05), progress=False)
    cfg = FusionConfig(**FAST)
    fuse(base, tuned, tmp_path / "analysis" / "masks", tmp_path / "out", cfg, progress=False)
    fuse(three["base"], {t: three["tuned"][t] for t in tuned}, three["masks"],
         tmp_path / "ref", cfg, progress=False)

    def tensors(d):
        return {k: v for f in sorted(d.glob("*.safetensors")) for k, v in load_file(f).items()}
    got, want = tensors(tmp_path / "out"), tensors(tmp_path / "ref")
    assert got.pop("model.empty_scale").shape == (0,)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- resuming an interrupted fuse ---------------------------------------------------------------
def _fuse_args(three, out: Path, *extra: str) -> list[str]:
    return ["fuse", "--no-ray", "--quiet", "--base", str(three["base"]), "--masks",
            str(three["masks"]), "--out", str(out), "--device", "cpu", "--num-cpus", "1",
            *[a for t, p in three["tuned"].items() for a in ("--tuned", f"{t}={p}")],
            "fusion.max_shard_bytes=30000", "fusion.chunk_elements=1024", *extra]


def _weights(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.safetensors"))}


def _interrupt_after_first_shard(monkeypatch):
    """Ctrl-C on the fuse's working thread once the first output shard is journaled (one
    thread: the first shard's tasks all run before the second's)."""
    import importlib

    fuse_mod = importlib.import_module("cpift_dist.fusion.fuse")

    task, seen = fuse_mod._ShardFuser._task, []

    def interrupted(self, fn, args):
        seen.append(self.shard.file)
        if self.shard.file != seen[0]:
            journal = Path(self.ctx.out) / fuse_mod.RESUME_DIR / "shards.jsonl"
            for _ in range(1000):
                if journal.is_file() and journal.read_text().strip():
                    break
                time.sleep(0.01)
            raise KeyboardInterrupt
        return task(self, fn, args)

    monkeypatch.setattr(fuse_mod._ShardFuser, "_task", interrupted)


def test_an_interrupted_fuse_resumes_from_its_finished_shards(three, tmp_path, monkeypatch,
                                                              capsys):
    """Ctrl-C after the first shard: it is kept in the locked partial output and the same
    command resumes from it without fusing it again; the output is byte for byte an
    uninterrupted fuse's. A kept shard whose bytes changed, or a rerun with other settings,
    fuses again from nothing."""
    from cpift_dist.io.atomic import partial_dir

    assert main(_fuse_args(three, tmp_path / "clean")) == 0
    clean = _weights(tmp_path / "clean")
    assert len(clean) > 2
    out, part = tmp_path / "o", partial_dir(tmp_path / "o")
    with monkeypatch.context() as m:
        _interrupt_after_first_shard(m)
        capsys.readouterr()
        assert main(_fuse_args(three, out)) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"kept in {part}" in err and "no partial" not in err, err
    assert not out.exists()
    first = min(clean)
    assert sorted(p.name for p in part.glob("*.safetensors"))[0] == first
    assert (part / first).read_bytes() == clean[first]
    stamp = (part / first).stat().st_mtime_ns
    # resumed with the shard size spelt as a size: the same config (ByteSize stores bytes)
    assert main(_fuse_args(three, out, "fusion.max_shard_bytes=30kB")) == 0
    assert "(1 of the shards kept from an interrupted run)" in " ".join(
        capsys.readouterr().out.split())  # rich wraps the line
    assert _weights(out) == clean and (out / first).stat().st_mtime_ns == stamp
    man = json.loads((out / "manifest.json").read_text())
    assert man["resumed_shards"] == 1 and not part.exists()
    assert man["outputs"] == json.loads((tmp_path / "clean" / "manifest.json").read_text()
                                        )["outputs"]
    assert not (out / ".resume").exists() and main(["verify", str(out)]) == 0
    # a kept shard changed on disk: fused again
    with monkeypatch.context() as m:
        _interrupt_after_first_shard(m)
        assert main(_fuse_args(three, tmp_path / "o2")) == 130
    data = bytearray((partial_dir(tmp_path / "o2") / first).read_bytes())
    data[-1] ^= 1
    (partial_dir(tmp_path / "o2") / first).write_bytes(bytes(data))
    assert main(_fuse_args(three, tmp_path / "o2")) == 0
    assert json.loads((tmp_path / "o2" / "manifest.json").read_text())["resumed_shards"] == 0
    assert _weights(tmp_path / "o2") == clean
    # other settings (omega): the partial output is cleared, nothing is kept
    with monkeypatch.context() as m:
        _interrupt_after_first_shard(m)
        assert main(_fuse_args(three, tmp_path / "o3")) == 130
    assert main(_fuse_args(three, tmp_path / "o3", "fusion.omega=0.3")) == 0
    assert main(_fuse_args(three, tmp_path / "c3", "fusion.omega=0.3")) == 0
    assert json.loads((tmp_path / "o3" / "manifest.json").read_text())["resumed_shards"] == 0
    assert _weights(tmp_path / "o3") == _weights(tmp_path / "c3") != clean


def test_a_resumed_fuse_needs_room_for_the_shards_it_has_left(three, tmp_path, monkeypatch,
                                                               capsys):
    """The room check counts only the shards still to write: with exactly their bytes free, a
    resume goes ahead where a fresh fuse is refused (and the kept shards stay kept)."""
    import collections

    from cpift_dist.io.atomic import partial_dir

    assert main(_fuse_args(three, tmp_path / "clean")) == 0
    data = {f: len(b) - 8 - int.from_bytes(b[:8], "little")  # the tensors' bytes
            for f, b in _weights(tmp_path / "clean").items()}
    rest = sum(data.values()) - data[min(data)]
    with monkeypatch.context() as m:
        _interrupt_after_first_shard(m)
        assert main(_fuse_args(three, tmp_path / "o")) == 130
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - rest, rest))
    capsys.readouterr()
    assert main(_fuse_args(three, tmp_path / "fresh")) == 2
    assert "the fused backbone needs" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda path: usage(10**9, 10**9 - rest + 1, rest - 1))
    assert main(_fuse_args(three, tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert (f"the fused backbone ({len(data) - 1} of its {len(data)} shards still to write) "
            "needs") in err, err
    assert f"kept in {partial_dir(tmp_path / 'o')}" in err
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - rest, rest))
    assert main(_fuse_args(three, tmp_path / "o")) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["resumed_shards"] == 1
    assert _weights(tmp_path / "o") == _weights(tmp_path / "clean")


def test_a_fuse_killed_after_a_shard_resumes_on_ray_and_in_a_new_process(three, tmp_path,
                                                                        ray_local):
    """SIGKILL of ``cpift fuse`` right after it journaled its first shard (a torn journal line
    and half-written shards left behind as a crash leaves them): the next run, here with
    Ray's executor, keeps that shard and gives an uninterrupted fuse's bytes."""
    from cpift_dist.executor import FAULT_TASK_ENV
    from cpift_dist.io.atomic import partial_dir

    out, part = tmp_path / "o", partial_dir(tmp_path / "o")
    cli = [sys.executable, "-m", "cpift_dist.cli"]
    env = dict(os.environ, **{FAULT_TASK_ENV: f"fuse_journal:{tmp_path}"})
    r = subprocess.run(cli + _fuse_args(three, out), env=env, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == -signal.SIGKILL and (tmp_path / "fuse_journal.killed").exists(), \
        r.stderr[-2000:]
    assert not out.exists()
    with open(part / ".resume" / "shards.jsonl", "a") as fh:
        fh.write('{"file": "model-000')  # torn
    assert len(list(part.glob("*.safetensors"))) >= 1
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "clean",
         FusionConfig(**FAST), InProcessExecutor(1), progress=False)
    man = fuse(three["base"], three["tuned"], three["masks"], out, FusionConfig(**FAST),
               RayExecutor(), progress=False)
    assert man["resumed_shards"] == 1 and man["executor"] == "ray" and not part.exists()
    assert _weights(out) == _weights(tmp_path / "clean")


@pytest.mark.parametrize("executor", ["threads", "local Ray"])
def test_a_fuse_stopped_by_sigterm_keeps_its_finished_shards_and_exits_143(three, tmp_path,
                                                                          executor):
    """SIGTERM (a preempted SLURM job, ``ray job stop``) right after the first shard was
    journaled: ``cpift fuse`` stops as it would on Ctrl-C, says so, exits 143 and keeps the
    finished shard, from which the same command resumes to an uninterrupted fuse's bytes. On
    a local Ray it started too (whose ``ray.init`` sets a SIGTERM handler of its own)."""
    from cpift_dist.executor import FAULT_SIGNAL_ENV, FAULT_TASK_ENV
    from cpift_dist.io.atomic import partial_dir

    out, part = tmp_path / "o", partial_dir(tmp_path / "o")
    cli = [sys.executable, "-m", "cpift_dist.cli"]
    args = _fuse_args(three, out)
    if executor == "local Ray":
        args = [a for a in args if a != "--no-ray"]
    env = dict(os.environ, **{FAULT_TASK_ENV: f"fuse_journal:{tmp_path}",
                              FAULT_SIGNAL_ENV: "SIGTERM"})
    r = subprocess.run(cli + args, env=env, capture_output=True, text=True, timeout=240)
    assert (tmp_path / "fuse_journal.killed").exists(), r.stderr[-2000:]
    assert r.returncode == 143, r.stderr[-2000:]
    assert "cpift: stopped by SIGTERM\n" in r.stderr, r.stderr[-2000:]
    assert f"the finished part is kept in {part}" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
    kept = (part / ".resume" / "shards.jsonl").read_text().splitlines()
    assert len(kept) >= 1
    fuse(three["base"], three["tuned"], three["masks"], tmp_path / "clean",
         FusionConfig(**FAST), InProcessExecutor(1), progress=False)
    r = subprocess.run(cli + _fuse_args(three, out), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    said = " ".join(r.stdout.split())  # (rich wraps the line to the terminal)
    assert f"({len(kept)} of the shards kept from an interrupted run)" in said, said
    assert _weights(out) == _weights(tmp_path / "clean") and not part.exists()


def test_a_partial_output_in_use_is_refused_and_left_alone(three, tmp_path):
    import fcntl

    from cpift_dist.errors import CpiftError
    from cpift_dist.io.atomic import partial_dir

    part = partial_dir(tmp_path / "o")
    part.mkdir()
    (part / "theirs").write_text("x")
    fd = os.open(part, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(CpiftError, match="another process is writing"):
            fuse(three["base"], three["tuned"], three["masks"], tmp_path / "o",
                 FusionConfig(**FAST), progress=False)
    finally:
        os.close(fd)
    assert (part / "theirs").read_text() == "x" and not (tmp_path / "o").exists()


@pytest.mark.timeout(60)
def test_the_fuse_threads_take_their_own_shards_first_and_help_where_one_has_none():
    """The fuser's scheduler: with a lane (an output shard) per thread, each thread runs its
    own lane's tasks (so that two threads never write into one file: Linux serialises that);
    with one lane, both threads take its tasks; the priorities hold within a lane."""
    import importlib
    import threading

    fuse_mod = importlib.import_module("cpift_dist.fusion.fuse")
    ran = []

    def task(lane, i, together):
        together.wait()  # both threads are in a task at once, step by step
        ran.append((lane, i, threading.current_thread().name))

    sched, both = fuse_mod._Scheduler(2), threading.Barrier(2, timeout=10)
    for lane in (0, 1):  # lane 0's tasks first: a single queue would give them both threads
        for i in range(5):
            sched.submit(fuse_mod._GRAM, task, lane, i, both, lane=lane)
    sched.run()
    by_lane = {lane: {t for ln, _, t in ran if ln == lane} for lane in (0, 1)}
    assert by_lane == {0: {"fuse-0"}, 1: {"fuse-1"}}, ran
    assert [i for ln, i, _ in ran if ln == 0] == list(range(5))

    ran.clear()  # one lane: the other thread helps (else the barrier would time out)
    sched, both = fuse_mod._Scheduler(2), threading.Barrier(2, timeout=10)
    for i in range(4):
        sched.submit(fuse_mod._GRAM, task, 0, i, both, lane=0)
    sched.run()
    assert {t for _, _, t in ran} == {"fuse-0", "fuse-1"} and len(ran) == 4

    ran.clear()  # an apply task submitted later overtakes the lane's queued Gram tasks
    sched, alone = fuse_mod._Scheduler(1), threading.Barrier(1)
    for i in range(3):
        sched.submit(fuse_mod._GRAM, task, 0, i, alone)
    sched.submit(fuse_mod._APPLY, task, 0, 9, alone)
    sched.run()
    assert [i for _, i, _ in ran] == [9, 0, 1, 2]
