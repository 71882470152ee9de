"""The pure radix-select pieces against brute force."""

import numpy as np
import pytest
import torch

from cpift_dist.analysis.radix_select import (HIGH_BINS, LOW_BINS, Selection, find_bin, finite,
                                              high_histogram, low_histogram, magnitude_bits,
                                              resolve_high, resolve_low, resolve_window,
                                              sample_window, update_magnitude)

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
        resolve_window(sel2, sel2.above, bits[in_bin].numpy())
        assert sel2.threshold_bits == sel.threshold_bits
        assert (sel2.greater, sel2.ties) == (sel.greater, sel.ties)


@pytest.mark.parametrize("seed", range(4))
def test_window_winners_match_a_stable_sort(seed):
    """The compiled window selection against a stable descending sort of the candidates: the
    same threshold and ties, and exactly the same winners' bits set (the first equal ones in
    candidate order winning), segment by segment, each at its own flat offset."""
    from cpift_dist.analysis import fused
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30000))
    spread = [1 << 8, 1 << 20, 1 << 31][seed % 3]  # one, a few or many high bins
    bits = rng.integers(0, spread, n, dtype=np.int64).astype(np.int32)
    bits[rng.random(n) < 0.3] = bits[0]  # a mass of equal values
    cuts = np.sort(rng.integers(0, n + 1, int(rng.integers(0, 40))))
    bounds = np.concatenate([[0], cuts, [n]])  # empty segments too
    flat = 1000 + rng.permutation(n)  # distinct positions, in no order
    firsts = rng.integers(0, 1000, len(bounds) - 1)
    order = np.argsort(-bits.astype(np.int64), kind="stable")
    for need in sorted({1, 2, n // 3 + 1, n // 2 + 1, n - 1 or 1, n}):
        above = int(rng.integers(0, 1000))
        sel = Selection(above + need, 10 ** 9)
        resolve_window(sel, above, bits)
        won = np.zeros(n, bool)
        won[order[:need]] = True
        thr = int(bits[order[need - 1]])
        greater = int((bits > thr).sum())
        assert (sel.threshold_bits, sel.greater, sel.ties) == (thr, above + greater,
                                                                need - greater)
        packed = np.zeros((1000 + n + 7) // 8, np.uint8)
        left = sel.ties
        for a, b, first in zip(bounds[:-1], bounds[1:], firsts):
            left = fused.set_winners(fused.readonly(bits[a:b]), fused.readonly(flat[a:b] - first),
                                     int(first), sel.threshold_bits, left, packed)
        want = np.zeros(len(packed) * 8, bool)
        want[flat[won]] = True
        assert left == 0
        np.testing.assert_array_equal(packed, np.packbits(want, bitorder="little"))
    with pytest.raises(ValueError, match="does not hold"):
        resolve_window(Selection(n + 5, 10 ** 9), 4, bits)
    with pytest.raises(ValueError, match="does not hold"):
        resolve_window(Selection(3, 10 ** 9), 3, bits)


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
