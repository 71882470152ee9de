"""How often a finished 2-rank ZeRO-3 run fails at exit: the shipped entry point against one
that lets Python finalise, side by side (interleaved) in one run.

    .venv/bin/python bench/exit_stress.py --runs 60 --jobs 2

Each run trains a tiny Llama for 6 steps on 2 gloo ranks under torchrun (CPU) and must exit 0
with its model written. ``finalise`` runs the same ``main`` through ``sys.exit(main())``, so the
ranks go through ``Py_FinalizeEx`` with DeepSpeed's gloo worker threads still alive; ``shipped``
is ``python -m cpift_dist.training.run``, which ends with ``os._exit`` (see ``run._exit``).
``--jobs 2`` runs two at once, so the ranks share busy cores, as in CI.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from helpers import torchrun_train  # noqa: E402

SHIM = "import sys\nfrom cpift_dist.training.run import main\nsys.exit(main())\n"


def one(setup: Path, out: Path, entry: list[str]) -> tuple[bool, bool]:
    """(ok, aborted) of one training run."""
    r = torchrun_train(setup, out, ("arithmetic", "strings"), "max_steps=6", "save_every=3",
                       "grad_accum=2", "zero_stage=3", timeout=400, entry=entry)
    ok = r.returncode == 0 and "trained 6 steps" in r.stdout and (out / "model").is_dir()
    return ok, "terminate called" in r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=60, help="runs per entry point")
    ap.add_argument("--jobs", type=int, default=2, help="runs at once")
    a = ap.parse_args()
    from cpift_dist.data import make_suite
    from helpers import make_chat_tokenizer, make_llama

    with tempfile.TemporaryDirectory(prefix="cpift-exit-") as tmp:
        d = Path(tmp)
        make_llama(d / "model")
        make_chat_tokenizer(d / "model")
        make_suite(d / "suite", n_train=48, n_eval=8)
        (d / "shim.py").write_text(SHIM)
        entries = {"shipped": ["-m", "cpift_dist.training.run"], "finalise": [str(d / "shim.py")]}
        plan = [(name, i) for i in range(a.runs) for name in entries]  # interleaved
        t0 = time.time()
        with ThreadPoolExecutor(a.jobs) as pool:
            results = list(pool.map(lambda p: (p[0], *one(d, d / f"{p[0]}-{p[1]}",
                                                          entries[p[0]])), plan))
        print(f"{len(plan)} runs in {time.time() - t0:.0f} s, {a.jobs} at once")
        for name in entries:
            got = [(ok, ab) for n, ok, ab in results if n == name]
            fails = sum(not ok for ok, _ in got)
            print(f"{name:9s} failed {fails} of {len(got)} ({100 * fails / len(got):.1f} %), "
                  f"SIGABRT 'terminate called' in {sum(ab for _, ab in got)}")


if __name__ == "__main__":
    main()
