"""Storage every node sees: ``--output`` and ``--data`` looked for from each node before anything trains.

A member on another node writes its checkpoints and final files to ``--output`` as that node sees
the path, and the image decoding reads ``--data`` there. A local folder that only the driver's
node has (the default ``runs/...``, a laptop's disk, a head's own volume) would leave the members'
files on the workers' disks, where the driver cannot read them and the autoscaler deletes them.
So when the cluster has more than one node, the driver writes a marker (a random token) in the
output folder and a task pinned to each alive node reads it back and looks for one data file;
a node that cannot see either stops the run with one line naming the path, the node and the fix.
Nodes that join later (an autoscaler's, or one a restarted member lands on) are checked by each
member's trainer before it trains (``NodeStorage.check_here``), against the run's ``run.json``.

The bundled demo's data is written by each node for itself (``digits.ensure_digits``: the same
files from scikit-learn's copy on that node), so the demo needs no shared data folder.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from ensemble import storage
from ensemble.errors import ConfigError, StallError

log = logging.getLogger("ensemble.driver")

MARKER_PREFIX = ".storage-check-"  # the marker's name in --output: this prefix and its token
WAIT_STEP_S = 1.0                  # the driver waits for the nodes' answers in steps this long (Ctrl-C works)
FIX = "use s3://BUCKET/PREFIX, or a folder that every node mounts at the same path"


@dataclass(frozen=True)
class NodeStorage:
    """What every node that decodes, trains or votes must see: the run folder and the data."""

    output: str                           # the run folder: an absolute local path or a URI
    data: str                             # --data as the run names it (the bundled digits' folder without one)
    data_file: Optional[tuple[str, int]]  # (path, size in bytes) of one training image every node must read
    bundled: bool = False                 # the bundled digits: each node writes its own copy at ``data``

    def problems(self, output_file: str, token: Optional[bytes] = None) -> dict:
        """What this process's node cannot see: {"output": reason, "data": reason} for each that
        fails, {} when it sees both. ``output_file`` must exist in the run folder (with ``token``:
        hold exactly those bytes, so a folder of the same name elsewhere does not pass)."""
        found = {}
        name = "the file the driver just wrote in it" if token is not None else os.path.basename(output_file)
        try:
            seen = storage.read_bytes(output_file)
            if token is not None and seen != token:
                found["output"] = f"{name} holds other bytes there"
        except FileNotFoundError:
            found["output"] = f"{name} is not there"
        except OSError as exc:
            found["output"] = f"cannot read {name} there ({_reason(exc)})"
        if self.bundled:
            from ensemble.digits import ensure_digits

            try:
                ensure_digits(self.data)
            except OSError as exc:
                found["data"] = f"the bundled digits could not be written at {self.data} ({_reason(exc)})"
                return found
        if self.data_file is not None:
            path, size = self.data_file
            try:
                there = storage.file_stats([path])[0][0]
            except OSError as exc:
                there, why = -1, f"cannot read {path} there ({_reason(exc)})"
            else:
                why = f"{path} is not there" if there < 0 else f"{path} there has {there} bytes, not {size}"
            if there != size:
                found["data"] = why
        return found

    def check_here(self, who: str) -> None:
        """ConfigError (one line) unless this process's node sees the run folder (its run.json,
        written before any member trains) and the data; ``who`` names what was to run here."""
        import ray

        found = self.problems(storage.join(self.output, "run.json"))
        if found:
            context = ray.get_runtime_context()
            node = _node_words(context.get_node_id(), ray.util.get_node_ip_address())
            raise refusal(self, found, f"{node}, where {who} was to run")


def node_storage(output: str, data: str, index, *, bundled: bool) -> NodeStorage:
    """The run's NodeStorage: ``output`` made absolute (a relative path would name another folder on
    each node: members resolve it against their own working directory), the first training image."""
    output = output if storage.is_uri(output) else os.path.abspath(output)
    paths = index.train.column("path").to_pylist()
    data_file = (paths[0], storage.file_stats(paths[:1])[0][0]) if paths else None
    return NodeStorage(output=output, data=data, data_file=data_file, bundled=bundled)


def check_nodes_see_storage(needs: NodeStorage, *, timeout_s: float) -> None:
    """Before anything trains: a task on each alive node reads the marker the driver writes in the run
    folder and looks for the data file; one line (ConfigError) naming the path, the first node that
    cannot see it and the fix. Nothing to do on a one-node cluster whose node is the driver's.
    The marker (and any folder made for it) is removed again, whatever the answer."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    if len(nodes) < 2 and all(n["NodeID"] == here for n in nodes):
        return
    token = uuid.uuid4().hex
    marker = storage.join(needs.output, MARKER_PREFIX + token)
    made = _missing_folders(needs.output)
    log.info("checking that the cluster's %d nodes see --output %s and --data %s", len(nodes), needs.output,
             needs.data)
    storage.write_bytes(marker, token.encode())
    try:
        look = ray.remote(num_cpus=0, max_retries=0)(_look)
        refs = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
                             name="ensemble-storage-check").remote(needs, marker, token.encode()): n for n in nodes}
        answers = _wait(refs, timeout_s)
    finally:
        _remove(marker, made)
    blind = [(node, found) for node, found in answers if found]
    if blind:
        node, found = blind[0]
        more = f"; {len(blind) - 1} more of the {len(nodes)} nodes cannot either" if len(blind) > 1 else ""
        raise refusal(needs, found, _node_words(node["NodeID"], node["NodeManagerAddress"]) + more)


def _look(needs: NodeStorage, marker: str, token: bytes) -> dict:
    """The task on one node (no torch, no model): what it cannot see."""
    return needs.problems(marker, token)


def _wait(refs: dict, timeout_s: float) -> list:
    """[(node, its answer)] in node order; StallError naming a node that did not answer in time (its
    task waits for a worker process there: a node that is alive but stuck)."""
    import ray

    pending, answers, started = list(refs), {}, time.time()
    while pending:
        done, pending = ray.wait(pending, num_returns=len(pending), timeout=WAIT_STEP_S)
        for ref in done:
            node = _node_words(refs[ref]["NodeID"], refs[ref]["NodeManagerAddress"])
            try:
                answers[ref] = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # the package itself failed there (not installed?)
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                detail = str(cause).strip().splitlines()
                raise ConfigError(f"the storage check failed on {node}: {cause.__class__.__name__}"
                                  f"{': ' + detail[0][:200] if detail else ''}; install this package on every "
                                  f"node as on the driver's, then rerun the same command") from None
            except ray.exceptions.RayError as exc:  # the node went away: no member will run there
                log.warning("%s left during the storage check (%s); going on without it", node,
                            exc.__class__.__name__)
                answers[ref] = {}
        waited = time.time() - started
        if pending and waited > timeout_s:
            node = refs[pending[0]]
            raise StallError(f"the storage check got no answer from "
                             f"{_node_words(node['NodeID'], node['NodeManagerAddress'])}"
                             f" in {waited:.0f} s ({len(pending)} of {len(refs)} nodes silent); check that node, "
                             f"or remove it from the cluster, then rerun the same command")
    return [(refs[ref], answers[ref]) for ref in refs]


def refusal(needs: NodeStorage, found: dict, where: str) -> ConfigError:
    """The one line: which of --output / --data, from where, why, and the fix."""
    what = " and ".join(f"--{k} {needs.output if k == 'output' else needs.data}" for k in ("output", "data")
                        if k in found)
    verb = "are" if len(found) > 1 else "is"
    why = "; ".join(found[k] for k in ("output", "data") if k in found)
    lost = " (members there would keep their files on that node's own disk)" if "output" in found else ""
    return ConfigError(f"{what} {verb} not visible from {where}: {why}{lost}; {FIX}")


def _node_words(node_id: str, address: str) -> str:
    return f"node {address} (id {node_id[:8]})"


def _missing_folders(output: str) -> list[str]:
    """The local folders at and above ``output`` that do not exist yet, deepest first, created now
    (the marker needs its folder; object stores need none)."""
    if storage.is_uri(output):
        return []
    made, path = [], output
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    if made:
        try:
            os.makedirs(output)
        except OSError as exc:
            raise ConfigError(f"--output {output}: cannot create it ({_reason(exc)}); pick another folder") from None
    return made


def _remove(marker: str, made: list[str]) -> None:
    """The marker, then the folders made for it (only while empty: nothing else is touched)."""
    try:
        storage.remove(marker)
    except OSError as exc:
        log.warning("could not remove the storage check's marker %s (%s)", marker, _reason(exc))
    for folder in made:
        try:
            os.rmdir(folder)
        except OSError:
            break


def _reason(exc: OSError) -> str:
    return str(exc).strip().splitlines()[0][:160] if str(exc).strip() else exc.__class__.__name__
