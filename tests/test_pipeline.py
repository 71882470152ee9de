"""`cpift run` end to end (tiny preset, local Ray, CPU): outputs, freeze, resume, reruns."""

import json
import shutil

import pytest
import torch

from cpift_dist.cli import main, preset_path
from cpift_dist.config import load_config
from cpift_dist.io import Checkpoint, verify_outputs
from cpift_dist.pipeline import STAGES, Pipeline
from helpers import TINY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def test_every_stage_writes_outputs_that_load(tiny_run):
    from transformers import AutoModelForCausalLM

    cfg, res, logs, _ = tiny_run
    run = cfg.run_dir
    assert [line.split()[0] for line in logs] == list(STAGES)
    spans = []
    for t in ("arithmetic", "strings", "logic", "format"):
        assert (run / "finetune" / t / "model" / "config.json").is_file()
        assert (run / "analysis" / "masks" / f"{t}.safetensors").is_file()
        rank = json.loads((run / "finetune" / t / "ranks" / "0.json").read_text())
        spans.append((rank["start"], rank["end"]))
    # Ray ran the fine-tunes side by side (1 CPU each, 2 CPUs): some two trained at once
    assert any(a0 < b1 and b0 < a1 for i, (a0, a1) in enumerate(spans)
               for b0, b1 in spans[i + 1:]), spans
    groups = json.loads((run / "groups.json").read_text())
    stages = [s["tasks"] for s in groups["stages"]]
    assert sorted(sum(stages, [])) == sorted(t.name for t in cfg.tasks)
    finals = [run / "fusion" / "backbone", *(run / "sft" / f"stage-{k}" / "model"
                                             for k in range(1, len(stages) + 1)),
              run / "baselines" / "multitask" / "stage-1" / "model"]
    for p in finals:
        model = AutoModelForCausalLM.from_pretrained(p)
        out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, min_new_tokens=2)
        assert out.shape == (1, 5)
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert set(scores["scores"]) >= {"base", "fused", "multitask", "single:logic",
                                     f"cpi:stage-{len(stages)}"}
    for s in scores["scores"].values():
        assert all(0 <= s[t] <= 1 for t in scores["tasks"])
    md = (run / "report" / "report.md").read_text()
    assert "| method |" in md and "worst drop" in md
    page = (run / "report" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "src='http" not in page
    assert res["table"].splitlines()[0].startswith("| method |")
    # every stage's manifest lists files that are there, with their sizes and digests
    stage_dirs = sorted(m.parent for m in run.rglob("manifest.json"))
    assert {run / "analysis", run / "fusion" / "backbone", run / "finetune" / "arithmetic"
            / "model", run / "sft" / "stage-1"} <= set(stage_dirs), stage_dirs
    for d in stage_dirs:
        assert verify_outputs(d) == [], d
    assert main(["verify", str(run)]) == 0  # the whole run, as a user checks a copied one


def test_frozen_elements_hold_across_the_stages(tiny_run):
    from cpift_dist.training.freeze import CoreUnion

    cfg, _, _, _ = tiny_run
    run = cfg.run_dir
    groups = [s["tasks"] for s in json.loads((run / "groups.json").read_text())["stages"]]
    models = [Checkpoint(run / "fusion" / "backbone")] + [
        Checkpoint(run / "sft" / f"stage-{k}" / "model") for k in range(1, len(groups) + 1)]
    assert len(groups) >= 2, f"one stage: nothing frozen to check ({groups})"
    checked = 0
    for k in range(2, len(groups) + 1):  # stage k keeps the cores of stages 1..k-1
        union = CoreUnion([run / "analysis" / "masks" / f"{t}.safetensors"
                           for g in groups[:k - 1] for t in g])
        before, after = models[k - 1], models[k]
        man = json.loads((run / "sft" / f"stage-{k}" / "manifest.json").read_text())
        n = 0
        for name in union.names():
            m = torch.from_numpy(union.bits(name))
            assert torch.equal(before.read(name).reshape(-1)[m], after.read(name).reshape(-1)[m])
            n += int(m.sum())
        assert n == man["frozen_elements"] == man["checked_elements"] > 0
        checked += n
        # the final model still holds the cores of stage 1 as stage 1 left them
    if len(groups) >= 2:
        last = models[-1]
        union = CoreUnion([run / "analysis" / "masks" / f"{t}.safetensors" for t in groups[0]])
        for name in union.names():
            m = torch.from_numpy(union.bits(name))
            assert torch.equal(models[1].read(name).reshape(-1)[m], last.read(name).reshape(-1)[m])
    assert checked > 0


def test_reruns_redo_what_changed_then_evolving_isolation_in_cpi_and_as_a_baseline(
        tiny_run, tmp_path):
    """On a copy of the finished run (one test: each SFT re-run costs a minute here), a rerun
    skips every stage and re-runs exactly what changed: a fused shard cut short (the fuse
    alone); a deleted eval; then `sft.epi` alone
    (evolving masks inside CPI-FT's stages) with the epi method as a baseline: the SFT, the
    baselines' new method (multitask is kept), the eval and the report re-run, the fuse does
    not; then a new fusion omega: the fuse, the SFT, the eval and the report, the baselines
    (which start from the base) do not. Every output loads; the drift plot is there."""
    from transformers import AutoModelForCausalLM

    from cpift_dist.analysis.masks import MaskFile

    _, _, _, pristine = tiny_run
    shutil.copytree(pristine, tmp_path / "runs")

    def rerun(*overrides, from_stage=None):
        logs = []
        c = load_config(preset_path("tiny"), [f"runs_dir={tmp_path / 'runs'}", *TINY,
                                              *overrides])
        res = Pipeline(c, from_stage, progress=False, log=logs.append).run()
        ran = {line.split()[0]: "skipped" not in line for line in logs}
        return c.run_dir, res, ran, [s for s in STAGES if ran.get(s)]

    run, _, ran, _ = rerun()
    assert not any(ran[s] for s in STAGES[:-1]), ran  # everything complete: only the report
    # a fused shard cut short (its manifest records another size): the fuse re-runs, writes
    # the same bytes, so nothing after it does
    shard = sorted((run / "fusion" / "backbone").glob("*.safetensors"))[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:-8])
    assert rerun()[3] == ["fuse", "report"]
    assert shard.read_bytes() == whole
    groups, stage1 = run / "groups.json", run / "sft" / "stage-1" / "manifest.json"
    backbone = run / "fusion" / "backbone" / "manifest.json"
    multitask = run / "baselines" / "multitask" / "stage-1" / "manifest.json"
    stamp = {p: p.stat().st_mtime_ns for p in (groups, stage1, backbone, multitask)}
    shutil.rmtree(run / "eval")
    assert rerun()[3] == ["eval", "report"]
    # an SFT field alone: cpi's stages re-run (now with evolving isolation) on the same
    # backbone; the new baseline method runs, the multitask baseline is kept
    epi = ("sft.epi.p=0.02", "sft.epi.refresh_every=1", "sft.epi.warmup_steps=1",
           "baselines=[multitask, epi]")
    order = rerun(*epi)[3]
    assert order == ["sft", "baselines", "eval", "report"], order
    assert [p.stat().st_mtime_ns for p in (groups, backbone, multitask)] == [
        stamp[groups], stamp[backbone], stamp[multitask]]
    assert stage1.stat().st_mtime_ns != stamp[stage1]
    epi_base = run / "baselines" / "epi" / "stage-1" / "manifest.json"
    stamp.update({p: p.stat().st_mtime_ns for p in (stage1, epi_base)})
    # a fusion field: the backbone changes, so cpi's stages re-run and the eval; the
    # baselines start from the base and are kept
    _, res, _, order = rerun("fusion.omega=0.5", *epi)
    assert order == ["fuse", "sft", "eval", "report"], order
    assert [p.stat().st_mtime_ns for p in (groups, multitask, epi_base)] == [
        stamp[groups], stamp[multitask], stamp[epi_base]]
    assert backbone.stat().st_mtime_ns != stamp[backbone]
    assert stage1.stat().st_mtime_ns != stamp[stage1]
    stages = sorted(run.glob("sft/stage-*")) + [run / "baselines" / "epi" / "stage-1"]
    for d in stages:
        man = json.loads((d / "manifest.json").read_text())
        log = json.loads((d / "epi" / "epi.json").read_text())
        steps = man["steps"]
        assert [r["step"] for r in log["refreshes"]] == list(range(1, steps))
        assert man["epi_refreshes"] == steps - 1 and len(man["epi_masks"]) == steps - 1
        for rel, digest in man["epi_masks"].items():
            m = MaskFile(d / rel)
            assert sum(int(m.read(n).sum()) for n in m.names()) == log["refreshes"][0]["k"]
        facts = json.loads((d / "freeze.json").read_text())
        assert facts["epi"]["partition_mismatches"] == 0
        assert facts["epi"]["frozen_in_partitions"] == log["refreshes"][0]["k"]
        if d.parent.name == "sft" and d.name != "stage-1":  # static cores too, still checked
            assert facts["checked"] == facts["frozen"] > 0 and not facts["mismatched_tensors"]
        AutoModelForCausalLM.from_pretrained(d / "model")
    assert "multitask" in json.loads((run / "eval" / "scores.json").read_text())["scores"]
    assert "| epi |" in res["table"]
    md = (run / "report" / "report.md").read_text()
    assert "## Evolving isolation" in md and "| baselines/epi/stage-1 |" in md
    assert "isolation-drift.png" in md and (run / "report" / "isolation-drift.png").is_file()


def test_ray_job_submit_against_a_local_head(tiny_run, tmp_path):
    """`ray job submit --working-dir . -- python ray_jobs/run.py ...` on a head on 127.0.0.1
    (token authentication, as Ray 2.60 requires): the job re-runs the eval on that cluster and
    skips every stage before it."""
    import os
    import secrets
    import subprocess
    import sys
    from pathlib import Path

    from helpers import free_ports, run

    cfg, _, _, _ = tiny_run
    root = Path(__file__).resolve().parents[1]
    ray_bin = str(Path(sys.executable).parent / "ray")
    import tempfile
    short = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must be short
    token = tmp_path / "token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "RAY_TMPDIR": str(short),  # the job's `python` is this environment's
           # the head is killed, and its dashboard with it: what that leaves in the temp
           # directory (its multiprocessing directory) goes with `short`
           "TMPDIR": str(short),
           # Ray's single-machine mode: the node IP is 127.0.0.1 and every server of the head
           # listens there alone (`--node-ip-address 127.0.0.1` by itself binds all interfaces)
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    import signal
    import socket
    import time

    def stop(proc):
        import contextlib
        with contextlib.suppress(ProcessLookupError):  # (already gone with its group)
            os.killpg(proc.pid, signal.SIGKILL)  # the head, its GCS, raylet and workers
        proc.wait(timeout=60)

    def start_head(attempt: int):
        """A head in its own session (the test stops it alone: `ray stop` would stop every Ray
        on the machine, the session's own included), every port its own: the session's Ray
        already holds the defaults (e.g. the dashboard agent's 52365), and a second agent that
        cannot bind leaves job submission without one. Returns the process and its dashboard
        port once the dashboard answers, or None with its log when it exits first."""
        port, dash, *more = free_ports(9)
        ports = [f"--{name}={p}" for name, p in zip((
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
            "metrics-export-port", "ray-client-server-port", "node-manager-port",
            "object-manager-port"), more)]
        log = tmp_path / f"head-{attempt}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [ray_bin, "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
                 "--port", str(port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                 str(dash), "--num-cpus", "2", *ports, "--temp-dir", str(short)], env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", dash)) == 0:
                    return proc, dash, log
            if proc.poll() is not None:
                stop(proc)  # whatever it started before it exited
                return None, dash, log
            time.sleep(1)
        stop(proc)
        pytest.fail("the Ray head's dashboard did not come up in 120 s: "
                    + log.read_text()[-3000:])

    # a head that exits before its dashboard answers (a port another process took between
    # choosing and binding it) is started again on new ports; its log is kept and shown
    for attempt in range(3):
        head, dash, log = start_head(attempt)
        if head is not None:
            break
        print(f"ray start --head exited (attempt {attempt + 1}):\n{log.read_text()[-3000:]}")
    else:
        pytest.fail("ray start --head exited three times; the last log:\n"
                    + log.read_text()[-3000:])
    try:
        excludes = '{"excludes": ["runs/", ".git/", ".venv/", "bench/_data/", "__pycache__/"]}'
        for _ in range(30):  # the job agent comes up a little after the dashboard
            job = run(
                [ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dash}",
                 "--working-dir", str(root), "--runtime-env-json", excludes, "--",
                 "python", "ray_jobs/run.py", "--preset", "tiny", f"runs_dir={cfg.runs_dir}",
                 *TINY, "eval.limit=4", "--from", "eval", "--quiet"],
                540, env=env, cwd=root)
            out = job.stdout + job.stderr
            if "No available agent" not in out and "Agent info not found" not in out:
                break
            time.sleep(3)
        assert job.returncode == 0 and "succeeded" in out, out[-3000:]
        assert "eval      done" in out  # and nothing before the eval: the run is unchanged
        assert all(f"{s:9s} complete: skipped" in out for s in STAGES[:STAGES.index("eval")])
        assert (cfg.run_dir / "eval" / "scores.json").is_file()
        import psutil

        from helpers import listening_beyond_loopback

        def in_group(p):
            try:
                return os.getpgid(p.pid) == head.pid
            except OSError:
                return False
        names, exposed = listening_beyond_loopback(filter(in_group, psutil.process_iter()))
        assert {"gcs_server", "raylet"} <= names, names
        assert not exposed, f"the head listens beyond loopback: {exposed}"
    finally:
        stop(head)
        shutil.rmtree(short, ignore_errors=True)


def test_the_report_shows_example_counts_and_every_stage_freeze_check(tiny_run):
    cfg, _, _, _ = tiny_run
    run = cfg.run_dir
    md = (run / "report" / "report.md").read_text()
    scores = json.loads((run / "eval" / "scores.json").read_text())["scores"]
    n = scores["base"]["_n"]  # held-out examples scored per task, the same for every model
    assert all(s["_n"] == n for s in scores.values()) and set(n) == set(scores["base"]) - {
        "_n", "_examples"}
    assert all(1 <= k <= cfg.eval.limit for k in n.values())
    if len(set(n.values())) == 1:
        k = next(iter(n.values()))
        assert f"share of **{k} held-out examples**" in md and f"1/{k} = {1 / k:.3f}" in md
    else:
        assert all(f"{t} {k} (one example = {1 / k:.3f})" in md for t, k in n.items())
    section = md.split("## Frozen-element check of every stage")[1].split("\n## ")[0]
    stages = sorted(run.glob("sft/stage-*"))
    assert len(stages) >= 2
    for d in stages[1:]:  # every stage after the first froze earlier cores
        man = json.loads((d / "manifest.json").read_text())
        row = [ln for ln in section.splitlines() if ln.startswith(f"| sft/{d.name} |")]
        assert len(row) == 1, section
        assert f"| {man['frozen_elements']:,} | {man['checked_elements']:,} |" in row[0]
        assert row[0].endswith("| 0 | bit-identical |")
    assert "| sft/stage-1 |" in section and "nothing frozen" in section
    page = (run / "report" / "report.html").read_text()
    assert "Frozen-element check of every stage" in page and "bit-identical" in page


def test_the_heatmap_scale_spans_the_off_diagonal_overlaps(tmp_path):
    from cpift_dist.plots import jaccard_heatmap, offdiagonal_range

    jac = [[1, .012, .020, .031], [.012, 1, .015, .018], [.020, .015, 1, .025],
           [.031, .018, .025, 1]]
    lo, hi = jaccard_heatmap(list("abcd"), jac, [["a", "d"], ["b"], ["c"]], 0.03,
                             tmp_path / "j.png")
    assert (lo, hi) == (.012, .031) and (tmp_path / "j.png").stat().st_size > 0
    assert offdiagonal_range([[1]]) == (0.0, 1.0)
    lo, hi = offdiagonal_range([[1, .05], [.05, 1]])  # all equal: still a non-empty range
    assert lo < .05 < hi


@pytest.mark.timeout(120)
def test_in_process_eval_holds_as_many_models_at_once_as_memory_or_gpus_allow(tmp_path,
                                                                            monkeypatch):
    """Without Ray (``--no-ray``, the SLURM script) the eval threads each load a model: at
    most as many at once as fit in memory (float32 and a quarter more), or one per GPU, each
    thread on its own GPU; torch's thread count is as it was after."""
    import threading
    import time
    from types import SimpleNamespace

    import importlib

    from cpift_dist import evaluate
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.io import Checkpoint
    from cpift_dist.pipeline import eval_slots, evaluate_all
    from helpers import make_llama

    models = {f"m{i}": tmp_path / f"m{i}" for i in range(4)}
    for p in models.values():
        make_llama(p)
    numel = sum(t.numel for t in Checkpoint(models["m0"]).tensors.values())
    seen, lock = {"now": 0, "peak": 0, "on": set(), "clash": 0, "devices": []}, threading.Lock()

    def fake(path, tasks, cfg, threads=None, device=None):
        assert threads is None  # process-wide: never set from an eval thread
        with lock:
            seen["now"] += 1
            seen["peak"] = max(seen["peak"], seen["now"])
            seen["clash"] += device in seen["on"]
            seen["on"].add(device)
            seen["devices"].append(device)
        time.sleep(0.3)
        with lock:
            seen["now"] -= 1
            seen["on"].discard(device)
        return {"t": {"score": 0.5, "n": 1, "examples": []}}

    monkeypatch.setattr(evaluate, "evaluate_model", fake)
    analyze_module = importlib.import_module("cpift_dist.analysis.analyze")  # not the function
    before = torch.get_num_threads()
    # (GPUs, memory: the host's or each GPU's, models at once, devices): bf16 on a GPU is
    # 2.5 bytes per parameter with the margin; beyond 90% of a GPU, one at a time on all
    for gpus, memory, peak, devices in [(0, int(2.5 * 5 * numel / 0.8), 2, {"cpu"}),
                                        (0, 10 * numel, 1, {"cpu"}),
                                        (2, 3 * numel, 2, {"cuda:0", "cuda:1"}),
                                        (2, 2 * numel, 1, {"auto"}),
                                        (5, 2 * numel, 2, {"auto:0,1", "auto:2,3"})]:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda i: SimpleNamespace(total_memory=memory))
        monkeypatch.setattr(analyze_module, "available_memory", lambda: memory)
        seen.update(peak=0, clash=0, devices=[])
        res = evaluate_all(models, {"t": None}, SimpleNamespace(eval=None),
                           InProcessExecutor(8))
        assert list(res) == list(models) and all(r["t"] == 0.5 for r in res.values())
        assert seen["peak"] == peak and set(seen["devices"]) == devices, (gpus, seen)
        assert not gpus or seen["clash"] == 0  # a GPU holds one model at a time
        assert torch.get_num_threads() == before
    assert eval_slots(models, 3, gpus=0, memory=1 << 50) == ["cpu"] * 3
    assert eval_slots(models, 8, gpus=8, memory=0, gpu_memory=1 << 40) == [
        f"cuda:{i}" for i in range(4)]
    # 2.5 bytes per parameter over 90% of a GPU holding 1.0: 3 GPUs a model, 2 groups of 8
    assert eval_slots(models, 8, gpus=8, memory=0, gpu_memory=numel) == ["auto:0,1,2",
                                                                         "auto:3,4,5"]


@pytest.mark.timeout(120)
def test_ray_eval_tasks_ask_for_the_gpus_a_model_spans(tmp_path, monkeypatch, ray_local):
    """On a Ray cluster with GPUs each eval task asks for as many GPUs as its model needs in
    bf16 (``gpus_per_model``, at most one node's) and spreads it over them (``device="auto"``
    where the task sees more than one); ``auto:2,3`` gives accelerate those GPUs' memory only.
    The GPU figures are faked (CI has none): the session's Ray has no GPU node, which
    ``ray_gpu_layout`` says."""
    from types import SimpleNamespace

    from cpift_dist import evaluate, pipeline, ray_utils
    from cpift_dist.errors import CpiftError
    from cpift_dist.executor import RayExecutor
    from cpift_dist.io import Checkpoint
    from helpers import make_llama

    models = {f"m{i}": make_llama(tmp_path / f"m{i}") for i in range(2)}
    numel = sum(t.numel for t in Checkpoint(models["m0"]).tensors.values())
    with pytest.raises(CpiftError, match="no GPU node"):
        ray_utils.ray_gpu_layout()
    asked, devices = [], []

    class Recorded(RayExecutor):  # runs the task's function here, as a task with n GPUs would
        def map(self, fn, shared, items):
            asked.append(self.num_gpus)
            monkeypatch.setattr(torch.cuda, "device_count", lambda: int(self.num_gpus))
            for i, args in enumerate(items):
                yield i, fn(shared, *args)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(evaluate, "evaluate_model", lambda path, tasks, cfg, threads=None,
                        device=None: devices.append(device) or {"t": {"score": 1.0, "n": 1,
                                                                      "examples": []}})
    # (one GPU's memory, GPUs per node): 2.5 bytes per parameter over 90% of a GPU
    for memory, per_node, gpus, device in [(3 * numel, 8, 1, None), (2 * numel, 8, 2, "auto"),
                                           (numel // 2, 4, 4, "auto")]:
        monkeypatch.setattr(ray_utils, "ray_gpu_layout", lambda: (memory, per_node))
        asked.clear(), devices.clear()
        res = pipeline.evaluate_all(models, {"t": None}, SimpleNamespace(eval=None),
                                    Recorded(num_gpus=1))
        assert asked == [gpus] and devices == [device] * 2 and list(res) == list(models)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (10 + i, 100))
    spread = evaluate._spread_memory("auto:1,3")
    assert list(spread) == [1, 3, "cpu"] and spread[1] == 11 and spread[3] == 13
    assert evaluate._spread_memory("auto") is None


@pytest.mark.timeout(300)
def test_eval_threads_load_one_model_at_a_time_and_keep_tied_heads_tied(train_setup, tmp_path,
                                                                        monkeypatch):
    """transformers 5's ``from_pretrained`` swaps process-wide state (weight tying off, the
    default dtype) while it builds a model: two loads on threads at once left tying off for
    the process, and later tied models loaded with a random ``lm_head``. The eval threads load
    one model at a time; each tied model comes out tied and scores as it does alone."""
    import threading
    import time
    from types import SimpleNamespace

    import importlib

    import transformers
    from transformers.modeling_utils import PreTrainedModel

    from cpift_dist.config import EvalConfig
    from cpift_dist.evaluate import EvalTask, evaluate_model
    from cpift_dist.executor import InProcessExecutor
    from cpift_dist.pipeline import evaluate_all
    from helpers import make_chat_tokenizer, make_tied

    models = {f"m{i}": make_tied(tmp_path / f"m{i}", store_head=False, seed=i)
              for i in range(4)}
    for p in models.values():
        make_chat_tokenizer(p)
    tasks = {t: EvalTask(train_setup / "suite" / t / "eval.jsonl", scorer=t)
             for t in ("arithmetic", "format")}
    cfg = EvalConfig(max_new_tokens=6, limit=3)
    alone = {k: evaluate_model(p, tasks, cfg, device="cpu") for k, p in models.items()}

    tie, loaded = PreTrainedModel.tie_weights, transformers.AutoModelForCausalLM.from_pretrained
    seen, lock = {"now": 0, "peak": 0, "untied": 0, "calls": 0}, threading.Lock()

    def spy(*args, **kwargs):
        with lock:
            seen["now"] += 1
            seen["peak"] = max(seen["peak"], seen["now"])
        time.sleep(0.2)  # four threads start together: without the lock all four are here
        try:
            model = loaded(*args, **kwargs)
        finally:
            with lock:
                seen["now"] -= 1
        with lock:
            seen["calls"] += 1
            seen["untied"] += model.lm_head.weight is not model.model.embed_tokens.weight
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the CPU's slots, GPU or not
    monkeypatch.setattr(importlib.import_module("cpift_dist.analysis.analyze"),
                        "available_memory", lambda: 1 << 40)
    res = evaluate_all(models, tasks, SimpleNamespace(eval=cfg), InProcessExecutor(4))
    assert seen["calls"] == 4 and seen["peak"] == 1 and seen["untied"] == 0, seen
    assert PreTrainedModel.tie_weights is tie and torch.get_default_dtype() == torch.float32
    assert {k: {t: r[t] for t in tasks} for k, r in res.items()} == {
        k: {t: r["score"] for t, r in a.items()} for k, a in alone.items()}


def test_a_model_spread_by_device_map_scores_as_on_one_device(train_setup):
    """``device="auto"`` (a model larger than one GPU: accelerate's ``device_map``) runs the
    same generation, with the same scores as on one device: the CPU where no GPU is (CI),
    else the first GPU (bf16 there, as ``auto`` loads it)."""
    from cpift_dist.config import EvalConfig
    from cpift_dist.evaluate import EvalTask, evaluate_model

    tasks = {t: EvalTask(train_setup / "suite" / t / "eval.jsonl", scorer=t)
             for t in ("arithmetic", "format")}
    cfg = EvalConfig(max_new_tokens=8, limit=4)
    one = evaluate_model(train_setup / "model", tasks, cfg,
                         device="cuda:0" if torch.cuda.is_available() else "cpu")
    spread = evaluate_model(train_setup / "model", tasks, cfg, device="auto")
    assert spread == one and all(r["n"] == 4 for r in one.values())


@pytest.mark.timeout(120)
def test_ray_tasks_that_ask_for_memory_run_as_many_at_once_as_a_node_holds(ray_local):
    """Ray's eval tasks on CPU nodes ask for their model's memory (``RayExecutor(memory=)``):
    a node runs as many at once as its memory resource covers; a request beyond the largest
    node's is capped there (the tasks run one at a time rather than never)."""
    from cpift_dist.executor import RayExecutor

    def held(seconds, i):  # local: pickled by value (the workers cannot import this file)
        import time

        t0 = time.time()
        time.sleep(seconds)
        return t0, time.time()

    node = max(n["Resources"].get("memory", 0) for n in ray_local.nodes() if n["Alive"])
    assert node > 0
    for memory, overlap in [(None, True), (int(0.6 * node), False), (10 * node, False)]:
        spans = [r for _, r in RayExecutor(memory=memory).map(held, 3.0, [(i,) for i in
                                                                           range(2)])]
        (a0, a1), (b0, b1) = sorted(spans)
        assert (b0 < a1) is overlap, (memory, spans)  # 2 CPUs: both at once where it fits
