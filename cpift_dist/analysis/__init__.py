"""Delta analysis: update magnitudes, exact global top-k core masks, stats and overlap."""

from cpift_dist.analysis.analyze import AnalysisResult, analyze
from cpift_dist.analysis.masks import MaskFile, MaskWriter, pack_mask, unpack_mask
from cpift_dist.analysis.radix_select import update_magnitude

__all__ = ["AnalysisResult", "MaskFile", "MaskWriter", "analyze", "pack_mask", "unpack_mask",
           "update_magnitude"]
