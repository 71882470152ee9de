"""Element-wise freezing of core regions under DeepSpeed ZeRO-2 / ZeRO-3 (DESIGN.md §3).

Gradient hooks do not freeze: AdamW's weight decay moves an element whose gradient is zero.
What holds, in every ZeRO stage and precision: each rank slices the frozen-element mask to the
flat fp32 partition it owns, keeps those elements' indices and values, and a post-step hook on
DeepSpeed's *inner* torch optimizer writes the values back right after each step. DeepSpeed
then copies the fp32 partition to the 16-bit weights (or they are the same tensor in fp32), so
both copies stay bit-identical.

The partition layouts read here are DeepSpeed internals (pinned in pyproject.toml):

* ZeRO-3: sub-group ``i`` is the flat ``fp32_partitioned_groups_flat[i]``, the concatenation of
  each parameter's partition (``partition_numel()`` elements, in ``fp16_groups[i]`` order);
  rank ``r`` holds the parameter's flat elements ``[r * partition_numel, ...)``.
* ZeRO-2: group ``i``'s parameters are laid out in ``bit16_groups_flat[i]`` at
  ``round_robin_bit16_offsets[i]``; rank ``r`` owns the slice that
  ``parallel_partitioned_bit16_groups[i][r]`` covers, as ``single_partition_of_fp32_groups[i]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cpift_dist.analysis.masks import MaskFile
from cpift_dist.errors import MaskError


class CoreUnion:
    """The union of several tasks' core masks, read lazily as packed bits.

    Args:
        paths: core-mask files (``analysis/masks/<task>.safetensors``), all of one model.
    """

    def __init__(self, paths: list[str | Path]):
        self.files = [MaskFile(p) for p in paths]
        self.numel: dict[str, int] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in self.files:
            if self.shapes and f.shapes != self.shapes:
                raise MaskError(f"{f.path}: made for another model than {self.files[0].path}")
            self.numel, self.shapes = f.numel, f.shapes

    def names(self) -> list[str]:
        return sorted(self.numel)

    def bits(self, name: str, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Flat boolean union mask of tensor ``name``, elements ``lo:hi``."""
        hi = self.numel[name] if hi is None else hi
        if hi <= lo:
            return np.zeros(0, dtype=bool)
        b0, b1 = lo // 8, (hi + 7) // 8
        packed = np.zeros(b1 - b0, dtype=np.uint8)
        for f in self.files:
            packed |= f.read_packed(name, b0, b1)
        return np.unpackbits(packed, bitorder="little")[lo - 8 * b0: hi - 8 * b0].astype(bool)

    def popcount(self, block: int = 1 << 22) -> int:
        """Elements in the union over the whole model: popcounts of the OR-ed packed bytes.

        Counted from the mask files alone (no unpacking, no model): the independent number that
        the end-of-stage check compares with the elements it actually compared and with those
        the ranks' partitions hold.
        """
        total = 0
        for name in self.names():
            nbytes = (self.numel[name] + 7) // 8
            for b0 in range(0, nbytes, block):
                b1 = min(nbytes, b0 + block)
                packed = np.zeros(b1 - b0, dtype=np.uint8)
                for f in self.files:
                    packed |= f.read_packed(name, b0, b1)
                total += int(np.bitwise_count(packed).sum())
        return total

    def close(self) -> None:
        for f in self.files:
            f.close()


@dataclass
class _Frozen:
    """Frozen elements of one flat fp32 partition."""

    flat: torch.Tensor
    index: torch.Tensor
    values: torch.Tensor
    tensors: dict[str, int] = field(default_factory=dict)  # name -> frozen elements held here


def _layout(engine) -> list[tuple[torch.Tensor, list[tuple[torch.nn.Parameter, int, int, int]]]]:
    """Per flat fp32 partition of this rank: [(param, flat offset, param offset, length)]."""
    import deepspeed.comm as dist

    opt = engine.optimizer
    out = []
    if engine.zero_optimization_stage() == 3:
        for i, params in enumerate(opt.fp16_groups):
            rank = dist.get_rank(group=opt.sub_group_process_groups[i])
            entries, off = [], 0
            for p in params:
                pn = p.partition_numel()
                lo = rank * pn
                entries.append((p, off, lo, max(0, min(pn, p.ds_numel - lo))))
                off += pn
            flat = opt.fp32_partitioned_groups_flat[i]
            if flat.numel() != off:
                raise RuntimeError(f"ZeRO-3 sub-group {i}: partition layout not as expected "
                                   f"({flat.numel()} != {off}); unsupported DeepSpeed version?")
            out.append((flat, entries))
    elif engine.zero_optimization_stage() in (1, 2):
        for i, params in enumerate(opt.round_robin_bit16_groups):
            rank = dist.get_rank(group=opt.real_dp_process_group[i])
            parts = opt.parallel_partitioned_bit16_groups[i]
            left = sum(t.numel() for t in parts[:rank])
            size = parts[rank].numel()
            flat = opt.single_partition_of_fp32_groups[i]
            if flat.numel() != size:
                raise RuntimeError(f"ZeRO-2 group {i}: partition layout not as expected; "
                                   "unsupported DeepSpeed version?")
            entries = []
            for p, off, meta in zip(params, opt.round_robin_bit16_offsets[i],
                                    opt.round_robin_bit16_meta[i]):
                lo, hi = max(off, left), min(off + meta.numel(), left + size)
                if lo < hi:
                    entries.append((p, lo - left, lo - off, hi - lo))
            out.append((flat, entries))
    else:
        raise RuntimeError("element-wise freezing needs ZeRO stage 2 or 3")
    return out


class ElementFreezer:
    """Keeps the elements of a :class:`CoreUnion` bit-identical through DeepSpeed training.

    Build it after ``deepspeed.initialize`` (and after ``load_checkpoint`` when resuming): the
    values it keeps are the ones the fp32 partitions hold at that moment. With ``union=None`` it
    starts empty and :meth:`replace` gives it its elements (evolving isolation's frozen set).

    Raises:
        MaskError: the masks name a tensor the model does not have, or shapes differ.
    """

    def __init__(self, engine, union: CoreUnion | None):
        self.engine = engine
        groups: list[_Frozen] = []
        if union is not None:
            groups = self._from_union(engine, union)
        self.replace(groups)
        self._handle = None
        self.attach()

    @staticmethod
    def _from_union(engine, union: CoreUnion) -> list[_Frozen]:
        names = {id(p): n for n, p in engine.module.named_parameters()}
        shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in
                  engine.module.named_parameters()}
        for n in union.names():
            if n not in shapes:
                raise MaskError(f"{union.files[0].path}: mask for tensor {n!r}, which the "
                                "model being trained does not have")
            if shapes[n] != union.shapes[n]:
                raise MaskError(f"{union.files[0].path}: tensor {n!r} has shape "
                                f"{list(union.shapes[n])} in the mask, {list(shapes[n])} in "
                                "the model")
        groups = []
        for flat, entries in _layout(engine):
            idx, counts = [], {}
            for p, flat_off, p_off, length in entries:
                name = names[id(p)]
                if name not in union.numel or length == 0:
                    continue
                local = np.flatnonzero(union.bits(name, p_off, p_off + length))
                if local.size:
                    idx.append(torch.from_numpy(local + flat_off))
                    counts[name] = int(local.size)
            if idx:
                index = torch.cat(idx).to(flat.device)
                groups.append(_Frozen(flat, index, flat.detach()[index].clone(), counts))
        return groups

    def replace(self, groups: list[_Frozen]) -> None:
        """Freezes exactly these elements from now on (their values as given in ``groups``)."""
        self.groups = groups
        self._by_flat = {id(g.flat): g for g in groups}

    def attach(self) -> None:
        """Registers the post-step hook on DeepSpeed's inner optimizer (done at construction)."""
        if self._handle is None:
            self._handle = self.engine.optimizer.optimizer.register_step_post_hook(self._restore)

    def detach(self) -> None:
        """Removes the hook: later steps move frozen elements again (benchmarks, tear-down)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _restore(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                g = self._by_flat.get(id(p))
                if g is not None:
                    p.data[g.index] = g.values

    @property
    def frozen_here(self) -> int:
        """Frozen elements in this rank's partitions."""
        return sum(int(g.index.numel()) for g in self.groups)

    def tensors_here(self) -> dict[str, int]:
        """Tensor name -> frozen elements this rank holds."""
        out: dict[str, int] = {}
        for g in self.groups:
            for n, c in g.tensors.items():
                out[n] = out.get(n, 0) + c
        return out

    def check_partitions(self) -> int:
        """Frozen elements of this rank's fp32 partitions that differ from the kept values."""
        bad = 0
        for g in self.groups:
            now = g.flat.detach()[g.index]
            bad += int((now.view(torch.int32) != g.values.view(torch.int32)).sum())
        return bad


def check_frozen(state: dict[str, torch.Tensor], reference, union: CoreUnion,
                 dtype: torch.dtype) -> tuple[int, list[str]]:
    """Compares the frozen elements of a full state dict with the stage input, bit for bit.

    Args:
        state: tensor name -> full tensor (gathered) after training.
        reference: a :class:`~cpift_dist.io.Checkpoint` of the stage input.
        union: the frozen elements.
        dtype: the training dtype (the input as the model loaded it).

    Returns:
        (number of elements compared, names of tensors with a mismatch). The count is of the
        values actually compared (the selected elements of the trained tensors), not of the
        mask, so a caller can hold it against :meth:`CoreUnion.popcount`.
    """
    checked, bad = 0, []
    for name in union.names():
        n, same = check_frozen_tensor(name, state[name], reference, union, dtype)
        checked += n
        if not same:
            bad.append(name)
    return checked, bad


def check_frozen_tensor(name: str, tensor: torch.Tensor, reference, union: CoreUnion,
                        dtype: torch.dtype) -> tuple[int, bool]:
    """One tensor of :func:`check_frozen`: (elements compared, whether every one of them is
    bit-identical to the stage input's); a tensor of another size than its mask is a
    mismatch with nothing compared."""
    mask = torch.from_numpy(union.bits(name))
    if not mask.any():
        return 0, True
    flat = tensor.detach().cpu().reshape(-1)
    if flat.numel() != mask.numel():  # not the tensor the mask was made for
        return 0, False
    as_int = torch.int16 if dtype.itemsize == 2 else torch.int32
    got = flat[mask].view(as_int)
    want = reference.read(name).to(dtype).reshape(-1)[mask].view(as_int)
    return int(got.numel()), torch.equal(got, want)


def freeze_problem(facts: dict, expected: int | None = None) -> str | None:
    """What is wrong with an end-of-stage freeze report (``freeze.json``), or None.

    Args:
        facts: the report: ``frozen`` (the masks' popcount), ``checked`` (elements compared bit
            for bit in the gathered weights), ``frozen_in_partitions`` (elements the ranks'
            partitions kept), ``mismatched_tensors``, ``partition_mismatches``; with evolving
            isolation, ``epi`` (its own partition check and the last mask's count), and
            ``released_at_step`` when the static cores were released by a refresh.
        expected: the frozen count the caller computed itself from the stage's masks.
    """
    epi = facts.get("epi")
    if epi is not None:
        if epi.get("partition_mismatches"):
            return (f"{epi['partition_mismatches']} elements of the evolving frozen set moved "
                    "since its last refresh")
        if epi.get("frozen_in_partitions") != epi.get("selected"):
            return (f"evolving isolation: {epi.get('frozen_in_partitions')} elements held "
                    f"frozen in partitions, {epi.get('selected')} in the last mask")
    if "frozen" not in facts and epi is not None:
        return None
    if facts.get("mismatched_tensors"):
        return f"tensors {facts['mismatched_tensors'][:5]} differ from the stage input"
    if facts.get("partition_mismatches"):
        return f"{facts['partition_mismatches']} frozen elements moved in the fp32 partitions"
    counts = {"in the masks": facts.get("frozen"), "held in partitions":
              facts.get("frozen_in_partitions")}
    if facts.get("released_at_step") is None:  # released cores were free to move afterwards
        counts["compared"] = facts.get("checked")
    if expected is not None:
        counts["planned"] = expected
    if len(set(counts.values())) != 1:
        return "frozen-element counts disagree: " + ", ".join(
            f"{v} {k}" for k, v in counts.items())
    return None
