"""Core masks equal the stable-sort / torch.topk oracle, on every path and edge case."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cpift_dist.analysis import MaskFile, analyze
from cpift_dist.analysis.plan import layer_of, selection_group
from cpift_dist.config import AnalysisConfig
from cpift_dist.executor import InProcessExecutor, RayExecutor
from blake3 import blake3

from cpift_dist.io import Checkpoint, sha256_file
from helpers import make_llama, oracle_masks, perturb, record_read_ahead

pytestmark = pytest.mark.timeout(180)

SMALL = dict(chunk_elements=1024, unit_elements=3000)  # many units; tensors span chunks


def assert_masks_equal(out, base, tuned, p):
    for task, path in tuned.items():
        oracle = oracle_masks(base, path, p)
        mf = MaskFile(out / "masks" / f"{task}.safetensors")
        assert mf.names() == sorted(oracle)
        for name, want in oracle.items():
            got = mf.read(name)
            assert torch.equal(got, want), f"{task}/{name}"
        stats = json.loads((out / "stats.json").read_text())[task]
        D = sum(m.numel() for m in oracle.values())
        assert stats["D"] == D and stats["k"] == math.floor(p * D) == stats["selected"]
        for name, want in oracle.items():
            assert stats["per_tensor"][name]["selected"] == int(want.sum())


PATHS = {  # how the selection is resolved: every path must be exact
    "sample-window": dict(),
    "radix": dict(sample_every=0),
    "radix-3pass": dict(sample_every=0, collect_limit=0),
}


def methods(res):
    return {g["method"] for s in res.stats.values() for g in s["groups"].values()}


def assert_same_masks(a: Path, b: Path, tasks) -> None:
    """The analyses in ``a`` and ``b`` wrote byte-identical masks for every task."""
    for t in tasks:
        f = f"masks/{t}.safetensors"
        assert sha256_file(a / f) == sha256_file(b / f), t


def units_of(base: Path, cfg: AnalysisConfig):
    """The units the analysis plans for ``base`` under ``cfg``."""
    from cpift_dist.analysis.plan import plan_units

    ck = Checkpoint(base)
    return plan_units([ck.tensors[n] for n in ck.names()], cfg.selection, cfg.chunk_elements,
                      cfg.unit_elements)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("path", list(PATHS))
def test_fp32_matches_oracle(models, tmp_path, p, path):
    tuned = {"a": models["a"], "b": models["b"]}
    cfg = AnalysisConfig(p=p, **PATHS[path], **SMALL)
    res = analyze(models["base"], tuned, tmp_path / "out", cfg, progress=False)
    assert_masks_equal(tmp_path / "out", models["base"], tuned, p)
    outs = json.loads((tmp_path / "out" / "manifest.json").read_text())["outputs"]
    files = sorted(str(f.relative_to(tmp_path / "out")) for f in (tmp_path / "out").rglob("*")
                   if f.is_file() and f.name != "manifest.json")
    assert sorted(outs) == files and all(  # the masks hashed while counted, the rest after
        outs[f]["blake3"] == blake3((tmp_path / "out" / f).read_bytes()).hexdigest()
        for f in files)
    if p == 0.5:
        # the threshold lies inside the mass of exact zeros: a huge tie
        assert res.stats["a"]["threshold"] == 0.0 and res.stats["a"]["groups"]["all"]["ties"] > 0
    else:
        assert methods(res) == {path}


def test_mispredicted_window_falls_back_to_radix(models, tmp_path, monkeypatch):
    import sys
    mod = sys.modules["cpift_dist.analysis.analyze"]
    monkeypatch.setattr(mod, "sample_window", lambda sel, h: (0x3F000000, 0x3F800000, 0))
    tuned = {"a": models["a"]}
    res = analyze(models["base"], tuned, tmp_path / "out", AnalysisConfig(p=0.02, **SMALL),
                  progress=False)
    assert methods(res) == {"radix"}
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["passes"] == [
        "sample", "window", "radix-histogram", "radix-bin"]
    assert_masks_equal(tmp_path / "out", models["base"], tuned, 0.02)


def test_windows_are_collected_within_the_budget(models, tmp_path, monkeypatch):
    """collect_limit bounds the window candidates of all selections together: the smallest
    windows are collected, the others take the radix path, and every mask stays exact. The
    default is a quarter of the available memory, at 24 bytes a candidate."""
    import sys
    mod = sys.modules["cpift_dist.analysis.analyze"]
    estimates = []
    real = mod.sample_window

    def spy(sel, h):
        w = real(sel, h)
        estimates.append(w[2])
        return w

    monkeypatch.setattr(mod, "sample_window", spy)
    tuned = {"a": models["a"], "b": models["b"]}
    res = analyze(models["base"], tuned, tmp_path / "all", AnalysisConfig(p=0.02, **SMALL),
                  progress=False)
    assert methods(res) == {"sample-window"} and len(estimates) == 2
    small, large = sorted(estimates)
    assert small > 0
    monkeypatch.setattr(mod, "available_memory", lambda: 96 * small)  # the default's source
    assert mod.collect_limit(AnalysisConfig()) == small
    for limit, want in ((small + large, ["sample-window", "sample-window"]),
                        (small + large - 1, ["radix", "sample-window"]),
                        (small - 1, ["radix", "radix"])):
        out = tmp_path / f"l{limit}"
        res = analyze(models["base"], tuned, out,
                      AnalysisConfig(p=0.02, collect_limit=limit, **SMALL), progress=False)
        assert sorted(s["groups"]["all"]["method"] for s in res.stats.values()) == want, limit
        assert json.loads((out / "manifest.json").read_text())["collect_limit"] == limit
        assert_masks_equal(out, models["base"], tuned, 0.02)


def test_available_memory_respects_cgroup_limits(tmp_path, monkeypatch):
    """A cgroup's limit caps the budget; its inactive page cache counts as room."""
    from cpift_dist.analysis.analyze import _cgroup_room, available_memory

    d = tmp_path / "cg"
    d.mkdir()
    (d / "memory.max").write_text("1000000\n")
    (d / "memory.current").write_text("700000\n")
    (d / "memory.stat").write_text("anon 500000\ninactive_file 150000\n")
    assert _cgroup_room(d, "memory.max", "memory.current", "inactive_file") == 450000
    (d / "memory.max").write_text("max\n")
    assert _cgroup_room(d, "memory.max", "memory.current", "inactive_file") >= 1 << 60
    assert _cgroup_room(tmp_path / "none", "memory.max", "memory.current", "x") >= 1 << 60
    meminfo = Path("/proc/meminfo").read_text()
    avail = next(int(x.split()[1]) * 1024 for x in meminfo.splitlines()
                 if x.startswith("MemAvailable:"))
    assert 0 < available_memory() <= avail + (256 << 20)  # another process may free memory


@pytest.mark.parametrize("read", ["pread", "map"])
@pytest.mark.parametrize("path", list(PATHS))
def test_bf16_matches_oracle(bf16_models, tmp_path, path, read, monkeypatch):
    """Every selection path, with the full passes reading chunks into a buffer (pread) and
    through the files' maps; the window pass runs its compiled runs of chunks wherever it can
    (not on maps, nor beside a radix histogram)."""
    from cpift_dist.analysis import fused

    runs = []
    window_run = fused.window_run
    monkeypatch.setattr(fused, "window_run",  # (warm() calls it with no chunks)
                        lambda *a: runs.append(len(a[0])) or window_run(*a))
    tuned = {"a": bf16_models["a"], "b": bf16_models["b"]}
    cfg = AnalysisConfig(p=0.05, **PATHS[path], **SMALL, read=read)
    analyze(bf16_models["base"], tuned, tmp_path / "out", cfg, progress=False)
    assert bool(sum(runs)) == (read == "pread" and path != "radix-3pass")
    assert Checkpoint(bf16_models["base"]).info("lm_head.weight").dtype == torch.bfloat16
    assert_masks_equal(tmp_path / "out", bf16_models["base"], tuned, 0.05)


@pytest.mark.parametrize("read", ["pread", "map"])
@pytest.mark.parametrize("path", list(PATHS))
def test_fine_tunes_in_another_dtype_match_the_oracle(mixed_models, tmp_path, path, read,
                                                      monkeypatch):
    """|tuned - base| of a parameter whose checkpoints differ in dtype is taken in float32
    (both widened exactly, as the oracle does), on every selection path and both reads; the
    window pass's compiled runs leave such parameters to the per-chunk loop."""
    from cpift_dist.analysis import fused

    runs = []
    window_run = fused.window_run
    monkeypatch.setattr(fused, "window_run", lambda *a: runs.append(len(a[0])) or window_run(*a))
    m = mixed_models
    assert Checkpoint(m["fp32"]).info("lm_head.weight").dtype == torch.float32
    assert Checkpoint(m["mlp"]).info("lm_head.weight").dtype == torch.bfloat16
    for i, (base, tuned) in enumerate(((m["base"], {t: m[t] for t in ("fp32", "mlp", "bf16")}),
                                       (m["base32"], {t: m[t] for t in ("to_bf16", "to_fp16")}))):
        out = tmp_path / f"out{i}"
        cfg = AnalysisConfig(p=0.05, **PATHS[path], **SMALL, read=read)
        analyze(base, tuned, out, cfg, progress=False)
        assert_masks_equal(out, base, tuned, 0.05)
    assert not sum(runs)  # every unit holds a parameter of two dtypes


def test_many_exact_ties_at_threshold(models, tmp_path):
    # deltas quantised to 2**-10 make thousands of equal magnitudes; pick p so that the
    # threshold lands inside a run of equal values and check the tie count
    cfg = AnalysisConfig(p=0.03, **SMALL)
    res = analyze(models["base"], {"a": models["a"]}, tmp_path / "out", cfg, progress=False)
    g = res.stats["a"]["groups"]["all"]
    u = torch.cat([(Checkpoint(models["a"]).read(n) - Checkpoint(models["base"]).read(n))
                   .abs().reshape(-1) for n in Checkpoint(models["base"]).names()])
    at_threshold = int((u == g["threshold"]).sum())
    assert at_threshold > g["ties"] > 0  # only the first ties are taken
    assert_masks_equal(tmp_path / "out", models["base"], {"a": models["a"]}, 0.03)


def test_k_zero_and_k_all(models, tmp_path):
    tuned = {"a": models["a"]}
    analyze(models["base"], tuned, tmp_path / "zero", AnalysisConfig(p=1e-9), progress=False)
    mf = MaskFile(tmp_path / "zero" / "masks" / "a.safetensors")
    assert all(not mf.read(n).any() for n in mf.names())
    assert_masks_equal(tmp_path / "zero", models["base"], tuned, 1e-9)
    analyze(models["base"], tuned, tmp_path / "all", AnalysisConfig(p=1.0, **SMALL),
            progress=False)
    mf = MaskFile(tmp_path / "all" / "masks" / "a.safetensors")
    assert all(mf.read(n).all() for n in mf.names())


def test_several_shards_and_tensor_larger_than_chunk(models):
    ck = Checkpoint(models["base"])
    assert len(ck.files) >= 3
    assert max(t.numel for t in ck.tensors.values()) > SMALL["chunk_elements"] * 3


@pytest.mark.parametrize("selection", ["per-tensor", "per-layer"])
def test_per_tensor_and_per_layer_selection(models, tmp_path, selection):
    p = 0.05
    analyze(models["base"], {"a": models["a"]}, tmp_path / "out",
            AnalysisConfig(p=p, selection=selection, **SMALL), progress=False)
    b, t = Checkpoint(models["base"]), Checkpoint(models["a"])
    groups: dict[str, list[str]] = {}
    for n in b.names():
        groups.setdefault(selection_group(n, selection), []).append(n)
    mf = MaskFile(tmp_path / "out" / "masks" / "a.safetensors")
    for g, names in groups.items():
        u = torch.cat([(t.read(n) - b.read(n)).abs().reshape(-1) for n in names])
        k = math.floor(p * u.numel())
        want = torch.zeros(u.numel(), dtype=torch.bool)
        want[torch.sort(u, descending=True, stable=True).indices[:k]] = True
        got = torch.cat([mf.read(n).reshape(-1) for n in names])
        assert torch.equal(got, want), g
    if selection == "per-layer":
        assert {"layer.0", "layer.1", "other"} == set(groups)
        assert layer_of("model.layers.1.mlp.up_proj.weight") == 1


def test_jaccard_matches_dense_recomputation(models, tmp_path):
    tuned = {"a": models["a"], "b": models["b"], "c": models["a"]}
    res = analyze(models["base"], tuned, tmp_path / "out", AnalysisConfig(p=0.08, **SMALL),
                  progress=False)
    dense = {t: torch.cat([m.reshape(-1) for _, m in sorted(oracle_masks(models["base"], p, 0.08)
                                                            .items())])
             for t, p in tuned.items()}
    tasks = list(tuned)
    for i, ti in enumerate(tasks):
        for j, tj in enumerate(tasks):
            inter = int((dense[ti] & dense[tj]).sum())
            union = int((dense[ti] | dense[tj]).sum())
            assert res.overlap["intersection"][i][j] == inter
            assert res.overlap["union"][i][j] == union
            assert res.overlap["jaccard"][i][j] == pytest.approx(inter / union, abs=1e-8)
    assert res.overlap["jaccard"][0][2] == 1.0  # the same model twice
    on_disk = json.loads((tmp_path / "out" / "overlap.json").read_text())
    assert on_disk == json.loads(json.dumps(res.overlap))


def test_ray_and_in_process_give_identical_masks(models, tmp_path, ray_local):
    tuned = {"a": models["a"], "b": models["b"]}
    cfg = AnalysisConfig(p=0.02, **SMALL)
    analyze(models["base"], tuned, tmp_path / "local", cfg, InProcessExecutor(), progress=False)
    analyze(models["base"], tuned, tmp_path / "ray", cfg, RayExecutor(), progress=False)
    assert_same_masks(tmp_path / "local", tmp_path / "ray", tuned)
    man = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert man["executor"] == "ray" and man["units"] > 4 and man["status"] == "complete"


def test_mask_counts_equal_numpy_over_blocks_and_ragged_ends(tmp_path):
    """Sizes and pairwise intersections of 3 mask files against numpy on the unpacked masks:
    a tensor spanning two read blocks with a last block that is not whole words, tiny ones, and
    an empty mask."""
    from cpift_dist.analysis.masks import MaskWriter, pack_mask
    from cpift_dist.analysis.overlap import _BLOCK, mask_counts

    shapes = {"big": (1000, 2101), "odd": (7,), "small": (3, 5)}
    assert 8 * _BLOCK < 1000 * 2101 < 16 * _BLOCK and (1000 * 2101 // 8) % 8  # 2 blocks, ragged
    g = np.random.default_rng(3)
    masks = [{n: g.random(math.prod(s)) < d for n, s in shapes.items()} for d in (0.3, 0.5, 0.0)]
    paths = []
    for t, m in enumerate(masks):
        w = MaskWriter(tmp_path / f"t{t}.safetensors", shapes)
        for n, bits in m.items():
            w.write(n, 0, pack_mask(bits))
        w.close({"task": f"t{t}"})
        paths.append(tmp_path / f"t{t}.safetensors")
    names = sorted(shapes)
    counts, inter = mask_counts(paths, names)
    for ti, n in enumerate(names):
        assert counts[ti].tolist() == [int(m[n].sum()) for m in masks]
    for i in range(3):
        for j in range(3):
            assert inter[i, j] == sum(int((masks[i][n] & masks[j][n]).sum()) for n in names)


def test_mask_file_format(models, tmp_path):
    analyze(models["base"], {"a": models["a"]}, tmp_path / "out", AnalysisConfig(p=0.02),
            progress=False)
    from safetensors.numpy import load_file
    from safetensors import safe_open
    path = tmp_path / "out" / "masks" / "a.safetensors"
    raw = load_file(path)  # plain safetensors, readable without this project
    with safe_open(str(path), "np") as f:
        meta = f.metadata()
    shapes = json.loads(meta["tensors"])
    oracle = oracle_masks(models["base"], models["a"], 0.02)
    for n, m in oracle.items():
        assert raw[n].dtype == np.uint8 and raw[n].shape == ((m.numel() + 7) // 8,)
        assert np.array_equal(raw[n], np.packbits(m.numpy().reshape(-1), bitorder="little"))
        assert shapes[n]["shape"] == list(m.shape)
    assert meta["task"] == "a" and float(meta["p"]) == 0.02
    assert int(meta["k"]) == sum(int(m.sum()) for m in oracle.values())
    assert len(meta["base_digest"]) == 64 and len(meta["tuned_digest"]) == 64


@pytest.mark.parametrize("note", [0, 200_000])
def test_mask_writer_in_place_and_with_a_header_beyond_its_room(tmp_path, note):
    """The writer writes its file in place (the header in the room reserved before the data,
    padded with spaces) or, when the metadata outgrows that room, moves the data behind the
    header; either way a plain safetensors file with the bits written by ``write``,
    ``set_bits`` and through ``mapped``, and no other file left."""
    from safetensors.numpy import load_file

    from cpift_dist.analysis.masks import MaskWriter, pack_mask

    rng = np.random.default_rng(note)
    shapes = {"w": (37, 11), "v": (5,), "e": (0,), "x.y": (3, 4, 5)}
    want = {n: rng.random(int(np.prod(s))) < 0.3 for n, s in shapes.items()}
    path = tmp_path / "m.safetensors"
    w = MaskWriter(path, shapes)
    w.write("w", 0, pack_mask(want["w"]))
    w.set_bits("v", np.flatnonzero(want["v"]))
    packed = w.mapped()
    for n in ("x.y",):
        start = w.offsets[n] - w.data_start
        packed[start:start + (want[n].size + 7) // 8] |= pack_mask(want[n])
    del packed
    w.close({"task": "t", "note": "n" * note})
    got = load_file(path)
    for n, m in want.items():
        assert np.array_equal(got[n], pack_mask(m)), n
    from safetensors import safe_open
    with safe_open(str(path), "np") as f:
        assert len(f.metadata()["note"]) == note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    if note == 0:  # in place: the data where it was written
        assert path.stat().st_size == w.data_start + sum((m.size + 7) // 8 for m in want.values())


@pytest.mark.parametrize("path", list(PATHS))
def test_threaded_in_process_is_identical(models, tmp_path, monkeypatch, path):
    """On threads, every path gives the same masks; each unit's mask bytes are written by the
    thread that computed it, not by the driver."""
    import threading
    from cpift_dist.analysis.masks import MaskWriter

    writers = []
    write = MaskWriter.write
    monkeypatch.setattr(MaskWriter, "write", lambda self, *a: writers.append(
        threading.current_thread() is threading.main_thread()) or write(self, *a))
    tuned = {"a": models["a"], "b": models["b"]}
    cfg = AnalysisConfig(p=0.04, **PATHS[path], **SMALL)
    analyze(models["base"], tuned, tmp_path / "one", cfg, InProcessExecutor(1), progress=False)
    assert writers and all(writers)
    writers.clear()
    res = analyze(models["base"], tuned, tmp_path / "two", cfg, InProcessExecutor(3),
                  progress=False)
    assert methods(res) == {path} and writers and not any(writers)
    assert_same_masks(tmp_path / "one", tmp_path / "two", tuned)


@pytest.mark.parametrize("read_ahead", [1, 1500])
def test_cold_inputs_are_asked_ahead_and_give_the_same_masks(models, tmp_path, monkeypatch,
                                                              read_ahead):
    """Where the page cache lacks a unit's pages, the sample pass asks the kernel for exactly
    its sampled rows, a full pass for each chunk once, a bounded distance ahead; a warm cache
    asks for nothing; the masks are the same either way."""
    from cpift_dist.analysis import scan
    from cpift_dist.io.checkpoint import CheckpointReader

    asked = []
    monkeypatch.setattr(scan, "READ_AHEAD", read_ahead)
    monkeypatch.setattr(CheckpointReader, "prefetch_rows",
                        lambda self, name, ranges: asked.append((name, list(ranges))))
    monkeypatch.setattr(CheckpointReader, "prefetch_gather", lambda self, parts: asked.append(
        [(name, np.asarray(ranges).tolist()) for name, ranges in parts]))
    tuned = {"a": models["a"], "b": models["b"]}
    cfg = AnalysisConfig(p=0.03, **SMALL)
    for cold in (False, True):
        monkeypatch.setattr(CheckpointReader, "cached", lambda self, points, c=cold: not c)
        analyze(models["base"], tuned, tmp_path / str(cold), cfg, progress=False)
        assert bool(asked) == cold
    assert_same_masks(tmp_path / "False", tmp_path / "True", tuned)

    ck = Checkpoint(models["base"])
    units = units_of(models["base"], cfg)
    ctx = scan.ScanContext(str(models["base"]), {t: str(p) for t, p in tuned.items()})
    unit = max(units, key=lambda u: len(u.chunks))
    assert len(unit.chunks) > 3
    chunks = unit.chunks
    asked.clear()  # the sample: every sampled row of the unit, at once, before the first read
    for _ in scan._sample_runs(ctx, unit, 64):
        want = {}  # one part per tensor, its chunks' ranges in order
        for c in chunks:
            want.setdefault(c.name, []).extend(
                [c.row_start + a, c.row_start + b] for a, b in scan.sample_ranges(
                    c.row_stop - c.row_start, ck.info(c.name).row_numel, 64).tolist())
        assert asked == [list(want.items())] * 3  # base and the two tuned
    asked.clear()
    for ci, *_ in scan._chunks(ctx, unit):
        ahead = ci + 1  # asked for so far: this chunk and the next ones within READ_AHEAD
        while ahead < len(chunks) and sum(c.numel for c in chunks[ci:ahead]) < read_ahead:
            ahead += 1
        assert len(asked) == 3 * ahead
    assert asked == [(c.name, [(c.row_start, c.row_stop)]) for c in chunks for _ in range(3)]


@pytest.mark.parametrize("threads", [1, 3])
def test_cold_full_pass_is_asked_ahead_across_units_by_one_thread(models, tmp_path, monkeypatch,
                                                                  threads):
    """In this process, one read-ahead thread asks for a cold full pass's chunks: each chunk of
    each checkpoint once, in the units' order across their boundaries, never more than
    READ_AHEAD elements per scanning thread beyond the units begun; the scanning threads ask
    for none; the masks are those of a warm run."""
    from cpift_dist.analysis import scan
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.io.checkpoint import CheckpointReader

    read_ahead = 2500
    monkeypatch.setattr(scan, "READ_AHEAD", read_ahead)
    tuned = {"a": models["a"], "b": models["b"]}
    cfg = AnalysisConfig(p=0.03, **SMALL)
    analyze(models["base"], tuned, tmp_path / "warm", cfg, progress=False)

    events, _ = record_read_ahead(monkeypatch)
    monkeypatch.setattr(CheckpointReader, "prefetch_gather", lambda self, parts: None)
    monkeypatch.setattr(CheckpointReader, "cached", lambda self, points: False)
    res = analyze(models["base"], tuned, tmp_path / "cold", cfg,
                  executor=InProcessExecutor(threads), progress=False)
    assert methods(res) == {"sample-window"}  # one full pass
    assert_same_masks(tmp_path / "warm", tmp_path / "cold", tuned)

    units = units_of(models["base"], cfg)
    assert len(units) > 3
    chunks = [c for u in units for c in u.chunks]
    asks = [e for e in events if e[0] == "ask"]
    assert {e[4] for e in asks} == {"read-ahead"}
    assert [(e[2], e[3]) for e in asks] == [(c.name, (c.row_start, c.row_stop))
                                            for c in chunks for _ in range(3)]
    before = np.cumsum([0] + [c.numel for c in chunks])  # elements ahead of each chunk
    begun = n = 0
    for e in events:
        if e[0] == "begin":
            begun += e[1]
        else:  # the n-th ask, of chunk n // 3
            assert before[n // 3] - begun < read_ahead * threads
            n += 1
    assert sum(e[1] for e in events if e[0] == "begin") == sum(c.numel for c in chunks)


def test_window_run_of_a_file_truncated_after_opening_names_it(models, tmp_path):
    """The compiled window pass reads its own chunks: a tuned file that ends early (truncated
    after the checkpoints were opened) is a CheckpointError naming that file and tensor."""
    import shutil

    from cpift_dist.analysis import scan
    from cpift_dist.errors import CheckpointError

    d = tmp_path / "b"
    shutil.copytree(models["b"], d)
    cfg = AnalysisConfig(**SMALL)
    units = units_of(models["base"], cfg)
    ctx = scan.ScanContext(str(models["base"]), {"a": str(models["a"]), "b": str(d)})
    unit = max(units, key=lambda u: len(u.chunks))
    plan = {(t, g): ("window", 1 << 30, 1 << 31) for t in ("a", "b")
            for g in {c.group for c in unit.chunks}}
    assert scan.scan_window(ctx, unit, plan).above  # opened (and cached), read whole
    last = unit.chunks[-1]
    info = scan._checkpoint(str(d)).info(last.name)
    with open(info.file, "r+b") as f:
        f.truncate(info.offset + 8)
    with pytest.raises(CheckpointError, match=f"{info.file.name}.*truncated.*{last.name!r}"):
        scan.scan_window(ctx, unit, plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_loops_equal_the_whole_array_definitions(dtype):
    """The compiled per-chunk loops against the torch/numpy definitions of each pass, with
    zeros, negative zeros, subnormals, ties, an Inf and a NaN, over 2 tasks and a size that is a multiple
    of neither the block nor a byte; the window pass also with an empty window (lo >= hi)."""
    from cpift_dist.analysis import fused
    from cpift_dist.analysis.radix_select import (HIGH_BINS, LOW_BINS, high_histogram,
                                                  update_magnitude)
    from cpift_dist.analysis.scan import _as_kernel_input

    g = torch.Generator().manual_seed(7)
    n = 4096 * 2 + 43
    base = torch.randn(n, generator=g).to(dtype)
    tuned = [(base.float() + torch.randn(n, generator=g) * 1e-2 *
              (torch.rand(n, generator=g) < 0.5)).to(dtype) for _ in range(2)]
    base[:3] = torch.tensor([0.0, -0.0, 1.0])
    tuned[0][:3] = torch.tensor([-0.0, 0.0, 1.0])
    tuned[1][10], tuned[1][11] = float("inf"), float("nan")
    base[20:23] = 0.0  # magnitudes in the high bins 0-7 that are not zero (subnormals)
    tuned[0][20:23] = torch.tensor([1e-40, -6e-40, 3e-40]).to(dtype)
    b = _as_kernel_input(base)
    ts = tuple(_as_kernel_input(t) for t in tuned) + (b, b)  # a group of 4, 2 inactive
    bf16 = dtype == torch.bfloat16
    bits = [update_magnitude(base, t).view(torch.int32).numpy() for t in tuned]
    active = np.array([True, True, False, False])
    hist = np.zeros((4, HIGH_BINS), np.int64)
    fused.high_histograms(b, ts, bf16, active, hist)
    for k in range(2):
        assert np.array_equal(hist[k], high_histogram(update_magnitude(base, tuned[k])).numpy())
    high = np.array([bits[0][50] >> 16, bits[1][60] >> 16, 0, 0], np.int64)
    low = np.zeros((4, LOW_BINS), np.int64)
    fused.low_histograms(b, ts, bf16, active, high, low)
    for k in range(2):
        sel = bits[k][(bits[k] >> 16) == high[k]]
        assert np.array_equal(low[k], np.bincount(sel & 0xFFFF, minlength=LOW_BINS))
    lo = np.array([np.quantile(x, 0.9) for x in bits] + [0, 0], np.int64)
    hi = np.array([np.quantile(x, 0.95) for x in bits] + [0, 0], np.int64)
    packed = np.zeros((4, (n + 7) // 8), np.uint8)
    above, bad = np.zeros(4, np.int64), np.zeros(4, bool)
    c_task, c_idx, c_bits = fused.window(b, ts, bf16, active, lo, hi, packed, above, bad)
    for k in range(2):
        x = bits[k]
        assert np.array_equal(packed[k], np.packbits(x >= hi[k], bitorder="little"))
        assert above[k] == int((x >= hi[k]).sum()) and bad[k] == bool((x >= 0x7F800000).any())
        want = np.flatnonzero((x >= lo[k]) & (x < hi[k]))
        assert np.array_equal(c_idx[c_task == k], want)
        assert np.array_equal(c_bits[c_task == k], x[want])
    packed2 = np.full_like(packed, 0xFF)  # the loops write every byte of an active row
    above2 = np.zeros(4, np.int64)
    c_task, _, _ = fused.window(b, ts, bf16, active, hi, lo, packed2, above2, bad)  # lo > hi
    assert len(c_task) == 0
    for k in range(2):  # everything at or above "hi" (here lo) is in the mask
        assert np.array_equal(packed2[k], np.packbits(bits[k] >= lo[k], bitorder="little"))
        assert above2[k] == int((bits[k] >= lo[k]).sum())
    thr = np.array([bits[0][100], bits[1][200], 0, 0], np.int64)
    quota, taken = np.array([1, 0, 0, 0], np.int64), np.zeros(4, np.int64)
    packed = np.zeros((4, (n + 7) // 8), np.uint8)
    packed[:2] = 0xFF  # written, not ORed into
    fused.threshold_masks(b, ts, bf16, active, thr, quota, taken, packed)
    for k in range(2):
        sel = bits[k] > thr[k]
        sel[np.flatnonzero(bits[k] == thr[k])[:quota[k]]] = True
        assert np.array_equal(packed[k], np.packbits(sel, bitorder="little"))
    assert not packed[2:].any() and not hist[2:].any() and not low[2:].any()  # inactive


def test_the_sample_is_spread_over_the_rows(tmp_path):
    """Updates concentrated in a band of late rows (as real fine-tunes make them): the strided
    sample still predicts the window, so one full pass resolves the selection (a sample of the
    first rows of each chunk missed the band, and every selection fell back to radix)."""
    from cpift_dist.analysis.scan import sample_ranges

    assert sample_ranges(512, 2048, 64).tolist() == [[r, r + 1] for r in range(0, 512, 64)]
    assert sample_ranges(3, 10_000, 64).tolist() == [[0, 1]]
    assert sample_ranges(10_000, 1, 64).tolist() == [[0, 256]]  # a vector: 256-element segments
    base = make_llama(tmp_path / "base", dtype=torch.bfloat16, seed=11, hidden=256,
                      shard_bytes=2_000_000)

    def band(name, t):
        if t.ndim == 2 and t.shape[0] >= 64:
            t = t.clone()
            t[-t.shape[0] // 8:] += 0.05  # the last eighth of the rows: large updates
        return t

    tuned = perturb(base, tmp_path / "t", seed=3, scale=1e-3, edit=band)
    res = analyze(base, {"t": tuned}, tmp_path / "out",
                  AnalysisConfig(p=0.01, chunk_elements=65536, sample_every=8), progress=False)
    assert res.stats["t"]["groups"]["all"]["method"] == "sample-window"
    oracle = oracle_masks(base, tuned, 0.01)
    m = MaskFile(tmp_path / "out" / "masks" / "t.safetensors")
    for name in m.names():
        assert torch.equal(m.read(name), oracle[name]), name


def test_the_debug_log_splits_the_units_time(models, tmp_path, monkeypatch, caplog):
    """The units' line of the debug log (in-process): their time summed over the threads,
    split into the compiled loops, separate reads and the rest (their own Python, waits for
    the GIL and for locks, mask writes). Planted 5 ms waits in each compiled loop and each read
    of the sample's rows that the units make land in their own shares, which add up to no
    more than the units' time, and that to no more than the threads' time."""
    import logging
    import re
    import sys
    import threading
    import time

    from cpift_dist.analysis import fused
    from cpift_dist.io.checkpoint import CheckpointReader

    planted = {"loops": 0, "reads": 0}

    def slowed(fn, what):
        def call(*args, **kwargs):
            if threading.current_thread() is not threading.main_thread():  # in the units
                planted[what] += 1
                time.sleep(0.005)
            return fn(*args, **kwargs)
        return call

    for name in ("high_histograms", "window", "window_run"):
        monkeypatch.setattr(fused, name, slowed(getattr(fused, name), "loops"))
    monkeypatch.setattr(CheckpointReader, "gather_rows",
                        slowed(CheckpointReader.gather_rows, "reads"))
    caplog.set_level(logging.DEBUG, logger="cpift_dist.analysis.analyze")
    t0 = time.perf_counter()
    sys.modules["cpift_dist.analysis.analyze"].analyze(
        models["base"], {"a": models["a"], "b": models["b"]}, tmp_path / "out",
        AnalysisConfig(p=0.02, **SMALL), executor=InProcessExecutor(2), progress=False)
    elapsed = time.perf_counter() - t0
    [line] = [r.getMessage() for r in caplog.records
              if r.getMessage().startswith("analyze units: ")]
    m = re.fullmatch(r"analyze units: (\S+) s on 2 thread\(s\): compiled loops (\S+) s, reads "
                     r"(\S+) s, the rest \(Python, waits for the GIL and for locks, mask "
                     r"writes\) (\S+) s", line)
    units, loops, reads, rest = map(float, m.groups())
    assert planted["loops"] and planted["reads"]
    assert loops >= 0.005 * planted["loops"] - 0.01, (loops, planted)
    assert reads >= 0.005 * planted["reads"] - 0.01, (reads, planted)
    assert rest >= -0.01 and loops + reads <= units + 0.02 and units <= 2 * elapsed + 0.02


def test_the_debug_log_times_the_phases_and_the_drivers_own_work(models, tmp_path,
                                                                   monkeypatch, caplog):
    """The debug line that gpu_check prints: each phase's time, and the driver's own work in
    each pass (the serial part that bounds a pass on many cores), on the path with every pass
    (a window that misses, then radix select with a third pass)."""
    import logging
    import re
    import sys
    import time
    mod = sys.modules["cpift_dist.analysis.analyze"]
    monkeypatch.setattr(mod, "sample_window", lambda sel, h: (0x3F000000, 0x3F800000, 0))
    caplog.set_level(logging.DEBUG, logger="cpift_dist.analysis.analyze")
    t0 = time.perf_counter()
    analyze(models["base"], {"a": models["a"], "b": models["b"]}, tmp_path / "out",
            AnalysisConfig(p=0.02, collect_limit=0, **SMALL), progress=False)
    elapsed = time.perf_counter() - t0
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("analyze, ")]
    phases, driver = line.split("; the driver's own work (while the units ran, and after): ")
    assert [p.rsplit(" ", 2)[0] for p in phases.split(": ", 1)[1].split(", ")] == [
        "checks", "numba's loops", "sample", "window", "radix", "mask files", "counts",
        "manifest"]
    times = {m[1]: float(m[2]) for m in re.finditer(r"([^,]+?) (\d+\.\d\d) s", driver)}
    names = [d.rsplit(" ", 2)[0] for d in driver.split(", ")]
    assert names == ["sample", "window", "window selection", "radix histogram", "radix bin",
                     "radix bin selection", "radix masks"]
    assert all(0 <= t <= elapsed for t in times.values()) and len(times) == len(names)
