"""Every bad input: a one-line error naming the culprit, exit status 2, no partial output."""

import json
import os
import shutil

import pytest
import torch

from cpift_dist.cli import main
from helpers import perturb

pytestmark = pytest.mark.timeout(120)


def run(capsys, tmp_path, base, tuned, *extra):
    out = tmp_path / "out"
    argv = ["analyze", "--base", str(base), "--p", "0.05", "--out", str(out), "--no-ray",
            "--quiet", *extra]
    for t, p in tuned.items():
        argv += ["--tuned", f"{t}={p}"]
    rc = main(argv)
    err = capsys.readouterr().err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
    return rc, err, leftovers


def variant(models, tmp_path, name, **kw):
    return perturb(models["base"], tmp_path / name, seed=9, **kw)


def corrupt_copy(models, tmp_path, fn):
    d = tmp_path / "bad"
    shutil.copytree(models["a"], d)
    fn(d)
    return d


def expect(capsys, tmp_path, models, tuned, *needles, extra=()):
    rc, err, leftovers = run(capsys, tmp_path, models["base"], tuned, *extra)
    assert rc == 2, err
    line = err.strip()
    assert line.startswith("cpift: error: ") and "\n" not in line, err
    for n in needles:
        assert n in line, line
    assert leftovers == [], leftovers


def test_missing_tensor(models, tmp_path, capsys):
    d = variant(models, tmp_path, "t", edit=None)
    # drop one tensor by rewriting the shard that holds it
    from safetensors.torch import load_file, save_file
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"].pop("model.norm.weight")
    sd = load_file(d / shard)
    del sd["model.norm.weight"]
    save_file(sd, d / shard)
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    expect(capsys, tmp_path, models, {"t": d}, "missing tensor 'model.norm.weight'", str(d))


def test_extra_tensor(models, tmp_path, capsys):
    d = variant(models, tmp_path, "t")
    from safetensors.torch import save_file
    save_file({"extra.weight": torch.zeros(3)}, d / "extra.safetensors")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["extra.weight"] = "extra.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    expect(capsys, tmp_path, models, {"t": d}, "extra tensor 'extra.weight'")


def test_shape_mismatch(models, tmp_path, capsys):
    d = variant(models, tmp_path, "t", edit=lambda n, t: t[:-1] if n == "lm_head.weight" else t)
    expect(capsys, tmp_path, models, {"t": d}, "tensor 'lm_head.weight': shape", str(d))


def test_dtype_mismatch(models, tmp_path, capsys):
    """bf16, fp16 and fp32 may differ between base and fine-tune (compared in float32); a
    float64 or an integer copy of a float parameter is refused."""
    for kind, edit in (("torch.float64", torch.Tensor.double), ("torch.int32", torch.Tensor.int)):
        d = variant(models, tmp_path, kind,
                    edit=lambda n, t, e=edit: e(t) if n == "model.norm.weight" else t)
        expect(capsys, tmp_path, models, {"t": d}, "tensor 'model.norm.weight': dtype", kind,
               str(d), "only bfloat16, float16 and float32 may differ")


def test_truncated_safetensors(models, tmp_path, capsys):
    def trunc(d):
        f = sorted(d.glob("model-*.safetensors"))[0]
        f.write_bytes(f.read_bytes()[:-100])
    d = corrupt_copy(models, tmp_path, trunc)
    expect(capsys, tmp_path, models, {"t": d}, "corrupt or truncated", "model-00001")


def test_corrupt_header(models, tmp_path, capsys):
    def garble(d):
        f = sorted(d.glob("model-*.safetensors"))[-1]
        b = bytearray(f.read_bytes())
        b[8:20] = b"not json!!!!"
        f.write_bytes(bytes(b))
    d = corrupt_copy(models, tmp_path, garble)
    expect(capsys, tmp_path, models, {"t": d}, "corrupt or truncated")


def test_index_entry_outside_directory(models, tmp_path, capsys):
    def escape(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        name = next(iter(idx["weight_map"]))
        idx["weight_map"][name] = "../a/" + idx["weight_map"][name]
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    d = corrupt_copy(models, tmp_path, escape)
    expect(capsys, tmp_path, models, {"t": d}, "points outside the checkpoint directory")


def test_malformed_index(models, tmp_path, capsys):
    d = corrupt_copy(models, tmp_path,
                     lambda d: (d / "model.safetensors.index.json").write_text("{oops"))
    expect(capsys, tmp_path, models, {"t": d}, "malformed index", "model.safetensors.index.json")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values(models, tmp_path, capsys, value):
    def poison(n, t):
        if n == "model.layers.1.mlp.up_proj.weight":
            t = t.clone()
            t[3, 5] = value
        return t
    d = variant(models, tmp_path, "t", edit=poison)
    expect(capsys, tmp_path, models, {"t": d}, "'model.layers.1.mlp.up_proj.weight'",
           "non-finite", str(d))


def test_missing_directory_and_bin_only(models, tmp_path, capsys):
    expect(capsys, tmp_path, models, {"t": tmp_path / "nope"}, "does not exist")
    binonly = tmp_path / "binonly"
    binonly.mkdir()
    (binonly / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    expect(capsys, tmp_path, models, {"t": binonly}, "pickle checkpoints are not read")


def test_bad_arguments(models, tmp_path, capsys):
    expect(capsys, tmp_path, models, {}, "--tuned 'noequals': expected NAME=DIR",
           extra=["--tuned", "noequals"])
    expect(capsys, tmp_path, models, {"a": models["a"], "a ": models["b"]}, "field 'tasks")
    expect(capsys, tmp_path, models, {"a": models["a"], "b": models["a"]}, "field 'analysis.p'",
           extra=["analysis.p=1.5"])
    expect(capsys, tmp_path, models, {"a": models["a"]}, "field 'analysis.p'",
           extra=["analysis.p=0"])
    expect(capsys, tmp_path, models, {"a": models["a"]}, "field 'analysis.bogus': unknown key",
           extra=["analysis.bogus=1"])


def test_duplicate_task_names(models, tmp_path, capsys):
    rc = main(["analyze", "--base", str(models["base"]), "--tuned", f"x={models['a']}",
               "--tuned", f"x={models['b']}", "--out", str(tmp_path / "out"), "--no-ray"])
    err = capsys.readouterr().err
    assert rc == 2 and "duplicate task name 'x'" in err
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(models, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc = main(["analyze", "--base", str(models["base"]), "--tuned", f"a={models['a']}",
               "--out", str(out), "--no-ray", "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
    rc = main(["analyze", "--base", str(models["base"]), "--tuned", f"a={models['a']}",
               "--out", str(out), "--no-ray", "--quiet", "--overwrite"])
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "manifest.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failure_mid_run_leaves_nothing(models, tmp_path, capsys):
    # NaN in the last tensor in name order: the error comes after masks were being written
    def poison(n, t):
        return torch.full_like(t, float("nan")) if n == "model.norm.weight" else t
    d = variant(models, tmp_path, "t", edit=poison)
    expect(capsys, tmp_path, models, {"ok": models["a"], "t": d}, "model.norm.weight")


def test_sigterm_stops_an_analysis_cleanly(models, tmp_path, capsys, monkeypatch,
                                            default_sigterm):
    """SIGTERM in the middle of ``cpift analyze`` (its masks written, being counted): one line,
    exit 143, no output and no temporary directory left; SIGTERM's default is back after."""
    import importlib
    import signal

    A = importlib.import_module("cpift_dist.analysis.analyze")
    counts = A.mask_counts

    def terminated(*args, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return counts(*args, **kw)

    monkeypatch.setattr(A, "mask_counts", terminated)
    out = tmp_path / "out"
    rc = main(["analyze", "--base", str(models["base"]), "--tuned", f"a={models['a']}",
               "--out", str(out), "--no-ray", "--quiet"])
    assert rc == 143
    assert capsys.readouterr().err == "cpift: stopped by SIGTERM (no partial output was kept)\n"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_config_errors(tmp_path, capsys, models):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: x\ntasks: [\n")
    assert main(["analyze", "--config", str(bad), "--no-ray"]) == 2
    assert "bad.yaml: line" in capsys.readouterr().err
    bad.write_text(f"base: {models['base']}\ntasks:\n  - name: a\n    tuned: {models['a']}\n"
                   f"  - name: a\n    tuned: {models['b']}\n")
    assert main(["analyze", "--config", str(bad), "--no-ray"]) == 2
    assert "duplicate task name 'a'" in capsys.readouterr().err
    bad.write_text(f"base: {models['base']}\ntasks:\n  - name: a\n    tuned: {models['a']}\n"
                   f"analysis:\n  p: 0.01\n  tau: 3\n")
    assert main(["analyze", "--config", str(bad), "--no-ray"]) == 2
    assert "bad.yaml: field 'analysis.tau': unknown key" in capsys.readouterr().err
    assert main(["fuse", "--base", str(models["base"]), "--tuned", f"a={models['a']}",
                 "--masks", str(tmp_path), "--out", str(tmp_path / "o"), "--no-ray",
                 "--max-shard-size", "5XB"]) == 2
    assert ("command line: field 'fusion.max_shard_bytes': could not interpret byte unit: XB"
            in capsys.readouterr().err)


def test_too_little_room_for_an_output_is_refused_before_the_work(models, tmp_path, capsys,
                                                                   monkeypatch):
    """Masks and a fused backbone that the output's file system has no room for: one line
    naming the output, what it needs and what is free, exit 2, nothing left behind."""
    import collections

    tuned = {"a": models["a"], "b": models["b"]}
    assert run(capsys, tmp_path, models["base"], tuned)[0] == 0
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 999, 999))
    (tmp_path / "x").mkdir()
    rc, err, leftovers = run(capsys, tmp_path / "x", models["base"], tuned)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and not leftovers, err
    assert f"{tmp_path / 'x' / 'out'}: the core masks of 2 task(s) needs " in lines[0]
    assert "its file system has 999B free" in lines[0]
    argv = ["fuse", "--base", str(models["base"]), "--masks", str(tmp_path / "out" / "masks"),
            "--out", str(tmp_path / "x" / "fused"), "--no-ray", "--quiet", "--device", "cpu",
            "--tuned", f"a={models['a']}", "--tuned", f"b={models['b']}"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"{tmp_path / 'x' / 'fused'}: the fused backbone needs " in lines[0]
    assert list((tmp_path / "x").iterdir()) == []


def test_a_full_disk_is_a_clear_error_and_touches_nothing_earlier(models, tmp_path):
    """The output's file system refuses writes past 40 kB (RLIMIT_FSIZE: EFBIG, as a full disk
    gives ENOSPC) halfway through a fusion: one line naming the output, exit 2, no partial
    directory, and an earlier output in the same place left as it was."""
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from cpift_dist.analysis import analyze
    from cpift_dist.config import AnalysisConfig

    analyze(models["base"], {"a": models["a"], "b": models["b"]}, tmp_path / "analysis",
            AnalysisConfig(p=0.05), progress=False)
    out = tmp_path / "backbone"
    out.mkdir()
    (out / "earlier.txt").write_text("an earlier output")

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, 40_000))

    cli = Path(sys.executable).parent / "cpift"
    r = subprocess.run([str(cli), "fuse", "--base", str(models["base"]),
                        "--tuned", f"a={models['a']}", "--tuned", f"b={models['b']}",
                        "--masks", str(tmp_path / "analysis" / "masks"), "--out", str(out),
                        "--overwrite", "--no-ray", "--quiet"],
                       capture_output=True, text=True, preexec_fn=small_disk, timeout=100)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert len(lines) == 1 and f"{out}: File too large while writing" in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["analysis", "backbone"]
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
    assert (out / "earlier.txt").read_text() == "an earlier output"


def test_deepspeed_settings_the_train_fields_own_are_refused(tmp_path, capsys, models):
    """``train.deepspeed`` adds to the generated DeepSpeed config; what a train field sets
    (precision, batch sizes, ZeRO stage, offload, the optimizer) is refused, naming the key."""
    from cpift_dist.config import TrainConfig
    from cpift_dist.training.loop import _ds_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {models['base']}\ntasks:\n  - name: a\n    tuned: {models['a']}\n")
    for override, key in [("train.deepspeed.bf16.enabled=true", "bf16.enabled"),
                          ("train.deepspeed.zero_optimization.stage=2", "zero_optimization.stage"),
                          ("train.deepspeed.zero_optimization.offload_param.device=nvme",
                           "zero_optimization.offload_param.device"),
                          ("train.deepspeed.optimizer={type: Adam}", "optimizer.type")]:
        assert main(["analyze", "--config", str(cfg), "--no-ray", override]) == 2
        assert (f"field 'train.deepspeed': Value error, deepspeed.{key} is set by this project"
                in capsys.readouterr().err), override
    assert main(["analyze", "--config", str(cfg), "--no-ray", "train.zero_stage=2",
                 "train.offload_params=cpu"]) == 2
    assert "field 'train.offload_params': Value error, needs zero_stage 3" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # what is allowed merges section by section into the generated config
    ds = _ds_config(TrainConfig(offload_optimizer="cpu", deepspeed={
        "zero_optimization": {"overlap_comm": False}, "comms_logger": {"enabled": True}}), 2)
    assert ds["zero_optimization"] == {"stage": 3, "offload_optimizer": {
        "device": "cpu", "pin_memory": True}, "overlap_comm": False}
    assert ds["comms_logger"] == {"enabled": True} and ds["train_batch_size"] == 8
    # a finished stage's identity holds the memory settings only where set
    assert not {"gradient_checkpointing", "offload_optimizer", "offload_params",
                "deepspeed"} & set(TrainConfig().key())
    assert TrainConfig(offload_optimizer="cpu").key()["offload_optimizer"] == "cpu"
