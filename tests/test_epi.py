"""Evolving isolation (EPI): the distributed exact selection against a gathered stable-sort
oracle, the freeze between refreshes, kill-and-resume, and the config's refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cpift_dist.analysis.masks import MaskFile
from cpift_dist.config import EPIConfig, load_config
from cpift_dist.errors import ConfigError
from cpift_dist.io import Checkpoint
from cpift_dist.training.epi import refresh_due, tie_quotas
from helpers import epi_oracle, torchrun_train, write_mask

WORKER = str(Path(__file__).parent / "epi_worker.py")


def epi_run(setup, out, *overrides, mode="trace", nproc=2, env=None, freeze=()):
    return torchrun_train(setup, out, ("arithmetic", "strings"), *overrides, freeze=freeze,
                          entry=(WORKER,), nproc=nproc,
                          env={"EPI_WORKER_MODE": mode, **(env or {})}, timeout=400)


# ---- configuration and planning ---------------------------------------------------------------
@pytest.mark.parametrize("key,value,field", [
    ("p", "0", "sft.epi.p"), ("p", "1", "sft.epi.p"), ("p", "1.5", "sft.epi.p"),
    ("refresh_every", "0", "sft.epi.refresh_every"), ("beta", "1", "sft.epi.beta"),
    ("beta", "-0.1", "sft.epi.beta"), ("score", "hessian", "sft.epi.score")])
def test_bad_epi_settings_name_the_field(tmp_path, key, value, field):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base: /x\ntasks: [{name: a}]\nsft: {method: epi}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, [f"sft.epi.{key}={value}"])
    assert f"field '{field}'" in str(e.value) and str(cfg) in str(e.value)


def test_refresh_steps_and_tie_quotas():
    c = EPIConfig(refresh_every=2, warmup_steps=3)
    assert [t for t in range(1, 12) if refresh_due(c, t, 11)] == [3, 5, 7, 9]
    c = EPIConfig(refresh_every=4)
    assert [t for t in range(1, 13) if refresh_due(c, t, 12)] == [4, 8]  # not at the last step
    # ties go to the first segments in (tensor, element) order, whatever the rank lists say
    q = tie_quotas([(1, 0, 5), (0, 40, 3), (0, 0, 2), (1, 9, 4)], 7)
    assert q == {(0, 0): 2, (0, 40): 3, (1, 0): 2, (1, 9): 0}


def test_plans_give_the_epi_settings_to_the_right_stages(tmp_path, train_setup):
    from cpift_dist.config import RunConfig
    from cpift_dist.training.sft import plan_stages, stage_job

    names = ["arithmetic", "strings", "logic"]
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "groups.json").write_text(json.dumps({
        "tasks": names, "jaccard": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        "stages": [{"stage": 1, "tasks": ["logic"]}, {"stage": 2, "tasks": names[:2]}]}))

    def cfg(**sft):
        return RunConfig.model_validate({
            "name": "r", "runs_dir": str(tmp_path / "runs"), "base": str(train_setup / "model"),
            "tasks": [{"name": n, "train_data": str(train_setup / "suite" / n / "train.jsonl")}
                      for n in names], "sft": {"steps": 9, **sft}})

    plain = cfg()
    (epi,) = plan_stages(plain, "epi")
    assert epi.tasks == names and epi.init == plain.base and epi.steps == 9
    assert epi.out == plain.run_dir / "baselines" / "epi" / "stage-1" and not epi.frozen_tasks
    assert stage_job(plain, epi).epi == EPIConfig()  # the defaults when sft.epi is unset
    assert all(stage_job(plain, s).epi is None for s in plan_stages(plain, "cpi"))
    both = cfg(epi={"p": 0.02, "refresh_every": 3})
    cpi = plan_stages(both, "cpi")
    assert [stage_job(both, s).epi.p for s in cpi] == [0.02, 0.02]
    assert stage_job(both, cpi[1]).freeze  # the static cores stay, united with the EPI set
    assert stage_job(both, plan_stages(both, "multitask")[0]).epi is None
    only = cfg(epi={"p": 0.02, "cpi_stages": False})
    assert all(stage_job(only, s).epi is None for s in plan_stages(only, "cpi"))
    assert stage_job(only, plan_stages(only, "epi")[0]).epi.p == 0.02


# ---- the distributed selection ----------------------------------------------------------------
SELECTED: dict[tuple, dict] = {}


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage,dtype,nproc", [(3, "fp32", 2), (2, "bf16", 2), (3, "bf16", 1)])
def test_distributed_selection_equals_a_gathered_topk(train_setup, tmp_path, stage, dtype,
                                                      nproc):
    """Planted scores with 13 distinct values (thousands of exact ties at the threshold),
    partitions cut inside tensors (ZeRO-3 splits every tensor, ZeRO-2 its flat groups): the
    mask is the oracle's, bit for bit, on 1 and 2 ranks."""
    p = 0.1
    r = epi_run(train_setup, tmp_path / "o", f"zero_stage={stage}", f"dtype={dtype}",
                f"epi.p={p}", mode="select", nproc=nproc)
    assert r.returncode == 0, r.stderr[-4000:]
    log = json.loads((tmp_path / "o" / "epi" / "epi.json").read_text())
    rec = log["refreshes"][0]
    assert rec["ties"] > 100 and rec["greater"] + rec["ties"] == rec["selected"] == rec["k"]
    mask = MaskFile(tmp_path / "o" / rec["mask"])
    want = epi_oracle(train_setup / "model", p)
    got = {n: mask.read(n).reshape(-1) for n in mask.names()}
    assert set(got) == set(want)
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, bad
    assert sum(int(m.sum()) for m in got.values()) == rec["k"]
    SELECTED[(stage, dtype, nproc)] = got
    if len(SELECTED) > 1:  # every world size and ZeRO stage gives the same mask
        first = next(iter(SELECTED.values()))
        assert all(torch.equal(first[n], got[n]) for n in got)


# ---- training with refreshes: freeze between refreshes, static cores, kill and resume ---------
STATIC = "model.layers.0.self_attn.o_proj.weight"
ARGS = ("zero_stage=3", "dtype=bf16", "max_steps=7", "save_every=2", "weight_decay=0.05",
        "lr=3e-3", "epi.p=0.05", "epi.refresh_every=2", "epi.warmup_steps=1", "epi.beta=0.5")


def _trace(out: Path, steps: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out / "trace" / f"step-{t}.safetensors")) for t in range(1, steps + 1)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_frozen_between_refreshes_and_resume_equals_uninterrupted(train_setup, tmp_path):
    static_path = tmp_path / "static.safetensors"
    static = write_mask(static_path, train_setup / "model",
                        lambda n, k: torch.arange(k) % 3 == 0 if n == STATIC
                        else torch.zeros(k, dtype=torch.bool), "s")
    full = tmp_path / "full"
    r = epi_run(train_setup, full, *ARGS, freeze=[static_path])
    assert r.returncode == 0, r.stderr[-4000:]
    log = json.loads((full / "epi" / "epi.json").read_text())
    refreshes = [x["step"] for x in log["refreshes"]]
    assert refreshes == [1, 3, 5]
    trace = _trace(full, 7)
    base = Checkpoint(train_setup / "model")
    masks = {t: MaskFile(full / "epi" / f"mask-step-{t:06d}.safetensors") for t in refreshes}
    k = log["refreshes"][0]["k"]
    moved_after_release = 0
    for j, t in enumerate(refreshes):
        end = refreshes[j + 1] if j + 1 < len(refreshes) else 7
        m = {n: masks[t].read(n).reshape(-1) for n in masks[t].names()}
        assert sum(int(v.sum()) for v in m.values()) == k
        for n, sel in m.items():
            held = _bits(trace[t - 1][n])[sel]
            for s in range(t + 1, end + 1):  # weights after each step under this mask
                assert torch.equal(_bits(trace[s - 1][n])[sel], held), (n, t, s)
        if j + 1 < len(refreshes):  # released at the next refresh: they train again
            nxt = refreshes[j + 1]
            m2 = {n: masks[nxt].read(n).reshape(-1) for n in masks[nxt].names()}
            for n in m:
                rel = m[n] & ~m2[n]
                moved_after_release += int((_bits(trace[6][n])[rel]
                                            != _bits(trace[nxt - 1][n])[rel]).sum())
        if j > 0:
            assert 0 < log["refreshes"][j]["jaccard_prev"] < 1
    assert moved_after_release > 0
    # the static cores never move, from the input to the last step
    for n, sel in static.items():
        want = _bits(base.read(n).to(torch.bfloat16))[sel]
        assert all(torch.equal(_bits(tr[n])[sel], want) for tr in trace), n
    # ... while the rest trains
    assert not torch.equal(trace[-1][STATIC].float(), base.read(STATIC).float())
    facts = json.loads((full / "freeze.json").read_text())
    assert facts["epi"]["refreshes"] == 3 and facts["epi"]["partition_mismatches"] == 0
    assert facts["epi"]["frozen_in_partitions"] == k and facts["checked"] == facts["frozen"] > 0

    # killed right after step 4's checkpoint (between the refreshes at 3 and 5), then resumed
    crash = tmp_path / "crash"
    r = epi_run(train_setup, crash, *ARGS, freeze=[static_path],
                env={"CPIFT_FAULT_AFTER_STEP": "4"})
    assert r.returncode != 0 and not (crash / "model").exists()
    r = epi_run(train_setup, crash, *ARGS, freeze=[static_path])
    assert r.returncode == 0, r.stderr[-4000:]
    for f in sorted((full / "model").glob("*.safetensors")):
        assert f.read_bytes() == (crash / "model" / f.name).read_bytes(), f.name
    for t in refreshes:
        name = f"mask-step-{t:06d}.safetensors"
        assert (full / "epi" / name).read_bytes() == (crash / "epi" / name).read_bytes()
    assert json.loads((crash / "epi" / "epi.json").read_text())["refreshes"] == log["refreshes"]
    for rank in (0, 1):  # the EMA and the frozen index at the last checkpoint
        a = load_file(str(full / "checkpoints" / "step-7" / f"epi-rank-{rank}.safetensors"))
        b = load_file(str(crash / "checkpoints" / "step-7" / f"epi-rank-{rank}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[x], b[x]) for x in a)
        assert any(int((a[x] != 0).sum()) for x in a if x.startswith("ema."))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_release_cores_lets_a_refresh_free_the_static_cores(train_setup, tmp_path):
    static_path = tmp_path / "static.safetensors"
    static = write_mask(static_path, train_setup / "model",
                        lambda n, k: torch.ones(k, dtype=torch.bool) if n == STATIC
                        else torch.zeros(k, dtype=torch.bool), "s")
    out = tmp_path / "o"
    r = epi_run(train_setup, out, "zero_stage=2", "dtype=fp32", "max_steps=4", "save_every=4",
                "weight_decay=0.05", "epi.p=0.02", "epi.refresh_every=2",
                "epi.release_cores=true", freeze=[static_path])
    assert r.returncode == 0, r.stderr[-4000:]
    trace = _trace(out, 4)
    base = Checkpoint(train_setup / "model").read(STATIC).reshape(-1)
    sel = static[STATIC]
    assert torch.equal(trace[1][STATIC].reshape(-1)[sel], base[sel])  # frozen up to step 2
    epi_mask = MaskFile(out / "epi" / "mask-step-000002.safetensors").read(STATIC).reshape(-1)
    free = sel & ~epi_mask  # released at step 2 and not re-selected: trains again
    assert int(free.sum()) > 0
    assert not torch.equal(trace[3][STATIC].reshape(-1)[free], base[free])
    facts = json.loads((out / "freeze.json").read_text())
    assert facts["released_at_step"] == 2 and facts["epi"]["static_released_at_step"] == 2
