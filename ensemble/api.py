"""The Python API, for notebooks and scripts: the commands as functions, and a finished run's handle.

    >>> import ensemble
    >>> run = ensemble.train(data="photos", output="runs/photos", arch="resnet18",
    ...                      image_size=64, epochs=5)                    # doctest: +SKIP
    >>> run = ensemble.load("runs/photos")   # a finished run, later or elsewhere; local or s3://
    >>> len(run.report["members"]) == run.report["config"]["members"]    # report.json's content
    True
    >>> table = run.predict("photos/test")   # a folder (flat, or class folders), or a list of files
    labelled ... image(s) with ... members
    >>> list(table.columns), len(table) == len(os.listdir("photos/test"))
    (['image_name', 'pred_label'], True)
    >>> bool(table["pred_label"].isin(run.report["data"]["class_names"]).all())
    True
    >>> run.export("photos.onnx")["output"]  # one ONNX file, checked against the torch vote
    'photos.onnx'

``tests/test_pipeline_ray.py`` runs this example (every line after ``train``) in a folder where
``photos`` is a small labelled set and ``runs/photos`` the tests' shared run, which
``ensemble.train`` made with keyword arguments like these.

Keyword arguments are the command line's flags with ``_`` for ``-`` (``--image-size`` is
``image_size``), with the same defaults, bounds and errors: a bad one raises the command's own
error class (``ensemble.errors.ConfigError``, a ``ValueError``; the other ``UserError`` classes)
with the command's one-line message, before anything is written. Without ``data`` the bundled
digits demo runs with its CPU preset, as ``python -m ensemble.driver`` does. Ray is joined
(``address``, ``RAY_ADDRESS``, the local cluster) or started once, and stays up for the next
call; call ``ray.shutdown()`` to stop a cluster it started.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from ensemble import storage
from ensemble.errors import ConfigError

# What the driver's command line takes beside the config's own keys (``config``: a YAML file).
TRAIN_EXTRA = ("config", "fresh")


def train(data: Optional[str] = None, output: Optional[str] = None, **flags: Any) -> "Run":
    """Train the ensemble (``python -m ensemble.driver``) and return the finished run.

    ``data``: the dataset root or manifest (local or ``s3://``); None: the bundled digits demo.
    ``output``: the run folder (default ``runs/<timestamp>``); the same folder again resumes an
    earlier run of the same settings, as the command does (``fresh=True`` discards it instead).
    ``config``: a YAML file of the same keys; the keyword arguments override it. Any other key of
    the driver's flags: ``members=9``, ``arch="resnet50"``, ``image_size=224``, ``epochs=20``, ...
    """
    from ensemble.config import FIELD_NAMES, config_with_preset, load_yaml
    from ensemble.driver import run as run_pipeline
    from ensemble.run_folder import default_output

    _check_keys("ensemble.train", flags, (*FIELD_NAMES, *TRAIN_EXTRA), "python -m ensemble.driver")
    fresh = flags.pop("fresh", False)
    if not isinstance(fresh, bool):
        raise ConfigError(f"--fresh {fresh!r}: must be true or false")
    file_values = load_yaml(flags.pop("config")) if flags.get("config") is not None else {}
    flags.pop("config", None)
    named = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in (("data", data), ("output", output))
             if v is not None}
    cfg = config_with_preset(file_values, {**flags, **named})
    folder = cfg.output or default_output()
    run_pipeline(cfg.replace(output=folder), fresh=fresh)
    return Run(folder if storage.is_uri(folder) else os.path.abspath(folder))


def load(path: str, members: str = "all") -> "Run":
    """A finished run (the ``--output`` of a driver run, local or ``s3://``), its member files
    checked against the hashes recorded when they finished; one line (ConfigError, RunError) if
    ``path`` holds no finished run. ``members``: ``all``, or ``selected`` (the report's selection)."""
    from ensemble.run_folder import load_run

    load_run(path, members)  # checks it now, not at the first predict
    return Run(path, members=members)


@dataclass
class Run:
    """A finished run: its report, and predict / export / distill with its members.

    ``members``: which members predict and export use, ``all`` or ``selected``.
    """

    path: str
    members: str = "all"
    _report: Optional[dict] = field(default=None, repr=False)

    @property
    def report(self) -> dict:
        """report.json's content (read once; its sha256 checked when the run recorded one)."""
        if self._report is None:
            from ensemble.run_folder import _read_report

            report = _read_report(self.path)
            if report is None:
                raise ConfigError(f"--run {self.path}: no report.json; rerun the driver with --output {self.path} "
                                  f"to finish the run first")
            self._report = report
        return self._report

    def predict(self, images: Union[str, Sequence[str]], *, output: Optional[str] = None,
                address: Optional[str] = None, infer_actors: Optional[int] = None, strict: bool = False):
        """Label ``images`` (``python -m ensemble.predict``): a folder (flat, or class folders named like
        the run's classes), or a list of image files. Returns a pandas DataFrame with the columns and
        rows of predictions.csv (``image_name``, ``pred_label``). ``output``: also keep the
        command's files there (predictions.csv, probabilities.parquet with each class's probability,
        predict.json); without it they are written to a temporary folder and removed."""
        import pandas as pd

        from ensemble.predict import predict

        if infer_actors is not None and (isinstance(infer_actors, bool) or not isinstance(infer_actors, int)
                                         or infer_actors < 1):
            raise ConfigError(f"--infer-actors {infer_actors!r}: must be a whole number >= 1")
        scratch = tempfile.mkdtemp(prefix="ensemble-predict-") if output is None else None
        try:
            folder = output if output is not None else os.path.join(scratch, "predictions")
            predict(self.path, _images_arg(images), folder, address=address, infer_actors=infer_actors,
                    strict=strict, members=self.members, kept=output is not None)
            csv = storage.read_bytes(storage.join(folder, "predictions.csv"))
            table = pd.read_csv(io.BytesIO(csv), dtype=str, keep_default_na=False)
            for column in ("image_name", "pred_label"):  # the names as they are, not as a spreadsheet needs them
                table[column] = table[column].map(_unneutralised)
            return table
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def export(self, path: str) -> dict:
        """The ensemble as one ONNX file at ``path`` (``python -m ensemble.export``), checked against
        the torch vote with ONNX Runtime where installed; returns what was written and checked."""
        from ensemble.export import export_run

        return export_run(self.path, path, members=self.members)

    def distill(self, output: str, *, kd_temperature: Optional[float] = None, kd_alpha: Optional[float] = None,
                fresh: bool = False, speed_images: int = 16, **flags: Any) -> "Run":
        """Train one student on this run's soft vote into ``output`` (``python -m ensemble.distill``,
        the same keywords as its flags) and return the student, a one-member run."""
        from ensemble.distill import KD_DEFAULTS, _parser, distill

        allowed = [a.dest for a in _parser()._actions if a.dest not in ("help", "run", "output", "kd_temperature",
                                                                        "kd_alpha", "fresh", "speed_images")]
        _check_keys("Run.distill", flags, allowed, "python -m ensemble.distill")
        if isinstance(speed_images, bool) or not isinstance(speed_images, int) or not 0 <= speed_images <= 1024:
            raise ConfigError(f"--speed-images {speed_images!r}: must be from 0 to 1024")
        distill(self.path, output, flags,
                temperature=KD_DEFAULTS["kd_temperature"] if kd_temperature is None else kd_temperature,
                alpha=KD_DEFAULTS["kd_alpha"] if kd_alpha is None else kd_alpha, fresh=fresh,
                speed_images=speed_images)
        return Run(output if storage.is_uri(output) else os.path.abspath(output))


def _check_keys(who: str, given: dict, allowed: Sequence[str], command: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{who}: unknown argument {unknown[0]!r} ({command} has no --{unknown[0].replace('_', '-')});"
                          f" known: {', '.join(sorted(allowed))}")


def _unneutralised(cell: str) -> str:
    """A predictions.csv cell without the ``'`` that report._csv puts before a formula-like one."""
    from ensemble.report import FORMULA_STARTS

    return cell[1:] if cell.startswith("'") and cell.lstrip("'").startswith(FORMULA_STARTS) else cell


def _images_arg(images: Union[str, "os.PathLike", Sequence]) -> Union[str, list]:
    """A folder as the command takes it, or a list of files (each a str or path-like)."""
    if isinstance(images, (str, os.PathLike)):
        return os.fspath(images)
    return [os.fspath(p) for p in images]
