"""Checkpoint IO: lazy row-chunk reads, the shard writer, atomic outputs, shipped configs."""

import shutil
from pathlib import Path

import pytest
import torch

from cpift_dist.config import RunConfig, load_config
from cpift_dist.errors import CpiftError
from cpift_dist.io import (Checkpoint, ShardWriter, atomic_dir, checkpoint_digest,
                           sha256_file, write_manifest)

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
    """map_rows (the analysis's zero-copy reads) gives the same bytes as read_rows, for fp32
    and bf16 files, chunk by chunk; drop_mapped leaves arrays still in use readable."""
    for m in (models, bf16_models):
        ck = Checkpoint(m["base"])
        with ck.reader() as r:
            for name in ck.names():
                info = ck.info(name)
                for s in range(0, info.rows, 5):
                    e = min(info.rows, s + 5)
                    mapped = r.map_rows(name, s, e)
                    sparse = r.map_rows(name, s, e, random_access=True)  # the sample's map
                    assert not mapped.flags.writeable and not sparse.flags.writeable
                    want = r.read_rows(name, s, e).view(torch.uint8).numpy().copy()
                    r.drop_mapped()  # the pages leave the page tables; the array refaults them
                    assert (mapped == want).all() and (sparse == want).all()


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


def test_prefetch_asks_for_the_pages_of_each_range(models, monkeypatch):
    """A cold pass's prefetch: one MADV_WILLNEED per row range, from the page holding its first
    byte to its last byte."""
    import mmap

    from cpift_dist.io import checkpoint

    calls = []

    class Recorder:
        def __init__(self, mm):
            self.mm = mm

        def __len__(self):
            return len(self.mm)

        def madvise(self, option, start, length):
            calls.append((option, start, length))

    real_map = checkpoint._file_map
    monkeypatch.setattr(checkpoint, "_file_map",
                        lambda fd, random_access=False: Recorder(real_map(fd, random_access)))
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
        assert sha256_file(out / f) == d
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    for n in src.names():
        assert torch.equal(sd[n], src.read(n)), n
    # the manifest's sha256 is what the digest is built from
    assert checkpoint_digest(out) == checkpoint_digest(out)
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
