"""Where work's time goes: seconds by kind of work, summed over the threads that do it (the
debug logs' splits of the analysis's units' and the fuser's tasks' time)."""

import threading
import time
from contextlib import contextmanager


class TimeSplit:
    """Seconds by kind of work (``kinds``), summed over every thread that times a block.

    What a thread does outside the timed blocks (its own Python, waits for the GIL and for
    locks) is the rest: :meth:`rest` of the threads' total time."""

    def __init__(self, *kinds: str):
        self.spent = dict.fromkeys(kinds, 0.0)
        self._lock = threading.Lock()

    @contextmanager
    def timed(self, what: str):
        """Adds the block's time to ``spent[what]``, even where the block raises."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            with self._lock:
                self.spent[what] += dt

    def snapshot(self) -> dict[str, float]:
        """The seconds so far, for :meth:`since`."""
        with self._lock:
            return dict(self.spent)

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """The seconds added since :meth:`snapshot` returned ``before``."""
        return {k: v - before[k] for k, v in self.snapshot().items()}

    @staticmethod
    def rest(total: float, spent: dict[str, float]) -> float:
        """Of the threads' ``total`` time, what ``spent`` does not cover."""
        return total - sum(spent.values())
