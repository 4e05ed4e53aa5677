"""The --output folder: checked before anything is written, fingerprinted, opened or resumed.

A run's folder holds run.json (config, member seeds, the fingerprint a rerun must match,
package versions) and config.yaml, written before training; the results (report.py) and the
members' files (member_files.py) follow. No Ray here.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

from ensemble import storage
from ensemble.config import ConfigError, EnsembleConfig

# What a finished run wrote at its top level; --fresh removes them with the members.
RESULT_FILES = ("predictions.csv", "probabilities.parquet", "report.json", "report.md", "config.yaml", "run.json")


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
