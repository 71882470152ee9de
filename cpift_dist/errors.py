"""The project's error types: one line, naming the culprit (file, tensor or field)."""

from __future__ import annotations


class CpiftError(Exception):
    """Base class of every error cpift-dist raises on bad input; the CLI prints it and exits 2."""


class ConfigError(CpiftError):
    """A configuration file or CLI override is malformed or invalid."""


class CheckpointError(CpiftError):
    """A checkpoint directory or safetensors file is missing, corrupt or incompatible."""


class MaskError(CpiftError):
    """A core-mask file is malformed or was made for another model."""


class Terminated(KeyboardInterrupt):
    """SIGTERM reached ``cpift`` (a SLURM job preempted, cancelled or at its time limit,
    ``ray job stop``, ``kill``): raised in the main thread by the CLI's handler, so that the
    clean-up of a Ctrl-C runs (temporary outputs removed, a fuse's finished shards kept, the
    launcher's jobs stopped) and the exit status is 143."""
