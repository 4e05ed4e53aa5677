"""The --output folder: checked before anything is written, fingerprinted, opened or resumed,
and, once finished, loaded as a ``FinishedRun`` (what predict, serve and later tools use).

A run's folder holds run.json (config, member seeds, the fingerprint a rerun must match,
package versions) and config.yaml, written before training; the results (report.py) and the
members' files (member_files.py) follow. No Ray here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import time
import uuid
from dataclasses import dataclass
from typing import Optional

from ensemble import storage
from ensemble.config import ConfigError, EnsembleConfig, build_config
from ensemble.errors import RunError, StorageError

log = logging.getLogger("ensemble.run_folder")

REPORT_SHA256 = "report.json.sha256"  # written after report.json: "<sha256>  report.json", as sha256sum writes it
# What a finished run wrote at its top level; --fresh removes them with the members.
RESULT_FILES = ("predictions.csv", "probabilities.parquet", "report.json", REPORT_SHA256, "report.md", "config.yaml",
                "run.json")


# What ``python -m ensemble.distill`` adds to a student's run folder: the teacher's soft vote on the
# training rows, and the comparison of student and ensemble.
STUDENT_FILES = ("teacher.npz", "distill.json", "distill.md")


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
    check_writable_place(output)
    return output


def check_writable_place(output: str, *, folder: bool = True) -> None:
    """ConfigError unless the nearest existing folder at or above local ``output`` (a folder to
    create, or with ``folder=False`` a file to write) is writable."""
    parent = os.path.abspath(output if folder else os.path.dirname(os.path.abspath(output)))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise ConfigError(f"--output {output}: {parent} is not a writable folder; pick another place")


def check_outside(run: str, output: str) -> None:
    """ConfigError when ``output`` is the run's folder or lies inside it (predict would overwrite
    the run's own predictions.csv; distill or export would write among its members)."""
    # as storage resolves them: S3:// is s3://, a trailing slash or a link changes nothing
    run_path, out_path = storage.canonical(run), storage.canonical(output)
    sep = "/" if storage.is_uri(run) or storage.is_uri(output) else os.sep
    if out_path == run_path or out_path.startswith(run_path + sep):
        raise ConfigError(f"--output {output}: inside the run folder {run}, whose own files it would overwrite; "
                          f"pick a folder outside it")


def default_output() -> str:
    """runs/<date>-<time>-<6 hex digits>: drivers started in the same second get folders of their own."""
    return os.path.join("runs", f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


# The train and val files the members learn from, as the run saw them (written beside run.json):
# what a rerun compares its own with, to name a file that changed.
INPUTS_FILE = "inputs.parquet"
INPUT_COLUMNS = ("split", "path", "label", "size", "mtime_ns")
# Packages whose version changes a member's numbers ("Same seed, same result" in README.md).
RESULT_PACKAGES = ("torch", "torchvision", "numpy", "pillow")


def input_files(index):
    """The files the members learn from, train rows then val rows, as a pyarrow Table of
    INPUT_COLUMNS: split, path, label, size (bytes) and modification time (ns), from one stat per
    local file or one listing of the folders of an object store; and ``sha256``, the contents the
    image check read, when the index carries them (every checked index does)."""
    import pyarrow as pa

    splits = [("train", index.train), ("val", index.val)]
    paths = [p for _, table in splits for p in table.column("path").to_pylist()]
    stats = storage.file_stats(paths)
    columns = {"split": [name for name, table in splits for _ in range(table.num_rows)], "path": paths,
               "label": [label for _, table in splits for label in table.column("label").to_pylist()],
               "size": [size for size, _ in stats], "mtime_ns": [mtime for _, mtime in stats]}
    if all(CONTENTS_COLUMN in table.column_names for _, table in splits):
        columns[CONTENTS_COLUMN] = [d for _, table in splits for d in table.column(CONTENTS_COLUMN).to_pylist()]
    return pa.table(columns)


#: The column of a checked index (and of inputs.parquet) with each file's sha256, as read by the
#: image check; its digest is the fingerprint's ``contents_sha256``.
CONTENTS_COLUMN = "sha256"
CONTENTS_KEY = "contents_sha256"


def matching_earlier(output: str, fingerprint: dict) -> dict:
    """``fingerprint``, without ``contents_sha256`` when ``output`` holds a run from before file
    contents were fingerprinted (it resumes on sizes and times, as it was started)."""
    if CONTENTS_KEY not in fingerprint:
        return fingerprint
    data = storage.read_stored(storage.join(output, "run.json"))
    try:
        old = json.loads(data).get("fingerprint") if data else None
    except (ValueError, AttributeError):
        old = None
    if isinstance(old, dict) and CONTENTS_KEY not in old:
        log.info("%s: a run from before file contents were fingerprinted; it resumes on the files' sizes and "
                 "times", output)
        return {k: v for k, v in fingerprint.items() if k != CONTENTS_KEY}
    return fingerprint


#: The fingerprint's words for train pixels that are not the files' own: the compressed cache
#: tier's JPEG re-encoding (the raw tier and no cache give the decoded files' exact pixels).
TRAIN_PIXELS = {"compressed": "jpeg-q90"}


def training_fingerprint(cfg: EnsembleConfig, index, n_samples: int, inputs=None, *,
                         cache_tier: Optional[str] = None) -> dict:
    """What a finished member depends on; a run may reuse members only when this matches: the
    settings that change training, the files (``inputs``, default ``input_files(index)``: their
    paths, labels, sizes and modification times), the sha256 of a --weights file and the versions
    of the packages that change the numbers. ``index`` is the one the run trains on (with
    --val-fraction, its val drawn from train). ``cache_tier``: the image cache's tier this run
    trains from (None: no cache); the compressed one's pixels are other pixels (``train_pixels``)."""
    inputs = input_files(index) if inputs is None else inputs
    digest = hashlib.sha256()
    for column in INPUT_COLUMNS:
        digest.update("\n".join(map(str, inputs.column(column).to_pylist())).encode() + b"\0")
    keys = ("arch", "weights", "freeze", "freeze_stem", "epochs", "batch_size", "lr", "image_size", "augment",
            "eval_resize", "cache_side", "seed", "bagging", "precision")
    # --val-fraction picks the train rows (the files above show it too, but not as a setting). Only
    # when set, so a run from before the flag keeps its fingerprint and resumes.
    drawn = {"val_fraction": cfg.val_fraction} if cfg.val_fraction is not None else {}
    if cfg.val_fraction is not None and cfg.val_seed is not None and cfg.val_seed != cfg.seed:
        drawn["val_seed"] = cfg.val_seed
    if cache_tier in TRAIN_PIXELS:  # only then: a run on exact pixels keeps its earlier fingerprint
        drawn["train_pixels"] = TRAIN_PIXELS[cache_tier]
    if cfg.recipes:  # per-architecture recipes, and the sha256 of any weights file they name
        drawn["recipes"] = {arch: dict(sorted(r.items())) for arch, r in sorted(cfg.recipes.items())}
        drawn["recipes_weights_sha256"] = {arch: weights_sha256(str(r["weights"])) for arch, r in
                                           sorted(cfg.recipes.items()) if "weights" in r}
    if CONTENTS_COLUMN in inputs.column_names:  # what the image check read: a same-size, same-time copy differs here
        drawn[CONTENTS_KEY] = hashlib.sha256("\n".join(inputs.column(CONTENTS_COLUMN).to_pylist()).encode()).hexdigest()
    return {**{k: getattr(cfg, k) for k in keys}, **drawn, "bootstrap_size": n_samples, "classes": list(index.classes),
            "files_sha256": digest.hexdigest(), "weights_sha256": weights_sha256(cfg.weights),
            "versions": result_versions()}


def weights_sha256(weights: str) -> Optional[str]:
    """The sha256 of a --weights state-dict file; None for ``none`` or a torchvision weights name
    (those are fixed by the name and torchvision's version)."""
    if weights.lower() == "none" or not os.path.isfile(weights):  # as models.resolve_weights tells them apart
        return None
    digest = hashlib.sha256()
    with open(weights, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def result_versions() -> dict:
    """RESULT_PACKAGES' versions (another one changes a member's numbers)."""
    return package_versions(RESULT_PACKAGES)


def package_versions(names) -> dict:
    """{package: its installed version, or None}."""
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def open_output(output: str, fingerprint: dict, *, fresh: bool, inputs=None) -> bool:
    """Create the folder; with an earlier run there, resume it (same fingerprint) or refuse,
    naming what differs (with ``inputs``, ``input_files`` of this run: the first file that
    changed). The caller holds the folder's lock (run_lock.RunLock).

    Returns True when an earlier run's members may be reused. Storage that fails (a folder it
    may not read, a file where a folder should be) is one line (StorageError); nothing is removed.
    """
    try:
        return _open_output(output, fingerprint, fresh=fresh, inputs=inputs)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"--output {output}: cannot use it ({storage._reason(exc)}); check its permissions, "
                           f"or pick another folder") from None


def _open_output(output: str, fingerprint: dict, *, fresh: bool, inputs=None) -> bool:
    previous = storage.join(output, "run.json")
    resuming = False
    if storage.exists(previous):
        if fresh:
            storage.remove_tree(storage.join(output, "members"))
            for name in (*RESULT_FILES, INPUTS_FILE, *STUDENT_FILES):
                if storage.exists(storage.join(output, name)):
                    storage.remove(storage.join(output, name))
        else:
            data = storage.read_stored(previous)  # a read that fails: StorageError, one line, nothing removed
            try:
                old = json.loads(data or b"").get("fingerprint")
            except (ValueError, AttributeError):
                old = None
            if old != fingerprint:
                changed = _differences(output, old or {}, fingerprint, inputs)
                raise ConfigError(f"--output {output} holds a run with another config "
                                  f"({', '.join(changed) or 'unreadable'}"
                                  f" differ); use another --output, or add --fresh to discard it")
            resuming = True
    try:
        storage.makedirs(output)
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot create it ({exc.__class__.__name__}); "
                          f"pick another folder") from None
    return resuming


def _differences(output: str, old: dict, new: dict, inputs) -> list[str]:
    """The fingerprint keys that differ, in words: ``lr``, ``files (train/cat/a.jpg changed, 2 more)``,
    ``versions (torch 2.14.0 then, 2.15.0 now)``."""
    out = []
    for key in sorted(set(old) | set(new)):
        then, now = old.get(key), new.get(key)
        if then == now:
            continue
        if key == "files_sha256" or (key == CONTENTS_KEY and then is not None):
            changed = _files_changed(output, inputs)
            if changed not in out:
                out.append(changed)
        elif key == "versions" and isinstance(then, dict) and isinstance(now, dict):
            out.append("versions (" + ", ".join(f"{p} {then.get(p)} then, {now.get(p)} now"
                                                for p in sorted(set(then) | set(now))
                                                if then.get(p) != now.get(p)) + ")")
        elif key == "weights_sha256" and then is not None and now is not None:
            out.append("weights_sha256 (the --weights file changed)")
        elif key == "train_pixels":
            words = {None: "the files' exact pixels", TRAIN_PIXELS["compressed"]: "the compressed cache's JPEG q90"}
            earlier = "--cache-tier compressed" if then else "--cache-tier raw"
            out.append(f"train pixels ({words.get(then, then)} then, {words.get(now, now)} now: the image cache "
                       f"picked another tier; {earlier} trains on the earlier ones)")
        elif key == "teacher" and isinstance(then, dict) and isinstance(now, dict):
            out.append("teacher (" + ", ".join(f"{k} {then.get(k)} then, {now.get(k)} now"
                                               for k in sorted(set(then) | set(now))
                                               if then.get(k) != now.get(k)) + ")")
        else:
            out.append(key)
    return out


def _files_changed(output: str, inputs) -> str:
    """``files (NAME changed|added|removed[, N more])`` against the run's INPUTS_FILE, or ``files``."""
    import io

    import pyarrow.parquet as pq

    if inputs is None:
        return "files"
    try:
        saved = pq.read_table(io.BytesIO(storage.read_bytes(storage.join(output, INPUTS_FILE))))
    except (OSError, ValueError):  # a run from before it was written, or a damaged one
        return "files"

    names = list(INPUT_COLUMNS) + ([CONTENTS_COLUMN] if CONTENTS_COLUMN in saved.column_names
                                   and CONTENTS_COLUMN in inputs.column_names else [])

    def rows(table) -> dict:
        columns = [table.column(c).to_pylist() for c in names]
        return {(split, path): rest for split, path, *rest in zip(*columns)}

    then, now = rows(saved), rows(inputs)
    found = ([(key, "changed") for key in now if key in then and then[key] != now[key]]
             + [(key, "added") for key in now if key not in then]
             + [(key, "removed") for key in then if key not in now])
    if not found:
        return "files"
    paths = [path for _, path in then] + [path for _, path in now]
    root = os.path.commonprefix(paths)
    root = root[:max(root.rfind("/"), root.rfind(os.sep)) + 1]
    (_, path), what = found[0]
    more = f", {len(found) - 1} more" if len(found) > 1 else ""
    return f"files ({path[len(root):]} {what}{more})"


def save_run_config(output: str, cfg: EnsembleConfig, seeds: list[int], fingerprint: dict, inputs=None) -> None:
    """inputs.parquet (``inputs``, when given), config.yaml (--config takes it back) and run.json
    (what a rerun must match to resume)."""
    import io

    import pyarrow.parquet as pq
    import yaml

    if inputs is not None:
        buf = io.BytesIO()
        pq.write_table(inputs, buf)
        storage.write_bytes(storage.join(output, INPUTS_FILE), buf.getvalue())
    storage.write_text(storage.join(output, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    storage.write_text(storage.join(output, "run.json"), json.dumps(
        {"config": cfg.to_dict(), "member_seeds": seeds, "fingerprint": fingerprint, "versions": versions()},
        indent=2))


def versions() -> dict:
    """Python and the packages a result depends on, recorded beside it."""
    return {"python": platform.python_version(),
            **package_versions(("ensemble", "ray", "torch", "torchvision", "numpy", "pyarrow"))}


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

    @property
    def archs(self) -> list:
        """The used members' architectures, in ``members`` order."""
        return [self.config.arch_of(i) for i in self.members]


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
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) \
            or not isinstance(record.get("fingerprint"), dict) or "classes" not in record["fingerprint"]:
        raise RunError(f"--run {run}: its run.json has no config, fingerprint or classes (changed since the driver "
                       f"wrote it); restore it, or rerun the driver with --output {run} --fresh")
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
        check_member_shapes(finished[1], cfg.arch_of(i), len(record["fingerprint"]["classes"]),
                            f"--run {run}: member {i}")
        states.append(finished[1])
    return FinishedRun(config=cfg, fingerprint=record["fingerprint"], states=states, temperature=temperature,
                       members=used, weights=weights)


@functools.lru_cache(maxsize=8)
def _member_shapes(arch: str, num_classes: int) -> dict:
    import torch

    from ensemble.models import make_member_model

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = make_member_model(arch, num_classes, None, "none")
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_member_shapes(state: dict, arch: str, num_classes: int, what: str) -> None:
    """RunError (one line) when a member's state dict is not one of ``arch`` for ``num_classes``
    classes (a file replaced together with its recorded hash, or a run.json edited since)."""
    expected = _member_shapes(arch, num_classes)
    got = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    if got == expected:
        return
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = [k for k in expected.keys() & got.keys() if expected[k] != got[k]]
    problem = (f"{wrong[0]} is {list(got[wrong[0]])}, not {list(expected[wrong[0]])}" if wrong
               else f"{len(missing)} tensors missing ({', '.join(missing[:2])})" if missing
               else f"{len(extra)} tensors it should not have ({', '.join(extra[:2])})")
    raise RunError(f"{what}: its model.pt is not a {arch} for {num_classes} classes ({problem}); restore the run's "
                   f"files, or train it again with --fresh")


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
