"""Evolving parameter isolation (EPI, arXiv 2604.14010) under DeepSpeed ZeRO-2 / ZeRO-3.

CPI-FT freezes a static core region per task; EPI lets the frozen set follow the training:

* **Importance.** Every optimizer step, before the inner torch optimizer moves the weights, each
  rank updates ``s = beta * s + (1 - beta) * score`` over the flat fp32 partition it owns, from
  that partition's gradient as DeepSpeed hands it to the optimizer (reduced, unscaled, clipped):
  ``score = g^2`` (``fisher``, the diagonal Fisher estimate) or ``|g * theta|`` (``taylor``).
  One extra fp32 per parameter, partitioned like the optimizer state.
* **Layer-wise normalisation.** ``n_i = float32(s_i / mean_layer(s))`` with the mean over the
  element's layer group (``layers.N``; embeddings, final norm and head form the group
  ``other``, as ``analysis.selection: per-layer`` groups them). The per-layer sums are float64
  sums of each rank's float32 scores, all-reduced; a layer whose scores are all 0 gives 0.
* **Refresh.** At step t when ``t >= max(warmup_steps, 1)``, ``(t - warmup_steps) %
  refresh_every == 0`` and ``t < max_steps``, the frozen set becomes the exact global top-k of
  ``n`` with ``k = floor(p * D)`` over the D parameters of the model, by the analysis's radix
  select: 32,768-bin histograms of the high 16 float bits all-reduced across ranks, then the
  low 16 bits inside the threshold's bin; ties at the threshold go to the elements that come
  first in the canonical order (tensors by name, then flat index; the order ``cpift analyze``
  uses), decided from the ranks' per-segment tie counts. The selected set is that of a stable
  descending sort of the gathered scores, whatever the world size and partitioning.
* **Freezing.** The new set's values are kept as they are after step t and written back after
  every later step (:class:`~cpift_dist.training.freeze.ElementFreezer`, the same post-step
  restore as the static cores), so between two refreshes each frozen element is bit-identical;
  released elements train again. In a CPI-FT stage the static cores of earlier stages stay
  frozen the whole stage (their own freezer), unless ``release_cores``.
* **Outputs.** Every refresh writes its mask (the packed-bit core-mask format, task ``epi``)
  as ``<stage>/epi/mask-step-<t>.safetensors`` and appends step, threshold, counts, the Jaccard
  with the previous mask and the frozen set's share per layer to ``<stage>/epi/epi.json``.
* **Resume.** Each rank's EMA and frozen index are saved next to DeepSpeed's checkpoint
  (``epi-rank-<r>.safetensors`` in the step's directory); a resumed run continues exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cpift_dist.analysis.plan import selection_group
from cpift_dist.analysis.radix_select import (HIGH_BINS, LOW_BINS, Selection, resolve_high,
                                              resolve_low)
from cpift_dist.config import EPIConfig
from cpift_dist.errors import CpiftError
from cpift_dist.training.freeze import ElementFreezer, _Frozen, _layout

STATE_FILE = "epi-rank-{rank}.safetensors"
MASK_FILE = "mask-step-{step:06d}.safetensors"


@dataclass
class _Seg:
    """A piece of one tensor held in a rank's flat fp32 partition."""

    name: str
    tensor: int
    """Index of the tensor in the canonical (sorted-name) order."""
    p_off: int
    """First element of the tensor (flat) held here."""
    flat_off: int
    """Its position in the flat partition."""
    length: int
    layer: int
    """Index of its layer group."""


@dataclass
class _Part:
    flat: torch.Tensor
    ema: torch.Tensor
    segs: list[_Seg]


def layer_groups(names: list[str]) -> list[str]:
    """The layer groups of a model's tensors, in layer order (``other`` last)."""
    groups = {selection_group(n, "per-layer") for n in names}
    return sorted(groups, key=lambda g: (g == "other", int(g.split(".")[1]) if g != "other"
                                         else 0))


def refresh_due(cfg: EPIConfig, step: int, max_steps: int) -> bool:
    """Whether the frozen set is refreshed after optimizer step ``step`` (1-based)."""
    w = cfg.warmup_steps
    return max(w, 1) <= step < max_steps and (step - w) % cfg.refresh_every == 0


def tie_quotas(counts: list[tuple[int, int, int]], need: int) -> dict[tuple[int, int], int]:
    """How many of each segment's threshold ties are selected: the first ``need`` in the
    canonical order. ``counts``: (tensor index, first element, ties) of every segment of every
    rank; returns (tensor index, first element) -> ties taken there."""
    out = {}
    for t, off, c in sorted(counts):
        take = min(c, need)
        out[(t, off)] = take
        need -= take
    if need:
        raise CpiftError(f"EPI selection: {need} threshold ties not found across the ranks")
    return out


class EvolvingIsolation:
    """The EMA importance, the refreshes and the evolving frozen set of one DeepSpeed run.

    Build it after ``deepspeed.initialize`` (and the static freezer, if any); call
    :meth:`load` after ``load_checkpoint`` when resuming, :meth:`after_step` after every
    optimizer step, and :meth:`save` with every checkpoint.

    Args:
        engine: the DeepSpeed engine (ZeRO-2 or ZeRO-3).
        cfg: the EPI settings.
        out: the run's output directory (``epi/`` is written there by rank 0).
        max_steps: the run's optimizer steps (no refresh after the last).
        static: the freezer of the static cores (CPI-FT stages), released at the first
            refresh when ``cfg.release_cores``.
    """

    def __init__(self, engine, cfg: EPIConfig, out: Path, max_steps: int,
                 static: ElementFreezer | None = None):
        import torch.distributed as dist

        self.engine, self.cfg, self.max_steps, self.static = engine, cfg, max_steps, static
        self.dir = Path(out) / "epi"
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        named = list(engine.module.named_parameters())
        self.shapes = {n: tuple(getattr(p, "ds_shape", p.shape)) for n, p in named}
        order = sorted(self.shapes)
        index = {n: i for i, n in enumerate(order)}
        self.layers = layer_groups(order)
        layer_id = {g: i for i, g in enumerate(self.layers)}
        self.numel = sum(math.prod(s) for s in self.shapes.values())
        self.k = int(math.floor(cfg.p * self.numel))
        names = {id(p): n for n, p in named}
        self.parts: list[_Part] = []
        for flat, entries in _layout(engine):
            segs = sorted((_Seg(names[id(p)], index[names[id(p)]], p_off, flat_off, length,
                                layer_id[selection_group(names[id(p)], "per-layer")])
                           for p, flat_off, p_off, length in entries if length > 0),
                          key=lambda s: s.flat_off)  # indices built in this order are sorted
            self.parts.append(_Part(flat, torch.zeros_like(flat, dtype=torch.float32), segs))
        self._by_flat = {id(part.flat): part for part in self.parts}
        self.device = engine.device
        self.freezer = ElementFreezer(engine, None)
        self.refreshes = 0
        self.released_at: int | None = None
        self.history: list[dict] = []
        self._hook = None
        self.attach()

    # ---- importance -------------------------------------------------------------------------
    def _accumulate(self, optimizer, args, kwargs) -> None:
        """Pre-step hook on DeepSpeed's inner optimizer: the EMA of this step's scores."""
        b = self.cfg.beta
        for group in optimizer.param_groups:
            for p in group["params"]:
                part = self._by_flat.get(id(p))
                if part is None or p.grad is None:
                    continue
                g = p.grad.detach()
                if g.dtype != torch.float32:
                    g = g.float()
                part.ema.mul_(b)
                if self.cfg.score == "fisher":
                    part.ema.addcmul_(g, g, value=1 - b)
                else:
                    part.ema.add_((g * p.detach()).abs_(), alpha=1 - b)

    def attach(self) -> None:
        """Registers the EMA pre-step hook and the evolving freeze (done at construction)."""
        if self._hook is None:
            self._hook = self.engine.optimizer.optimizer.register_step_pre_hook(
                self._accumulate)
        self.freezer.attach()

    def detach(self) -> None:
        """Stops the EMA updates and the evolving freeze (benchmarks, tear-down)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.freezer.detach()

    # ---- refresh ----------------------------------------------------------------------------
    def after_step(self, step: int) -> dict | None:
        """Refreshes the frozen set when ``step`` is a refresh step; returns its record."""
        if refresh_due(self.cfg, step, self.max_steps):
            return self.refresh(step)
        return None

    def normalised(self) -> list[torch.Tensor]:
        """Per partition: float32 layer-normalised scores (positions outside segments: 0)."""
        import torch.distributed as dist

        n_layers = len(self.layers)
        acc = torch.zeros(2 * n_layers, dtype=torch.float64, device=self.device)
        for part in self.parts:
            for seg in part.segs:
                s = part.ema[seg.flat_off:seg.flat_off + seg.length]
                acc[seg.layer] += s.sum(dtype=torch.float64)
                acc[n_layers + seg.layer] += seg.length
        dist.all_reduce(acc)
        sums, counts = acc[:n_layers].cpu(), acc[n_layers:].cpu()
        if not torch.isfinite(sums).all():
            bad = self.layers[int(torch.nonzero(~torch.isfinite(sums))[0])]
            raise CpiftError(f"EPI: non-finite importance in layer group {bad!r} "
                             "(NaN or Inf gradients)")
        means = (sums / counts.clamp(min=1)).tolist()
        out = []
        for part in self.parts:
            n = torch.zeros_like(part.ema)
            for seg in part.segs:
                m = means[seg.layer]
                if m > 0:
                    s = part.ema[seg.flat_off:seg.flat_off + seg.length]
                    n[seg.flat_off:seg.flat_off + seg.length] = (s.double() / m).float()
            out.append(n)
        return out

    def select(self, scores: list[torch.Tensor]) -> tuple[list[torch.Tensor], Selection]:
        """The exact global top-k of ``scores`` (one float32 tensor per partition, >= 0):
        per partition the flat indices selected, and the selection's threshold and counts."""
        import torch.distributed as dist

        sel = Selection(self.k, self.numel, method="radix")
        bits = [[sc[s.flat_off:s.flat_off + s.length].view(torch.int32) for s in part.segs]
                for sc, part in zip(scores, self.parts)]
        flat_bits = [b for bs in bits for b in bs]
        hist = torch.zeros(HIGH_BINS, dtype=torch.int64, device=self.device)
        for b in flat_bits:
            hist += torch.bincount((b >> 16).long(), minlength=HIGH_BINS)[:HIGH_BINS]
        dist.all_reduce(hist)
        if self.k == 0:
            return [torch.zeros(0, dtype=torch.long, device=self.device) for _ in self.parts], sel
        resolve_high(sel, hist.cpu().numpy())
        low = torch.zeros(LOW_BINS, dtype=torch.int64, device=self.device)
        for b in flat_bits:
            inside = b[(b >> 16) == sel.high]
            if inside.numel():
                low += torch.bincount((inside & 0xFFFF).long(), minlength=LOW_BINS)
        dist.all_reduce(low)
        low = low.cpu().numpy()
        resolve_low(sel, low)
        thr, ties = sel.threshold_bits, sel.ties
        equal_total = int(low[thr & 0xFFFF])
        quotas = None
        if ties < equal_total:  # some ties are left out: the canonical order decides
            mine = [(s.tensor, s.p_off, int((b == thr).sum()))
                    for part, bs in zip(self.parts, bits) for s, b in zip(part.segs, bs)]
            every = [None] * self.world
            dist.all_gather_object(every, mine)
            quotas = tie_quotas([c for r in every for c in r], ties)
        out = []
        for part, bs in zip(self.parts, bits):
            idx = []
            for s, b in zip(part.segs, bs):
                take = b > thr
                if quotas is None:
                    take |= b == thr
                elif quotas.get((s.tensor, s.p_off)):
                    eq = torch.nonzero(b == thr).reshape(-1)[:quotas[(s.tensor, s.p_off)]]
                    take[eq] = True
                local = torch.nonzero(take).reshape(-1)
                if local.numel():
                    idx.append(local + s.flat_off)
            out.append(torch.cat(idx) if idx else
                       torch.zeros(0, dtype=torch.long, device=self.device))
        return out, sel

    def refresh(self, step: int, scores: list[torch.Tensor] | None = None) -> dict:
        """Makes the top-k of the normalised importance (or of ``scores``) the frozen set.

        Checks first that the elements frozen since the last refresh did not move (a failed
        refresh raises :class:`CpiftError`); writes the mask and the record (rank 0).
        """
        import torch.distributed as dist

        moved = torch.tensor([self.freezer.check_partitions()], device=self.device)
        dist.all_reduce(moved)
        if int(moved):
            raise CpiftError(f"EPI: {int(moved)} frozen elements moved before the refresh at "
                             f"step {step}")
        chosen, sel = self.select(self.normalised() if scores is None else scores)
        self._freeze(chosen)
        self.refreshes += 1
        if self.static is not None and self.cfg.release_cores and self.released_at is None:
            self.static.detach()
            self.released_at = step
        return self._write(step, sel)

    @staticmethod
    def _split(part: _Part, idx: torch.Tensor) -> list[tuple[_Seg, torch.Tensor]]:
        """A sorted flat index of one partition, cut at its segments' bounds."""
        starts = torch.tensor([s.flat_off for s in part.segs], dtype=idx.dtype,
                              device=idx.device)
        lo = torch.searchsorted(idx, starts).tolist()
        hi = torch.searchsorted(idx, starts + torch.tensor(
            [s.length for s in part.segs], dtype=idx.dtype, device=idx.device)).tolist()
        return [(s, idx[a:b]) for s, a, b in zip(part.segs, lo, hi) if b > a]

    def _freeze(self, chosen: list[torch.Tensor]) -> None:
        groups = []
        for part, idx in zip(self.parts, chosen):
            if idx.numel():
                counts: dict[str, int] = {}
                for s, inside in self._split(part, idx):
                    counts[s.name] = counts.get(s.name, 0) + int(inside.numel())
                groups.append(_Frozen(part.flat, idx, part.flat.detach()[idx].clone(), counts))
        self.freezer.replace(groups)

    def _positions(self) -> list[tuple[str, np.ndarray]]:
        """This rank's frozen elements as (tensor, flat positions in the tensor; int32 where
        the tensor allows: half the bytes gathered to rank 0)."""
        out = []
        for g in self.freezer.groups:
            part = self._by_flat[id(g.flat)]
            for s, inside in self._split(part, g.index):
                pos = (inside - s.flat_off + s.p_off).cpu()
                if math.prod(self.shapes[s.name]) < 2 ** 31:
                    pos = pos.to(torch.int32)
                out.append((s.name, pos.numpy()))
        return out

    def _write(self, step: int, sel: Selection) -> dict:
        """Gathers the new mask on rank 0; writes it and its record (``epi/epi.json``)."""
        import torch.distributed as dist

        every = [None] * self.world if self.rank == 0 else None
        dist.gather_object(self._positions(), every, dst=0)
        record = {"step": step, "k": self.k, "threshold": sel.threshold,
                  "greater": sel.greater, "ties": sel.ties, "moved_since_last": 0,
                  "mask": f"epi/{MASK_FILE.format(step=step)}",
                  "static_released": self.released_at is not None}
        if self.rank != 0:
            return record
        from cpift_dist.analysis.masks import MaskWriter
        from cpift_dist.analysis.overlap import mask_counts

        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / MASK_FILE.format(step=step)
        tmp = path.with_name(path.name + ".tmp")
        w = MaskWriter(tmp, self.shapes)
        per_layer = dict.fromkeys(self.layers, 0)
        selected = 0
        for positions in every:
            for name, pos in positions:
                w.set_bits(name, pos.astype(np.int64))
                per_layer[selection_group(name, "per-layer")] += len(pos)
                selected += len(pos)
        w.close({"task": "epi", "p": self.cfg.p, "k": self.k, "threshold": sel.threshold,
                 "selection": "epi-layer-normalised", "step": step, "score": self.cfg.score,
                 "beta": self.cfg.beta})
        os.replace(tmp, path)
        if selected != self.k:
            raise CpiftError(f"EPI refresh at step {step}: {selected} elements frozen, "
                             f"k = {self.k}")
        record["selected"] = selected
        record["layer_share"] = {g: c / max(1, selected) for g, c in per_layer.items()}
        prev = [h for h in self.history if h["step"] < step]
        if prev:
            names = sorted(self.shapes)
            _, inter = mask_counts([self.dir.parent / prev[-1]["mask"], path], names)
            union = int(inter[0, 0] + inter[1, 1] - inter[0, 1])
            record["jaccard_prev"] = float(inter[0, 1]) / union if union else 1.0
        self.history = prev + [record]
        self._write_json()
        return record

    def _write_json(self) -> None:
        tmp = self.dir / "epi.json.tmp"
        tmp.write_text(json.dumps({"config": self.cfg.model_dump(mode="json"),
                                   "layers": self.layers, "numel": self.numel,
                                   "refreshes": self.history}, indent=2) + "\n")
        os.replace(tmp, self.dir / "epi.json")

    # ---- checkpoints ------------------------------------------------------------------------
    def save(self, tag_dir: Path) -> None:
        """Writes this rank's EMA and frozen index into a checkpoint's directory."""
        from safetensors.torch import save_file

        tag_dir.mkdir(parents=True, exist_ok=True)
        by_flat = {id(g.flat): g.index for g in self.freezer.groups}
        tensors = {}
        for i, part in enumerate(self.parts):
            tensors[f"ema.{i}"] = part.ema.detach().cpu().contiguous()
            tensors[f"index.{i}"] = by_flat.get(id(part.flat), torch.zeros(0, dtype=torch.long)
                                                ).detach().cpu().contiguous()
        meta = {"world": str(self.world), "rank": str(self.rank), "parts": str(len(self.parts)),
                "refreshes": str(self.refreshes),
                "released_at": "" if self.released_at is None else str(self.released_at)}
        path = tag_dir / STATE_FILE.format(rank=self.rank)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    def load(self, tag_dir: Path, step: int) -> None:
        """Restores this rank's EMA and frozen set from a checkpoint (after DeepSpeed's
        ``load_checkpoint``: the kept values are the partitions' values, which the freeze held
        when the checkpoint was taken)."""
        from safetensors import safe_open

        path = tag_dir / STATE_FILE.format(rank=self.rank)
        if not path.is_file():
            raise CpiftError(f"{path}: the checkpoint has no EPI state for rank {self.rank} "
                             "(made without sft.epi, or with another world size)")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("world") != str(self.world) or meta.get("parts") != str(len(self.parts)):
                raise CpiftError(f"{path}: EPI state of a run with {meta.get('world')} ranks; "
                                 f"this run has {self.world} (resume with the same world size)")
            chosen = []
            for i, part in enumerate(self.parts):
                ema = f.get_tensor(f"ema.{i}")
                if ema.shape != part.ema.shape:
                    raise CpiftError(f"{path}: EPI state of partition {i} does not fit this "
                                     "run's partition")
                part.ema.copy_(ema.to(part.ema.device))
                chosen.append(f.get_tensor(f"index.{i}").to(self.device))
        self._freeze(chosen)
        self.refreshes = int(meta.get("refreshes", 0))
        if meta.get("released_at"):
            self.released_at = int(meta["released_at"])
            if self.static is not None:
                self.static.detach()
        if self.rank == 0:
            try:
                data = json.loads((self.dir / "epi.json").read_text())
                self.history = [h for h in data["refreshes"] if h["step"] <= step]
            except (OSError, ValueError, KeyError):
                self.history = []

    # ---- end of run -------------------------------------------------------------------------
    def facts(self) -> dict:
        """This run's EPI summary for ``freeze.json`` (all ranks call; rank 0's is complete)."""
        import torch.distributed as dist

        local = torch.tensor([self.freezer.check_partitions(), self.freezer.frozen_here],
                             device=self.device)
        dist.all_reduce(local)
        last = self.history[-1] if self.history else None
        return {"refreshes": self.refreshes, "frozen_in_partitions": int(local[1]),
                "partition_mismatches": int(local[0]),
                "selected": last["selected"] if last else 0,
                "last_mask": last["mask"] if last else None,
                "static_released_at_step": self.released_at}
