"""Task data: loading and rendering for SFT, deterministic mixing, the bundled task suite."""

from cpift_dist.data.mixture import TaskMixture
from cpift_dist.data.sft import IGNORE as IGNORE_INDEX
from cpift_dist.data.sft import Encoded, encode, encode_all, load_records
from cpift_dist.data.suite import SCORERS, TASKS, make_suite, score

__all__ = ["Encoded", "IGNORE_INDEX", "SCORERS", "TASKS", "TaskMixture", "encode", "encode_all", "load_records",
           "make_suite", "score"]
