"""Per-task fine-tunes on Ray: placement on 2 nodes, retry, failure reporting (that Ray runs
the tasks' fine-tunes side by side is asserted on the tiny pipeline's run, test_pipeline.py)."""

import json
import os
import sys
from pathlib import Path

import pytest

from cpift_dist.config import TrainConfig
from cpift_dist.errors import CpiftError
from cpift_dist.training import SFTJob
from cpift_dist.training.loop import FAULT_ENV
from helpers import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
BIN = Path(sys.executable).parent
TRAIN = {"max_steps": 4, "save_every": 2, "max_length": 320, "micro_batch": 2, "lr": 3e-3,
         "progress": False}


@pytest.fixture
def setup(train_setup):
    return train_setup


def test_a_two_rank_fine_tune_spread_over_two_nodes_with_a_worker_crash(setup, tmp_path,
                                                                         monkeypatch):
    from ray.cluster_utils import Cluster

    from helpers import left_in_tmp, own_tmp

    cfg = {"name": "ft", "runs_dir": str(tmp_path), "base": str(setup / "model"),
           "tasks": [{"name": t, "train_data": str(setup / "suite" / t / "train.jsonl")}
                     for t in ("arithmetic",)],
           "train": TRAIN,
           "finetune": {"workers_per_task": 2, "max_failures": 1, "placement": "STRICT_SPREAD"}}
    (tmp_path / "cfg.yaml").write_text(json.dumps(cfg))  # JSON is YAML
    for k, v in own_tmp(tmp_path / "tmp").items():  # the cluster's processes and the CLI's
        monkeypatch.setenv(k, v)
    # no dashboard: joining needs none, and stopping the cluster SIGTERMs it, which leaves its
    # multiprocessing directory (pymp-*) in the temp directory
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1",
                                      "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1")
        env = {**os.environ, FAULT_ENV: "2", "OMP_NUM_THREADS": "1"}  # every rank dies once
        r = run([str(BIN / "cpift"), "finetune", "--config", str(tmp_path / "cfg.yaml"),
                 "--address", cluster.address], 540, env=env)
    finally:
        cluster.shutdown()
    assert r.returncode == 0, r.stderr[-4000:]
    assert left_in_tmp(tmp_path / "tmp") == []
    out = tmp_path / "ft" / "finetune" / "arithmetic"
    ranks = [json.loads((out / "ranks" / f"{i}.json").read_text()) for i in (0, 1)]
    assert ranks[0]["node"] != ranks[1]["node"]  # a job's two ranks on different nodes
    assert all(x["step"] == 4 for x in ranks)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # crashed after step 2, resumed from its checkpoint
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out / "model")


def test_exhausted_retries_name_the_task_and_others_finish(setup, tmp_path, ray_local):
    from cpift_dist.training.ray_finetune import finetune_all

    cfg = TrainConfig(**TRAIN)
    jobs = {t: SFTJob(setup / "model", {t: setup / "suite" / t / "train.jsonl"}, tmp_path / t,
                      cfg) for t in ("arithmetic", "logic")}
    with pytest.raises(CpiftError, match=r"fine-tune of task 'arithmetic' failed .*"
                                         r"finished: logic"):
        finetune_all(jobs, num_workers=1, max_failures=0,
                     env={"arithmetic": {FAULT_ENV: "2"}})
    assert (tmp_path / "logic" / "model" / "config.json").exists()
    assert not (tmp_path / "arithmetic" / "model").exists()
