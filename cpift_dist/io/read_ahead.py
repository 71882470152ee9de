"""One thread asking the kernel for the inputs that this process's threads read next.

Where each working thread asked for its own next chunks (``madvise(WILLNEED)`` or
``posix_fadvise``) before reading them, cold inputs left the disk idle at times: the asks
drained at the end of each thread's piece of work, and a thread waited in ``madvise`` for room
in the block queue instead of computing (measured on 2 cores, 3.96B bf16 inputs larger than
memory, 1 thread, py-spy: 8.5 s of 59 s of the analysis in ``madvise``, 25.7 s waiting in
``pread``; docs/benchmarks.md). Both the analysis's full passes and the fuser hand their order
of reads to a :class:`ReadAhead` instead, and their threads only say how far they have begun.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class ReadAhead:
    """Walks ``steps`` (``(elements, ask)`` pairs, in the order the working threads will begin
    them; an iterable that is consumed on this class's thread, so a generator may probe the
    page cache or open files there) and calls each ``ask`` once no more than ``budget``
    elements of earlier steps are asked and not yet begun. The working threads call
    :meth:`begin` with the elements they begin. A hint: if a step fails, the thread stops, and
    the working threads read what they need all the same.

    Use as a context manager around the work; leaving it stops the thread (after the ask in
    flight) and closes a generator of steps: steps not yet asked for when the work ends (a
    read-ahead thread that lagged behind on a busy machine) are never asked for."""

    def __init__(self, steps: Iterable[tuple[int, Callable[[], None]]], budget: int):
        self.steps, self.budget = steps, budget
        self._cv = threading.Condition()
        self._begun = 0  # elements the working threads have begun
        self.asked = 0  # elements of the steps asked for so far
        self.finished = False  # every step asked for (or the thread stopped)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="read-ahead", daemon=True)

    def __enter__(self) -> "ReadAhead":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()

    def begin(self, elements: int) -> None:
        """A working thread begins the next ``elements``."""
        with self._cv:
            self._begun += elements
            self._cv.notify_all()

    def _run(self) -> None:
        steps = iter(self.steps)
        try:
            for elements, ask in steps:
                with self._cv:
                    while not self._closed and self.asked - self._begun >= self.budget:
                        self._cv.wait()
                    if self._closed:
                        return
                ask()
                with self._cv:
                    self.asked += elements
                    self._cv.notify_all()
        except Exception as e:  # noqa: BLE001  a hint: the work reads what it needs anyway
            log.debug("read-ahead stopped: %s", e)
        finally:
            with self._cv:
                self.finished = True
                self._cv.notify_all()
            close = getattr(steps, "close", None)
            if close is not None:
                close()
