"""Where units of work run: in this process, or as Ray tasks on a local or remote cluster.

Stage code calls ``executor.map(fn, shared, items)`` with a pure function ``fn(shared, *item)``
and consumes ``(item index, result)`` pairs as they finish, reducing them on the fly so the
driver never holds all results at once.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from cpift_dist.errors import CpiftError

FAULT_TASK_ENV = "CPIFT_FAULT_TASK"
"""Fault injection for tests: ``<name>:<directory>`` makes the process that first reaches the
fault point ``name`` SIGKILL itself there (:func:`fault_point`): for the Ray tasks of a
function, once its work is done, before the result is returned; ``fuse_journal``, the fuser's
driver right after it recorded a finished shard. The directory records that it happened, so
the retry (or the rerun) lives."""

FAULT_SIGNAL_ENV = "CPIFT_FAULT_SIGNAL"
"""The signal a fault point sends its process, by name (``SIGTERM``: a preemption, which the
CLI turns into a clean stop); SIGKILL where unset."""


def fault_point(name: str, where: str | None = None) -> None:
    """Kills this process here the first time, when :data:`FAULT_TASK_ENV` names ``name``
    (or with ``where``, its directory as read where the process's work was set up: a Ray
    task's driver, whose environment the workers started earlier do not share); with
    :data:`FAULT_SIGNAL_ENV`, sends it that signal instead."""
    if where is None:
        fn, _, where = os.environ.get(FAULT_TASK_ENV, "").partition(":")
        if fn != name or not where:
            return
    try:
        (Path(where) / f"{name}.killed").touch(exist_ok=False)
    except FileExistsError:
        return
    os.kill(os.getpid(), getattr(signal, os.environ.get(FAULT_SIGNAL_ENV, "SIGKILL")))


def _dies_once(fn: Callable) -> Callable:
    name, _, where = os.environ.get(FAULT_TASK_ENV, "").partition(":")
    if name != fn.__name__ or not where:
        return fn

    @functools.wraps(fn)
    def wrapped(*args):
        result = fn(*args)
        fault_point(name, where)
        return result

    return wrapped


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op pool cut to ``n`` threads inside the block (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class InProcessExecutor:
    """Runs items in this process: in order, or on ``threads`` threads (torch releases the GIL
    in its kernels), results as they finish. For small models, single machines and tests.

    While items run on several threads, torch's own intra-op pool is cut to this process's
    share of the cores per thread (cores // threads): otherwise every thread runs each op on a
    pool sized to the machine, and the cores are oversubscribed (measured: 16 threads slower
    than 4, 68% of samples spinning at OpenMP barriers)."""

    name = "in-process"

    def __init__(self, threads: int = 1):
        self.threads = max(1, int(threads))

    def parallelism(self) -> int:
        """Items that run at once."""
        return self.threads

    def map(self, fn: Callable, shared: Any, items: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        if self.threads == 1:
            for i, args in enumerate(items):
                yield i, fn(shared, *args)
            return
        with torch_threads(max(1, (os.cpu_count() or 1) // self.threads)):
            yield from self._threaded(fn, shared, items)

    def _threaded(self, fn, shared, items):
        with ThreadPoolExecutor(self.threads) as pool:
            todo = iter(enumerate(items))
            pending = {}
            for i, args in todo:
                pending[pool.submit(fn, shared, *args)] = i
                if len(pending) >= 2 * self.threads:
                    break
            try:
                while pending:
                    done = next(as_completed(pending))
                    i = pending.pop(done)
                    result = done.result()
                    for j, args in todo:
                        pending[pool.submit(fn, shared, *args)] = j
                        break
                    yield i, result
            finally:
                for f in pending:
                    f.cancel()


class RayExecutor:
    """Runs items as Ray tasks, at most ``max_in_flight`` at a time, results as they finish.

    A task whose worker process dies is retried by Ray (``max_retries``); an error raised by the
    function itself is not retried and is re-raised here as the original project error.
    """

    name = "ray"

    def __init__(self, max_in_flight: int | None = None, max_retries: int = 3,
                 num_cpus: float = 1, num_gpus: float = 0, memory: int | None = None):
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.memory = memory
        """Bytes of memory each task holds (Ray's ``memory`` resource: a node runs as many at
        once as its memory resource covers), capped at the largest live node's, so that a
        task is never unschedulable; None: not counted."""

    def _memory(self) -> int | None:
        import ray

        if not self.memory:
            return None
        largest = max((n["Resources"].get("memory", 0) for n in ray.nodes() if n["Alive"]),
                      default=0)
        return int(min(self.memory, largest)) or None

    def parallelism(self) -> int:
        """Items that run at once: ``max_in_flight``, else the cluster's free CPUs over each
        task's share."""
        import ray

        if self.max_in_flight:
            return self.max_in_flight
        return max(1, int(ray.available_resources().get("CPU", 1) / max(self.num_cpus, 1e-9)))

    def map(self, fn: Callable, shared: Any, items: Sequence[tuple]) -> Iterator[tuple[int, Any]]:
        import ray

        remote = ray.remote(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                            memory=self._memory(), max_retries=self.max_retries,
                            retry_exceptions=False)(_dies_once(fn))
        limit = self.max_in_flight or max(2, 2 * int(ray.available_resources().get("CPU", 1)))
        shared_ref = ray.put(shared)
        todo = iter(enumerate(items))
        pending: dict = {}

        def submit() -> None:
            for i, args in todo:
                pending[remote.remote(shared_ref, *args)] = i
                if len(pending) >= limit:
                    return

        submit()
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(done[0])
                try:
                    result = ray.get(done[0])
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, CpiftError):
                        raise cause from None
                    raise
                submit()
                yield i, result
        finally:
            for ref in pending:
                ray.cancel(ref)


def make_executor(ray_cfg, num_gpus: float = 0):
    """The executor a run config's ``ray`` section asks for: threads in this process when Ray
    is off, else Ray tasks (starting a private local Ray or joining ``ray.address``)."""
    from cpift_dist.ray_utils import init_ray

    if not ray_cfg.enabled:
        return InProcessExecutor(threads=ray_cfg.num_cpus or os.cpu_count() or 1)
    init_ray(ray_cfg.address or os.environ.get("RAY_ADDRESS"), ray_cfg.num_cpus)
    return RayExecutor(num_gpus=num_gpus)
