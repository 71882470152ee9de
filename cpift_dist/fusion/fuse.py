"""The streaming fuser: one backbone from the task models, one output shard per unit of work.

Recipe: check inputs (base, tuned, masks) -> plan output shards -> per shard (a Ray task or a
thread), per tensor: Gram pass over its row chunks -> fold coefficients on the host -> apply
pass writing the fused chunks straight into the shard file -> index, config and tokenizer from
the base, manifest with overlap counts. Memory is bounded by the chunk size; output appears
whole (atomic rename) or not at all.
"""

from __future__ import annotations

import functools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from cpift_dist.analysis.masks import MaskFile, unpack_mask
from cpift_dist.analysis.plan import Chunk, plan_units
from cpift_dist.config import FusionConfig
from cpift_dist.errors import CpiftError, MaskError
from cpift_dist.executor import InProcessExecutor
from cpift_dist.fusion.slerp import (apply_torch, fold_coefficients, fold_weights, gram_torch,
                                     segments_of)
from cpift_dist.io import (Checkpoint, atomic_dir, checkpoint_digest, compare_checkpoints,
                           sha256_file, write_manifest)
from cpift_dist.io.checkpoint import INDEX_NAME, SINGLE_NAME
from cpift_dist.io.safetensors_stream import SequentialWriter

_WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class FuseContext:
    """What every output shard needs."""

    base: str
    tuned: dict[str, str]
    masks: dict[str, str]
    out: str
    cfg: FusionConfig


@dataclass(frozen=True)
class OutShard:
    """One output file and the tensors it holds, in order."""

    file: str
    names: tuple[str, ...]


def plan_shards(base: Checkpoint, max_shard_bytes: int) -> list[OutShard]:
    """Tensors in name order, cut into files of at most ``max_shard_bytes`` (HF naming).

    A stored tied copy (``base.tied``) follows its parameter in the same file, so that it is
    written as a byte copy of the fused value and the output stays tied.
    """
    groups: list[list[str]] = [[]]
    size = 0
    for name in base.names():
        names = [name] + sorted(a for a, src in base.tied.items() if src == name)
        nbytes = sum(base.info(n).numel * base.info(n).dtype.itemsize for n in names)
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1] += names
        size += nbytes
    n = len(groups)
    return [OutShard(SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors",
                     tuple(g)) for i, g in enumerate(groups)]


@functools.lru_cache(maxsize=32)
def _checkpoint(path: str) -> Checkpoint:
    return Checkpoint(path)


def _device_and_backend(cfg: FusionConfig) -> tuple[str, str]:
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = cfg.backend
    if backend == "auto":
        backend = "triton" if device == "cuda" else "torch"
    return device, backend


def fuse_shard(ctx: FuseContext, shard: OutShard) -> dict:
    """Fuses the tensors of one output shard and writes it; returns its sha256 and counts."""
    cfg = ctx.cfg
    device, backend = _device_and_backend(cfg)
    kernels = None
    if backend == "triton":
        from cpift_dist.kernels import slerp as kernels
    base = _checkpoint(ctx.base)
    tasks = list(ctx.tuned)
    tuned = [_checkpoint(ctx.tuned[t]) for t in tasks]
    masks = [MaskFile(ctx.masks[t]) for t in tasks]
    t = fold_weights(len(tasks), cfg.omega)
    tv = cfg.space == "task-vectors"
    counts = {}
    entries = {n: (base.info(n).dtype, base.info(n).shape) for n in shard.names}
    writer = SequentialWriter(Path(ctx.out) / shard.file, entries, {"format": "pt"})
    readers = [base.reader()] + [c.reader() for c in tuned]  # files open lazily; closed below
    try:
        for name in shard.names:
            info = base.info(name)
            if name in base.tied:  # a stored tied copy: the same bytes as its parameter
                writer.repeat(base.tied[name], name)
                continue
            if info.numel == 0:
                continue
            if not info.dtype.is_floating_point:  # buffers such as position ids: the base's
                writer.write(name, base.read(name))
                continue
            chunks = plan_units([info], "global", cfg.chunk_elements, 1 << 62)[0].chunks
            segments = segments_of(info.shape, cfg.granularity)

            def load(c: Chunk):
                b = readers[0].read_rows(c.name, c.row_start, c.row_stop).to(device, copy=True)
                x = torch.stack([r.read_rows(c.name, c.row_start, c.row_stop).to(device)
                                 for r in readers[1:]])
                p = np.stack([m.read_packed(c.name, c.flat_start // 8,
                                            (c.flat_start + c.numel + 7) // 8) for m in masks])
                return x, b, p

            def chunk_segments(c: Chunk) -> int:
                return c.row_stop - c.row_start if segments > 1 else 1

            cache = None
            gram = np.zeros((segments, len(tasks), len(tasks)))
            for c in chunks:  # reduction pass
                x, b, p = load(c)
                if len(chunks) == 1:
                    cache = (x, b, p)
                if kernels is not None:
                    g = kernels.gram(x, b, torch.from_numpy(p).to(device), chunk_segments(c), tv)
                else:
                    union = unpack_mask(np.bitwise_or.reduce(p, axis=0), c.numel)
                    g = gram_torch(x, b, torch.from_numpy(union), chunk_segments(c), tv)
                g = g.cpu().numpy()
                if segments > 1:
                    gram[c.row_start:c.row_stop] = g
                else:
                    gram += g
            coef = torch.from_numpy(fold_coefficients(gram, t))
            core = overlap = 0
            for c in chunks:  # apply pass
                x, b, p = cache if cache is not None else load(c)
                cf = coef[c.row_start:c.row_stop] if segments > 1 else coef
                if kernels is not None:
                    out = kernels.apply(x, b, torch.from_numpy(p).to(device), cf.to(device), tv,
                                        cfg.overlap, info.dtype)
                else:
                    out = apply_torch(x, b, _unpack(p, c.numel), cf, tv, cfg.overlap, info.dtype)
                writer.write(name, out)
                union, multi = _core_counts(p)
                core, overlap = core + union, overlap + multi
            counts[name] = {"core": core, "overlap": overlap}
    finally:
        for r in readers:
            r.__exit__(None, None, None)
        for m in masks:
            m.close()
    return {"file": shard.file, "sha256": writer.close(), "names": list(shard.names),
            "counts": counts, "device": device, "backend": backend}


def _unpack(packed: np.ndarray, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([unpack_mask(p, n) for p in packed]))


def _core_counts(packed: np.ndarray) -> tuple[int, int]:
    """Elements in any core and in two or more cores, from packed bytes (popcounts)."""
    union = np.bitwise_or.reduce(packed, axis=0)
    multi = np.zeros_like(union)
    for i in range(len(packed)):
        for j in range(i + 1, len(packed)):
            multi |= packed[i] & packed[j]
    return int(np.bitwise_count(union).sum()), int(np.bitwise_count(multi).sum())


def check_masks(base: Checkpoint, masks_dir: Path, tasks: list[str]) -> dict[str, str]:
    """The mask file of every task, checked against the base model.

    Raises:
        MaskError: a missing file, a mask of another task, or one made for another model.
    """
    shapes = {n: base.info(n).shape for n in base.names()
              if base.info(n).dtype.is_floating_point}
    out = {}
    for t in tasks:
        path = Path(masks_dir) / f"{t}.safetensors"
        m = MaskFile(path)
        if m.task != t:
            raise MaskError(f"{path}: this is the core mask of task {m.task!r}, not {t!r}")
        m.check_model(shapes, str(base.path))
        m.close()
        out[t] = str(path)
    return out


def fuse(base: str | Path, tuned: dict[str, str | Path], masks_dir: str | Path,
         out: str | Path, cfg: FusionConfig | None = None, executor=None,
         overwrite: bool = False, progress: bool = True) -> dict:
    """Builds the fused backbone (DESIGN.md §1.4) as an HF checkpoint in ``out``.

    Args:
        base: base checkpoint (theta0); its config and tokenizer files are copied.
        tuned: task -> fine-tuned checkpoint, in task order (the SLERP fold order).
        masks_dir: directory with ``<task>.safetensors`` core masks (``cpift analyze``).
        cfg: fusion settings.
        executor: where output shards are fused (in-process by default).

    Returns:
        The manifest written to ``out/manifest.json``.

    Raises:
        CpiftError: incompatible checkpoints, missing or foreign masks, unwritable output.
    """
    cfg = cfg or FusionConfig()
    executor = executor or InProcessExecutor()
    if not tuned:
        raise CpiftError("no tuned checkpoints given (--tuned NAME=DIR)")
    base_ck = Checkpoint(base)
    base_ck.check_tied()
    for p in tuned.values():
        ck = Checkpoint(p)
        compare_checkpoints(base_ck, ck)
        ck.check_tied()
    mask_files = check_masks(base_ck, Path(masks_dir), list(tuned))
    shards = plan_shards(base_ck, cfg.max_shard_bytes)
    device, backend = _device_and_backend(cfg)
    if device == "cuda" and not torch.cuda.is_available():
        raise CpiftError("fusion.device=cuda but no CUDA device is available")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        ctx = FuseContext(str(base), {t: str(p) for t, p in tuned.items()}, mask_files,
                          str(tmp), cfg)
        results = []
        for _, r in tqdm(executor.map(fuse_shard, ctx, [(s,) for s in shards]),
                         total=len(shards), desc="fuse shards", unit="shard",
                         disable=not progress, leave=False):
            results.append(r)
        results.sort(key=lambda r: r["file"])
        outputs = {r["file"]: r["sha256"] for r in results}
        if len(shards) > 1:
            weight_map = {n: r["file"] for r in results for n in r["names"]}
            total = sum(i.numel * i.dtype.itemsize for i in base_ck.tensors.values())
            (tmp / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
            outputs[INDEX_NAME] = sha256_file(tmp / INDEX_NAME)
        for f in sorted(Path(base).iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_FILES) and f.name not in (
                    INDEX_NAME, "manifest.json"):
                shutil.copy(f, tmp / f.name)
                outputs[f.name] = sha256_file(tmp / f.name)
        counts = {n: c for r in results for n, c in r["counts"].items()}
        digests = {"base": checkpoint_digest(base)}
        digests.update({f"tuned/{t}": checkpoint_digest(p) for t, p in tuned.items()})
        digests.update({f"masks/{t}": sha256_file(p) for t, p in mask_files.items()})
        man = write_manifest(tmp, "fuse", cfg.model_dump(mode="json"), digests, outputs, extra={
            "tasks": list(tuned),
            "fold_weights": fold_weights(len(tuned), cfg.omega),
            "device": device, "backend": backend, "executor": executor.name,
            "core_elements": sum(c["core"] for c in counts.values()),
            "overlap_elements": sum(c["overlap"] for c in counts.values()),
            "per_tensor": counts,
        })
    return man
