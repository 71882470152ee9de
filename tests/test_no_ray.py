"""The pipeline without Ray: `cpift run --no-ray` (torchrun on this node) and one `sbatch` for
all of it (srun steps, under stand-in srun/scontrol with 2 simulated nodes on this machine).

Every process these runs start finds a stand-in ``ray`` package first on its path, which
records any import of it: the Ray-free paths must never import Ray.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import TINY, left_in_tmp, own_tmp, run, slurm_standins

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# the tiny preset as the tests run it, without the baseline (the launchers are the point here)
ARGS = [*TINY, "baselines=[]"]
NEVER_RAY = '''import os
with open(os.environ["RAY_IMPORT_MARKER"], "a") as f:
    f.write(str(os.getpid()) + "\\n")
raise ImportError("ray was imported on a Ray-free path (tests/test_no_ray.py)")
'''


def _env(tmp: Path, **extra) -> dict:
    block = tmp / "no-ray-site"
    (block / "ray").mkdir(parents=True, exist_ok=True)
    (block / "ray" / "__init__.py").write_text(NEVER_RAY)
    return {**os.environ, "PYTHONPATH": str(block), "RAY_IMPORT_MARKER": str(tmp / "ray-imported"),
            "OMP_NUM_THREADS": "1", **own_tmp(tmp / "tmp"), **extra}


def _cpift_run(runs: Path, env: dict, *more, timeout=600):
    return run([str(BIN / "cpift"), "run", "--preset", "tiny", "--no-ray", "--quiet",
                f"runs_dir={runs}", *ARGS, *more], timeout, env=env, cwd=runs.parent)


@pytest.fixture(scope="module")
def no_ray_run(tmp_path_factory):
    """A `cpift run --preset tiny --no-ray` whose fine-tune ranks die after their step-1
    checkpoint, then the rerun that resumes them, then a rerun that skips everything:
    (runs dir, the three results, env)."""
    d = tmp_path_factory.mktemp("noray")
    runs = d / "runs"
    env = _env(d)
    crashed = _cpift_run(runs, {**env, "CPIFT_FAULT_AFTER_STEP": "1"})
    resumed = _cpift_run(runs, env)
    again = _cpift_run(runs, env, timeout=200)
    return runs / "tiny", (crashed, resumed, again), d


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cpift_run_without_ray_resumes_a_killed_fine_tune_and_skips_when_done(no_ray_run):
    from transformers import AutoModelForCausalLM

    from cpift_dist.io import Checkpoint
    from cpift_dist.training.freeze import CoreUnion

    run_dir, (crashed, resumed, again), d = no_ray_run
    tasks = ["arithmetic", "strings", "logic", "format"]
    # the first run: every fine-tune rank dies after its step-1 checkpoint; failures by task
    lines = [ln for ln in crashed.stderr.splitlines() if ln.startswith("cpift: error:")]
    assert crashed.returncode == 2 and len(lines) == 1, crashed.stderr[-3000:]
    assert all(f"fine-tune of task {t!r} failed" in lines[0] for t in tasks)
    # the rerun resumed each from step 1 (a restart from scratch would log step 1 twice)
    # the stages it finished, and where each thread was if it died of a signal (faulthandler)
    assert resumed.returncode == 0, (resumed.stdout[-1500:], resumed.stderr[-8000:])
    for t in tasks:
        steps = [json.loads(x)["step"] for x in
                 (run_dir / "finetune" / t / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2], (t, steps)
        launch = json.loads((run_dir / "finetune" / t / "launch.json").read_text())
        assert launch["launcher"] == "torchrun" and launch["returncode"] == 0
        # torchrun's logs: one run directory per launch (the crashed one and its resume)
        assert len(list((run_dir / "finetune" / t / "torchrun").glob("*/attempt_0"))) == 2, t
    assert left_in_tmp(d / "tmp") == [], "left in the temp directory"
    assert not (d / "ray-imported").exists(), "a Ray-free run imported ray"
    # every output exists and loads; the frozen elements held bit for bit
    stages = sorted(run_dir.glob("sft/stage-*/model"))
    assert len(stages) >= 2
    for p in [run_dir / "fusion" / "backbone", *stages]:
        AutoModelForCausalLM.from_pretrained(p)
    groups = [s["tasks"] for s in json.loads((run_dir / "groups.json").read_text())["stages"]]
    union = CoreUnion([run_dir / "analysis" / "masks" / f"{t}.safetensors" for t in groups[0]])
    a, b = Checkpoint(run_dir / "sft" / "stage-1" / "model"), Checkpoint(stages[-1])
    for n in a.names():
        m = torch.from_numpy(union.bits(n))
        assert torch.equal(a.read(n).reshape(-1)[m], b.read(n).reshape(-1)[m]), n
    facts = json.loads((run_dir / "sft" / "stage-2" / "freeze.json").read_text())
    assert facts["frozen"] == facts["checked"] == facts["frozen_in_partitions"] > 0
    assert (run_dir / "eval" / "scores.json").is_file()
    assert "bit-identical" in (run_dir / "report" / "report.md").read_text()
    # a rerun skips every stage
    assert again.returncode == 0, again.stderr[-3000:]
    for stage in ("finetune", "analyze", "group", "fuse", "sft", "eval"):
        assert f"{stage:9s} complete: skipped" in again.stdout, again.stdout


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_one_sbatch_runs_the_pipeline_and_equals_the_local_run(no_ray_run, tmp_path):
    local, _, _ = no_ray_run
    env = _env(tmp_path, **slurm_standins(tmp_path / "bin", ["127.0.0.1", "127.0.0.2"],
                                          tmp_path / "srun.log"), NPROC_PER_NODE="1")
    r = run(["bash", str(ROOT / "launch" / "slurm_run.sbatch"), str(ROOT / "cpift_dist" /
             "presets" / "tiny.yaml"), "--quiet", f"runs_dir={tmp_path / 'runs'}", *ARGS],
            800, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert not (tmp_path / "ray-imported").exists(), "the SLURM path imported ray"
    assert left_in_tmp(tmp_path / "tmp") == []
    slurm = tmp_path / "runs" / "tiny"
    # fine-tunes ran as srun steps on one node each, two tasks at a time on disjoint nodes
    events = [ln.split() for ln in (tmp_path / "srun.log").read_text().splitlines()]
    steps = {e[1]: {"start": float(e[2]), "cmd": e} for e in events if e[0] == "start"}
    for e in events:
        if e[0] == "end":
            steps[e[1]]["end"] = float(e[2])
    ft = [s for s in steps.values() if "--finetune" in s["cmd"]]
    assert len(ft) == 4 and all(s["cmd"][3] == "1" for s in ft)  # --nodes=1 each
    assert any(a["start"] < b["end"] and b["start"] < a["end"]
               for i, a in enumerate(ft) for b in ft[i + 1:]), "no two fine-tunes overlapped"
    sft = [s for s in steps.values() if "--stage" in s["cmd"]]
    assert sft and all(s["cmd"][3] == "2" for s in sft)  # SFT stages span both nodes
    nodes = {json.loads((slurm / "finetune" / t / "launch.json").read_text())["slot"][0]
             for t in ("arithmetic", "strings", "logic", "format")}
    assert nodes == {"127.0.0.1", "127.0.0.2"}
    # the same outputs as `cpift run --no-ray` on one node: masks, backbone, SFT weights
    same = [p.relative_to(local) for p in sorted(local.glob("analysis/masks/*.safetensors"))
            + sorted(local.glob("fusion/backbone/*.safetensors"))
            + sorted(local.glob("sft/stage-*/model/*.safetensors"))]
    assert len(same) >= 7
    for rel in same:  # ranks meet across 2 agents instead of 1: still bit-identical here
        assert (slurm / rel).read_bytes() == (local / rel).read_bytes(), rel


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["too-few-nodes", "relative-runs-dir", "no-srun"])
def test_slurm_run_refuses_what_it_cannot_run(tmp_path, case):
    env = {**os.environ, **slurm_standins(tmp_path / "bin", ["127.0.0.1", "127.0.0.2"])}
    runs = tmp_path / "runs"
    more, want = {"too-few-nodes": (["finetune.nodes_per_task=3"],
                                    "finetune.nodes_per_task=3 but the allocation has 2 node(s)"),
                  "relative-runs-dir": (["runs_dir=rel/runs"], "runs_dir: rel/runs is relative"),
                  "no-srun": ([], "srun is not on PATH")}[case]
    if case == "no-srun":
        (tmp_path / "bin" / "srun").unlink()
    r = run(["bash", str(ROOT / "launch" / "slurm_run.sbatch"),
             str(ROOT / "cpift_dist" / "presets" / "tiny.yaml"), f"runs_dir={runs}", *more],
            100, env=env, cwd=tmp_path)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and want in lines[0], r.stderr[-2000:]
    assert not runs.exists() and not (tmp_path / "rel").exists()  # nothing written


def test_local_slots_partition_the_gpus_and_the_cores(monkeypatch):
    from cpift_dist import launchers
    from cpift_dist.config import RunConfig

    cfg = RunConfig.model_validate({"base": "b", "tasks": [{"name": "a"}]})
    monkeypatch.setattr(launchers, "cuda_devices", lambda: 8)
    slots = launchers._local_slots(cfg, ranks=2, use_gpu=True)
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0,1", "2,3", "4,5", "6,7"]
    assert len(launchers._local_slots(cfg, ranks=3, use_gpu=True)) == 2  # floor(8 / 3)
    assert len(launchers._local_slots(cfg, ranks=2, use_gpu=True, jobs=3)) == 3
    monkeypatch.setattr(launchers.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cpu = launchers._local_slots(cfg, ranks=2, use_gpu=False)
    assert len(cpu) == 8 and cpu[0] == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cpu = launchers._local_slots(cfg, ranks=2, use_gpu=False, jobs=2)
    assert len(cpu) == 2 and cpu[0]["OMP_NUM_THREADS"] == "4"  # 16 cores / (2 jobs x 2 ranks)
    assert launchers.resolve_launcher(cfg) == "ray"
    cfg.ray.enabled = False
    assert launchers.resolve_launcher(cfg) == "torchrun"


@pytest.mark.timeout(180)
def test_a_rank_s_traceback_lands_in_the_job_s_torchrun_logs(tmp_path, monkeypatch):
    """A rank's uncaught exception is written by the entry point (``@record``) to torchrun's
    log directory inside the job's output, not to a fresh ``/tmp/torchelastic_*``."""
    from cpift_dist import launchers
    from cpift_dist.config import RunConfig

    entry = tmp_path / "entry.py"  # the entry point, with its loop made to fail: both ranks
    # fail together (a rank still starting when the other failed was stopped by torchrun
    # before its own failure, and wrote no log: seen once on a loaded 2-core machine)
    entry.write_text("import os, pathlib, sys, time\n"
                     "import cpift_dist.training.run as R\n"
                     "def planted(job):\n"
                     f"    ready = pathlib.Path({str(tmp_path / 'ready')!r})\n"
                     "    ready.mkdir(exist_ok=True)\n"
                     "    (ready / os.environ['RANK']).touch()\n"
                     "    while len(list(ready.iterdir())) < 2:\n"
                     "        time.sleep(0.05)\n"
                     "    raise RuntimeError(f'planted failure in the loop of {job.out.name}')\n"
                     "R.run = planted\n"
                     "sys.exit(R.main())\n")
    monkeypatch.setattr(launchers, "ENTRY", (str(entry),))
    for k, v in own_tmp(tmp_path / "tmp").items():
        monkeypatch.setenv(k, v)
    cfg = RunConfig.model_validate({"base": "b", "tasks": [{"name": "a"}],
                                    "finetune": {"local_jobs": 1}})
    cfg.ray.enabled = False
    out = tmp_path / "job"
    job = launchers.Job("the probe", ["--model", str(tmp_path), "--out", str(out),
                                      "--data", f"a={entry}"], out)
    failed = launchers.run_jobs(cfg, [job], ranks=2, use_gpu=False)
    assert failed == {"the probe": "torchrun exit 1; rerun to resume from its last checkpoint"}
    errors = sorted((out / "torchrun").glob("*/attempt_0/*/error.json"))
    assert [p.parent.name for p in errors] == ["0", "1"]  # one per rank
    for p in errors:
        err = json.loads(p.read_text())["message"]
        assert err["message"] == "RuntimeError: planted failure in the loop of job"
        stack = err["extraInfo"]["py_callstack"]  # the rank's traceback, down to the failure
        assert "cpift_dist/training/run.py" in stack and ", in planted" in stack, stack
    assert left_in_tmp(tmp_path / "tmp") == []


def _ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie no one reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _stop_when(marks: Path, n: int):
    """A thread that sends this process SIGTERM once ``n`` files are in ``marks`` (and never
    otherwise: the test's timeout reports it)."""
    import signal
    import threading
    import time

    def wait_then_stop():
        for _ in range(2400):
            if marks.is_dir() and len(list(marks.iterdir())) >= n:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.05)

    t = threading.Thread(target=wait_then_stop, daemon=True)
    t.start()
    return t


def _two_jobs(tmp_path, monkeypatch):
    from cpift_dist import launchers
    from cpift_dist.config import RunConfig

    for k, v in own_tmp(tmp_path / "tmp").items():
        monkeypatch.setenv(k, v)
    cfg = RunConfig.model_validate({"base": "b", "tasks": [{"name": "a"}],
                                    "finetune": {"local_jobs": 1}})
    cfg.ray.enabled = False
    return cfg, [launchers.Job(f"job {n}", [], tmp_path / n) for n in ("a", "b")]


@pytest.mark.timeout(180)
def test_sigterm_stops_the_launcher_s_jobs_and_starts_no_more(tmp_path, monkeypatch,
                                                              default_sigterm):
    """SIGTERM to the process that runs the jobs alone (``kill``, ``ray job stop``; its jobs
    run in sessions of their own): the running torchrun and both of its ranks end on the
    SIGTERM it forwards, with no rank left behind and no need of SIGKILL, the queued job never
    starts, and :class:`Terminated` goes on to the caller."""
    import signal

    from cpift_dist import launchers
    from cpift_dist.cli import sigterm_stops
    from cpift_dist.errors import Terminated

    ready = tmp_path / "ready"
    entry = tmp_path / "entry.py"  # a rank that says it runs, then works until stopped
    entry.write_text("import os, pathlib, time\n"
                     f"ready = pathlib.Path({str(ready)!r})\n"
                     "ready.mkdir(exist_ok=True)\n"
                     "(ready / str(os.getpid())).touch()\n"
                     "time.sleep(600)\n")
    monkeypatch.setattr(launchers, "ENTRY", (str(entry),))
    cfg, jobs = _two_jobs(tmp_path, monkeypatch)
    _stop_when(ready, 2)
    with pytest.raises(Terminated), sigterm_stops():
        launchers.run_jobs(cfg, jobs, ranks=2, use_gpu=False)
    ranks = [int(p.name) for p in ready.iterdir()]
    assert len(ranks) == 2 and all(_ended(pid) for pid in ranks)
    rc = json.loads((tmp_path / "a" / "launch.json").read_text())["returncode"]
    assert rc not in (0, -signal.SIGKILL), rc  # torchrun ended on the SIGTERM, not killed
    assert not (tmp_path / "b").exists()  # never started
    assert left_in_tmp(tmp_path / "tmp") == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


@pytest.mark.timeout(60)
def test_a_job_that_ignores_sigterm_is_killed_with_what_it_started(tmp_path, monkeypatch,
                                                                   default_sigterm):
    """A job whose processes ignore SIGTERM: after ``STOP_WAIT`` its whole process group (the
    job and what it started) gets SIGKILL, so that nothing outlives the launcher."""
    import signal

    from cpift_dist import launchers
    from cpift_dist.cli import sigterm_stops
    from cpift_dist.errors import Terminated

    pids = tmp_path / "pids"
    stubborn = ("import os, pathlib, signal, sys, time\n"
                "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                "if len(sys.argv) == 1:\n"
                "    import subprocess\n"
                "    subprocess.Popen([sys.executable, __file__, 'child'])\n"
                f"pathlib.Path({str(pids)!r}).mkdir(exist_ok=True)\n"
                f"(pathlib.Path({str(pids)!r}) / str(os.getpid())).touch()\n"
                "time.sleep(600)\n")
    script = tmp_path / "stubborn.py"
    script.write_text(stubborn)
    monkeypatch.setattr(launchers, "_command", lambda *a: [sys.executable, str(script)])
    monkeypatch.setattr(launchers, "STOP_WAIT", 1.0)
    cfg, jobs = _two_jobs(tmp_path, monkeypatch)
    _stop_when(pids, 2)
    with pytest.raises(Terminated), sigterm_stops():
        launchers.run_jobs(cfg, jobs, ranks=1, use_gpu=False)
    started = [int(p.name) for p in pids.iterdir()]
    assert len(started) == 2
    for _ in range(100):  # the child, no longer ours, is reaped by whoever adopted it
        if all(_ended(pid) for pid in started):
            break
        time.sleep(0.05)
    assert all(_ended(pid) for pid in started)
    rc = json.loads((tmp_path / "a" / "launch.json").read_text())["returncode"]
    assert rc == -signal.SIGKILL and not (tmp_path / "b").exists()


@pytest.mark.timeout(180)
def test_torchrun_passes_sigusr1_on_to_the_ranks(tmp_path, monkeypatch):
    """SLURM's ``--signal=USR1@T`` reaches torchrun too: the launcher has it pass SIGUSR1 on
    to the ranks (where they save a checkpoint and stop) instead of dying of it."""
    import signal
    import threading

    from cpift_dist import launchers

    ready, got = tmp_path / "ready", tmp_path / "got"
    entry = tmp_path / "entry.py"  # a rank that says it runs (and its torchrun), then waits
    entry.write_text("import os, pathlib, signal, sys, time\n"
                     f"ready, got = pathlib.Path({str(ready)!r}), pathlib.Path({str(got)!r})\n"
                     "def usr1(*_):\n"
                     "    got.mkdir(exist_ok=True)\n"
                     "    (got / os.environ['RANK']).touch()\n"
                     "    sys.exit(138)\n"
                     "signal.signal(signal.SIGUSR1, usr1)\n"
                     "ready.mkdir(exist_ok=True)\n"
                     "(ready / f\"{os.environ['RANK']}-{os.getppid()}\").touch()\n"
                     "time.sleep(600)\n")
    monkeypatch.setattr(launchers, "ENTRY", (str(entry),))
    monkeypatch.delenv("PET_SIGNALS_TO_HANDLE", raising=False)
    cfg, jobs = _two_jobs(tmp_path, monkeypatch)

    def usr1_to_torchrun():
        for _ in range(2400):
            if ready.is_dir() and len(list(ready.iterdir())) == 2:  # both ranks run
                break
            time.sleep(0.05)
        os.kill(int(next(ready.iterdir()).name.split("-")[1]), signal.SIGUSR1)

    threading.Thread(target=usr1_to_torchrun, daemon=True).start()
    failed = launchers.run_jobs(cfg, jobs[:1], ranks=2, use_gpu=False)
    assert sorted(p.name for p in got.iterdir()) == ["0", "1"]  # both ranks had it
    assert failed == {"job a": "torchrun exit 1; rerun to resume from its last checkpoint"}
