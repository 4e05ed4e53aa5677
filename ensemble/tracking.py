"""Experiment tracking in MLflow (``--mlflow``): a parent run per ensemble run, a child run per
member, logged as the member trains.

The driver opens the parent (``RunTracking``): the run's config as params and, once the report is
written, the ensemble's scores as metrics and report.md + figures/ as artifacts. Each member logs
its child from its own actor process (``MemberRun``): its settings as params, and one step per
epoch (``EPOCH_METRICS``). A rerun of the same command finds both again by their tags (the parent
by its run folder and fingerprint, a child by its parent and member index) and continues them; a
resumed member logs only the epochs the child does not hold yet.

Tracking never changes or stops a run: any error of MLflow's (a server that cannot be reached, a
locked database) is one ``warning:`` line per process and tracking URI, and that run or member
goes on untracked. MLflow is imported only where a run is tracked (``pip install -e
'.[mlflow]'``: mlflow-skinny, with SQLAlchemy and Alembic for a SQLite store); none here at import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

from ensemble import storage
from ensemble.errors import ConfigError, redact

log = logging.getLogger("ensemble.tracking")

DB_NAME = "mlflow.db"        # the default store: a SQLite file in the run folder (MLflow 3's file store is deprecated)
ARTIFACTS = "mlartifacts"    # an experiment this module creates in a SQLite store keeps its artifacts beside the file
# MLflow retries a failed request 7 times with growing pauses (minutes for a server that is down)
# and waits 120 s for an answer; a tracker should cost the run a moment, once. Values the user set win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# A member's child run, one step per epoch: EpochStats field -> metric name.
EPOCH_METRICS = {"train_loss": "train_loss", "train_acc": "train_acc", "val_loss": "val_loss", "val_acc": "val_acc",
                 "images_per_s": "images_per_s", "seconds": "epoch_seconds"}


def tracking_uri(cfg, output: str) -> Optional[str]:
    """Where a run with ``--mlflow`` logs (None without it): ``--mlflow-uri``, else
    ``MLFLOW_TRACKING_URI``, else a SQLite file in the run folder (``sqlite:///<output>/mlflow.db``,
    absolute, so members on this machine find it). One line (ConfigError) for an object-store
    ``--output`` without either (a SQLite store is a local file), or MLflow not installed."""
    if not cfg.mlflow:
        return None
    uri = cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    if uri is None and storage.is_uri(output):
        raise ConfigError(f"--mlflow with --output {output}: the default store is a SQLite file in a local run "
                          f"folder; pass --mlflow-uri (a tracking server, http://HOST:5000, or sqlite:///PATH.db) "
                          f"or set MLFLOW_TRACKING_URI")
    uri = uri or "sqlite:///" + os.path.abspath(os.path.join(output, DB_NAME))
    import importlib.util

    needs = ("mlflow", "sqlalchemy", "alembic") if uri.startswith("sqlite:") else ("mlflow",)
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--mlflow: {', '.join(missing)} not installed; pip install -e '.[mlflow]' "
                          f"(mlflow-skinny, SQLAlchemy, Alembic)")
    return uri


def run_key(output: str, fingerprint: dict) -> str:
    """The parent's tag a rerun finds it by: the run folder and the fingerprint a resumed run shares."""
    folder = output if storage.is_uri(output) else os.path.abspath(output)
    text = json.dumps({"folder": folder, "fingerprint": fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def member_params(cfg, fingerprint: dict, member: int, member_seed: int) -> dict:
    """A child run's params: the member, its seed and the settings it trained with: the
    fingerprint's single values (arch, lr, batch size, epochs, bootstrap size, the run's seed...),
    as the member's own config ``cfg`` has them where it sets one (its architecture and recipe)."""
    settings = {k: v if getattr(cfg, k, None) is None else getattr(cfg, k) for k, v in fingerprint.items()
                if not isinstance(v, (dict, list)) and not k.endswith("sha256")}
    return {"member": member, "member_seed": member_seed, **settings}


def epoch_metrics(stats) -> dict:
    """One epoch's metrics (an ``epochs.EpochStats``), by MLflow name."""
    return {name: float(getattr(stats, field)) for field, name in EPOCH_METRICS.items()}


def ensemble_scores(report: dict) -> dict:
    """The parent's metrics from report.json's content: the ensemble's val accuracy, NLL, ECE and
    Brier before and after temperature scaling, out-of-bag scores, the member selection's. Only
    finite numbers (a run without out-of-bag rows has none of those)."""
    ens = report["ensemble"]
    cal, sel, oob = ens.get("calibration") or {}, ens.get("selection") or {}, ens.get("oob") or {}
    before, after = ens.get("metrics") or cal.get("val_before") or {}, cal.get("val_after") or {}
    scores = {"val_acc": ens.get("val_acc"), "mean_member_val_acc": ens.get("mean_member_val_acc"),
              "temperature": cal.get("temperature"), "oob_acc": oob.get("acc"), "oob_nll": oob.get("nll"),
              "selection_n_members": sel.get("n_members"), "selection_temperature": sel.get("temperature")}
    for name in ("nll", "ece", "brier"):
        scores[f"val_{name}"] = before.get(name)
        scores[f"val_{name}_scaled"] = after.get(name)
        scores[f"selection_val_{name}"] = (sel.get("val") or {}).get(name)
        scores[f"selection_val_{name}_scaled"] = (sel.get("val_after") or {}).get(name)
    scores["selection_val_acc"] = (sel.get("val") or {}).get("accuracy")
    return {k: float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


@dataclass(frozen=True)
class MemberTracking:
    """What a member needs to log its child run (in its ``MemberPlan``)."""

    uri: str
    experiment_id: str
    parent_run_id: str


class RunTracking:
    """The parent run of one ensemble run (the driver's side); does nothing when ``uri`` is None
    or once an MLflow call failed. As a context it ends the parent: FINISHED, or KILLED (Ctrl-C,
    SIGTERM) or FAILED when the run ends in an error."""

    def __init__(self, uri: Optional[str], experiment: str = "ensemble"):
        self.uri, self.experiment = uri, experiment
        self.client, self.experiment_id, self.run_id = None, None, None

    def start(self, cfg, output: str, fingerprint: dict, *, fresh: bool) -> None:
        """Open the parent: the one an earlier driver of this run folder and fingerprint opened
        (unless ``fresh``), else a new one with ``cfg`` as its params."""
        if self.uri is None:
            return
        try:
            client = _client(self.uri)
            self.experiment_id = _experiment_id(client, self.experiment, self.uri)
            key = run_key(output, fingerprint)
            run_id = None if fresh else _find(client, self.experiment_id, f"tags.`ensemble.run_key` = '{key}'")
            if run_id is not None:
                client.update_run(run_id, status="RUNNING")
            else:
                folder = output if storage.is_uri(output) else os.path.abspath(output)
                created = client.create_run(self.experiment_id, run_name=os.path.basename(folder.rstrip("/")),
                                            tags={"ensemble.run_key": key, "ensemble.run_folder": folder}).info.run_id
                client.log_batch(created, params=_params(cfg.to_dict()))
            log.info("MLflow: %s run %s of experiment %r at %s", "continuing" if run_id else "logging to",
                     run_id or created, self.experiment, redact(self.uri))
            self.client, self.run_id = client, run_id or created
        except Exception as exc:  # noqa: BLE001 - tracking never stops a run
            self._failed("opening the run", exc)

    def members(self) -> Optional[MemberTracking]:
        """What the members log their child runs with; None when the parent is not tracked."""
        if self.client is None:
            return None
        return MemberTracking(uri=self.uri, experiment_id=self.experiment_id, parent_run_id=self.run_id)

    def finish(self, report: dict, output: str) -> None:
        """The ensemble's scores (``ensemble_scores``) as metrics; report.md and figures/ as artifacts."""
        if self.client is None:
            return
        try:
            from mlflow.entities import Metric

            now = _now()
            self.client.log_batch(self.run_id,
                                  metrics=[Metric(k, v, now, 0) for k, v in ensemble_scores(report).items()])
            _log_report_files(self.client, self.run_id, output)
        except Exception as exc:  # noqa: BLE001
            self._failed("logging the ensemble's scores", exc)

    def __enter__(self) -> "RunTracking":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if self.client is not None:
            status = "FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED"
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as error:  # noqa: BLE001
                self._failed("ending the run", error)
        return False

    def _failed(self, what: str, exc: BaseException) -> None:
        _warn(self.uri, what, exc)
        self.client = None


class MemberRun:
    """A member's child run, logged from the member's process as it trains; does nothing when
    ``tracking`` is None or once an MLflow call failed. An earlier process's child of the same
    parent and member is continued: epochs it holds already are not logged again."""

    def __init__(self, tracking: Optional[MemberTracking], member: int, params: dict):
        self.tracking, self.member = tracking, member
        self.client, self.run_id, self.logged = None, None, set()
        if tracking is None:
            return
        try:
            client = _client(tracking.uri)
            where = f"tags.`mlflow.parentRunId` = '{tracking.parent_run_id}' and tags.`ensemble.member` = '{member}'"
            run_id = _find(client, tracking.experiment_id, where)
            if run_id is None:
                run_id = client.create_run(tracking.experiment_id, run_name=f"member-{member}", tags={
                    "mlflow.parentRunId": tracking.parent_run_id, "ensemble.member": str(member)}).info.run_id
                client.log_batch(run_id, params=_params(params))
            else:
                client.update_run(run_id, status="RUNNING")
                self.logged = {m.step for m in client.get_metric_history(run_id, "val_acc")}
            self.client, self.run_id = client, run_id
        except Exception as exc:  # noqa: BLE001
            self._failed("opening its run", exc)

    def epoch(self, stats) -> None:
        """One finished epoch (``epochs.EpochStats``) at step = epoch."""
        if self.client is None or stats.epoch in self.logged:
            return
        try:
            from mlflow.entities import Metric

            now = _now()
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, stats.epoch)
                                                        for k, v in epoch_metrics(stats).items()])
            self.logged.add(stats.epoch)
        except Exception as exc:  # noqa: BLE001
            self._failed(f"logging epoch {stats.epoch}", exc)

    def finish(self, summary) -> None:
        """The member's best epoch and val accuracy (a ``MemberSummary``), where it ran; FINISHED."""
        if self.client is None:
            return
        try:
            from mlflow.entities import Metric, RunTag

            now = _now()
            self.client.log_batch(self.run_id, metrics=[Metric("best_val_acc", float(summary.val_acc), now, 0),
                                                        Metric("best_epoch", float(summary.best_epoch), now, 0)],
                                  tags=[RunTag("ensemble.device", str(summary.device)),
                                        RunTag("ensemble.node", str(summary.node))])
            self.client.set_terminated(self.run_id, "FINISHED")
        except Exception as exc:  # noqa: BLE001
            self._failed("ending its run", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        _warn(self.tracking.uri, f"member {self.member}: {what}", exc)
        self.client = None


_warned: set = set()  # tracking URIs this process has warned about


def _warn(uri: str, what: str, exc: BaseException) -> None:
    """One ``warning:`` line per process and tracking URI, not one per epoch."""
    if uri in _warned:
        return
    _warned.add(uri)
    text = str(exc)
    # MLflow wraps a connection's failure in a long message; its last cause says what happened
    cause = re.search(r"\[Errno -?\d+\] [^'\")]+|timed out", text)
    reason = cause.group(0) if cause else f"{type(exc).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"
    log.warning("warning: MLflow tracking at %s: %s failed (%s); the run goes on without it", redact(uri), what,
                redact(reason))


def _client(uri: str):
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial MLflow database tables..."
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client, name: str, uri: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


def _artifact_location(uri: str) -> Optional[str]:
    """Beside a SQLite store's file (a run folder's store keeps everything in the folder); None
    elsewhere: a server's own default."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?")[0]
    return os.path.join(os.path.dirname(os.path.abspath(path)), ARTIFACTS)


def _find(client, experiment_id: str, where: str) -> Optional[str]:
    """The latest active run matching ``where`` (an MLflow filter string), or None."""
    runs = client.search_runs([experiment_id], filter_string=where, order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0].info.run_id if runs else None


def _params(values: dict) -> list:
    from mlflow.entities import Param

    return [Param(str(k), str(v)) for k, v in values.items()]


def _now() -> int:
    return int(time.time() * 1000)


def _log_report_files(client, run_id: str, output: str) -> None:
    """report.md and figures/*.png as the parent's artifacts (read through storage: the run folder
    may be on an object store)."""
    import tempfile

    figures = storage.join(output, "figures")
    names = [n for n, is_dir in storage.list_dir(figures) if not is_dir] if storage.exists(figures) else []
    with tempfile.TemporaryDirectory(prefix="ensemble-mlflow-") as tmp:
        os.makedirs(os.path.join(tmp, "figures"))
        for rel in ["report.md", *(f"figures/{n}" for n in names)]:
            with open(os.path.join(tmp, rel), "wb") as fh:
                fh.write(storage.read_bytes(storage.join(output, *rel.split("/"))))
        client.log_artifacts(run_id, tmp)
