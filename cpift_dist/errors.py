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
