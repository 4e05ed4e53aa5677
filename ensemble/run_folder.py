"""The --output folder: checked before anything is written, fingerprinted, opened or resumed,
and, once finished, loaded as a ``FinishedRun`` (what predict, serve and later tools use).

A run's folder holds run.json (config, member seeds, the fingerprint a rerun must match,
package versions) and config.yaml, written before training; the results (report.py) and the
members' files (member_files.py) follow. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
from dataclasses import dataclass
from typing import Optional

from ensemble import storage
from ensemble.config import ConfigError, EnsembleConfig, build_config
from ensemble.errors import RunError

log = logging.getLogger("ensemble.run_folder")

REPORT_SHA256 = "report.json.sha256"  # written after report.json: "<sha256>  report.json", as sha256sum writes it
# What a finished run wrote at its top level; --fresh removes them with the members.
RESULT_FILES = ("predictions.csv", "probabilities.parquet", "report.json", REPORT_SHA256, "report.md", "config.yaml",
                "run.json")


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


def training_fingerprint(cfg: EnsembleConfig, index, n_samples: int) -> dict:
    """What a finished member depends on; a run may reuse members only when this matches."""
    digest = hashlib.sha256()
    for table in (index.train, index.val):
        for column in ("path", "label"):
            digest.update("\n".join(map(str, table.column(column).to_pylist())).encode())
    keys = ("arch", "weights", "freeze", "freeze_stem", "epochs", "batch_size", "lr", "image_size", "augment", "eval_resize", "cache_side", "seed",
            "bagging", "precision")
    return {**{k: getattr(cfg, k) for k in keys}, "bootstrap_size": n_samples, "classes": list(index.classes),
            "files_sha256": digest.hexdigest()}


def open_output(output: str, fingerprint: dict, *, fresh: bool) -> bool:
    """Create the folder; with an earlier run there, resume it (same fingerprint) or refuse.

    Returns True when an earlier run's members may be reused.
    """
    previous = storage.join(output, "run.json")
    resuming = False
    if storage.exists(previous):
        if fresh:
            storage.remove_tree(storage.join(output, "members"))
            for name in RESULT_FILES:
                if storage.exists(storage.join(output, name)):
                    storage.remove(storage.join(output, name))
        else:
            try:
                old = json.loads(storage.read_bytes(previous)).get("fingerprint")
            except ValueError:
                old = None
            if old != fingerprint:
                changed = sorted(k for k in set(old or {}) | set(fingerprint)
                                 if (old or {}).get(k) != fingerprint.get(k))
                raise ConfigError(f"--output {output} holds a run with another config ({', '.join(changed) or 'unreadable'}"
                                  f" differ); use another --output, or add --fresh to discard it")
            resuming = True
    try:
        storage.makedirs(output)
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot create it ({exc.__class__.__name__}); pick another folder") from None
    return resuming


def save_run_config(output: str, cfg: EnsembleConfig, seeds: list[int], fingerprint: dict) -> None:
    """config.yaml (--config takes it back) and run.json (what a rerun must match to resume)."""
    import yaml

    storage.write_text(storage.join(output, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    storage.write_text(storage.join(output, "run.json"), json.dumps(
        {"config": cfg.to_dict(), "member_seeds": seeds, "fingerprint": fingerprint, "versions": versions()},
        indent=2))


def versions() -> dict:
    """Python and the packages a result depends on, recorded beside it."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("ensemble", "ray", "torch", "torchvision", "numpy", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------- a finished run

MEMBER_CHOICES = ("all", "selected")


@dataclass(frozen=True)
class FinishedRun:
    """What predicting (or serving) with a finished run needs, its member files checked."""

    config: EnsembleConfig
    fingerprint: dict
    states: list                     # the used members' state dicts, in ``members`` order
    temperature: float               # the one its report fitted for this vote; 1 when it has none
    members: list                    # indices of the members used (loaded)
    weights: Optional[list] = None   # their selection weights (sum 1); None: the run's own vote

    @property
    def classes(self) -> list:
        return list(self.fingerprint["classes"])


def load_run(run: str, members: str = "all") -> FinishedRun:
    """The finished run in ``run``, or one line (ConfigError, RunError) if it is not one.

    ``members``: ``all``, or ``selected``: the Caruana selection its report.json recorded
    (``ensemble.selection.weights``); members of weight 0 are not even loaded. Every loaded
    member's files are checked against the sha256 recorded when it finished (weights_only load).
    """
    from ensemble.member_files import load_finished_member

    if members not in MEMBER_CHOICES:
        raise ConfigError(f"--members {members}: choose {' or '.join(MEMBER_CHOICES)}")
    try:
        record = json.loads(storage.read_bytes(storage.join(run, "run.json")))
    except (OSError, ValueError):
        raise ConfigError(f"--run {run}: no readable run.json; pass the --output folder of a finished "
                          f"'python -m ensemble.driver' run") from None
    cfg = build_config(flag_values=record["config"])
    report = _read_report(run)  # checked against its sha256 when the run recorded one
    used, weights = list(range(cfg.members)), None
    if members == "selected":
        used, weights = selected_members(report, cfg.members, run)
    temperature = _temperature(report, "selection" if members == "selected" else "calibration", run)
    if temperature is None and members == "selected":  # a report from before selections had their own
        temperature = _temperature(report, "calibration", run)
    if temperature is None:
        log.warning("--run %s: no temperature in its report.json; probabilities are the plain soft vote", run)
        temperature = 1.0
    states = []
    for i in used:
        finished = load_finished_member(run, i, record["fingerprint"])  # sha256 checked; CheckpointError if not
        if finished is None:
            raise RunError(f"--run {run}: member {i} has not finished; rerun the driver with --output {run} "
                           f"to finish the run first")
        states.append(finished[1])
    return FinishedRun(config=cfg, fingerprint=record["fingerprint"], states=states, temperature=temperature,
                       members=used, weights=weights)


def _temperature(report: Optional[dict], part: str, run: str) -> Optional[float]:
    """The temperature report.json's ``ensemble.<part>`` fitted (calibration: the vote of all
    members; selection: the selected members' weighted vote), or None where it records none. One
    that the driver cannot have written (it fits T within ``DEFAULT_BOUNDS``; 0 would fail every
    vote) is one line (RunError), before a member is loaded."""
    from ensemble.scores.calibration import DEFAULT_BOUNDS

    try:
        value = report["ensemble"][part]["temperature"]
    except (KeyError, TypeError):
        return None
    try:
        temperature = float(value)
    except (TypeError, ValueError):
        temperature = math.nan
    low, high = DEFAULT_BOUNDS
    if not (math.isfinite(temperature) and low <= temperature <= high):
        raise RunError(f"--run {run}: report.json's ensemble.{part}.temperature is {value!r}, not a temperature "
                       f"the driver fits (a number from {low:g} to {high:g}); restore the file, or rerun the "
                       f"driver with --output {run} to write it again")
    return temperature


def _read_report(run: str) -> Optional[dict]:
    """report.json's content, or None (no readable report). Where the run recorded its sha256
    (REPORT_SHA256, written after it), a report that differs, or is gone, is one line (RunError)."""
    try:
        data = storage.read_bytes(storage.join(run, "report.json"))
    except OSError:
        data = None
    try:
        recorded = storage.read_bytes(storage.join(run, REPORT_SHA256)).decode().split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        recorded = None  # a run from before reports were hashed
    if recorded is not None and (data is None or hashlib.sha256(data).hexdigest() != recorded):
        change = "is missing" if data is None else "changed after the run wrote it (its sha256 differs)"
        raise RunError(f"--run {run}: report.json {change}; {REPORT_SHA256} records the one the run wrote: "
                       f"restore it, or rerun the driver with --output {run} to write it again")
    try:
        return json.loads(data) if data is not None else None
    except ValueError:
        return None


def write_report_sha256(output: str) -> None:
    """report.json's sha256 beside it (REPORT_SHA256), written after it: ``load_run`` refuses a
    report changed since (``sha256sum -c report.json.sha256`` checks it too)."""
    digest = hashlib.sha256(storage.read_bytes(storage.join(output, "report.json"))).hexdigest()
    storage.write_text(storage.join(output, REPORT_SHA256), f"{digest}  report.json\n")


def selected_members(report: Optional[dict], n_members: int, run: str) -> tuple[list, list]:
    """(member indices, their weights) of the selection in report.json's ``ensemble.selection``:
    the members of weight > 0, in index order. One line (ConfigError) if there is none."""
    try:
        weights = [float(w) for w in report["ensemble"]["selection"]["weights"]]
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"--members selected: {run}/report.json records no member selection "
                          f"(ensemble.selection.weights); use --members all") from None
    if len(weights) != n_members or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--members selected: {run}/report.json's selection weights {weights} do not fit "
                          f"the run's {n_members} members; use --members all")
    used = [i for i, w in enumerate(weights) if w > 0]
    return used, [weights[i] for i in used]
