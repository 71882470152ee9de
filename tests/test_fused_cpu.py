"""The fusion's CPU loops (numba) against the float64 definition, the torch path and torch's own
float32 arithmetic, bit for bit where the contract says so."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from cpift_dist.analysis.masks import pack_mask
from cpift_dist.fusion import fused
from cpift_dist.fusion.slerp import apply_torch, fold_coefficients, fold_weights, gram_torch
from helpers import make_case, slerp_elementwise

pytestmark = pytest.mark.timeout(300)


def packed_of(masks: torch.Tensor) -> np.ndarray:
    return np.stack([pack_mask(m) for m in masks])


@pytest.mark.parametrize("case", ["random", "collinear", "anti-parallel", "zero",
                                  "nearly-collinear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_tasks", [2, 3, 4])
def test_loops_match_float64_reference_and_torch_path(case, dtype, n_tasks):
    # 5000 elements: blocks of 2048 end inside a row of 500 and inside a mask byte's run
    n, rows = 5000, 10
    x, base, masks = make_case(case, n_tasks, n, dtype)
    packed = packed_of(masks)
    t = fold_weights(n_tasks, "uniform")
    xs = x
    core = masks.any(0)
    for tv in (False, True):
        for segments in (1, rows):
            g = fused.gram_chunk(base, xs, packed, segments, tv)
            assert torch.allclose(torch.from_numpy(g), gram_torch(x, base, core, segments, tv),
                                  rtol=1e-12, atol=1e-9)
            coef = fold_coefficients(g, t)
            for overlap in ("max-magnitude", "task-order"):
                out, n_core, n_multi = fused.apply_chunk(base, xs, packed, coef, tv, overlap,
                                                         dtype)
                assert out.dtype == dtype
                assert (n_core, n_multi) == (int(core.sum()), int((masks.sum(0) >= 2).sum()))
                ref = slerp_elementwise(x, base, masks, segments, t, tv, overlap)
                assert torch.equal(out[core].double(), ref[core])  # transplanted bit for bit
                tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
                err = (out.double() - ref).abs().max().item()
                assert err <= tol * (ref.abs().max().item() + 1), (case, tv, segments, err)
                ot = apply_torch(x, base, masks, torch.from_numpy(coef), tv, overlap, dtype)
                assert torch.allclose(ot.double(), out.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_is_torch_float32_arithmetic_bit_for_bit(dtype):
    """Non-core elements equal torch's element-wise float32 ops in task order (no FMA), then
    the cast to the output dtype: bf16 rounds to nearest even, ties and extremes included."""
    g = torch.Generator().manual_seed(7)
    n = 3 * 2048 + 40
    x = (torch.randn(3, n, generator=g) * torch.logspace(-30, 30, n)).to(dtype)
    x[:, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-40, 3e38, 1.0])
    base = (torch.randn(n, generator=g) * 1e-3).to(dtype)
    masks = torch.zeros(3, n, dtype=torch.bool)
    coef = np.array([[0.3, 0.45, 0.25], [1.0 + 2 ** -9, -2 ** -20, 2 ** -8]])
    for tv in (False, True):
        out, _, _ = fused.apply_chunk(base, x, packed_of(masks), coef, tv,
                                      "max-magnitude", dtype)
        c = torch.from_numpy(coef).float()
        half = n // 2
        want = torch.empty(n)
        for s, sl in enumerate((slice(0, half), slice(half, n))):
            v = [(xi.float() - base.float())[sl] if tv else xi.float()[sl] for xi in x]
            acc = c[s, 0] * v[0]
            for k in (1, 2):
                acc = acc + c[s, k] * v[k]
            want[sl] = acc + base.float()[sl] if tv else acc
        want = want.to(dtype)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(out), nan)
        assert torch.equal(out[~nan].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want[~nan].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def test_bf16_rounding_ties_to_even_and_nan():
    """Float32 bit patterns exactly halfway between two bf16 values round to the even one, as
    torch rounds; overflow to infinity, subnormals and signs too; NaN becomes 0x7FC0."""
    hi = torch.tensor([0x3F80, 0x3F81, 0xC040, 0x7F7F, 0x0001, 0x8000, 0x7F80], dtype=torch.int32)
    bits = torch.cat([(hi << 16) | 0x8000, (hi << 16) | 0x7FFF, (hi << 16) | 0x8001,
                      hi << 16]).to(torch.int64) & 0xFFFFFFFF
    vals = torch.from_numpy(bits.numpy().astype(np.uint32).view(np.float32))
    want = vals.bfloat16().view(torch.int16).numpy().view(np.uint16)
    got = np.array([fused._round_bf16(np.uint32(b)) for b in bits.tolist()], np.uint16)
    nan = torch.isnan(vals).numpy()  # torch's vectorised cast gives 0xFFFF, its scalar 0x7FC0
    assert nan.sum() == 3 and (got[nan] == 0x7FC0).all()
    assert np.array_equal(got[~nan], want[~nan])
    assert fused._round_bf16(np.uint32(0x7FC12345)) == 0x7FC0
    assert fused._round_bf16(np.uint32(0xFF800001)) == 0x7FC0


@pytest.mark.parametrize("n_tasks", [2, 3, 4])
def test_one_fold_of_stacked_segments_is_the_fold_of_each(n_tasks):
    """The fuser folds a whole run's segments in one call: each segment's coefficients are
    the same bits as its own fold (random, collinear, anti-parallel, zero and cancelling Gram
    matrices side by side, 1 to 300 segments)."""
    rng = np.random.default_rng(n_tasks)
    t = fold_weights(n_tasks, "uniform")
    for _ in range(30):
        S = int(rng.integers(1, 300))
        x = rng.standard_normal((S, n_tasks, 40)) * rng.uniform(0.01, 100, (S, n_tasks, 1))
        kind = rng.integers(0, 4, S)
        x[kind == 1, 1] = 3.0 * x[kind == 1, 0]  # collinear: LERP
        x[kind == 2, 1] = -x[kind == 2, 0]  # anti-parallel: cancels to zero
        x[kind == 3] = 0.0
        gram = np.einsum("sik,sjk->sij", x, x)
        each = np.concatenate([fold_coefficients(gram[s:s + 1], t) for s in range(S)])
        assert np.array_equal(fold_coefficients(gram, t), each)


def test_core_values_and_counts_with_partial_last_byte():
    """A chunk of 13 elements (a partial last mask byte): core elements take the winner's
    value bit for bit, counts are popcounts of the union and of the pairwise overlaps."""
    x, base, masks = make_case("random", 3, 13, torch.bfloat16, seed=4)
    masks[:, :] = False
    masks[0, [0, 5, 12]] = True
    masks[1, [5, 6, 12]] = True
    masks[2, [12]] = True
    coef = np.array([[0.5, 0.3, 0.2]])
    out, n_core, n_multi = fused.apply_chunk(base, x, packed_of(masks), coef, True,
                                             "max-magnitude", torch.bfloat16)
    assert (n_core, n_multi) == (4, 2)
    mags = (x.float() - base.float()).abs()
    assert out[0] == x[0, 0] and out[6] == x[1, 6]
    win5 = 0 if mags[0, 5] >= mags[1, 5] else 1
    assert out[5] == x[win5, 5]
    win12 = int(torch.argmax(torch.where(masks[:, 12], mags[:, 12], -1.0)))
    assert out[12] == x[win12, 12]


def test_warm_compiles_every_signature_the_stages_use(models, bf16_models, tmp_path):
    """After ``warm()`` (the session fixture ran it), an analysis and fusions of fp32 and bf16
    checkpoints compile nothing new: worker processes find every loop in numba's cache."""
    from cpift_dist.analysis import analyze
    from cpift_dist.analysis import fused as analysis_loops
    from cpift_dist.config import AnalysisConfig, FusionConfig
    from cpift_dist.fusion import fuse

    loops = [analysis_loops.high_histograms, analysis_loops.low_histograms,
             analysis_loops.window, analysis_loops.window_run, analysis_loops.threshold_masks,
             fused.gram, fused.apply, fused.gram_run, fused.apply_run]
    before = [set(f.signatures) for f in loops]
    # bf16 and float32 each; ``window``, ``gram`` and ``apply`` also gain the run loops' inner
    # calls where warm() compiled the run loops rather than loading them (a fresh clone)
    inner = (analysis_loops.window, fused.gram, fused.apply)
    assert all(len(s) == 2 or (f in inner and len(s) == 4) for f, s in zip(loops, before))
    for m in (models, bf16_models):
        tuned = {"a": m["a"], "b": m["b"]}
        d = tmp_path / m["base"].parent.name
        analyze(m["base"], tuned, d / "an", AnalysisConfig(p=0.05), progress=False)
        fuse(m["base"], tuned, d / "an" / "masks", d / "fu",
             FusionConfig(chunk_elements=1024, device="cpu"), progress=False)
    assert [set(f.signatures) for f in loops] == before  # nothing compiled by the stages
    assert len(analysis_loops.kth_largest_bits.signatures) == 1
    assert len(analysis_loops.set_winners.signatures) == 1
    from cpift_dist.io import gather  # the sample's reads: one signature each, warm's
    assert [len(f.signatures) for f in (gather.gather, gather.willneed, gather.advise)] == [1] * 3


@pytest.mark.timeout(120)
def test_numba_registries_load_without_the_blas_probe_and_leave_it_importable():
    """``load_registries`` keeps SciPy's BLAS module out of numba's first load, then removes its
    block: the loops run, and SciPy (where installed) imports as usual afterwards."""
    code = (
        "import sys\n"
        "from cpift_dist.analysis import fused\n"
        "fused.load_registries()\n"
        "assert 'numba.np.arraymath' in sys.modules\n"
        "assert fused._BLAS_PROBE not in sys.modules, 'the block or the module stayed'\n"
        "fused.warm()\n"
        "try:\n"
        "    import scipy.linalg.cython_blas\n"
        "except ModuleNotFoundError as e:\n"
        "    assert e.name == 'scipy', e  # not installed (a block left would name the probe)\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=110)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.parametrize("was_on", [True, False])
def test_warm_pauses_the_garbage_collector_and_restores_it(monkeypatch, was_on):
    """Both ``warm``s load numba's registries and loops with the collector off, and leave it as
    they found it, on or off."""
    import gc

    from cpift_dist.analysis import fused as analysis_loops

    states = []

    def load_registries():
        states.append(gc.isenabled())

    monkeypatch.setattr(analysis_loops, "load_registries", load_registries)
    monkeypatch.setattr(fused, "load_registries", load_registries)
    try:
        gc.enable() if was_on else gc.disable()
        analysis_loops.warm()
        assert gc.isenabled() is was_on
        fused.warm()
        assert gc.isenabled() is was_on
    finally:
        gc.enable()
    assert states == [False, False]
