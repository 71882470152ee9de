"""Deterministic mixing of several tasks' examples, resumable from a saved position.

Every rank builds the same sequence from the same seed and takes the positions ``i`` with
``i % world_size == rank``; the state (epoch, position) goes into checkpoints, so a resumed run
continues with exactly the examples an uninterrupted one would have seen.
"""

from __future__ import annotations

import numpy as np


class TaskMixture:
    """An endless stream of (task, example index), epoch by epoch.

    Args:
        sizes: task -> number of examples it has.
        samples: task -> examples drawn per epoch (default: its size). More than its size
            cycles through seeded permutations; equal numbers give a balanced mix.
        seed: the mix's seed (the same on every rank).
    """

    def __init__(self, sizes: dict[str, int], samples: dict[str, int] | None = None,
                 seed: int = 0):
        self.tasks = list(sizes)
        self.sizes = dict(sizes)
        self.samples = {t: int((samples or {}).get(t, sizes[t])) for t in self.tasks}
        if any(n < 0 for n in self.samples.values()) or not sum(self.samples.values()):
            raise ValueError("a mixture needs a positive number of samples")
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: list[tuple[str, int]] | None = None

    def epoch_order(self, epoch: int) -> list[tuple[str, int]]:
        """The whole (task, index) sequence of one epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        items = []
        for t in self.tasks:
            n, size = self.samples[t], self.sizes[t]
            idx = np.concatenate([rng.permutation(size) for _ in range(-(-n // size))])[:n]
            items += [(t, int(i)) for i in idx]
        perm = rng.permutation(len(items))
        return [items[i] for i in perm]

    def __len__(self) -> int:
        return sum(self.samples.values())

    def next(self) -> tuple[str, int]:
        """The next item of the global sequence (advancing the state)."""
        if self._order is None:
            self._order = self.epoch_order(self.epoch)
        item = self._order[self.position]
        self.position += 1
        if self.position == len(self._order):
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return item

    def take(self, n: int, rank: int = 0, world_size: int = 1) -> list[tuple[str, int]]:
        """The next ``n`` global items, of which this rank keeps every world_size-th."""
        out = []
        for _ in range(n):
            pos = self.epoch * len(self) + self.position
            item = self.next()
            if pos % world_size == rank:
                out.append(item)
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position,
                "samples": dict(self.samples), "sizes": dict(self.sizes)}

    def load_state_dict(self, state: dict) -> None:
        if state["samples"] != self.samples or state["sizes"] != self.sizes \
                or state["seed"] != self.seed:
            raise ValueError("mixture state was saved for another mix (seed, sizes or samples)")
        self.epoch, self.position, self._order = state["epoch"], state["position"], None
