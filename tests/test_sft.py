"""Masked SFT: element-wise freezing under ZeRO-2/3 with 2 gloo ranks, and the stage driver."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from cpift_dist.config import RunConfig
from cpift_dist.errors import CpiftError
from cpift_dist.io import Checkpoint
from cpift_dist.training.sft import (plan_stages, random_split, similarity_split, split_budget,
                                     stage_job)
from helpers import free_port, left_in_tmp, own_tmp, run, torchrun_train, write_mask

BIN = Path(sys.executable).parent
WHOLE = "model.norm.weight"                          # entirely frozen
NONE = "model.layers.0.mlp.up_proj.weight"           # nothing frozen
BOUNDARY = "model.layers.1.self_attn.q_proj.weight"  # a block across ZeRO-3's rank boundary


@pytest.fixture(scope="module")
def masks(train_setup, tmp_path_factory):
    d = tmp_path_factory.mktemp("masks")
    model = train_setup / "model"
    g = torch.Generator().manual_seed(0)
    a = write_mask(d / "a.safetensors", model,
                   lambda n, k: (torch.rand(k, generator=g) < 0.2) & torch.tensor(n != NONE), "a")

    def block(n, k):
        m = torch.zeros(k, dtype=torch.bool)
        m[:] = n == WHOLE
        if n == BOUNDARY:
            m[k // 2 - 50: k // 2 + 50] = True
        return m

    b = write_mask(d / "b.safetensors", model, block, "b")
    union = {n: a[n] | b[n] for n in a}
    return [d / "a.safetensors", d / "b.safetensors"], union


@pytest.fixture(scope="module")
def masked_run(train_setup, masks, tmp_path_factory):
    """(ZeRO stage, dtype) -> the output of a masked 2-rank run, each trained once per module:
    ZeRO-3 fp32 is both a freeze check and the kill-and-resume test's uninterrupted run."""
    done = {}

    def get(stage: int, dtype: str) -> Path:
        if (stage, dtype) not in done:
            out = tmp_path_factory.mktemp(f"masked-{stage}-{dtype}") / "o"
            r = train(train_setup, out, f"zero_stage={stage}", f"dtype={dtype}", freeze=masks[0])
            assert r.returncode == 0, r.stderr[-4000:]
            done[stage, dtype] = out
        return done[stage, dtype]
    return get


def train(setup, out, *overrides, freeze=(), env=None):
    return torchrun_train(setup, out, ("arithmetic", "strings"), "weight_decay=0.05",
                          "max_steps=6", "save_every=3", "grad_accum=2", *overrides,
                          freeze=freeze, env=env, timeout=400)


def _flat(ck: Checkpoint, name: str, dtype) -> torch.Tensor:
    return ck.read(name).to(dtype).reshape(-1)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage,dtype", [(3, "fp32"), (2, "fp32"), (3, "bf16"), (2, "bf16")])
def test_frozen_elements_bit_identical(train_setup, masks, masked_run, stage, dtype):
    paths, union = masks
    out = masked_run(stage, dtype)
    want = torch.bfloat16 if dtype == "bf16" else torch.float32
    base, got = Checkpoint(train_setup / "model"), Checkpoint(out / "model")
    moved = total = 0
    for n in base.names():
        b, t, m = _flat(base, n, want), _flat(got, n, want), union[n]
        assert torch.equal(b[m], t[m]), n  # frozen: bit for bit
        moved += int((b[~m] != t[~m]).sum())
        total += int((~m).sum())
    assert moved > 0.5 * total  # the rest trained (AdamW, weight decay > 0)
    assert not torch.equal(_flat(base, NONE, want), _flat(got, NONE, want))
    facts = json.loads((out / "freeze.json").read_text())
    assert facts["frozen"] == facts["checked"] == sum(int(m.sum()) for m in union.values())
    assert facts["mismatched_tensors"] == [] and facts["partition_mismatches"] == 0
    split = facts["tensors_split_across_ranks"]  # frozen elements on both sides of a boundary
    assert split and (stage == 2 or {BOUNDARY, WHOLE} <= set(split))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_activation_checkpointing_and_zero_offload_keep_the_freeze(train_setup, masks,
                                                                   masked_run, tmp_path):
    """The memory options of 7B-70B runs. Activation checkpointing and ZeRO-3's parameter
    offload change no bit of the result (fp32 on CPU); the optimizer's offload (fp32 master and
    AdamW on the host) moves unfrozen elements by rounding only, and keeps every frozen element
    bit-identical, in ZeRO-3 (bf16; killed after a checkpoint and resumed) and ZeRO-2. What
    each engine ran with is read back from it (``deepspeed.json``), not from the config that
    asked."""
    paths, union = masks
    base = Checkpoint(train_setup / "model")
    runs = {  # name: (overrides, the run without the options, dtype, (rtol, atol) against it)
        "same": (("zero_stage=3", "dtype=fp32", "gradient_checkpointing=true",
                  "offload_params=cpu", "deepspeed={zero_optimization: {overlap_comm: false}}"),
                 (3, "fp32"), torch.float32, (0, 0)),
        "zero3": (("zero_stage=3", "dtype=bf16", "gradient_checkpointing=true",
                   "offload_optimizer=cpu", "offload_params=cpu"),
                  (3, "bf16"), torch.bfloat16, (2 ** -7, 1e-6)),
        "zero2": (("zero_stage=2", "dtype=fp32", "gradient_checkpointing=true",
                   "offload_optimizer=cpu"), (2, "fp32"), torch.float32, (1e-5, 1e-7)),
    }
    for name, (overrides, plain, want, (rtol, atol)) in runs.items():
        out = tmp_path / name
        if name == "zero3":  # killed after its step-3 checkpoint: the resume reads host state
            r = train(train_setup, out, *overrides, freeze=paths,
                      env={"CPIFT_FAULT_AFTER_STEP": "3"})
            assert r.returncode != 0 and not (out / "model").exists(), r.stderr[-2000:]
        r = train(train_setup, out, *overrides, freeze=paths)
        assert r.returncode == 0, (name, r.stderr[-4000:])
        steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4, 5, 6], (name, steps)
        ran = json.loads((out / "deepspeed.json").read_text())
        asked = dict(o.split("=", 1) for o in overrides)
        assert ran["zero_stage"] == int(asked["zero_stage"]) and ran["world"] == 2
        assert ran["activation_checkpointing"] is True, name
        assert ran["offload_optimizer"] is ("offload_optimizer" in asked), name
        assert ran["offload_param"] is ("offload_params" in asked), name
        # the step on the host: torch's fused CPU kernel (bench/adamw_bench.py)
        assert ran["optimizer"] == "AdamW" and ran["fused_step"] is ran["offload_optimizer"]
        if name == "same":
            assert ran["config"]["zero_optimization"]["overlap_comm"] is False
        facts = json.loads((out / "freeze.json").read_text())
        assert facts["frozen"] == facts["checked"] == sum(int(m.sum()) for m in union.values())
        assert facts["partition_mismatches"] == 0 and facts["mismatched_tensors"] == []
        got, ref = Checkpoint(out / "model"), Checkpoint(masked_run(*plain) / "model")
        for n in base.names():
            b, t, m = _flat(base, n, want), _flat(got, n, want), union[n]
            assert torch.equal(b[m], t[m]), (name, n)  # frozen: bit for bit
            x = _flat(ref, n, want)
            if rtol == 0:
                assert torch.equal(t, x), (name, n)
            else:
                assert torch.allclose(t.float(), x.float(), rtol=rtol, atol=atol), (name, n)
        assert not torch.equal(_flat(base, NONE, want), _flat(got, NONE, want))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_without_the_freezer_masked_elements_drift(train_setup, masks, tmp_path):
    _, union = masks
    r = train(train_setup, tmp_path / "o", "zero_stage=3")
    assert r.returncode == 0, r.stderr[-4000:]
    base, got = Checkpoint(train_setup / "model"), Checkpoint(tmp_path / "o" / "model")
    changed = sum(int((_flat(base, n, torch.float32) != _flat(got, n, torch.float32))[
        union[n]].sum()) for n in base.names())
    assert changed > 0.9 * sum(int(m.sum()) for m in union.values())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_and_resume_keeps_the_freeze_and_equals_uninterrupted(train_setup, masks,
                                                                   masked_run, tmp_path):
    paths, union = masks
    full = masked_run(3, "fp32")  # uninterrupted, the same arguments
    r = train(train_setup, tmp_path / "crash", "zero_stage=3", freeze=paths,
              env={"CPIFT_FAULT_AFTER_STEP": "3"})
    assert r.returncode != 0 and not (tmp_path / "crash" / "model").exists()
    r = train(train_setup, tmp_path / "crash", "zero_stage=3", freeze=paths)
    assert r.returncode == 0, r.stderr[-4000:]
    a, b = Checkpoint(full / "model"), Checkpoint(tmp_path / "crash" / "model")
    base = Checkpoint(train_setup / "model")
    for n in a.names():
        assert torch.equal(a.read(n), b.read(n)), n
        assert torch.equal(b.read(n).reshape(-1)[union[n]], base.read(n).reshape(-1)[union[n]])


def test_check_frozen_names_a_changed_tensor(train_setup, masks):
    from cpift_dist.training.freeze import CoreUnion, check_frozen

    paths, union = masks
    ck = Checkpoint(train_setup / "model")
    state = {n: ck.read(n).clone() for n in ck.names()}
    cu = CoreUnion(paths)
    assert check_frozen(state, ck, cu, torch.float32) == (
        sum(int(m.sum()) for m in union.values()), [])
    i = int(union[BOUNDARY].nonzero()[0])
    state[BOUNDARY].view(-1)[i] = torch.nextafter(state[BOUNDARY].view(-1)[i],
                                                  torch.tensor(1e9))  # one ulp
    assert check_frozen(state, ck, cu, torch.float32)[1] == [BOUNDARY]


@pytest.mark.parametrize("argv", [[], ["--run-config", "missing.yaml", "--stage", "1"]])
def test_the_train_entry_point_leaves_its_process_group(argv):
    """Every way out of ``cpift-train`` destroys the process group (gloo threads alive at
    interpreter exit abort a finished rank with SIGABRT; pytorch/pytorch#190489)."""
    import torch.distributed as dist

    from cpift_dist.training.run import main

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert main(argv) == 2  # a usage error, after the group exists
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_train_entry_point_exits_without_finalising_python():
    """``python -m cpift_dist.training.run`` ends by ``os._exit`` with its output flushed:
    gloo worker threads that outlive the group abort a finished rank (SIGABRT) when they meet
    interpreter finalisation (8 of 360 runs on busy cores; see ``run._exit``)."""
    probe = ("import atexit, runpy, sys; atexit.register(print, 'FINALISED', flush=True); "
             "sys.argv = ['cpift-train', '--out', 'x']; "
             "runpy.run_module('cpift_dist.training.run', run_name='__main__')")
    r = run([sys.executable, "-c", probe], 120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "cpift-train: error: --model and --out are required" in r.stderr  # flushed
    assert "FINALISED" not in r.stdout  # no atexit, no Py_FinalizeEx


# ---- planning ---------------------------------------------------------------------------------
def test_budget_and_splits():
    assert split_budget(10, [2, 1, 1]) == [5, 3, 2] or sum(split_budget(10, [2, 1, 1])) == 10
    assert split_budget(10, [2, 1, 1])[0] == 5 and sum(split_budget(7, [1] * 3)) == 7
    assert split_budget(3, [5, 1, 1]) == [1, 1, 1]
    with pytest.raises(CpiftError, match="fewer than"):
        split_budget(2, [1, 1, 1])
    tasks = list("abcdefg")
    s = random_split(tasks, 3, seed=1)
    assert s == random_split(tasks, 3, seed=1) and len(s) == 3
    assert sorted(sum(s, [])) == tasks and {len(x) for x in s} <= {2, 3}
    jac = [[1, .5, 0, 0], [.5, 1, 0, .1], [0, 0, 1, .3], [0, .1, .3, 1]]
    assert similarity_split(list("wxyz"), jac, 2) == [["w", "x"], ["y", "z"]]
    assert similarity_split(list("wxyz"), jac, 4) == [["w"], ["x"], ["y"], ["z"]]


def _run_cfg(tmp_path, train_setup, **sft) -> RunConfig:
    suite = train_setup / "suite"
    names = ["arithmetic", "strings", "logic", "format"]
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "groups.json").write_text(json.dumps({
        "tasks": names, "jaccard": [[1, .3, 0, 0], [.3, 1, 0, 0], [0, 0, 1, .2], [0, 0, .2, 1]],
        "stages": [{"stage": 1, "tasks": ["logic", "format"]},
                   {"stage": 2, "tasks": ["arithmetic", "strings"]}]}))
    return RunConfig.model_validate({
        "name": "r", "runs_dir": str(tmp_path / "runs"), "base": str(train_setup / "model"),
        "tasks": [{"name": n, "train_data": str(suite / n / "train.jsonl")} for n in names],
        "sft": {"steps": 12, "samples_per_task": 8, **sft}})


def test_plans_of_every_method(tmp_path, train_setup):
    cfg = _run_cfg(tmp_path, train_setup, calibration_samples=2)
    cpi = plan_stages(cfg, "cpi")
    assert [s.tasks for s in cpi] == [["logic", "format"], ["arithmetic", "strings"]]
    assert [s.frozen_tasks for s in cpi] == [[], ["logic", "format"]]
    assert cpi[0].init == cfg.run_dir / "fusion" / "backbone"
    assert cpi[1].init == cpi[0].out / "model" and cpi[1].out == cfg.run_dir / "sft" / "stage-2"
    job = stage_job(cfg, cpi[1])
    assert [p.name for p in job.freeze] == ["logic.safetensors", "format.safetensors"]
    assert job.samples == {"arithmetic": 8, "strings": 8, "logic": 2, "format": 2}
    assert job.cfg.max_steps == 6
    mt = plan_stages(cfg, "multitask")
    assert len(mt) == 1 and mt[0].steps == 12 and mt[0].init == cfg.base
    assert mt[0].out == cfg.run_dir / "baselines" / "multitask" / "stage-1"
    rnd = plan_stages(cfg, "multistage-random")
    assert len(rnd) == 3 and sum(s.steps for s in rnd) == 12
    assert all(not s.frozen_tasks for s in rnd)
    heur = plan_stages(cfg, "multistage-heuristic")
    assert [s.tasks for s in heur] == [["arithmetic", "strings"], ["logic"], ["format"]]
    (cfg.run_dir / "groups.json").unlink()
    with pytest.raises(CpiftError, match="groups.json: no groups"):
        plan_stages(cfg, "cpi")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_cpift_sft_stages_on_ray_freeze_and_the_baseline_launchers(tmp_path, train_setup,
                                                                    ray_local):
    from cpift_dist.analysis import analyze
    from cpift_dist.cli import main
    from cpift_dist.config import AnalysisConfig, FusionConfig
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.fusion import fuse
    from cpift_dist.training.sft import run_sft
    from helpers import perturb

    cfg = _run_cfg(tmp_path, train_setup)
    cfg.train = cfg.train.model_copy(update={"max_length": 320, "micro_batch": 2, "lr": 3e-3,
                                             "weight_decay": 0.05, "progress": False})
    cfg.sft.steps = 4
    base = train_setup / "model"
    tuned = {t.name: perturb(base, cfg.run_dir / "finetune" / t.name, seed=i + 1)
             for i, t in enumerate(cfg.tasks)}
    ex = InProcessExecutor(2)
    analyze(base, tuned, cfg.run_dir / "analysis", AnalysisConfig(p=0.05), executor=ex,
            progress=False)
    fuse(base, tuned, cfg.run_dir / "analysis" / "masks", cfg.run_dir / "fusion" / "backbone",
         FusionConfig(device="cpu"), executor=ex, progress=False)

    mans = run_sft(cfg, "cpi", progress=False)
    assert [m["status"] for m in mans] == ["complete", "complete"]
    s1, s2 = (cfg.run_dir / "sft" / f"stage-{k}" for k in (1, 2))
    assert "frozen_elements" not in mans[0] and mans[1]["frozen_elements"] > 0
    a, b = Checkpoint(s1 / "model"), Checkpoint(s2 / "model")
    from cpift_dist.training.freeze import CoreUnion
    union = CoreUnion([cfg.run_dir / "analysis" / "masks" / f"{t}.safetensors"
                       for t in ("logic", "format")])
    frozen = 0
    for n in a.names():
        m = torch.from_numpy(union.bits(n))
        x, y = a.read(n).reshape(-1), b.read(n).reshape(-1)
        assert torch.equal(x[m], y[m]), n
        assert not torch.equal(x[~m], y[~m]), n
        frozen += int(m.sum())
    assert frozen == mans[1]["frozen_elements"] == mans[1]["checked_elements"]
    assert not (s2 / "checkpoints").exists()  # DeepSpeed state dropped once a stage is done
    # (a deleted stage re-runs alone, its earlier stages kept: tests/test_faults.py)

    # a baseline through the launcher entry (torchrun on this node), via the CLI
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(cfg.model_dump_json())
    rc = main(["sft", "--config", str(cfg_file), "--method", "multitask", "--no-ray",
               "--quiet"])
    assert rc == 0
    mt = cfg.run_dir / "baselines" / "multitask" / "stage-1"
    man = json.loads((mt / "manifest.json").read_text())
    assert man["steps"] == 4 and man["tasks"] == [t.name for t in cfg.tasks]
    assert Checkpoint(mt / "model").names() == a.names()
    # the SLURM script (stand-in srun/scontrol on this node): plan, prepare, srun torchrun
    import stat
    for name, body in (("srun", 'while [[ $1 == --* ]]; do shift; done\nexec "$@"'),
                       ("scontrol", "echo 127.0.0.1")):
        f = tmp_path / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PATH": f"{tmp_path}:{BIN}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n1",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "9", "NPROC_PER_NODE": "2",
           "MASTER_PORT": str(free_port()), **own_tmp(tmp_path / "tmp")}
    r = run(["bash", str(root / "launch" / "slurm_sft.sbatch"), str(cfg_file),
             "multistage-heuristic", "sft.num_stages=1"], 400, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    heur = cfg.run_dir / "baselines" / "multistage-heuristic" / "stage-1"
    assert json.loads((heur / "manifest.json").read_text())["status"] == "complete"
    # torchrun's logs in the stage's directory, none in /tmp
    assert len(list((heur / "torchrun").glob("9-1_*/attempt_0"))) == 1
    assert left_in_tmp(tmp_path / "tmp") == []
    assert "stage 1 (multistage-heuristic): 4 steps" in r.stdout


def test_a_planted_freeze_report_mismatch_fails_the_stage(tmp_path, train_setup, masks):
    """The stage's end-of-run check compares counts from three independent sources (the masks'
    popcount, the elements compared bit for bit, those the partitions held) with the driver's
    own popcount of the planned masks: any disagreement, or a changed tensor, fails the stage
    and writes no manifest."""
    import shutil

    from cpift_dist.training.sft import finish_stage, prepare_stage

    cfg = _run_cfg(tmp_path, train_setup)
    mask_dir = cfg.run_dir / "analysis" / "masks"
    mask_dir.mkdir(parents=True)
    paths, union = masks
    for t, p in zip(("logic", "format"), paths):  # stage 2 freezes stage 1's two tasks
        shutil.copy(p, mask_dir / f"{t}.safetensors")
    stage = plan_stages(cfg, "cpi")[1]
    shutil.copytree(train_setup / "model", stage.init)
    job = prepare_stage(cfg, stage)
    shutil.copytree(train_setup / "model", stage.out / "model")
    n = sum(int(m.sum()) for m in union.values())
    good = {"frozen": n, "checked": n, "frozen_in_partitions": n, "mismatched_tensors": [],
            "partition_mismatches": 0}
    planted = [({"checked": n - 1}, "counts disagree"),
               ({"frozen_in_partitions": n + 3}, "counts disagree"),
               ({"frozen": n + 1, "checked": n + 1, "frozen_in_partitions": n + 1},
                f"{n} planned"),
               ({"mismatched_tensors": [BOUNDARY]}, BOUNDARY),
               ({"partition_mismatches": 2}, "moved in the fp32 partitions")]
    for change, why in planted:
        (stage.out / "freeze.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(CpiftError, match=why):
            finish_stage(cfg, stage, job)
        assert not (stage.out / "manifest.json").exists()
    (stage.out / "freeze.json").write_text(json.dumps(good))
    man = finish_stage(cfg, stage, job)
    assert man["frozen_elements"] == man["checked_elements"] == n


def test_check_frozen_counts_what_it_compared(train_setup, masks):
    """``check_frozen``'s count is of the values compared, independent of the mask's count: a
    trained tensor missing elements (a wrong gather) is reported, not counted as checked."""
    from cpift_dist.training.freeze import CoreUnion, check_frozen

    paths, union = masks
    ck = Checkpoint(train_setup / "model")
    cu = CoreUnion(paths)
    assert cu.popcount() == sum(int(m.sum()) for m in union.values())
    state = {n: ck.read(n).clone() for n in ck.names()}
    state[BOUNDARY] = state[BOUNDARY].reshape(-1)[:-200]  # a short, wrongly gathered tensor
    checked, bad = check_frozen(state, ck, cu, torch.float32)
    assert bad == [BOUNDARY] and checked < cu.popcount()
