"""The launcher scripts run the loop: deepspeed (single node) and SLURM (stand-in srun)."""

import os
import stat
import sys
from pathlib import Path

import pytest

from helpers import free_port, left_in_tmp, own_tmp, run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[1]
ARGS = ["max_steps=2", "save_every=2", "max_length=320", "micro_batch=2", "progress=false"]


@pytest.fixture
def setup(train_setup):
    return train_setup


def _env(tmp_path, **extra):
    port = free_port()
    path = f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "MASTER_PORT": str(port), "PATH": path, **own_tmp(tmp_path / "tmp"), **extra}


def test_deepspeed_launcher_script(setup, tmp_path):
    r = run(["bash", str(ROOT / "launch" / "deepspeed_multinode.sh"), "-",
             "arithmetic", str(setup / "suite" / "arithmetic" / "train.jsonl"),
             str(setup / "model"), str(tmp_path / "out"), *ARGS],
            300, env=_env(tmp_path, NPROC="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 2 steps" in r.stdout
    assert (tmp_path / "out" / "model" / "config.json").exists()
    assert left_in_tmp(tmp_path / "tmp") == []


def test_slurm_script_under_stand_in_srun(setup, tmp_path):
    # stand-ins for one node: srun runs its command, scontrol names this host
    for name, body in (("srun", 'while [[ $1 == --* ]]; do shift; done\nexec "$@"'),
                       ("scontrol", "echo 127.0.0.1")):
        f = tmp_path / name
        f.write_text(f"#!/usr/bin/env bash\n{body}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    env = _env(tmp_path, SLURM_JOB_NODELIST="n1", SLURM_NNODES="1", SLURM_JOB_ID="7",
               NPROC_PER_NODE="2")
    r = run(["bash", str(ROOT / "launch" / "slurm_finetune.sbatch"), "logic",
             str(setup / "suite" / "logic" / "train.jsonl"), str(setup / "model"),
             str(tmp_path / "out"), *ARGS], 300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained 2 steps" in r.stdout and (tmp_path / "out" / "model").is_dir()
    # torchrun's logs in the job's directory, none in /tmp
    assert left_in_tmp(tmp_path / "tmp") == []
    assert len(list((tmp_path / "out" / "torchrun").glob("7_*/attempt_0"))) == 1
