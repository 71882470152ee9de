"""Exact top-k by radix select over the float32 bit patterns of update magnitudes.

For a non-negative, finite float32 ``u`` the IEEE bit pattern read as an integer is monotone in
the value, and its sign bit is 0. Pass 1 histograms the high 16 bits (32,768 bins, the sign bit
being 0); the bin holding the k-th largest value is found from the summed histogram. Pass 2
resolves the low 16 bits inside that bin: the exact threshold and how many elements equal to it
are taken (ties go to the elements that come first). Every function here is pure: it sees one
tensor (or one histogram), never a whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cpift_dist.analysis import fused

HIGH_BINS = 1 << 15  # high 16 bits of a non-negative float32: the sign bit is 0
LOW_BINS = 1 << 16
NONFINITE_BIN = 0x7F80  # high bits of +Inf; NaN magnitudes lie above it


def update_magnitude(base: torch.Tensor, tuned: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """|tuned - base| computed in float32, whatever the input dtype (into ``out`` if given)."""
    if base.dtype != torch.float32:
        base, tuned = base.to(torch.float32), tuned.to(torch.float32)
    return torch.sub(tuned, base, out=out).abs_()


def magnitude_bits(u: torch.Tensor) -> torch.Tensor:
    """The int32 bit patterns of a non-negative float32 tensor (monotone in the value)."""
    return u.view(torch.int32)


def high_histogram(u: torch.Tensor) -> torch.Tensor:
    """int64 histogram of the high 16 bits of float32 magnitudes, ``HIGH_BINS`` long.

    Non-finite magnitudes (NaN, Inf) land in bins >= ``NONFINITE_BIN``: see :func:`finite`.
    """
    return torch.bincount(magnitude_bits(u) >> 16, minlength=HIGH_BINS)


def finite(high_hist: torch.Tensor) -> bool:
    """Whether every magnitude counted in a high-bits histogram was finite."""
    return not bool(high_hist[NONFINITE_BIN:].any())


def low_histogram(u: torch.Tensor, high: int) -> torch.Tensor:
    """int64 histogram of the low 16 bits of the elements whose high 16 bits equal ``high``."""
    x = magnitude_bits(u).numpy()
    sel = x[(x >= high << 16) & (x < (high + 1) << 16)]
    return torch.bincount(torch.from_numpy(sel & 0xFFFF), minlength=LOW_BINS)


def to_sparse(hist: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(bins, counts) of the non-empty bins: what a worker sends back to the driver."""
    idx = torch.nonzero(hist).reshape(-1)
    return idx.numpy().astype(np.int32), hist[idx].numpy().astype(np.int64)


def add_sparse(dense: np.ndarray, sparse: tuple[np.ndarray, np.ndarray]) -> None:
    """Adds a sparse histogram into a dense int64 accumulator in place."""
    np.add.at(dense, sparse[0], sparse[1])


@dataclass
class Selection:
    """The state of one top-k selection (one task, one selection group).

    Attributes:
        k: number of elements to select.
        numel: number of candidate elements.
        high: high 16 bits of the threshold (-1 when k == 0).
        above: elements whose high bits exceed ``high`` (all selected).
        in_bin: elements whose high bits equal ``high``.
        threshold_bits: full threshold bit pattern once resolved (-1 before, or when k == 0).
        greater: elements strictly above the threshold (all selected), once resolved.
        ties: elements equal to the threshold that are selected (the first ones in order).
        method: how it was resolved: ``sample-window``, ``radix`` or ``radix-3pass``.
    """

    k: int
    numel: int
    high: int = -1
    above: int = 0
    in_bin: int = 0
    threshold_bits: int = -1
    greater: int = 0
    ties: int = 0
    method: str = ""

    @property
    def need_in_bin(self) -> int:
        """How many elements of the threshold's bin are selected."""
        return self.k - self.above

    @property
    def threshold(self) -> float:
        """The k-th largest magnitude (0.0 when k == 0)."""
        if self.threshold_bits < 0:
            return 0.0
        return float(np.array([self.threshold_bits], dtype=np.int32).view(np.float32)[0])


def find_bin(hist: np.ndarray, k: int) -> tuple[int, int, int]:
    """The bin holding the k-th largest element of a histogram (k >= 1).

    Returns:
        (bin, count strictly above the bin, count in the bin).
    """
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside [1, {total}]")
    from_top = np.cumsum(hist[::-1])  # from_top[j] = count in bins >= len-1-j
    j = int(np.searchsorted(from_top, k))  # first j with from_top[j] >= k
    b = len(hist) - 1 - j
    above = int(from_top[j - 1]) if j > 0 else 0
    return b, above, int(hist[b])


def resolve_high(sel: Selection, high_hist: np.ndarray) -> None:
    """Pass 1 result: the threshold's bin and the count above it."""
    if sel.k == 0:
        return
    sel.high, sel.above, sel.in_bin = find_bin(high_hist, sel.k)


def resolve_low(sel: Selection, low_hist: np.ndarray) -> None:
    """Pass 2 result: the exact threshold and how many ties at it are taken."""
    if sel.k == 0:
        return
    low, above_low, _ = find_bin(low_hist, sel.need_in_bin)
    sel.threshold_bits = (sel.high << 16) | low
    sel.greater = sel.above + above_low
    sel.ties = sel.k - sel.greater


def resolve_window(sel: Selection, above: int, bits: np.ndarray) -> None:
    """Resolves a selection from a window of candidates.

    Every element above the window is selected (``above`` of them); so are the ``k - above``
    largest candidates, the first in canonical order winning among equal values (a stable
    descending sort): :func:`~cpift_dist.analysis.fused.set_winners` marks them. Sets the
    exact threshold, ``greater`` and ``ties`` in ``sel`` (a compiled two-pass radix select).

    Args:
        above: elements above the window.
        bits: int32 magnitude bits of the window's elements.

    Raises:
        ValueError: the window does not hold the k-th largest element.
    """
    need = sel.k - above
    if not 0 < need <= len(bits):
        raise ValueError(f"window does not hold the k-th largest: k={sel.k}, above={above}, "
                         f"window={len(bits)}")
    thr, greater = fused.kth_largest_bits(fused.readonly(np.ascontiguousarray(bits, np.int32)),
                                          need)
    sel.threshold_bits = int(thr)
    sel.ties = need - int(greater)
    sel.greater = sel.k - sel.ties


def sample_window(sel: Selection, sample_hist: np.ndarray) -> tuple[int, int, int] | None:
    """A window of magnitude bits [lo, hi) that very likely holds the k-th largest element.

    From a high-bits histogram of a sample (a 1/s share of the elements), the window spans the
    bins between the sample's quantiles at k(1 +- margin); the margin is 10% plus five standard
    deviations of the sampled count. Whether it really holds the k-th largest is checked
    exactly afterwards (see :func:`resolve_window`); this only predicts.

    Returns:
        (lo, hi) bit bounds and the number of elements the window is expected to hold (the
        caller decides whether to collect them: a threshold inside a mass of equal values makes
        a huge window), or None when k == 0.
    """
    n = int(sample_hist.sum())
    if sel.k == 0 or n == 0:
        return None
    scale = sel.numel / n
    m = sel.k / scale  # expected count above the threshold in the sample
    margin = 0.1 * m + 5 * math.sqrt(m) + 2
    from_top = np.cumsum(sample_hist[::-1])[::-1]  # from_top[b] = sampled count in bins >= b
    nb = len(sample_hist)
    # hi: the lowest bin edge with at most m - margin sampled elements at or above it
    ok_hi = np.flatnonzero(from_top <= m - margin)
    hi_bin = int(ok_hi[0]) if len(ok_hi) else NONFINITE_BIN
    # lo: the highest bin edge with at least m + margin sampled elements at or above it
    ok_lo = np.flatnonzero(from_top >= m + margin)
    lo_bin = int(ok_lo[-1]) if len(ok_lo) else 0
    lo_bin = min(lo_bin, hi_bin)
    inside = (from_top[lo_bin] - (from_top[hi_bin] if hi_bin < nb else 0)) * scale
    hi_bin = min(hi_bin, NONFINITE_BIN)  # every finite magnitude lies below +Inf's bits
    return lo_bin << 16, hi_bin << 16, math.ceil(inside)
