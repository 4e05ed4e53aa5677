"""Joining a Ray cluster, checking what the user asked of it, and sizing member slots to it.

Every check raises ConfigError with one line that names the flag, so both entry points can
refuse bad input before they write anything.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional

from ensemble.config import ConfigError, EnsembleConfig

log = logging.getLogger(__name__)


def connect(address: Optional[str]):
    """Join ``address`` (or RAY_ADDRESS / the local cluster) or start one; returns the dashboard URL."""
    import ray

    if ray.is_initialized():
        return None
    if address and address not in ("auto", "local"):
        check_reachable(address)
    kwargs = {"logging_level": logging.WARNING, "log_to_driver": True}
    if address:
        kwargs["address"] = address
    handlers = _signal_handlers()
    try:
        context = ray.init(**kwargs)
    except ConnectionError as exc:
        raise ConfigError(f"--address {address}: no Ray cluster found ({str(exc).splitlines()[0][:120]}); "
                          f"start one with 'ray start --head' or leave --address out") from None
    finally:
        _restore_signal_handlers(handlers)
    dashboard = getattr(context, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    return dashboard


def _signal_handlers() -> dict:
    """The process's Python handlers for SIGINT and SIGTERM (main thread only; else none)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict) -> None:
    """ray.init installs its own SIGTERM handling in a driver (a stack dump and exit 1, or a bare
    sys.exit): put the process's handlers back, so the driver's "stop like Ctrl-C" (members
    stopped, exit 130, the resume command printed) holds once Ray is up."""
    import signal

    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


DEFAULT_MEMBER_CPUS = 2.0  # --cpus-per-member when unset, or all of the largest node's CPUs if it has fewer


def resolve_resources(cfg: EnsembleConfig, capacity: Capacity) -> EnsembleConfig:
    """``cfg`` with what each actor gets on this cluster: CPUs and GPUs per member, GPUs per voter
    and the voter pool's size. An explicit request no node can meet is refused in one line; the
    defaults shrink to fit, so the bundled defaults run on any cluster and no actor waits forever
    for resources that will never exist."""
    cpus = fit_cpus(cfg.cpus_per_member, capacity, "cpus-per-member", default=DEFAULT_MEMBER_CPUS)
    fit_cpus(cfg.cpus_per_infer_actor, capacity, "cpus-per-infer-actor")
    gpus = resolve_gpus(cfg.gpus_per_member, capacity, "gpus-per-member")
    # voters follow GPU members, also onto GPU nodes an autoscaler has yet to add
    infer_gpus = resolve_gpus(cfg.gpus_per_infer_actor, capacity, "gpus-per-infer-actor",
                              auto=1.0 if gpus > 0 else None)
    fits = math.floor(capacity.most("CPU") / cfg.cpus_per_infer_actor + 1e-9)
    if infer_gpus > 0:
        fits = min(fits, math.floor(capacity.most("GPU") / infer_gpus + 1e-9))
    voters = max(1, min(cfg.infer_actors, fits))
    if voters < cfg.infer_actors:
        log.info("--infer-actors %d: %d fit(s) on this cluster; the vote runs with %d", cfg.infer_actors, voters,
                 voters)
    return cfg.replace(cpus_per_member=cpus, gpus_per_member=gpus, gpus_per_infer_actor=infer_gpus,
                       infer_actors=voters)


def fit_cpus(requested: Optional[float], capacity: Capacity, what: str, *, default: Optional[float] = None) -> float:
    """CPUs per actor: an explicit request must fit on some node (alive or launchable); an unset
    one is ``default``, or the largest node's CPUs where that is less."""
    largest = capacity.largest("CPU")
    if requested is None:
        return min(default, largest) if largest > 0 else default
    if requested > largest:
        raise ConfigError(f"--{what} {requested:g} but the largest node has {largest:g} CPU(s); "
                          f"use --{what} {largest:g} or less")
    return float(requested)


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


# Where `ray up` leaves the cluster's config on the head (cluster.yaml starts the autoscaler with it).
BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class Capacity:
    """What the cluster has now and what its autoscaler may add; sizes GPU use and member slots.

    ``node_types``: (resources, max_workers) of each node type the autoscaler may launch, from
    the cluster config an autoscaler reports to the GCS (none of Ray 2.60's own does, KubeRay's
    included) or ``BOOTSTRAP_CONFIG`` (a `ray up` head); empty for a fixed cluster, or where the
    driver cannot see them.
    """

    nodes: tuple[dict, ...]                          # resources of each alive node
    node_types: tuple[tuple[dict, int], ...] = ()

    @property
    def autoscaling(self) -> bool:
        return bool(self.node_types)

    def most(self, resource: str) -> float:
        """An upper bound on ``resource`` in the cluster: what it has plus what the autoscaler may add."""
        now = sum(n.get(resource, 0.0) for n in self.nodes)
        return now + sum(r.get(resource, 0.0) * count for r, count in self.node_types)

    def largest(self, resource: str) -> float:
        """The most of ``resource`` on one node, alive or launchable."""
        return max([n.get(resource, 0.0) for n in self.nodes] + [r.get(resource, 0.0) for r, _ in self.node_types],
                   default=0.0)


    def smallest_store(self) -> tuple[float, str]:
        """(bytes, which node) of the smallest object store of a node that decodes, trains or votes:
        the image cache's decode tasks put its blocks (the primaries) in the stores of the alive
        CPU nodes, and each node that trains or votes reads all of it into its own store. A node
        type the autoscaler may add counts too: its store as declared (``object_store_memory``),
        else Ray's default share of the memory it declares (``memory``, which `ray up` fills in
        for AWS worker types); a type that declares neither is left out of the comparison."""
        alive = [n for n in self.nodes if n.get("CPU", 0) > 0] or self.nodes
        stores = [(n.get("object_store_memory", 0.0), "the smallest node's") for n in alive]
        for resources, _ in self.node_types:
            store = launchable_store(resources)
            if resources.get("CPU", 0) > 0 and store is not None:
                stores.append((store, "the smallest launchable node type's"))
        return min(stores, default=(0.0, "the smallest node's"), key=lambda s: s[0])


def launchable_store(resources: dict) -> Optional[float]:
    """The object store (bytes) a node of a launchable type will have, or None if it declares no memory."""
    if resources.get("object_store_memory"):
        return float(resources["object_store_memory"])
    if resources.get("memory"):
        share = float(os.environ.get("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", 0.3))
        return float(resources["memory"]) * share / (1 - share)  # "memory" is the rest of the node's RAM
    return None


def cluster_capacity() -> Capacity:
    """Read the connected cluster's nodes and, when it autoscales, the node types it may launch."""
    import ray

    nodes = tuple(dict(n["Resources"]) for n in ray.nodes() if n["Alive"])
    return Capacity(nodes=nodes, node_types=_autoscaler_node_types())


def _autoscaler_node_types() -> tuple[tuple[dict, int], ...]:
    """(resources, max workers) per launchable worker type; () when the driver cannot see them."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()  # an autoscaler that reports its groups (Ray 2.60's do not yet)
    except Exception:
        config = None
    if config is not None and config.node_group_configs:
        return tuple((dict(g.resources), int(g.max_count) if g.max_count >= 0 else 10**6)
                     for g in config.node_group_configs if g.max_count != 0)
    return node_types_from_launcher_config(os.path.expanduser(BOOTSTRAP_CONFIG))


def node_types_from_launcher_config(path: str) -> tuple[tuple[dict, int], ...]:
    """Worker types of a cluster-launcher YAML (``available_node_types``), each with its max_workers."""
    import yaml

    try:
        with open(path) as fh:
            config = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError):
        return ()
    head = config.get("head_node_type")
    limit = config.get("max_workers", 10**6)
    types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        count = min(int(spec.get("max_workers", limit)), limit)
        if name != head and count > 0 and spec.get("resources"):
            types.append(({k: float(v) for k, v in spec["resources"].items()}, count))
    return tuple(types)


def resolve_gpus(requested: Optional[float], capacity: Capacity, what: str, *, auto: Optional[float] = None) -> float:
    """GPUs per actor. Unset: ``auto`` if given, else 1 when the cluster has or can add GPUs, else 0.

    An explicit request must fit on some node, alive or launchable.
    """
    largest = capacity.largest("GPU")
    if requested is None:
        if auto is not None:
            return auto
        return 1.0 if largest > 0 else 0.0
    if requested > 0:
        if largest == 0:
            grow = " and its autoscaler cannot add any" if capacity.autoscaling else ""
            raise ConfigError(f"--{what} {requested:g} but the cluster has no GPUs{grow}; use --{what} 0")
        if requested > largest:
            raise ConfigError(f"--{what} {requested:g} but the largest node has {largest:g} GPU(s); "
                              f"use --{what} {largest:g} or less")
        if sum(n.get("GPU", 0.0) for n in capacity.nodes) == 0:
            log.info("--%s %g: the cluster has no GPU node yet; its autoscaler adds them on demand", what,
                     requested)
    return float(requested)


def member_window(cfg: EnsembleConfig, capacity: Capacity, gpus: float) -> int:
    """How many members run at once: as many as the cluster's CPUs (and GPUs) hold.

    Members decode their own input on their own CPUs, so they may fill the cluster. This many
    trainer actors start; each trains its share of the members in turn. Ray queues the actors
    that do not fit yet, and an autoscaler adds nodes for them: the count is taken from what the
    cluster can grow to. ``cfg.cpus_per_member`` must be resolved (``resolve_resources``).
    """
    slots = math.floor(capacity.most("CPU") / cfg.cpus_per_member + 1e-9)
    if gpus > 0:
        slots = min(slots, math.floor(capacity.most("GPU") / gpus + 1e-9))
    return max(1, min(cfg.members, slots))


def slot_members(queue: list[int], window: int) -> list[list[int]]:
    """Members per trainer slot: at most ``window`` slots, members dealt round-robin."""
    slots = max(1, min(window, len(queue)))
    return [queue[k::slots] for k in range(slots)] if queue else []


def slot_name(members: list[int]) -> str:
    """The actor's name in the dashboard: ensemble-member-3, ensemble-members-0-2-4 for a slot of
    several, ensemble-members-0-2-4-...-998 for a slot of more than six (unique per run: a slot's
    first members are its own)."""
    if len(members) == 1:
        return f"ensemble-member-{members[0]}"
    shown = members if len(members) <= 6 else [*members[:3], "...", members[-1]]
    return "ensemble-members-" + "-".join(map(str, shown))
