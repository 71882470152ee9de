"""The pure radix-select pieces against brute force."""

import numpy as np
import pytest
import torch

from cpift_dist.analysis.radix_select import (HIGH_BINS, LOW_BINS, Selection, find_bin, finite,
                                              high_histogram, low_histogram, magnitude_bits,
                                              resolve_high, resolve_low, sample_window,
                                              select_candidates,
                                              update_magnitude)

pytestmark = pytest.mark.timeout(60)


def test_bits_are_monotone_in_value():
    u = torch.tensor([0.0, 1e-45, 1e-38, 1e-3, 0.5, 1.0, 3e38])
    b = magnitude_bits(u)
    assert torch.all(b[1:] > b[:-1])


def test_update_magnitude_in_float32_from_bf16():
    a = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    b = torch.tensor([1.0078125, 2.0], dtype=torch.bfloat16)
    u = update_magnitude(a, b)
    assert u.dtype == torch.float32 and u.tolist() == [0.0078125, 4.0]


@pytest.mark.parametrize("seed", range(5))
def test_exact_threshold_matches_sort(seed):
    g = torch.Generator().manual_seed(seed)
    u = (torch.randn(5000, generator=g).abs() * 1e-3).round(decimals=5)  # many ties
    u[:300] = 0.0
    bits = magnitude_bits(u)
    for k in (1, 17, 2500, 4999, 5000):
        sel = Selection(k, u.numel())
        resolve_high(sel, high_histogram(u).numpy())
        resolve_low(sel, low_histogram(u, sel.high).numpy())
        kth = torch.sort(u, descending=True, stable=True).values[k - 1]
        assert sel.threshold == float(kth)
        assert sel.greater == int((u > kth).sum()) and sel.greater + sel.ties == k
        # a one-bin window of candidates reaches the same threshold
        sel2 = Selection(k, u.numel())
        resolve_high(sel2, high_histogram(u).numpy())
        in_bin = (bits >> 16) == sel2.high
        chosen = select_candidates(sel2, sel2.above, bits[in_bin].numpy())
        assert sel2.threshold_bits == sel.threshold_bits and chosen.sum() == sel2.need_in_bin
        assert (sel2.greater, sel2.ties) == (sel.greater, sel.ties)


def test_non_finite_values_are_seen_by_the_histogram():
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = update_magnitude(torch.zeros(4), torch.tensor([0.0, 1.0, bad, 2.0]))
        assert not finite(high_histogram(u))
    assert finite(high_histogram(torch.tensor([0.0, 3e38, 1e-45])))


def test_find_bin_edges():
    h = np.zeros(8, np.int64)
    h[[1, 5]] = [3, 2]
    assert find_bin(h, 1) == (5, 0, 2)
    assert find_bin(h, 2) == (5, 0, 2)
    assert find_bin(h, 3) == (1, 2, 3)
    with pytest.raises(ValueError):
        find_bin(h, 6)
    assert HIGH_BINS * 2 == LOW_BINS


def test_sample_window_holds_the_kth_largest():
    g = torch.Generator().manual_seed(7)
    u = torch.randn(200_000, generator=g).abs() * 1e-3
    bits = magnitude_bits(u)
    for k in (1, 100, 2000, 100_000):
        sel = Selection(k, u.numel())
        sample = u[::64]
        w = sample_window(sel, high_histogram(sample).numpy())
        assert w is not None
        lo, hi, estimate = w
        above = int((bits >= hi).sum())
        inside = int(((bits >= lo) & (bits < hi)).sum())
        assert above < k <= above + inside
        assert inside < u.numel() // 4  # a window, not everything
        assert abs(estimate - inside) <= 0.5 * inside + 8 * 64  # what the caller budgets for
    # a mass of equal values at the threshold: the estimate says the window holds all of it
    z = torch.zeros(10_000)
    z[:10] = 1.0
    assert sample_window(Selection(5000, z.numel()), high_histogram(z).numpy())[2] >= 9990
    assert sample_window(Selection(0, z.numel()), high_histogram(z).numpy()) is None
