"""Triton kernels against the float64 definition (TRITON_INTERPRET=1 on CPU; CUDA when present)."""

import os
import sys

import numpy as np
import pytest
import torch

from cpift_dist.analysis.masks import pack_mask
from cpift_dist.fusion.slerp import (apply_torch, fold_coefficients, fold_weights, gram_torch,
                                     slerp_reference)
from helpers import make_case as make
from helpers import slerp_elementwise as reference

kernels = pytest.importorskip("cpift_dist.kernels.slerp", reason="triton is not installed")
pytestmark = pytest.mark.timeout(240)

CUDA = torch.cuda.is_available()
# Triton runs kernels on CPU tensors only in its interpreter, which is chosen per process (when
# the kernels are defined). conftest.py turns it on where there is no CUDA; on a CUDA machine
# the CPU-tensor tests below run in a subprocess with it on (test_cpu_tests_under_the_interpreter)
# and the CUDA tests run on the device here.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
on_cpu = pytest.mark.skipif(not INTERPRETED, reason="CPU-tensor kernel tests run under the "
                            "interpreter in a subprocess (test_cpu_tests_under_the_interpreter)")


def run_kernels(x, base, masks, segments, t, tv, overlap, device, block=128):
    packed = torch.from_numpy(np.stack([pack_mask(m) for m in masks]))
    xk, bk, pk = x.to(device), base.to(device), packed.to(device)
    g = kernels.gram(xk, bk, pk, segments, tv, block=block).cpu()
    coef = torch.from_numpy(fold_coefficients(g.numpy(), t))
    out = kernels.apply(xk, bk, pk, coef, tv, overlap, x.dtype, block=block).cpu()
    return g, coef, out


CASES = ["random", "collinear", "anti-parallel", "zero", "nearly-collinear"]


# the unrolled kernels take 1-4 tasks (2 and 3 in every dtype, 4 in bf16), the generic ones 5+
SHAPES = [(d, n) for d in (torch.float32, torch.bfloat16, torch.float16) for n in (2, 3)] + [
    (torch.bfloat16, 4), (torch.float32, 5)]


@on_cpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,n_tasks", SHAPES)
def test_kernels_match_float64_reference(case, dtype, n_tasks):
    n, rows = 600, 6  # not a multiple of the block (128); 6 rows of 100
    x, base, masks = make(case, n_tasks, n, dtype)
    t = fold_weights(n_tasks, "uniform")
    for tv in (False, True):
        for segments in (1, rows):
            for overlap in ("max-magnitude", "task-order"):
                g, coef, out = run_kernels(x, base, masks, segments, t, tv, overlap, "cpu")
                # the reduction equals the float64 Gram matrix
                gt = gram_torch(x, base, masks.any(0), segments, tv)
                assert torch.allclose(g, gt, rtol=1e-12, atol=1e-9)
                ref = reference(x, base, masks, segments, t, tv, overlap)
                # core elements are transplanted bit for bit
                core = masks.any(0)
                assert torch.equal(out[core].double(), ref[core])
                # the rest equals the float64 definition to the output dtype's rounding
                tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
                scale = ref.abs().max().item() + 1
                err = (out.double() - ref).abs().max().item()
                assert err <= tol * scale, (case, tv, segments, overlap, err)
                # and the torch CPU path computes the same
                ot = apply_torch(x, base, masks, coef, tv, overlap, dtype)
                assert torch.allclose(ot.double(), out.double(), rtol=tol, atol=tol)


@on_cpu
@pytest.mark.parametrize("dtype,n_tasks", [(torch.bfloat16, 3), (torch.float32, 4),
                                           (torch.bfloat16, 2)])
def test_apply_kernel_equals_the_cpu_loops_bit_for_bit(dtype, n_tasks):
    """Same coefficients in, same bits out: float32 in task order without FMA, the same core
    winner, the same rounding (the CUDA launch disables FMA contraction for this)."""
    from cpift_dist.fusion import fused

    x, base, masks = make("random", n_tasks, 800, dtype)
    packed = np.stack([pack_mask(m) for m in masks])
    for segments, tv, overlap in ((1, True, "max-magnitude"), (8, False, "task-order"),
                                  (5, True, "task-order")):
        coef = torch.rand((segments, n_tasks), generator=torch.Generator().manual_seed(segments))
        # float32 out: the interpreter's own cast to bf16 truncates (CUDA's rounds to nearest
        # even, checked bit for bit in test_kernels_on_cuda_match_reference)
        got = kernels.apply(x, base, torch.from_numpy(packed), coef, tv, overlap, torch.float32,
                            block=64).to(dtype)
        want, _, _ = fused.apply_chunk(base, x, packed, coef.numpy(), tv, overlap, dtype)
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (segments, tv, overlap)


@on_cpu
def test_collinear_and_anti_parallel_fall_back_to_lerp():
    for case in ("collinear", "anti-parallel"):
        x, base, masks = make(case, 2, 512, torch.float32)
        masks[:] = False
        _, coef, out = run_kernels(x, base, masks, 1, [0.3], False, "task-order", "cpu")
        assert np.allclose(coef.numpy(), [[0.7, 0.3]])  # LERP weights exactly
        assert torch.allclose(out, 0.7 * x[0] + 0.3 * x[1], atol=1e-6)


def test_reference_equals_mergekit_slerp():
    mk = pytest.importorskip("mergekit.merge_methods.slerp")
    g = torch.Generator().manual_seed(3)
    for case in ("random", "collinear", "nearly-collinear", "zero"):
        a = torch.randn(4000, generator=g)
        b = {"random": torch.randn(4000, generator=g), "collinear": 3 * a,
             "nearly-collinear": a + 1e-4 * torch.randn(4000, generator=g),
             "zero": torch.zeros(4000)}[case]
        for t in (0.25, 0.5):
            want = mk.slerp(torch.tensor(t), a[None].double(), b[None].double())[0]
            got = slerp_reference([a, b], [t])
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), case
            # and through the Gram matrix (what both fusion paths use)
            coef = fold_coefficients(np.array([[[a.double() @ a.double(), a.double() @ b.double()],
                                                [a.double() @ b.double(), b.double() @ b.double()]]]),
                                     [t])[0]
            assert torch.allclose(coef[0] * a.double() + coef[1] * b.double(), want, rtol=1e-9,
                                  atol=1e-12)


def test_three_task_fold_with_cancellation():
    # x1 = -x2 with t = 1/2 cancels acc to zero; the next step must see a zero vector
    g = torch.Generator().manual_seed(5)
    a = torch.randn(300, generator=g).double()
    xs = [a, -a, torch.randn(300, generator=g).double()]
    t = fold_weights(3, "uniform")
    ref = slerp_reference(xs, t)
    gram = torch.stack(xs) @ torch.stack(xs).T
    coef = fold_coefficients(gram[None].numpy(), t)[0]
    got = sum(c * x for c, x in zip(coef, xs))
    assert torch.allclose(got, ref, atol=1e-9)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device (the CPU tests above cover the math)")
@pytest.mark.parametrize("dtype,n_tasks", [(torch.float32, 2), (torch.bfloat16, 3),
                                           (torch.bfloat16, 4), (torch.float32, 5)])
def test_kernels_on_cuda_match_reference(dtype, n_tasks):
    from cpift_dist.fusion import fused

    n, rows = 1 << 18, 16  # from TUNED_FROM on: the autotuned launch
    x, base, masks = make("random", n_tasks, n, dtype)
    t = fold_weights(n_tasks, "uniform")
    for segments in (1, rows):
        g, coef, out = run_kernels(x, base, masks, segments, t, True, "max-magnitude", "cuda",
                                   block=None)
        assert torch.allclose(g, gram_torch(x, base, masks.any(0), segments, True),
                              rtol=1e-12, atol=1e-9)
        ref = reference(x, base, masks, segments, t, True, "max-magnitude")
        core = masks.any(0)
        assert torch.equal(out[core].double(), ref[core])
        tol = 2e-6 if dtype == torch.float32 else 8e-3
        assert (out.double() - ref).abs().max().item() <= tol * (ref.abs().max().item() + 1)
        if n_tasks > kernels.MAX_FAST:
            continue  # the generic kernel sums the tasks as a tree: equal within rounding only
        # the same coefficients give the CPU loops' bits (no FMA, same order, same rounding),
        # with the autotuned tiles as well as a fixed one
        packed = np.stack([pack_mask(m) for m in masks])
        want, _, _ = fused.apply_chunk(base, x, packed, coef.numpy(), True, "max-magnitude",
                                       dtype)
        pk = torch.from_numpy(packed).cuda()
        for block in (None, 1024):
            got = kernels.apply(x.cuda(), base.cuda(), pk, coef, True, "max-magnitude", dtype,
                                block=block).cpu()
            assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (segments, block)


@pytest.mark.skipif(INTERPRETED, reason="this process runs the kernels under the interpreter")
@pytest.mark.timeout(900)
def test_cpu_tests_under_the_interpreter():
    """On a CUDA machine: the CPU-tensor tests of this file, under TRITON_INTERPRET=1."""
    import importlib.util

    from helpers import run

    workers = ["-n", str(min(8, os.cpu_count() or 1))] if importlib.util.find_spec("xdist") else []
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
             "-m", "not gpu", "-k", "not under_the_interpreter", *workers], 880,
            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-500:]
