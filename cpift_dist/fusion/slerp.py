"""SLERP folded over task models, on the non-core elements (DESIGN.md §1.4), CPU path.

The fold acc = x_1; acc = SLERP(acc, x_i, t_i) keeps acc a linear combination of the inputs,
and every quantity SLERP needs (|acc|, |x_i|, acc.x_i) is a quadratic form of the Gram matrix
G_ij = x_i.x_j over the non-core elements. So a fusion is: one reduction pass (the Gram matrix
per segment, accumulated in float64), the fold on the host (:func:`fold_coefficients`, float64),
and one apply pass (sum_j c_j x_j on non-core elements, the winning task's value on core ones).
The Triton kernels (``cpift_dist.kernels.slerp``) implement the two passes on GPU with the same
contract; :func:`slerp_reference` is the float64 definition the tests hold both against.

A *segment* is what one angle is taken over: the whole tensor (``granularity="tensor"``, as
``mergekit-yaml`` does) or one row of dim 0 (``"row"``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

DOT_THRESHOLD = 0.9995  # |cos| above this: LERP (as mergekit)
EPS = 1e-8  # a vector with norm <= EPS is not normalised (as mergekit)
_CANCEL = 1e-12  # |acc|^2 below this share of its terms' energy is a cancellation to zero


def fold_weights(n_tasks: int, omega: float | str) -> list[float]:
    """t_i for i = 2..N: ``uniform`` gives 1/i (every task an equal share), a float is fixed."""
    if omega == "uniform":
        return [1.0 / i for i in range(2, n_tasks + 1)]
    return [float(omega)] * (n_tasks - 1)


def fold_coefficients(gram: np.ndarray, t: list[float]) -> np.ndarray:
    """Coefficients c (per segment) with fold result = sum_j c_j x_j.

    Args:
        gram: float64 [S, N, N] Gram matrices of the non-core elements, one per segment.
        t: the N-1 interpolation weights (:func:`fold_weights`).

    Returns:
        float64 [S, N].
    """
    gram = np.asarray(gram, dtype=np.float64)
    S, N = gram.shape[:2]
    c = np.zeros((S, N))
    c[:, 0] = 1.0
    for i in range(1, N):
        ti = t[i - 1]
        aa = np.einsum("sj,sjk,sk->s", c, gram, c)
        energy = np.einsum("sj,sj->s", c * c, np.diagonal(gram, axis1=1, axis2=2))
        aa = np.where(aa <= _CANCEL * energy, 0.0, aa)
        na = np.sqrt(aa)
        nb = np.sqrt(np.maximum(gram[:, i, i], 0.0))
        ab = np.einsum("sj,sj->s", c, gram[:, :, i])
        dot = ab / (np.where(na > EPS, na, 1.0) * np.where(nb > EPS, nb, 1.0))
        dot = np.clip(dot, -1.0, 1.0)
        linear = np.abs(dot) > DOT_THRESHOLD
        theta = np.arccos(np.where(linear, 0.0, dot))
        sin = np.where(linear, 1.0, np.sin(theta))
        ca = np.where(linear, 1 - ti, np.sin((1 - ti) * theta) / sin)
        cb = np.where(linear, ti, np.sin(ti * theta) / sin)
        c *= ca[:, None]
        c[:, i] += cb
    return c


def slerp_reference(xs: list[torch.Tensor], t: list[float]) -> torch.Tensor:
    """The fold by its definition, in float64, on one segment's non-core elements.

    ``SLERP(a, b, t)``: normalised copies (norm > EPS), cos clamped to [-1, 1], LERP when
    |cos| > DOT_THRESHOLD, else sin-weighted combination of the originals (mergekit's).
    """
    acc = xs[0].double()
    for x, ti in zip(xs[1:], t):
        b = x.double()
        na, nb = float(acc.norm()), float(b.norm())
        dot = float((acc / (na if na > EPS else 1.0)) @ (b / (nb if nb > EPS else 1.0)))
        dot = min(1.0, max(-1.0, dot))
        if abs(dot) > DOT_THRESHOLD:
            acc = (1 - ti) * acc + ti * b
        else:
            th = math.acos(dot)
            acc = (math.sin((1 - ti) * th) * acc + math.sin(ti * th) * b) / math.sin(th)
    return acc


def segments_of(shape: tuple[int, ...], granularity: str) -> int:
    """Segments (angles) of a tensor: 1, or its rows when ``row`` and it has 2+ dims."""
    return shape[0] if granularity == "row" and len(shape) >= 2 else 1


def _union(masks: torch.Tensor) -> torch.Tensor:
    """Elements in any task's core: an OR over the (few) task rows, not a strided reduction."""
    out = masks[0].clone()
    for m in masks[1:]:
        out |= m
    return out


def gram_torch(x: torch.Tensor, base: torch.Tensor, core: torch.Tensor, segments: int,
               task_vectors: bool) -> torch.Tensor:
    """float64 [S, N, N] Gram matrices of the non-core elements of one chunk.

    Args:
        x: [N, n] the tasks' values of the chunk (any float dtype).
        base: [n] the base's values (used in task-vector space).
        core: [n] bool, the union of the tasks' core masks.
        segments: S; the chunk's n elements are S equal consecutive segments.
    """
    n_tasks, n = x.shape
    v = x.double()
    if task_vectors:
        v -= base.double()
    idx = torch.nonzero(core).reshape(-1)
    if len(idx):
        v.index_fill_(1, idx, 0.0)
    v = v.reshape(n_tasks, segments, n // segments)
    return torch.einsum("isc,jsc->sij", v, v)


def apply_torch(x: torch.Tensor, base: torch.Tensor, masks: torch.Tensor, coef: torch.Tensor,
                task_vectors: bool, overlap: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Fused values of one chunk, in float32 arithmetic like the Triton apply kernel.

    Args:
        x: [N, n] tasks' values; base: [n]; masks: [N, n] bool core masks.
        coef: [S, N] fold coefficients (segments as in :func:`gram_torch`).
        overlap: ``max-magnitude`` (the task with the larger |theta_i - theta0| wins an element
            in several cores; ties: task order) or ``task-order`` (the first task wins).
    """
    n_tasks, n = x.shape
    segments = coef.shape[0]
    xf = x.float()
    bf = base.float()
    v = xf - bf if task_vectors else xf
    acc = torch.einsum("si,isc->sc", coef.float(), v.reshape(n_tasks, segments, n // segments))
    acc = acc.reshape(n)
    if task_vectors:
        acc += bf
    idx = torch.nonzero(_union(masks)).reshape(-1)
    if len(idx):  # core elements: the winning task's value, chosen task by task
        xs, ms = xf[:, idx], masks[:, idx]
        best = torch.full((len(idx),), -1.0, device=x.device)
        picked = torch.zeros(len(idx), device=x.device)
        for j in range(n_tasks):
            score = ((xs[j] - bf[idx]).abs() if overlap == "max-magnitude"
                     else torch.zeros(len(idx), device=x.device))
            better = ms[j] & (score > best)  # strict: the first task keeps a tie
            best = torch.where(better, score, best)
            picked = torch.where(better, xs[j], picked)
        acc[idx] = picked
    return acc.to(out_dtype)
