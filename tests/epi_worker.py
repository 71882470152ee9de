"""torchrun entry for the EPI tests: the training entry point with two probes.

``EPI_WORKER_MODE=select``: no training; every rank plants known importance scores (a function
of each element's tensor and flat position, so independent of the partitioning, with many exact
ties) and runs one refresh, which writes ``epi/mask-step-000001.safetensors``.

``EPI_WORKER_MODE=trace``: trains normally; after every optimizer step rank 0 writes the full
(gathered) weights to ``trace/step-<t>.safetensors``.
"""

import importlib
import os

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import planted_scores as planted  # noqa: E402

L = importlib.import_module("cpift_dist.training.loop")
R = importlib.import_module("cpift_dist.training.run")

MODE = os.environ.get("EPI_WORKER_MODE", "trace")


def _plant_and_refresh(self, stop_on_signals: bool = False) -> None:
    epi = self.epi
    for part in epi.parts:
        for s in part.segs:
            pos = torch.arange(s.p_off, s.p_off + s.length)
            part.ema[s.flat_off:s.flat_off + s.length] = planted(s.name, pos).to(part.ema.device)
    epi.refresh(1)
    self.losses = [0.0]


def _dump(self) -> None:
    import deepspeed
    from safetensors.torch import save_file

    params = dict(self.engine.module.named_parameters())
    if self.cfg.zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            full = {n: p.detach().clone().cpu() for n, p in params.items()}
    else:
        full = {n: p.detach().clone().cpu() for n, p in params.items()}
    if self.rank == 0:
        d = self.job.out / "trace"
        d.mkdir(exist_ok=True)
        save_file(full, str(d / f"step-{self.step}.safetensors"))


_setup = L.SFTLoop.setup


def setup(self):
    _setup(self)
    if MODE == "trace":
        self.after_step.append(_dump)


L.SFTLoop.setup = setup
if MODE == "select":
    L.SFTLoop.train = _plant_and_refresh
    L.SFTLoop.save = lambda self: None

if __name__ == "__main__":
    R._exit(R.main())
