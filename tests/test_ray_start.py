"""The private local Ray retries its start: a first attempt that times out (as on a busy
machine) is cleaned up and a fresh one comes up; attempts that all fail end in one clear line.
The one that came up is stopped at exit and its dir removed."""

import sys

import pytest

from helpers import run

_PROBE = """
import os, sys
import ray
from cpift_dist import ray_utils

real, calls = ray.init, []
def flaky(*a, **kw):
    calls.append(kw.get("_temp_dir"))
    if len(calls) == 1:  # what Ray raises when its node misses the start-up deadline
        os.makedirs(os.path.join(kw["_temp_dir"], "session_x"), exist_ok=True)
        raise Exception("The current node timed out during startup. This could happen because "
                        "some of the Ray processes failed to startup.")
    return real(*a, **kw)
ray.init = flaky
assert ray_utils.init_ray(None, num_cpus=1) == "local"
assert ray.get(ray.remote(lambda: 7).remote()) == 7
print("ATTEMPTS", len(calls), "FIRST_DIR_GONE", not os.path.exists(calls[0]),
      "FRESH_DIR", calls[0] != calls[1], "UP", os.path.isdir(calls[1]), flush=True)
"""  # exits with Ray up: the exit stops it and removes its dir


@pytest.mark.timeout(180)
def test_a_failed_local_ray_start_is_retried_in_a_fresh_dir():
    import os
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="cr-", dir="/tmp")  # Ray's socket paths are length-limited
    try:
        r = run([sys.executable, "-c", _PROBE], 170, env={**os.environ, "RAY_TMPDIR": short})
        left = os.listdir(short)
    finally:
        shutil.rmtree(short, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ATTEMPTS 2 FIRST_DIR_GONE True FRESH_DIR True UP True" in r.stdout
    assert left == [], f"the local Ray's dir outlived the process: {left}"
    assert "local Ray did not start (attempt 1 of 3)" in r.stderr


@pytest.mark.timeout(60)
def test_a_local_ray_that_never_starts_is_one_clear_error(tmp_path, monkeypatch):
    import ray

    from cpift_dist import ray_utils
    from cpift_dist.errors import CpiftError

    tries = []

    def never(*a, **kw):
        tries.append(kw["_temp_dir"])
        raise TimeoutError("The current node timed out during startup.")

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", never)
    monkeypatch.setattr(ray, "shutdown", lambda: None)  # the session's Ray (if any) stays up
    monkeypatch.setattr(ray_utils.time, "sleep", lambda s: None)
    with pytest.raises(CpiftError, match=r"did not start in 3 attempts .*timed out during"):
        ray_utils.init_ray(None, num_cpus=1)
    assert len(tries) == 3 and len(set(tries)) == 3
    assert not list(tmp_path.iterdir())  # every attempt's temp dir removed


@pytest.mark.timeout(60)
def test_only_a_failed_command_that_ran_on_the_local_ray_keeps_its_logs(tmp_path, monkeypatch,
                                                                          capsys):
    """A process that started the private local Ray keeps its dir when a command run on it
    fails; a command that fails without it (``--no-ray``) says nothing about Ray's logs and
    keeps nothing (its error stays one line). At exit the dir is removed unless kept (the
    removal with a real Ray: the test above and scripts/check_core_install.sh)."""
    import ray

    from cpift_dist import ray_utils
    from cpift_dist.cli import main

    kept = tmp_path / "cpift-ray-x"
    (kept / "session_latest" / "logs").mkdir(parents=True)
    state = {"dirs": [str(kept)], "keep": False, "uses": 1}
    monkeypatch.setattr(ray_utils, "_LOCAL", state)  # as after a local start in this process
    pickled = tmp_path / "pickled"  # a checkpoint the analysis refuses, after the executor
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    argv = ["analyze", "--base", str(pickled), "--tuned", f"a={pickled}", "--out",
            str(tmp_path / "o"), "--quiet"]
    assert main([*argv, "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pickle checkpoints are not read" in err, err
    assert not state["keep"] and state["uses"] == 1
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # the local Ray is up
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert "pickle checkpoints are not read" in err[0], err
    assert err[1:] == [f"cpift: the local Ray's logs are kept in {tmp_path / 'cpift-ray-x'}"]
    assert state["keep"] and state["uses"] == 2
    stops = []
    monkeypatch.setattr(ray, "shutdown", lambda: stops.append(1))  # the session's Ray stays
    ray_utils._end_local(ray)  # what the exit runs
    assert stops == [1] and (kept / "session_latest" / "logs").is_dir()
    state["keep"] = False
    ray_utils._end_local(ray)
    assert stops == [1, 1] and not kept.exists()
