"""tracking.py without Ray: where a run logs, what it logs, and a parent and member run continued by
a rerun, read back with MLflow's own client from a SQLite store; a tracking server that cannot be
reached is one warning line, not a stalled or failed run. (A real pipeline run logging its parent
and member runs: test_pipeline_ray.py.)"""

from __future__ import annotations

import logging
import os
import time

import pytest

from ensemble.config import EnsembleConfig
from ensemble.errors import ConfigError
from ensemble.tracking import RunTracking, ensemble_scores, epoch_metrics, member_params, tracking_uri
from tests.helpers import CALIBRATION, SELECTION, free_port


def test_tracking_uri_flag_then_environment_then_sqlite_in_the_run_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = str(tmp_path / "run")
    assert tracking_uri(EnsembleConfig(), out) is None  # off without --mlflow
    on = EnsembleConfig(mlflow=True)
    assert tracking_uri(on, out) == f"sqlite:///{tmp_path}/run/mlflow.db"  # absolute: sqlite:////...
    assert tracking_uri(on.replace(mlflow_uri="http://127.0.0.1:5000"), out) == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking_uri(on, out) == "http://tracker:5000"
    assert tracking_uri(on, "s3://bucket/runs/r1") == "http://tracker:5000"
    assert tracking_uri(on.replace(mlflow_uri="sqlite:////tmp/x.db"), out) == "sqlite:////tmp/x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match=r"^--mlflow with --output s3://bucket/runs/r1: the default store is a "
                                          r"SQLite file in a local run folder; pass --mlflow-uri"):
        tracking_uri(on, "s3://bucket/runs/r1")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alembic" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^--mlflow: alembic not installed; pip install -e '.\[mlflow\]'"):
        tracking_uri(on, out)
    assert tracking_uri(on.replace(mlflow_uri="http://127.0.0.1:5000"), out)  # a server needs no SQLAlchemy


def test_tracking_flags_need_mlflow_and_stay_out_of_the_fingerprint(tiny_digits):
    from ensemble.cli import config_from_argv

    cfg = config_from_argv(["--mlflow", "--mlflow-uri", "http://h:5000", "--mlflow-experiment", "study"])[0]
    assert (cfg.mlflow, cfg.mlflow_uri, cfg.mlflow_experiment) == (True, "http://h:5000", "study")
    for argv, line in ((["--mlflow-uri", "http://h:5000"], "--mlflow-uri http://h:5000: needs --mlflow"),
                       (["--mlflow-experiment", "x"], "--mlflow-experiment x: needs --mlflow"),
                       (["--mlflow", "--mlflow-experiment", ""], "--mlflow-experiment '': must be a non-empty")):
        with pytest.raises(ConfigError, match="^" + line):
            config_from_argv(argv)
    # Adding --mlflow to a run resumes it (test_faults.py reruns a run with it): the members'
    # fingerprint is the same with and without the tracking flags, and differs for a setting that trains.
    from ensemble.data import scan_layout
    from ensemble.run_folder import training_fingerprint

    index = scan_layout(tiny_digits)
    plain = config_from_argv(["--data", tiny_digits])[0]
    tracked = config_from_argv(["--data", tiny_digits, "--mlflow", "--mlflow-uri", "http://h:5000",
                                "--mlflow-experiment", "study"])[0]
    assert tracked.mlflow and not plain.mlflow
    fingerprint = training_fingerprint(plain, index, index.train.num_rows)
    assert training_fingerprint(tracked, index, index.train.num_rows) == fingerprint
    assert training_fingerprint(plain.replace(lr=plain.lr / 2), index, index.train.num_rows) != fingerprint


def test_what_the_runs_log():
    from ensemble.epochs import EpochStats

    report = {"ensemble": {"val_acc": 0.9, "mean_member_val_acc": 0.8, "metrics": CALIBRATION["val_before"],
                           "calibration": CALIBRATION, "selection": SELECTION,
                           "oob": {"acc": 0.85, "nll": float("nan")}}}
    scores = ensemble_scores(report)
    assert scores["val_acc"] == 0.9 and scores["mean_member_val_acc"] == 0.8 and scores["oob_acc"] == 0.85
    assert (scores["val_nll"], scores["val_ece"], scores["val_brier"]) == (0.35, 0.08, 0.2)
    assert (scores["val_nll_scaled"], scores["val_ece_scaled"], scores["temperature"]) == (0.3012, 0.0215, 0.8125)
    assert (scores["selection_n_members"], scores["selection_val_acc"], scores["selection_val_nll_scaled"],
            scores["selection_temperature"]) == (3, 0.91, 0.29, 0.75)
    assert "oob_nll" not in scores  # not finite: left out
    full = ensemble_scores({"ensemble": {"val_acc": 0.9, "metrics": {"nll": 0.3}}})  # full bagging: no OOB
    assert full == {"val_acc": 0.9, "val_nll": 0.3}

    stats = EpochStats(epoch=2, train_loss=0.5, train_acc=0.8, val_loss=0.6, val_acc=0.7, images=100,
                       images_per_s=50.0, seconds=2.0)
    assert epoch_metrics(stats) == {"train_loss": 0.5, "train_acc": 0.8, "val_loss": 0.6, "val_acc": 0.7,
                                    "images_per_s": 50.0, "epoch_seconds": 2.0}
    fingerprint = {"arch": "resnet18,resnet50", "lr": 1e-3, "epochs": 3, "seed": 7, "bootstrap_size": 40,
                   "classes": ["a", "b"], "files_sha256": "ab", "versions": {"torch": "x"}}
    member = EnsembleConfig(arch="resnet50", lr=2e-4, epochs=3, seed=7)  # its own architecture and recipe
    assert member_params(member, fingerprint, 1, 123) == {"member": 1, "member_seed": 123, "arch": "resnet50",
                                                         "lr": 2e-4, "epochs": 3, "seed": 7, "bootstrap_size": 40}


def _stats(epoch: int, val_acc: float):
    from ensemble.epochs import EpochStats

    return EpochStats(epoch=epoch, train_loss=1.0 / epoch, train_acc=val_acc, val_loss=1.0, val_acc=val_acc,
                      images=10, images_per_s=5.0, seconds=2.0)


def test_parent_and_member_runs_are_continued_by_a_rerun(tmp_path, monkeypatch):
    """A driver stopped mid-run (its parent KILLED, member 0's child after epoch 2, epoch 2 not
    committed) and its rerun: the same parent, RUNNING again then FINISHED; the same child,
    epoch 2 (trained again) not logged twice, epoch 3 added; --fresh opens a new parent."""
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    from ensemble.tracking import MemberRun

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out = tmp_path / "run"
    (out / "figures").mkdir(parents=True)
    (out / "report.md").write_text("# report\n")
    (out / "figures" / "size_curve.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    cfg = EnsembleConfig(mlflow=True, members=1, epochs=3, arch="resnet18", output=str(out))
    uri = tracking_uri(cfg, str(out))
    fingerprint = {"arch": "resnet18", "epochs": 3, "bootstrap_size": 40}
    params = member_params(cfg, fingerprint, 0, 11)

    with pytest.raises(KeyboardInterrupt):
        with RunTracking(uri) as first:
            first.start(cfg, str(out), fingerprint, fresh=False)
            member = MemberRun(first.members(), 0, params)
            member.epoch(_stats(1, 0.5))
            member.epoch(_stats(2, 0.6))
            raise KeyboardInterrupt  # Ctrl-C before epoch 2's checkpoint was committed
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(first.run_id).info.status == "KILLED"

    with RunTracking(uri) as again:
        again.start(cfg, str(out), fingerprint, fresh=False)
        assert again.run_id == first.run_id and client.get_run(again.run_id).info.status == "RUNNING"
        member = MemberRun(again.members(), 0, params)
        assert member.run_id is not None and member.logged == {1, 2}
        member.epoch(_stats(2, 0.61))  # trained again after the checkpoint of epoch 1
        member.epoch(_stats(3, 0.7))
        member.finish(type("Summary", (), {"val_acc": 0.7, "best_epoch": 3, "device": "cpu", "node": "n1"})())
        again.finish({"ensemble": {"val_acc": 0.75, "metrics": {"nll": 0.4}}}, str(out))

    experiment = client.get_experiment_by_name("ensemble")
    assert experiment.artifact_location == str(out / "mlartifacts")  # the run folder holds store and artifacts
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # one parent, one child, both continued
    parent = client.get_run(first.run_id)
    assert parent.info.status == "FINISHED" and parent.info.run_name == "run"
    assert parent.data.tags["ensemble.run_folder"] == str(out)
    assert parent.data.params["members"] == "1" and parent.data.params["mlflow"] == "True"
    assert parent.data.metrics == {"val_acc": 0.75, "val_nll": 0.4}
    assert [a.path for a in client.list_artifacts(first.run_id)] == ["figures", "report.md"]
    assert [a.path for a in client.list_artifacts(first.run_id, "figures")] == ["figures/size_curve.png"]
    child = client.get_run(member.run_id)
    assert child.info.status == "FINISHED" and child.info.run_name == "member-0"
    assert child.data.tags["mlflow.parentRunId"] == first.run_id and child.data.tags["ensemble.device"] == "cpu"
    assert child.data.params == {"member": "0", "member_seed": "11", "arch": "resnet18", "epochs": "3",
                                 "bootstrap_size": "40"}
    assert [(m.step, m.value) for m in client.get_metric_history(member.run_id, "val_acc")] == \
        [(1, 0.5), (2, 0.6), (3, 0.7)]
    assert [m.step for m in client.get_metric_history(member.run_id, "epoch_seconds")] == [1, 2, 3]
    assert child.data.metrics["best_val_acc"] == 0.7

    with RunTracking(uri) as fresh:  # --fresh discards the run folder's members: a new parent
        fresh.start(cfg, str(out), fingerprint, fresh=True)
    assert fresh.run_id not in (None, first.run_id)
    with RunTracking(uri) as later:  # and the rerun after it continues that one
        later.start(cfg, str(out), fingerprint, fresh=False)
    assert later.run_id == fresh.run_id


def test_unreachable_server_is_one_warning_line_and_the_run_goes_on(monkeypatch, caplog):
    """Nothing listens on the port: one warning for the parent and the member together (one
    process, one URI), in well under MLflow's default minutes of retries; nothing else is tried."""
    pytest.importorskip("mlflow")
    from ensemble.tracking import MemberRun, MemberTracking

    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    uri = f"http://127.0.0.1:{free_port()}"  # closed again: connection refused
    started = time.time()
    with caplog.at_level(logging.INFO):
        with RunTracking(uri) as parent:
            parent.start(EnsembleConfig(mlflow=True), "/tmp/r", {}, fresh=False)
            assert parent.members() is None
            member = MemberRun(MemberTracking(uri, "1", "abc"), 0, {})
            for epoch in (1, 2, 3):
                member.epoch(_stats(epoch, 0.5))
            member.finish(None)
            parent.finish({}, "/tmp/r")
    assert time.time() - started < 10
    lines = [r.getMessage() for r in caplog.records if "MLflow" in r.getMessage() or r.levelno >= logging.WARNING]
    assert lines == [f"warning: MLflow tracking at {uri}: opening the run failed ([Errno 111] Connection refused); "
                     f"the run goes on without it"]
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_credentials_in_the_tracking_uri_reach_no_file_log_line_or_parameter(monkeypatch, tmp_path, caplog):
    """--mlflow-uri http://user:TOKEN@host: run.json, config.yaml, run.lock (the command line), the
    resume line, MLflow's params and the warning line name the host, never the user or token."""
    pytest.importorskip("mlflow")
    import sys

    from ensemble import run_lock
    from ensemble.run_folder import save_run_config
    from ensemble.tracking import _params

    secret = "s3cr3t-t0ken"
    uri = f"http://alice:{secret}@127.0.0.1:{free_port()}"
    argv = ["python -m ensemble.driver", "--mlflow", "--mlflow-uri", uri, "--output", str(tmp_path / "run")]
    monkeypatch.setattr(sys, "argv", argv)
    cfg = EnsembleConfig(mlflow=True, mlflow_uri=uri, output=str(tmp_path / "run"))
    assert cfg.mlflow_uri == uri and tracking_uri(cfg, cfg.output) == uri  # what it logs to: the real one
    save_run_config(cfg.output, cfg, [1], {"arch": "resnet18"}, None)
    with run_lock.RunLock(cfg.output):
        lock = (tmp_path / "run" / "run.lock").read_text()
        written = {name: (tmp_path / "run" / name).read_text() for name in ("run.json", "config.yaml")}
    with caplog.at_level(logging.INFO):
        with RunTracking(uri) as parent:
            parent.start(cfg, cfg.output, {}, fresh=False)
    params = " ".join(p.value for p in _params(cfg.to_dict()))
    for text in (lock, *written.values(), params, caplog.text):
        assert secret not in text and "alice" not in text
    assert "http://***@127.0.0.1" in written["run.json"] and "http://***@127.0.0.1" in caplog.text
    assert "--mlflow-uri http://***@127.0.0.1" in lock
