"""How an analysis is cut into work: row chunks of tensors, grouped into contiguous units.

The canonical element order (used for ties) is: tensors sorted by name, elements by flat
row-major index. Chunks are row ranges of one tensor; units are runs of consecutive chunks in
that order, so the k-th tie of a selection group can be located by counting per unit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cpift_dist.io.checkpoint import TensorInfo

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class Chunk:
    """Rows ``row_start:row_stop`` of tensor ``name``: flat elements ``flat_start`` onwards."""

    name: str
    row_start: int
    row_stop: int
    flat_start: int
    numel: int
    group: str


@dataclass
class Unit:
    """One unit of work (a Ray task): consecutive chunks in canonical order."""

    index: int
    chunks: list[Chunk] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(c.numel for c in self.chunks)


def layer_of(name: str) -> int | None:
    """The transformer layer index in a parameter name (``model.layers.3.mlp...`` -> 3)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def module_type(name: str) -> str:
    """The module kind of a parameter: ``q_proj``, ``down_proj``, ``embed_tokens``, ``norm``...

    The module's own name (the component before ``weight``/``bias``); layer norms of any name
    are reported as ``norm``.
    """
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    leaf = parts[-1]
    if "norm" in leaf or leaf.startswith("ln"):
        return "norm"
    return leaf


def selection_group(name: str, selection: str) -> str:
    """Which top-k selection a parameter belongs to under a selection policy.

    ``global``: one group for the whole model (the paper's default). ``per-tensor``: each tensor
    alone. ``per-layer``: each transformer layer; tensors outside layers (embeddings, final
    norm, head) form the group ``other``.
    """
    if selection == "global":
        return "all"
    if selection == "per-tensor":
        return name
    if selection == "per-layer":
        layer = layer_of(name)
        return f"layer.{layer}" if layer is not None else "other"
    raise ValueError(f"unknown selection {selection!r}")


def plan_units(tensors: list[TensorInfo], selection: str, chunk_elements: int,
               unit_elements: int) -> list[Unit]:
    """Cuts tensors (any order given; sorted here by name) into chunks and units.

    A chunk holds at most ``max(chunk_elements, one row)`` elements and, except at the end of a
    tensor, a multiple of 8 elements, so that its packed mask bytes never straddle a byte.
    """
    units: list[Unit] = [Unit(0)]
    filled = 0  # elements in the last unit (a running count: units may hold many chunks)
    for t in sorted(tensors, key=lambda t: t.name):
        if t.numel == 0:
            continue
        row = t.row_numel
        align = 8 // math.gcd(row, 8)  # rows per chunk must be a multiple of this
        rows = max(1, chunk_elements // row)
        rows = max(align, rows - rows % align)
        group = selection_group(t.name, selection)
        for r0 in range(0, t.rows, rows):
            r1 = min(t.rows, r0 + rows)
            c = Chunk(t.name, r0, r1, r0 * row, (r1 - r0) * row, group)
            if units[-1].chunks and filled + c.numel > unit_elements:
                units.append(Unit(len(units)))
                filled = 0
            units[-1].chunks.append(c)
            filled += c.numel
    return [u for u in units if u.chunks]
