"""Training: one readable DeepSpeed ZeRO-3/ZeRO-2 SFT loop."""

from cpift_dist.training.loop import SFTJob, SFTLoop, run

__all__ = ["SFTJob", "SFTLoop", "run"]
