"""Faults during `cpift run` (tiny preset, CPU, the session's local Ray).

Each test takes a copy of one uninterrupted run, deletes one stage's outputs and runs the
pipeline again while a fault kills the process doing that stage's work: a Ray worker in the
middle of analysis, fusion or evaluation (after it computed its unit, before it returned it),
or a DeepSpeed rank right after a checkpoint in a fine-tune or a masked SFT stage (in Ray Train a
rank *is* a Ray worker process: one kill covers both). The run completes through Ray's task
retries or Ray Train's restart-and-resume, and every file the stage writes (tensors, masks,
indexes, scores; manifests aside, which record times) has the sha256 of the uninterrupted
run's. The later stages are then skipped: their inputs' digests did not change.
"""

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from cpift_dist.cli import preset_path
from cpift_dist.config import load_config
from cpift_dist.executor import FAULT_TASK_ENV
from cpift_dist.pipeline import Pipeline
from cpift_dist.training.loop import FAULT_ENV
from helpers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # the first builds the tiny run
TIMES = {"manifest.json", "stage.json", "metrics.jsonl", "freeze.json"}  # carry times/paths


def _digests(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name in TIMES or {"ranks", "tensorboard", ".ray-train"} & set(
                p.relative_to(root).parts):
            continue
        data = p.read_bytes()
        if p.name == "scores.json":  # the scores, not the models' paths
            data = json.dumps(json.loads(data)["scores"], sort_keys=True).encode()
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def _rerun_with_fault(tiny_run, tmp_path, monkeypatch, stage_dir: str, env: dict):
    """Deletes ``stage_dir`` in a copy of the run and runs the pipeline under ``env``."""
    _, _, _, pristine = tiny_run
    runs = tmp_path / "runs"
    shutil.copytree(pristine, runs)
    cfg = load_config(preset_path("tiny"), [f"runs_dir={runs}", *TINY])
    before = _digests(cfg.run_dir / stage_dir)
    assert before
    shutil.rmtree(cfg.run_dir / stage_dir)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    logs = []
    Pipeline(cfg, progress=False, log=logs.append).run()
    ran = [line.split()[0] for line in logs if "skipped" not in line]
    return before, _digests(cfg.run_dir / stage_dir), ran


@pytest.mark.parametrize("stage,stage_dir,fn", [
    ("analyze", "analysis", "scan_window"),
    ("fuse", "fusion", "fuse_shard"),
    ("eval", "eval", "_eval_one"),
])
def test_a_ray_worker_killed_mid_stage(tiny_run, tmp_path, monkeypatch, stage, stage_dir, fn):
    killed = tmp_path / "killed"
    killed.mkdir()
    before, after, ran = _rerun_with_fault(tiny_run, tmp_path, monkeypatch, stage_dir,
                                           {FAULT_TASK_ENV: f"{fn}:{killed}"})
    assert (killed / f"{fn}.killed").exists(), "the fault did not fire"
    assert after == before
    assert ran == [stage, "report"], ran  # identical outputs: nothing downstream re-runs


@pytest.mark.parametrize("stage", ["finetune", "sft"])
def test_a_deepspeed_rank_killed_after_a_checkpoint(tiny_run, tmp_path, monkeypatch, stage):
    cfg, _, _, _ = tiny_run
    if stage == "finetune":
        stage_dir = "finetune/logic"
    else:
        n = len(json.loads((cfg.run_dir / "groups.json").read_text())["stages"])
        stage_dir = f"sft/stage-{n}"  # the last CPI-FT stage: frozen cores, two ranks
    _, _, _, pristine = tiny_run
    downstream = {d: _digests(pristine / cfg.name / d) for d in ("analysis", "fusion", "sft")}
    before, after, ran = _rerun_with_fault(tiny_run, tmp_path, monkeypatch, stage_dir,
                                           {FAULT_ENV: "1"})  # every rank dies after step 1
    assert after == before
    assert ran == [stage, "report"], ran  # the model's manifest names it by content
    for d, digests in downstream.items():
        assert _digests(tmp_path / "runs" / cfg.name / d) == digests, d
    restarts = [json.loads(x) for x in (tmp_path / "runs" / cfg.name / stage_dir /
                                         "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in restarts].count(1) == 1  # step 1 was not trained twice
    if stage == "sft":
        man = json.loads((tmp_path / "runs" / cfg.name / stage_dir / "manifest.json").read_text())
        assert man["frozen_elements"] == man["checked_elements"] > 0
        for k in range(1, n):  # the deleted stage re-ran alone: the earlier ones were kept
            rel = Path(cfg.name) / "sft" / f"stage-{k}" / "manifest.json"
            assert (tmp_path / "runs" / rel).stat().st_mtime_ns == \
                (pristine / rel).stat().st_mtime_ns, rel
