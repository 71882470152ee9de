"""Connecting to Ray: a private local instance bound to 127.0.0.1, or a cluster by address."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import sys
import tempfile
import time

from cpift_dist.errors import CpiftError


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Starts or joins Ray once per process; returns what it connected to.

    Args:
        address: ``None`` or ``"local"`` starts a private local Ray (``address="local"``, its
            own temp dir, bound to 127.0.0.1, no dashboard), which never joins a stale cluster
            through ``/tmp/ray``. Anything else (``auto``, ``ray://host:10001``, ``host:6379``)
            joins that cluster.
        num_cpus: CPUs for a local Ray (default: all).
    """
    import ray

    if ray.is_initialized():
        if _LOCAL["dirs"]:
            _LOCAL["uses"] += 1
        return "existing"
    env = {"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}} \
        if os.environ.get("DS_ACCELERATOR") else None
    if address in (None, "", "local"):
        _start_local(ray, num_cpus, env)
        return "local"
    kwargs, loopback = {}, False
    host, port = _host_port(address)
    if host is not None:
        _probe(address, host, port)
        if host in ("127.0.0.1", "localhost", "::1"):
            # Ray would rewrite a loopback address to this machine's IP, where a head bound
            # to 127.0.0.1 does not listen (the join then hangs)
            kwargs["_node_ip_address"] = "127.0.0.1"
            loopback = True
    try:
        with _loopback_node(ray) if loopback else contextlib.nullcontext(), _own_sigterm():
            ray.init(address=address, runtime_env=env, log_to_driver=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CpiftError(f"--address {address}: no Ray cluster answers ({e})") from None
    return address


LOCAL_START_ATTEMPTS = 3
"""Tries to start the private local Ray: on a busy machine its processes can miss Ray's own
start-up deadline (``The current node timed out during startup``); a fresh try usually works."""


_LOCAL: dict = {"dirs": [], "keep": False, "uses": 0}
"""The private local Rays this process started: ``dirs``, their temp dirs (sockets, the
sessions' logs; one unless Ray was shut down and started again), ``keep``, whether those
outlive the process (:func:`keep_local_logs`), and ``uses``, how many :func:`init_ray` calls
handed one out (:func:`local_ray_uses`)."""


def local_ray_uses() -> int:
    """How many :func:`init_ray` calls of this process have handed out its private local Ray
    (started or already running): a caller compares two readings to learn whether the work in
    between ran on it."""
    return _LOCAL["uses"]


def keep_local_logs() -> str | None:
    """Keeps the private local Ray's temp dir, with its session's logs (the workers' output,
    which does not reach the driver), after this process exits; without this call it is
    removed at exit. Returns the dir, or ``None`` where this process started no local Ray.
    The CLI calls it when a command that ran on it fails."""
    if not _LOCAL["dirs"]:
        return None
    _LOCAL["keep"] = True
    return _LOCAL["dirs"][-1]


def _end_local(ray) -> None:
    """At exit: stops the private local Ray, then removes its temp dir unless it is kept (a
    run left 3.6 MB of logs in /tmp per run, as Ray leaves /tmp/ray)."""
    with contextlib.suppress(Exception):
        ray.shutdown()
    if not _LOCAL["keep"]:
        for d in _LOCAL["dirs"]:
            shutil.rmtree(d, ignore_errors=True)


def _start_local(ray, num_cpus: int | None, env: dict | None,
                 attempts: int = LOCAL_START_ATTEMPTS, pause: float = 2.0) -> None:
    """Starts a private local Ray, each attempt in a fresh temp dir; a failed attempt's
    processes are stopped and its dir removed before the next. The started one is stopped at
    exit and its dir removed, unless :func:`keep_local_logs` keeps it.

    Raises:
        CpiftError: every attempt failed (the last cause named).
    """
    root = os.environ.get("RAY_TMPDIR", "/tmp")
    os.makedirs(root, exist_ok=True)
    causes = []
    for attempt in range(1, attempts + 1):
        tmp = tempfile.mkdtemp(prefix="cpift-ray-", dir=root)
        try:
            with _loopback_node(ray), _own_sigterm():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                         _temp_dir=tmp, runtime_env=env, log_to_driver=False,
                         configure_logging=False)
            _LOCAL["dirs"].append(tmp)
            _LOCAL["uses"] += 1
            if len(_LOCAL["dirs"]) == 1:  # registered after Ray's own handler: runs first
                atexit.register(_end_local, ray)
            return
        except Exception as e:  # Ray raises plain Exception/RuntimeError/TimeoutError here
            cause = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            causes.append(cause)
            logging.getLogger(__name__).warning(
                "local Ray did not start (attempt %d of %d): %s", attempt, attempts, cause)
            with contextlib.suppress(Exception):
                ray.shutdown()  # stops whatever the failed attempt left running
            shutil.rmtree(tmp, ignore_errors=True)
            if attempt < attempts:
                time.sleep(pause * attempt)
    raise CpiftError(f"the local Ray did not start in {attempts} attempts (busy machine? "
                     f"`--no-ray` runs without it); last cause: {causes[-1]}")


@contextlib.contextmanager
def _own_sigterm():
    """Keeps a SIGTERM handler set before ``ray.init`` (the CLI's, which stops ``cpift`` as
    Ctrl-C does: :func:`cpift_dist.cli.sigterm_stops`): ``ray.init`` replaces it with its own
    (``sys.exit``, and for a local Ray a kill of its processes first), which would skip the
    CLI's message and exit status. The local Ray is still stopped, at exit
    (:func:`_end_local`). Where none was set, Ray's stays."""
    import signal
    import threading

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and before not in (signal.SIG_DFL, None):
            signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def _loopback_node(ray):
    """While Ray starts or joins: this node's IP is 127.0.0.1.

    Ray ignores ``_node_ip_address`` for ``address="local"`` (and ``--node-ip-address`` in
    ``ray start``) and takes the machine's IP, so GCS, raylet and workers listen on every
    interface. With its single-machine switch off (the macOS and Windows default; the env var
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) the node IP is 127.0.0.1 and every Ray server
    listens there alone (tests/test_cli.py checks the sockets). The switch is restored after,
    so nothing started later (``ray start --address``) inherits it.
    """
    constants = ray._private.ray_constants
    multi_node, constants.ENABLE_RAY_CLUSTER = constants.ENABLE_RAY_CLUSTER, False
    try:
        yield
    finally:
        constants.ENABLE_RAY_CLUSTER = multi_node


def _host_port(address: str) -> tuple[str | None, int | None]:
    """(host, port) of a plain ``host:port`` GCS address; (None, None) for ``auto``, ``ray://``."""
    if "://" in address or ":" not in address:
        return None, None
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise CpiftError(f"--address {address}: expected host:port") from None


def _probe(address: str, host: str, port: int, timeout: float = 5.0) -> None:
    """Fails in seconds, not minutes, when nothing listens at the address."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise CpiftError(f"--address {address}: no Ray cluster answers "
                         f"({e.strerror or e})") from None


def gpus_available() -> int:
    """GPUs the work can use: the connected Ray cluster's, else this machine's CUDA devices.

    Ray is only asked when this process already imported and started it: the Ray-free paths
    never import it."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return int(ray.cluster_resources().get("GPU", 0))
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_memory() -> int:
    import torch

    return int(torch.cuda.get_device_properties(0).total_memory)


def ray_gpu_layout() -> tuple[int, int]:
    """(memory of one GPU in bytes, the most GPUs one live node has) of the connected Ray
    cluster; the memory read by a task on a GPU node (Ray reports GPUs only by count)."""
    import ray

    per_node = max((int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]),
                   default=0)
    if not per_node:
        raise CpiftError("the Ray cluster has no GPU node")
    return ray.get(ray.remote(num_gpus=1, num_cpus=0)(_device_memory).remote()), per_node


def resolve_use_gpu(use_gpu: bool | None, ranks: int) -> bool:
    """``finetune.use_gpu`` made definite: unset means yes where there is a GPU for every rank."""
    if use_gpu is not None:
        if use_gpu and gpus_available() < ranks:
            raise CpiftError(f"finetune.use_gpu: {ranks} rank(s) need a GPU each; "
                             f"{gpus_available()} available")
        return use_gpu
    return gpus_available() >= ranks
