"""Joining a Ray cluster and checking what the user asked of it (shared by the driver and tune).

Every check raises ConfigError with one line that names the flag, so both entry points can
refuse bad input before they write anything.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from ensemble import storage
from ensemble.config import ConfigError


PRELOAD_MODULES = "torch,torchvision,ensemble.actors"


def connect(address: Optional[str]):
    """Join ``address`` (or RAY_ADDRESS / the local cluster) or start one; returns the dashboard URL."""
    import ray

    if ray.is_initialized():
        return None
    # Workers of a cluster started here import these before their first task: an actor placed on
    # an idle worker then skips ~3 s of imports. (Nodes started with `ray start` take the same
    # environment variable; see cluster.yaml.)
    os.environ.setdefault("RAY_preload_python_modules", PRELOAD_MODULES)
    if address and address not in ("auto", "local"):
        check_reachable(address)
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    try:
        context = ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster found ({str(exc).splitlines()[0][:120]}); "
                          f"start one with 'ray start --head' or leave --address out") from None
    return getattr(context, "dashboard_url", None)


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A TCP connect to host:port, so a wrong address fails in seconds, not after Ray's retries."""
    import socket
    from urllib.parse import urlsplit

    target = urlsplit(address if "://" in address else f"tcp://{address}")
    try:
        host, port = target.hostname, target.port or (10001 if target.scheme == "ray" else 6379)
    except ValueError:
        raise ConfigError(f"--address {address}: not host:port, ray://host:port or auto") from None
    if not host:
        raise ConfigError(f"--address {address}: not host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as exc:
        raise ConfigError(f"--address {address}: nothing answers at {host}:{port} ({exc.__class__.__name__}); "
                          f"check the address, or leave --address out to start a local cluster") from None


def resolve_gpus(requested: Optional[float], cluster: dict, what: str) -> float:
    """Auto -> 1 GPU when the cluster has any; check an explicit request can ever be met."""
    import ray

    total = cluster.get("GPU", 0.0)
    if requested is None:
        return 1.0 if total > 0 else 0.0
    if requested > 0:
        if total == 0:
            raise ConfigError(f"--{what} {requested:g} but the cluster has no GPUs; use --{what} 0")
        largest = max((n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n["Alive"]), default=0.0)
        if requested > largest:
            raise ConfigError(f"--{what} {requested:g} but the largest node has {largest:g} GPU(s)")
    return float(requested)


def check_output(output: str) -> str:
    """Refuse an --output that is a file or lies in an unwritable place. Writes nothing."""
    if storage.is_uri(output):
        try:
            taken = storage.exists(output) and not storage.is_dir(output)
        except OSError as exc:  # no such bucket, wrong endpoint, no credentials
            raise ConfigError(f"--output {output}: cannot reach it ({str(exc).splitlines()[0][:160]})") from None
        if taken:
            raise ConfigError(f"--output {output}: is a file; pass a folder")
        return output
    if os.path.isfile(output):
        raise ConfigError(f"--output {output}: is a file; pass a folder")
    parent = os.path.abspath(output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {output}: {parent} is not a writable folder; pick another place")
    return output
