"""The real console script: exit codes, the Ray job entries, joining a cluster by address, the
embedded Ray's sockets. (`cpift run --preset tiny` through the console script runs in CI's
plain-install check, scripts/check_core_install.sh.)"""

import json
import os
import sys
from pathlib import Path

import pytest

from helpers import run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _run(args, **kw):
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp")}
    return run(args, kw.pop("timeout", 280), env=env, cwd=ROOT, **kw)


@pytest.mark.timeout(120)
def test_exit_status_and_ray_job_entry(models, tmp_path):
    r = _run([str(BIN / "cpift"), "analyze", "--base", str(models["base"]),
              "--tuned", f"a={tmp_path / 'missing'}", "--out", str(tmp_path / "o"), "--no-ray"])
    assert r.returncode == 2 and "does not exist" in r.stderr and not (tmp_path / "o").exists()
    r = _run([sys.executable, "ray_jobs/analyze.py", "--base", str(models["base"]),
              "--tuned", f"a={models['a']}", "--out", str(tmp_path / "o"), "--no-ray", "--quiet"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "masks" / "a.safetensors").is_file()
    r = _run([sys.executable, "ray_jobs/fuse.py", "--base", str(models["base"]),
              "--tuned", f"a={models['a']}", "--masks", str(tmp_path / "o" / "masks"),
              "--out", str(tmp_path / "f"), "--no-ray", "--quiet"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "f" / "manifest.json").is_file() and "fused 1 tasks" in r.stdout


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_analyze_joins_a_running_cluster_by_address(models, tmp_path, monkeypatch):
    """A separately started 2-node Ray cluster on 127.0.0.1, joined with --address. The
    cluster has no dashboard: joining needs none, and Ray stops it with SIGTERM, which leaves
    its multiprocessing directory (``pymp-*``) in the temp directory on every run."""
    from ray.cluster_utils import Cluster

    from helpers import left_in_tmp, own_tmp

    for k, v in own_tmp(tmp_path / "tmp").items():  # the cluster's processes and the CLI's
        monkeypatch.setenv(k, v)
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                      "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        common = ["analyze", "--base", str(models["base"]), "--tuned", f"a={models['a']}",
                  "--tuned", f"b={models['b']}", "--quiet", "analysis.unit_elements=2048",
                  "analysis.chunk_elements=1024"]
        r = _run([str(BIN / "cpift"), *common, "--out", str(tmp_path / "c"),
                  "--address", cluster.address], timeout=200)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        cluster.shutdown()
    assert left_in_tmp(tmp_path / "tmp") == []
    man = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert man["executor"] == "ray" and man["units"] > 4
    r = _run([str(BIN / "cpift"), *common, "--out", str(tmp_path / "l"), "--no-ray"], timeout=120)
    assert r.returncode == 0
    for t in ("a", "b"):
        f = f"masks/{t}.safetensors"
        assert (tmp_path / "c" / f).read_bytes() == (tmp_path / "l" / f).read_bytes()


@pytest.mark.timeout(60)
def test_address_where_no_cluster_answers_fails_fast(models, tmp_path):
    import time
    t0 = time.monotonic()
    r = _run([str(BIN / "cpift"), "analyze", "--base", str(models["base"]),
              "--tuned", f"a={models['a']}", "--out", str(tmp_path / "o"),
              "--address", "127.0.0.1:1"], timeout=50)
    assert r.returncode == 2 and "no Ray cluster answers" in r.stderr
    assert time.monotonic() - t0 < 40 and not (tmp_path / "o").exists()


@pytest.mark.timeout(120)
def test_the_embedded_ray_listens_on_loopback_only(ray_local):
    """Every socket the private local Ray listens on (GCS, raylet, workers, agents) is 127.0.0.1."""
    import psutil

    from helpers import listening_beyond_loopback

    @ray_local.remote
    def node_ip():
        return ray_local.util.get_node_ip_address()

    assert ray_local.get(node_ip.remote()) == "127.0.0.1"  # a worker is up, its server too
    names, exposed = listening_beyond_loopback(psutil.Process().children(recursive=True))
    assert {"gcs_server", "raylet"} <= names, names
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.timeout(120)
def test_the_checkouts_kernels_directory_does_not_shadow_the_pypi_package():
    """A process started in the repository's root has the root on ``sys.path``, so it finds
    ``kernels/`` as the top-level package ``kernels`` before the PyPI package of that name.
    transformers >= 5.25 imports that package with every model class: shadowed, no model
    loaded there (``python -m pytest`` from the root failed this way). Where the PyPI package
    is installed, the root's ``kernels`` must hand over to it; where it is not, stay an empty
    module that transformers does not count as ``kernels``."""
    import importlib.metadata

    probe = ("import kernels, transformers.modeling_utils as m;"
             "from transformers.utils.import_utils import is_kernels_available as a;"
             "print(kernels.__file__); print(getattr(kernels, '__version__', None)); print(a())")
    r = run([sys.executable, "-c", probe], 100, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    file, version, available = r.stdout.split()
    try:
        pypi = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pypi = None
    if pypi is not None:
        assert Path(file).resolve() != ROOT / "kernels" / "__init__.py"
        assert version == pypi
    else:
        assert (Path(file).resolve(), version, available) == (
            ROOT / "kernels" / "__init__.py", "None", "False")
    # without the PyPI package (no site-packages): the root's own, empty module
    r = run([sys.executable, "-S", "-c", "import kernels; print(kernels.__file__, "
             "getattr(kernels, '__version__', None), sorted(vars(kernels)).count('slerp'))"],
            60, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == [str(ROOT / "kernels" / "__init__.py"), "None", "0"]


@pytest.mark.timeout(60)
def test_sigusr1_is_for_the_ranks_and_does_not_end_cpift():
    """SLURM's ``--signal=USR1@T`` reaches every process of the job, ``cpift`` too: within
    the CLI it is a no-op (Python's default would end the process), and the signals are as
    they were after it."""
    code = ("import os, signal\n"
            "from cpift_dist.cli import sigterm_stops\n"
            "with sigterm_stops():\n"
            "    os.kill(os.getpid(), signal.SIGUSR1)\n"
            "    print('alive', flush=True)\n"
            "assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL\n"
            "assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL\n"
            "print('restored')\n")
    r = _run([sys.executable, "-c", code], timeout=50)
    assert r.returncode == 0 and r.stdout.split() == ["alive", "restored"], r.stderr[-2000:]


@pytest.mark.timeout(60)
def test_a_crash_in_native_code_prints_where_every_thread_was():
    """A command that dies of a fatal signal (a SIGSEGV in torch, numba or a BLAS) prints
    each thread's Python stack before dying, and still dies of the signal (exit -11)."""
    code = ("import ctypes, sys\n"
            "from cpift_dist import cli\n"
            "def crash_here(args):\n"
            "    return ctypes.string_at(0)\n"
            "cli.cmd_verify = crash_here\n"
            "sys.exit(cli.main(['verify', '.']))\n")
    r = _run([sys.executable, "-c", code], timeout=50)
    assert r.returncode == -11, (r.returncode, r.stderr[-2000:])
    assert "Fatal Python error: Segmentation fault" in r.stderr, r.stderr[-2000:]
    assert "crash_here" in r.stderr and "in main" in r.stderr, r.stderr[-2000:]
