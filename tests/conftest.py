import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
_OWN_TMP = None
if "RAY_TMPDIR" not in os.environ:  # a temp dir only where none is given, removed at the end
    _OWN_TMP = os.environ["RAY_TMPDIR"] = tempfile.mkdtemp(prefix="cpift-t-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(2)

from helpers import make_chat_tokenizer, make_llama, perturb  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def compiled_loops():
    """numba's loops compiled once, in this process, before any Ray worker or subprocess
    needs them (they then load numba's on-disk cache instead of all compiling at once)."""
    from cpift_dist.analysis import fused as analysis_loops
    from cpift_dist.fusion import fused as fusion_loops

    analysis_loops.warm()
    fusion_loops.warm()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny fp32 Llama (3 shards) and two tuned variants with many exact ties."""
    d = tmp_path_factory.mktemp("models")
    base = make_llama(d / "base")
    return {"base": base,
            "a": perturb(base, d / "a", seed=1),
            "b": perturb(base, d / "b", seed=2, density=0.3)}


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bf16")
    base = make_llama(d / "base", dtype=torch.bfloat16, seed=3)
    return {"base": base, "a": perturb(base, d / "a", seed=4, quantum=2.0 ** -8),
            "b": perturb(base, d / "b", seed=5, quantum=None)}


@pytest.fixture(scope="session")
def mixed_models(bf16_models, models, tmp_path_factory) -> dict[str, Path]:
    """Fine-tunes stored in another dtype than their base: a bf16 base with an fp32 fine-tune
    whose updates are finer than bf16 can hold (as DeepSpeed's ``zero_to_fp32`` saves a bf16
    run's master weights), one with only the MLP in fp32, and one in bf16; an fp32 base with a
    bf16 and an fp16 fine-tune."""
    d = tmp_path_factory.mktemp("mixed")
    g = torch.Generator().manual_seed(21)

    def fp32(only=""):
        def edit(name, t):
            if only not in name:
                return t
            fine = torch.randn(t.shape, generator=g) * 2e-4  # about bf16's step at 0.02
            return t.float() + fine * (torch.rand(t.shape, generator=g) < 0.5)
        return edit

    base = bf16_models["base"]
    return {"base": base,
            "fp32": perturb(base, d / "fp32", seed=6, edit=fp32()),
            "mlp": perturb(base, d / "mlp", seed=7, edit=fp32("mlp")),
            "bf16": bf16_models["a"],
            "base32": models["base"],
            "to_bf16": perturb(models["base"], d / "to_bf16", seed=8,
                               edit=lambda n, t: t.bfloat16()),
            "to_fp16": perturb(models["base"], d / "to_fp16", seed=9,
                               edit=lambda n, t: t.half() if "attn" in n else t)}


@pytest.fixture(scope="session")
def ray_local():
    """One private local Ray for the whole session (bound to 127.0.0.1, 2 CPUs)."""
    ray = pytest.importorskip("ray", reason="ray is not installed (a GPU check machine)")

    from cpift_dist.ray_utils import init_ray

    init_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def default_sigterm():
    """SIGTERM at its default within the test, as in a fresh ``cpift`` process (where the CLI
    installs its own handler): the session's Ray, once started in this process, leaves its
    handler (stop the local Ray, ``sys.exit``); it is back after the test."""
    import signal

    before = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, before)


@pytest.fixture(scope="session")
def train_setup(tmp_path_factory) -> Path:
    """A tiny Llama with a chat tokenizer (``model/``) and the generated suite (``suite/``)."""
    from cpift_dist.data import make_suite

    d = tmp_path_factory.mktemp("train")
    make_llama(d / "model")
    make_chat_tokenizer(d / "model")
    make_suite(d / "suite", n_train=48, n_eval=8)
    return d


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, ray_local):
    """``cpift run --preset tiny`` (2 fine-tune steps) on the session's Ray, once: (config,
    result, log lines, a pristine copy of its runs dir for tests that change a run)."""
    import shutil

    from cpift_dist.cli import preset_path
    from cpift_dist.config import load_config
    from cpift_dist.pipeline import Pipeline
    from helpers import TINY

    d = tmp_path_factory.mktemp("pipeline")
    cfg = load_config(preset_path("tiny"), [f"runs_dir={d}", *TINY])
    logs = []
    res = Pipeline(cfg, progress=False, log=logs.append).run()
    pristine = tmp_path_factory.mktemp("pristine") / "runs"
    shutil.copytree(d, pristine)
    return cfg, res, logs, pristine


def pytest_unconfigure(config):
    """Removes the Ray temp dir this run made (scripts/test.sh makes and removes its own)."""
    if _OWN_TMP:
        shutil.rmtree(_OWN_TMP, ignore_errors=True)
