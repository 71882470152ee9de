"""torchrun entry for the export tests: the training entry point, whose save exports the
model twice, streamed (``<out>/streamed``) and gathered whole then written by
``save_pretrained`` (``<out>/model``), with each one's ``freeze.json`` beside it."""

import importlib
import shutil

L = importlib.import_module("cpift_dist.training.loop")
R = importlib.import_module("cpift_dist.training.run")

_save = L.SFTLoop.save


def save(self, stream: bool = True) -> None:
    import torch

    _save(self, stream=True)
    if self.rank == 0:
        out = self.job.out
        shutil.move(out / "model", out / "streamed")
        if (out / "freeze.json").exists():
            shutil.copy(out / "freeze.json", out / "streamed" / "freeze.json")
    torch.distributed.barrier()
    _save(self, stream=False)


L.SFTLoop.save = save

if __name__ == "__main__":
    R._exit(R.main())
