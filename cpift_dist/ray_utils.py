"""Connecting to Ray: a private local instance bound to 127.0.0.1, or a cluster by address."""

from __future__ import annotations

import os
import tempfile

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
        return "existing"
    env = {"env_vars": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "")}} \
        if os.environ.get("DS_ACCELERATOR") else None
    if address in (None, "", "local"):
        tmp = tempfile.mkdtemp(prefix="cpift-ray-", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", _temp_dir=tmp, runtime_env=env,
                 log_to_driver=False, configure_logging=False)
        return "local"
    try:
        ray.init(address=address, runtime_env=env, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise CpiftError(f"--address {address}: no Ray cluster answers ({e})") from None
    return address
