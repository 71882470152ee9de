"""Fusion: one backbone from the task models (core transplant + SLERP on the rest)."""

from cpift_dist.fusion.fuse import fuse
from cpift_dist.fusion.slerp import fold_coefficients, fold_weights, slerp_reference

__all__ = ["fold_coefficients", "fold_weights", "fuse", "slerp_reference"]
