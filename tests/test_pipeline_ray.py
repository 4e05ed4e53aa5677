"""End to end on a small local Ray cluster with real image files.

The distributed result is checked against a sequential recomputation without Ray: the
ensemble's val accuracy from the members' own val probabilities, and the test probabilities
from the saved member weights run in this process.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

ray = pytest.importorskip("ray")

from ensemble.bootstrap import member_seeds  # noqa: E402
from ensemble.config import CPU_PRESET, build_config  # noqa: E402
from ensemble.data import decode_batch, scan_layout  # noqa: E402
from ensemble.config import cache_side  # noqa: E402
from ensemble.pixels import model_input  # noqa: E402
from ensemble.models import make_member_model  # noqa: E402
from ensemble.scores.vote import accuracy, soft_vote  # noqa: E402
from tests.helpers import finished_tiny_run  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster():
    # One fake GPU (a request of 2 is refused against it); torch sees no CUDA and trains on CPU.
    # Metrics are exported every second instead of Ray's 10 (the metrics test waits for them).
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level="WARNING",
             _system_config={"metrics_report_interval_ms": 1000})
    yield
    ray.shutdown()


def _config(data, output, **overrides):
    values = {**CPU_PRESET, "image_size": 16, "epochs": 2, "members": 3, "batch_size": 16,
              "gpus_per_member": 0, "gpus_per_infer_actor": 0, "infer_batch_size": 16, **overrides}
    return build_config(flag_values={"data": data, "output": str(output), **values})


@pytest.fixture(scope="module")
def run(cluster, tiny_digits, tiny_run_cache, tmp_path_factory):
    return finished_tiny_run(tiny_run_cache, tiny_digits, tmp_path_factory)  # _config(..., seed=7)


def test_outputs_exist(run):
    cfg, report, output = run
    for name in ("predictions.csv", "probabilities.parquet", "report.json", "config.yaml", "run.json"):
        assert os.path.isfile(os.path.join(output, name)), name
    for i in range(cfg.members):
        folder = os.path.join(output, "members", f"member-{i}")
        assert sorted(os.listdir(folder)) == ["member.json", "model.pt", "val_probs.npz"]
    on_disk = json.load(open(os.path.join(output, "report.json")))
    assert on_disk["ensemble"]["val_acc"] == report["ensemble"]["val_acc"]
    params = on_disk["params"]["by_arch"]  # one count per architecture
    assert params["resnet34"]["total"] > params["resnet18"]["total"] == params["resnet18"]["trainable"] > 0
    assert on_disk["config"]["members"] == 3 and on_disk["config"]["data"] == os.path.abspath(cfg.data)
    assert on_disk["image_cache"] == {"tier": "raw"} and "train_pixels" not in on_disk["fingerprint"]


def test_members_recorded(run, tiny_digits):
    cfg, report, _ = run
    members = report["members"]
    assert [m["member"] for m in members] == list(range(cfg.members))
    assert [m["seed"] for m in members] == member_seeds(7, cfg.members)
    # two architectures in turn, member 1 with resnet34's own recipe (lr), recorded where it trained
    assert [m["arch"] for m in members] == ["resnet18", "resnet34", "resnet18"]
    saved = [json.load(open(os.path.join(run[2], "members", f"member-{i}", "member.json"))) for i in range(3)]
    assert [(s["config"]["arch"], s["config"]["lr"]) for s in saved] == [("resnet18", 1e-3), ("resnet34", 2e-3),
                                                                         ("resnet18", 1e-3)]
    by_arch = report["ensemble"]["by_arch"]
    assert {a: b["members"] for a, b in by_arch.items()} == {"resnet18": [0, 2], "resnet34": [1]}
    assert by_arch["resnet34"]["val_acc"] == pytest.approx(members[1]["val_acc"])
    assert "## Architectures" in open(os.path.join(run[2], "report.md")).read()
    for m in members:
        assert [h["epoch"] for h in m["history"]] == [1, 2]
        assert m["val_acc"] == max(h["val_acc"] for h in m["history"])
        assert m["history"][m["best_epoch"] - 1]["val_acc"] == m["val_acc"]
        assert m["device"] == "cpu"


def test_predictions_are_argmax_of_probabilities(run, tiny_digits):
    _, _, output = run
    index = scan_layout(tiny_digits)
    table = pq.read_table(os.path.join(output, "probabilities.parquet"))
    assert table.column_names == ["image_name", *index.classes, "predictive_entropy", "member_disagreement"]
    probs = np.stack([table.column(c).to_numpy() for c in index.classes], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    lines = open(os.path.join(output, "predictions.csv")).read().splitlines()
    assert lines[0] == "image_name,pred_label"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == table.column("image_name").to_pylist()
    assert sorted(r[0] for r in rows) == sorted(index.test.column("image_name").to_pylist())
    assert [r[1] for r in rows] == [index.classes[k] for k in probs.argmax(axis=1)]


def test_ensemble_val_acc_equals_sequential_soft_vote(run, tiny_digits):
    cfg, report, output = run
    index = scan_layout(tiny_digits)
    member_probs = []
    for i in range(cfg.members):
        saved = np.load(os.path.join(output, "members", f"member-{i}", "val_probs.npz"))
        assert saved["ids"].tolist() == list(range(index.val.num_rows))
        member_probs.append(saved["probs"])
    labels = index.val.column("label").to_numpy()
    expected = accuracy(soft_vote(np.stack(member_probs)), labels)
    assert report["ensemble"]["val_acc"] == pytest.approx(expected, abs=1e-12)
    # Each member's val accuracy is what its own probabilities say.
    for m, p in zip(report["members"], member_probs):
        assert m["val_acc"] == pytest.approx(accuracy(p, labels), abs=1e-12)


def _sequential_test_probs(cfg, index, output, *, hflip=False, split="test") -> np.ndarray:
    """The saved members run one after another in this process on the test images: (members, n, classes)."""
    table = getattr(index, split)
    batch = {k: table.column(k).to_numpy(zero_copy_only=False) for k in ("id", "path", "label")}
    images = model_input(torch.from_numpy(decode_batch(batch, image_size=cfg.image_size,
                                                       side=cache_side(cfg))["image"]),
                         torch.device("cpu"))
    member_probs = []
    for i in range(cfg.members):
        model = make_member_model(cfg.arch_of(i), len(index.classes), None, "none")
        model.load_state_dict(torch.load(os.path.join(output, "members", f"member-{i}", "model.pt"),
                                         weights_only=True))
        with torch.no_grad():
            p = torch.softmax(model.eval()(images), dim=1)
            if hflip:
                p = (p + torch.softmax(model(torch.flip(images, dims=[3])), dim=1)) / 2
        member_probs.append(p.numpy())
    return np.stack(member_probs)


def test_test_probabilities_equal_sequential_inference(run, tiny_digits):
    """The members' outputs on the test rows (computed in their trainers: the run is cached) == the
    saved members run one after another in this process, scaled by the temperature the report fitted
    (probabilities.parquet holds calibrated probabilities)."""
    from ensemble.scores.calibration import scale_probs

    cfg, report, output = run
    index = scan_layout(tiny_digits)
    temperature = report["ensemble"]["calibration"]["temperature"]
    assert temperature > 0 and temperature != 1.0
    expected = scale_probs(soft_vote(_sequential_test_probs(cfg, index, output)), temperature)
    table = pq.read_table(os.path.join(output, "probabilities.parquet"))
    got = np.stack([table.column(c).to_numpy() for c in index.classes], axis=1)
    order = {n: k for k, n in enumerate(table.column("image_name").to_pylist())}
    got = got[[order[n] for n in index.test.column("image_name").to_pylist()]]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_same_seed_without_the_cache_writes_the_same_predictions(run, tiny_digits, tmp_path, monkeypatch):
    """--cache-share 0: the members decode the files every epoch and the Ray Data voter pool runs
    every member (the shared run is cached, so its members voted in their trainers). Same seed,
    same files: predictions.csv byte for byte, and the same probabilities."""
    import ensemble
    from ensemble import vote_stage
    from tests.helpers import tiny_run_values

    pool_runs = []
    real_stage = vote_stage.soft_vote_stage
    monkeypatch.setattr(vote_stage, "soft_vote_stage", lambda *a, **k: pool_runs.append(1) or real_stage(*a, **k))
    uncached = ensemble.train(data=tiny_digits, output=tmp_path, **tiny_run_values(cache_share=0.0))
    assert pool_runs == [1] and uncached.report["image_cache"] == {"tier": "none"}
    _, report, output = run
    assert (tmp_path / "predictions.csv").read_bytes() == open(os.path.join(output, "predictions.csv"), "rb").read()
    assert [m["val_acc"] for m in uncached.report["members"]] == [m["val_acc"] for m in report["members"]]
    cached, streamed = (pq.read_table(os.path.join(folder, "probabilities.parquet")) for folder in (output, tmp_path))
    assert streamed.column("image_name").to_pylist() == cached.column("image_name").to_pylist()
    for column in cached.column_names[1:]:
        np.testing.assert_allclose(streamed.column(column).to_numpy(), cached.column(column).to_numpy(), atol=1e-5)


def test_distilled_student_is_a_one_member_run(run, tiny_digits, tmp_path, capsys):
    """Distillation on the shared run, through the Python API (``Run.distill``, which is what
    ``python -m ensemble.distill`` runs): the teacher's targets are its members' soft vote on the
    training rows (as run in this process), the student is a run predict's loader takes, and the
    same folder with another temperature is refused in one line. (Resuming is the driver's:
    test_stop_resume.py; the saved targets' read-back: test_distill.py.)"""
    import ensemble
    from ensemble.distill import main
    from ensemble.run_folder import load_run

    cfg, report, teacher = run
    out = str(tmp_path / "student")
    handle = ensemble.load(teacher).distill(out, epochs=1, arch="resnet18", kd_temperature=2.0, kd_alpha=0.5,
                                            speed_images=4)
    assert handle.path == out and handle.report["members"][0]["arch"] == "resnet18"
    summary = json.load(open(os.path.join(out, "distill.json")))
    student = load_run(out)
    assert (student.config.members, student.config.bagging, len(student.states)) == (1, "full", 1)
    assert student.classes == report["data"]["class_names"]
    index = scan_layout(tiny_digits)
    saved = np.load(os.path.join(out, "teacher.npz"))
    assert saved["ids"].tolist() == list(range(index.train.num_rows))
    expected = soft_vote(_sequential_test_probs(cfg, index, teacher, split="train"))
    np.testing.assert_allclose(saved["probs"], expected, atol=1e-5)
    student_report = json.load(open(os.path.join(out, "report.json")))
    assert student_report["members"][0]["history"][0]["epoch"] == 1
    assert summary["val"]["student"]["accuracy"] == student_report["members"][0]["val_acc"]
    assert summary["val"]["ensemble"]["accuracy"] == report["ensemble"]["val_acc"]
    assert summary["inference"]["batch"] == 4 and summary["inference"]["ratio"] > 1
    counted = report["params"]["by_arch"]
    assert summary["params"] == {"student": student_report["params"]["total"],
                                 "ensemble": 2 * counted["resnet18"]["total"] + counted["resnet34"]["total"]}
    assert "Distilled student of" in open(os.path.join(out, "distill.md")).read()
    capsys.readouterr()
    assert main(["--run", teacher, "--output", out, "--epochs", "1", "--kd-temperature", "3"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error:") and "teacher (kd_temperature 2.0 then, 3.0 now)" in line
    assert main(["--run", teacher, "--output", os.path.join(teacher, "student")]) == 2
    assert "inside the run folder" in capsys.readouterr().err


@pytest.mark.parametrize("request_, message", [
    ({"gpus_per_member": 2}, "each actor uses one GPU"),                  # a member trains on one device
    ({"cpus_per_member": 4}, "but the largest node has 2 CPU(s); use --cpus-per-member 2 or less"),
])
def test_resource_request_beyond_cluster_is_refused(cluster, tiny_digits, tmp_path, request_, message):
    from ensemble.config import ConfigError
    from ensemble.driver import run as run_pipeline

    with pytest.raises(ConfigError, match=re.escape(message)):
        run_pipeline(_config(tiny_digits, tmp_path / "out", **request_))
    assert not (tmp_path / "out").exists(), "a refused run must not leave an output folder"


# ---------------------------------------------------------------- report contents (values, not presence)

def test_oob_and_size_curve_values(run, tiny_digits):
    from ensemble.bootstrap import bootstrap_counts

    cfg, report, output = run
    index = scan_layout(tiny_digits)
    n_train = index.train.num_rows
    counts = np.stack([bootstrap_counts(s, n_train, n_train) for s in member_seeds(7, cfg.members)])
    oob = report["ensemble"]["oob"]
    assert oob["member_n_oob"] == [int((c == 0).sum()) for c in counts]
    assert oob["n_rows_scored"] == int((counts == 0).any(axis=0).sum())
    assert oob["n_rows_scored"] + oob["n_rows_without_oob"] == n_train
    for m, acc in zip(report["members"], oob["member_acc"]):
        assert m["oob_acc"] == acc
    for m in report["members"]:
        assert all(h["images"] == n_train for h in m["history"])  # bootstrap size = train size
    curve = report["ensemble"]["size_curve"]
    assert curve["k"] == [1, 2, 3]
    assert curve["accuracy"][-1] == pytest.approx(report["ensemble"]["val_acc"])
    assert curve["accuracy"][0] == pytest.approx(report["members"][0]["metrics"]["accuracy"])
    md = open(os.path.join(output, "report.md")).read()
    assert f"{report['ensemble']['val_acc']:.4f}" in md
    for name in ("training_curves", "size_curve", "reliability", "confusion_matrix"):
        assert f"figures/{name}.png" in md
        assert open(os.path.join(output, "figures", f"{name}.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_entropy_and_disagreement_columns(run, tiny_digits):
    """Both columns recomputed from the saved members run one after another in this process: the
    entropy (nats) of the calibrated soft vote, and the share of members whose own top class is not
    the vote's, by the formulas, not by the functions that wrote them."""
    from ensemble.scores.calibration import scale_probs

    cfg, report, output = run
    index = scan_layout(tiny_digits)
    member_probs = _sequential_test_probs(cfg, index, output).astype(np.float64)  # (members, n, classes)
    vote = scale_probs(member_probs.mean(axis=0), report["ensemble"]["calibration"]["temperature"])
    entropy = -np.sum(vote * np.log(np.clip(vote, 1e-300, None)), axis=1)
    disagreement = (member_probs.argmax(axis=2) != vote.argmax(axis=1)).mean(axis=0)
    table = pq.read_table(os.path.join(output, "probabilities.parquet"))
    order = {n: k for k, n in enumerate(table.column("image_name").to_pylist())}
    rows = [order[n] for n in index.test.column("image_name").to_pylist()]
    np.testing.assert_allclose(table.column("predictive_entropy").to_numpy()[rows], entropy, atol=1e-4)
    np.testing.assert_array_equal(table.column("member_disagreement").to_numpy()[rows],
                                  disagreement.astype(np.float32))
    assert 0 < disagreement.max() < 1 and 0 < entropy.min()  # the run's members disagree on some images


@contextlib.contextmanager
def _trainer_names_taken(members: int):
    """Every name a run's trainers could get, held in this job's namespace by actors that never
    start (they ask for a resource no node has): what an earlier run's trainer looks like while
    Ray has not yet processed its death, which can lag its ray.kill by seconds."""
    from ensemble.cluster import slot_members, slot_name

    @ray.remote
    class Placeholder:
        pass

    names = {slot_name(slot) for window in range(1, members + 1) for slot in slot_members(list(range(members)), window)}
    held = [Placeholder.options(name=name, resources={"nowhere": 1}).remote() for name in sorted(names)]
    try:
        yield sorted(names)
    finally:
        for actor in held:
            ray.kill(actor)


def test_hard_vote_hflip_tta_full_bagging_beside_taken_trainer_names(cluster, tiny_digits, tmp_path):
    """--vote hard --tta hflip --bagging full, checked against the saved members run in this
    process; run while every trainer name it could use is taken in the job's namespace."""
    from ensemble.driver import run as run_pipeline
    from ensemble.scores.vote import hard_vote

    cfg = _config(tiny_digits, tmp_path, members=3, epochs=1, vote="hard", tta="hflip", bagging="full",
                  mlflow=importlib.util.find_spec("mlflow") is not None)  # tracked too: see _check_mlflow_runs
    with _trainer_names_taken(cfg.members) as names:
        assert "ensemble-member-0" in names and "ensemble-members-0-1-2" in names
        report = run_pipeline(cfg)
    index = scan_layout(tiny_digits)
    assert report["ensemble"]["bagging"] == "full" and "oob" not in report["ensemble"]
    assert all(m["history"][0]["images"] == index.train.num_rows for m in report["members"])
    expected = [index.classes[k] for k in hard_vote(_sequential_test_probs(cfg, index, tmp_path, hflip=True))]
    rows = [line.split(",") for line in (tmp_path / "predictions.csv").read_text().splitlines()[1:]]
    by_name = dict(rows)
    assert [by_name[n] for n in index.test.column("image_name").to_pylist()] == expected
    if cfg.mlflow:
        _check_mlflow_runs(tmp_path, report)


def _check_mlflow_runs(output, report):
    """--mlflow (default store: SQLite in the run folder), read back with MLflow's client: one
    parent run with the run's config, the ensemble's scores and report.md + figures, and a child
    run per member, logged from the member's process, with its settings and each epoch's metrics."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output}/mlflow.db")
    experiment = client.get_experiment_by_name("ensemble")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    [parent] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.params["member"]))
    assert parent.info.status == "FINISHED" and parent.data.params["vote"] == "hard"
    assert parent.data.metrics["val_acc"] == pytest.approx(report["ensemble"]["val_acc"])
    assert parent.data.metrics["val_nll"] == pytest.approx(report["ensemble"]["metrics"]["nll"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"report.md", "figures"}
    assert len(client.list_artifacts(parent.info.run_id, "figures")) == 4
    assert [r.data.params["member"] for r in children] == ["0", "1", "2"] and len(runs) == 4
    for child, member in zip(children, report["members"]):
        assert child.info.status == "FINISHED" and child.data.params["arch"] == "resnet18"
        assert child.data.params["member_seed"] == str(member["seed"])
        history = client.get_metric_history(child.info.run_id, "val_acc")
        assert [(m.step, m.value) for m in history] == [(1, pytest.approx(member["history"][0]["val_acc"]))]
        assert set(child.data.metrics) >= {"train_loss", "train_acc", "val_loss", "images_per_s", "epoch_seconds"}


def test_node_types_from_the_autoscalers_config_in_the_gcs(cluster, monkeypatch, tmp_path):
    """An autoscaler that reports its node groups to the GCS (a ClusterConfig in the internal KV, where
    Ray's ``state.get_cluster_config`` reads it; Ray 2.60's own autoscalers, KubeRay's included, do
    not write it yet): put there as Ray's own test of that call does. A group of max_count 0 can add
    nothing; -1 has no limit."""
    from ray._raylet import GCS_AUTOSCALER_CLUSTER_CONFIG_KEY, GCS_AUTOSCALER_STATE_NAMESPACE
    from ray.core.generated import autoscaler_pb2
    from ray.experimental import internal_kv

    from ensemble import cluster as cluster_module

    monkeypatch.setattr(cluster_module, "BOOTSTRAP_CONFIG", str(tmp_path / "none.yaml"))  # no `ray up` head
    assert cluster_module.cluster_capacity().node_types == ()
    config = autoscaler_pb2.ClusterConfig()
    for name, resources, most in (("gpu", {"CPU": 8, "GPU": 1}, 9), ("off", {"CPU": 4}, 0),
                                  ("cpu", {"CPU": 16}, -1)):  # whole counts: the proto's map is uint64
        group = config.node_group_configs.add(name=name, max_count=most)
        group.resources.update(resources)
    key, namespace = GCS_AUTOSCALER_CLUSTER_CONFIG_KEY.encode(), GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    internal_kv._internal_kv_put(key, config.SerializeToString(), namespace=namespace)
    try:
        capacity = cluster_module.cluster_capacity()
    finally:
        internal_kv._internal_kv_del(key, namespace=namespace)
    assert capacity.node_types == (({"CPU": 8.0, "GPU": 1.0}, 9), ({"CPU": 16.0}, 10**6))
    assert capacity.most("GPU") == 1 + 9  # the module's one GPU and nine that may join
    assert cluster_module.cluster_capacity().node_types == ()  # gone again for the tests after this one


def test_member_metrics_on_the_metrics_endpoint(cluster):
    """A member's gauges (tagged by member) reach the node's Prometheus endpoint while it lives."""
    import re
    import time
    import urllib.request

    @ray.remote(num_cpus=0)
    class Member:
        def report(self, member, val_acc):
            from ensemble.actors import MemberMetrics

            self.metrics = MemberMetrics(member)  # kept alive with the actor, as in MemberTrainer
            self.metrics.update(epoch=2, train_loss=0.5, val_acc=val_acc, best_val_acc=val_acc, images_per_s=10)

    tags = (1000, 1001)  # not the ids of the members earlier tests trained on this cluster
    members = [Member.remote() for _ in tags]
    ray.get([m.report.remote(tag, 0.5 + k / 10) for k, (tag, m) in enumerate(zip(tags, members))])
    node = [n for n in ray.nodes() if n["Alive"]][0]
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    pattern = re.compile(r'^ray_ensemble_member_val_acc\{[^}]*member="(\d+)"[^}]*\} (\S+)$', re.M)
    deadline, found = time.time() + 90, {}
    while time.time() < deadline and len(found) < 2:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        found = {int(m): float(v) for m, v in pattern.findall(text) if int(m) in tags}
        time.sleep(1)
    assert found == {1000: 0.5, 1001: 0.6}


# ---------------------------------------------------------------- predict with a finished run

def test_predict_reproduces_the_runs_test_outputs(run, tiny_digits, tmp_path):
    from ensemble.predict import predict

    cfg, report, output = run
    summary = predict(output, os.path.join(tiny_digits, "test"), str(tmp_path / "pred"))
    assert summary["n_images"] == report["data"]["test"] and "accuracy" not in summary
    assert (tmp_path / "pred" / "predictions.csv").read_text() == open(os.path.join(output, "predictions.csv")).read()
    ours = pq.read_table(tmp_path / "pred" / "probabilities.parquet").to_pandas()
    theirs = pq.read_table(os.path.join(output, "probabilities.parquet")).to_pandas()
    assert list(ours.columns) == list(theirs.columns)
    np.testing.assert_allclose(ours.drop(columns="image_name").to_numpy(),
                               theirs.drop(columns="image_name").to_numpy(), atol=1e-5)
    from ensemble.config import ConfigError
    from ensemble.predict import check_predict_output

    # the same run on the same images may write that folder again (a rerun); other images may not
    check_predict_output(str(tmp_path / "pred"), output, os.path.join(tiny_digits, "test"))
    with pytest.raises(ConfigError, match="holds the predictions of another run or other images"):
        check_predict_output(str(tmp_path / "pred"), output, os.path.join(tiny_digits, "val"))


def test_predict_never_writes_into_another_run_or_a_full_folder(run, tiny_digits, tmp_path, capsys):
    """--output naming another training run's folder, or any folder with other files: one line,
    exit 2, the files there untouched; default folders of predicts started together differ."""
    from ensemble.predict import default_predict_output, main

    _, _, output = run
    other, full = tmp_path / "other-run", tmp_path / "full"
    for folder, name in ((other, "run.json"), (full, "notes.txt")):
        folder.mkdir()
        (folder / name).write_text("keep")
        (folder / "predictions.csv").write_text("keep")
    for folder, says in ((other, "holds a training run"), (full, "is not empty")):
        code = main(["--run", output, "--images", os.path.join(tiny_digits, "test"), "--output", str(folder)])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and err.startswith(f"error: --output {folder}: {says}")
        assert (folder / "predictions.csv").read_text() == "keep"
    assert len({default_predict_output() for _ in range(20)}) == 20


def test_the_api_docstrings_example_runs(run, tiny_digits, tmp_path, monkeypatch):
    """ensemble/api.py's example, every line after ``ensemble.train`` (which made the shared run,
    helpers.finished_tiny_run), in a folder where ``photos`` is the tiny set and ``runs/photos`` the run."""
    import doctest

    import ensemble.api

    _, _, output = run
    (tmp_path / "runs").mkdir()
    os.symlink(tiny_digits, tmp_path / "photos")
    os.symlink(output, tmp_path / "runs" / "photos")
    monkeypatch.chdir(tmp_path)
    result = doctest.testmod(ensemble.api, extraglobs={"os": os}, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 6 and result.failed == 0, result
    assert (tmp_path / "photos.onnx").stat().st_size > 0


def test_the_api_predicts_a_list_of_files_as_the_command_labels_the_folder(run, tiny_digits):
    """``Run.predict`` on the test images named one by one: the rows of the run's own
    predictions.csv (written by the driver for the same folder), in the list's order."""
    import csv

    import ensemble

    _, report, output = run
    handle = ensemble.load(output)
    assert handle.report == json.load(open(os.path.join(output, "report.json")))
    with open(os.path.join(output, "predictions.csv"), newline="") as fh:
        expected = {row["image_name"]: row["pred_label"] for row in csv.DictReader(fh)}
    test_dir = os.path.join(tiny_digits, "test")
    files = [os.path.join(test_dir, name) for name in sorted(os.listdir(test_dir), reverse=True)]
    table = handle.predict(files)
    names = [os.path.splitext(os.path.basename(f))[0] for f in files]
    assert table["image_name"].tolist() == names
    assert dict(zip(table["image_name"], table["pred_label"])) == expected


def test_predict_scores_class_folders(run, tiny_digits, tmp_path):
    from ensemble.predict import predict

    _, report, output = run
    summary = predict(output, os.path.join(tiny_digits, "val"), str(tmp_path / "pred"))
    assert summary["accuracy"] == pytest.approx(report["ensemble"]["val_acc"], abs=1e-9)
    # rows named <class>/<file>: the same file name in two class folders gives two rows
    rows = (tmp_path / "pred" / "predictions.csv").read_text().splitlines()[1:]
    names = [row.split(",")[0] for row in rows]
    assert len(names) == len(set(names)) == report["data"]["val"]
    assert all(name.split("/")[0] in report["data"]["class_names"] for name in names)


def test_predict_refuses_unfinished_tampered_and_empty_in_one_line(run, tiny_digits, tmp_path, capsys):
    import shutil

    from ensemble.predict import main

    _, _, output = run
    unfinished, tampered = tmp_path / "unfinished", tmp_path / "tampered"
    shutil.copytree(output, unfinished)
    os.remove(unfinished / "members" / "member-1" / "member.json")
    shutil.copytree(output, tampered)
    with open(tampered / "members" / "member-0" / "model.pt", "ab") as fh:
        fh.write(b"\0")
    (tmp_path / "empty").mkdir()
    test_dir = os.path.join(tiny_digits, "test")
    cases = [(unfinished, test_dir, "member 1 has not finished"), (tampered, test_dir, "sha256 differs"),
             (output, str(tmp_path / "empty"), "no images"), (tmp_path / "empty", test_dir, "no readable run.json")]
    for run_dir, images, message in cases:
        capsys.readouterr()
        assert main(["--run", str(run_dir), "--images", images, "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert not (tmp_path / "out").exists()
    # two files that would be one row, and an --output inside the run: refused before any work
    twins = tmp_path / "twins"
    twins.mkdir()
    for name in ("a.png", "a.jpg"):
        shutil.copy(os.path.join(test_dir, sorted(os.listdir(test_dir))[0]), twins / name)
    for images, out, message in [(str(twins), tmp_path / "out",
                                  "a.jpg and a.png would both be row 'a' of predictions.csv"),
                                 (test_dir, Path(output) / "again", f"inside the run folder {output}")]:
        assert main(["--run", str(output), "--images", images, "--output", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not out.exists()


def test_image_cache_holds_every_readable_files_exact_pixels(cluster, tiny_digits, tmp_path):
    """One pass checks and caches: an unreadable file is skipped (its row dropped, ids renumbered),
    every other row's block/row points at that file's eval pixels, and train rows also at its
    shrunk source image."""
    import shutil

    from ensemble.data import read_image
    from ensemble.batches import SplitImages
    from ensemble.image_cache import cache_images
    from ensemble.pixels import shrink

    data = tmp_path / "data"
    shutil.copytree(tiny_digits, data)
    bad = data / "train" / sorted(os.listdir(data / "train"))[-1] / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cfg = _config(str(data), tmp_path / "out", image_size=24)
    index, skipped, cache = cache_images(scan_layout(str(data)), cfg, max_bytes=1e9)
    assert [(s["split"], os.path.basename(s["path"])) for s in skipped] == [("train", "broken.png")]
    assert str(bad) not in index.train.column("path").to_pylist()
    assert cache is not None and cache.side == cache_side(cfg) == 27
    for split in ("train", "val", "test"):
        table = getattr(index, split)
        np.testing.assert_array_equal(table.column("id").to_numpy(), np.arange(table.num_rows))
        images = SplitImages(table, cache, image_size=24, resize="squash", side=cache.side)
        files = {k: table.column(k).to_numpy(zero_copy_only=False) for k in ("id", "path", "label")}
        expected = decode_batch(files, image_size=24, side=cache.side)["image"]
        np.testing.assert_array_equal(np.stack([images.eval(i) for i in range(table.num_rows)]), expected)
    train = SplitImages(index.train, cache, image_size=24, resize="squash", side=cache.side)
    for i in (0, index.train.num_rows - 1):
        path = index.train.column("path")[i].as_py()
        np.testing.assert_array_equal(train.train(i), shrink(read_image(path, min_size=27), 27), err_msg=path)
    assert cache.nbytes == sum(ray.get(r).nbytes for r in cache.eval_blocks) + sum(
        ray.get(r)["pixels"].nbytes for r in cache.train_blocks if r is not None)


def test_streaming_path_gives_the_cached_pixels(cluster, tiny_digits, tmp_path, caplog):
    """Data too large to cache (here: a budget of 0 bytes) is only checked, with the same rows, and
    members and voters decode the files: the same eval pixels and the same augmented batches as
    from the cache, so the same seed gives the same run either way."""
    import logging

    from ensemble.batches import batches
    from ensemble.batches import SplitImages
    from ensemble.image_cache import cache_images

    cfg = _config(tiny_digits, tmp_path, image_size=24)
    cached_index, _, cache = cache_images(scan_layout(tiny_digits), cfg, max_bytes=1e9)
    with caplog.at_level(logging.INFO, logger="ensemble.data"):
        streamed_index, _, none = cache_images(scan_layout(tiny_digits), cfg, max_bytes=0)
    assert none is None and "image cache: off" in caplog.text
    import hashlib

    for split in ("train", "val", "test"):
        paths = getattr(cached_index, split).column("path").to_pylist()
        assert getattr(streamed_index, split).column("path").to_pylist() == paths
        # both decode passes record what they read, for a resume to compare (run_folder.CONTENTS_KEY)
        digests = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in paths]
        assert getattr(cached_index, split).column("sha256").to_pylist() == digests
        assert getattr(streamed_index, split).column("sha256").to_pylist() == digests
    side = cache_side(cfg)
    for split, augment in (("train", "seed"), ("train", "light"), ("val", None)):
        from_cache = SplitImages(getattr(cached_index, split), cache, image_size=24, resize="squash", side=side)
        from_files = SplitImages(getattr(streamed_index, split), None, image_size=24, resize="squash", side=side)
        assert from_cache.reader is not None and from_files.reader is None
        rows = np.random.default_rng(0).integers(0, len(from_cache), size=len(from_cache))
        for a, b in zip(batches(from_cache, rows, batch_size=16, augment=augment, seed=5, threads=2),
                        batches(from_files, rows, batch_size=16, augment=augment, seed=5, threads=1)):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["id"], b["id"])


def _wait_for_stage_threads(timeout_s: float = 120.0) -> None:
    """A stalled stage's helper thread ends once the held CPUs are free (it drops the stage at its
    next result): wait for it, so no Ray call of it outlives this module's cluster."""
    import threading
    import time

    deadline = time.time() + timeout_s
    while any(t.name.startswith("ensemble-") for t in threading.enumerate()):
        assert time.time() < deadline, [t.name for t in threading.enumerate()]
        time.sleep(0.2)


@contextlib.contextmanager
def _every_cpu_held():
    """The module cluster's 2 CPUs held by an actor (other work) for the block; afterwards the
    actor is gone and any stalled stage's helper thread has ended."""
    @ray.remote(num_cpus=2)
    class Holder:
        def ready(self):
            return True

    holder = Holder.remote()
    ray.get(holder.ready.remote())
    try:
        yield
    finally:
        ray.kill(holder)
        _wait_for_stage_threads()


def test_a_cache_larger_than_its_budget_once_decoded_is_dropped_for_the_files(cluster, tmp_path, caplog):
    """Train images far wider than the 4:3 the estimate assumes: the estimate fits the budget, the
    decoded bytes do not; the cache is dropped (one log line) and the members decode the files, as
    with a cache that never fitted, the rows the same."""
    import logging

    from PIL import Image

    from ensemble.image_cache import cache_images, estimate_bytes
    from tests.helpers import write_digits_tree

    data = write_digits_tree(tmp_path / "wide", per_class_train=3, per_class_val=1, n_test=2, classes=2)
    for folder in ("train/class_0", "train/class_1"):
        for name in os.listdir(os.path.join(data, folder)):
            Image.new("RGB", (240, 30), (10, 200, 10)).save(os.path.join(data, folder, name))  # 8:1
    cfg = _config(data, tmp_path / "out", image_size=16)
    estimate = estimate_bytes(scan_layout(data), cfg, "raw")
    with caplog.at_level(logging.INFO, logger="ensemble.data"):
        index, skipped, cache = cache_images(scan_layout(data), cfg, max_bytes=estimate * 1.5)
    assert cache is None and not skipped and index.train.num_rows == 6
    assert "image cache: off (its raw tier took" in caplog.text and "over the budget of" in caplog.text


def test_image_cache_stage_that_cannot_start_is_reported(cluster, tiny_digits, tmp_path):
    """Every CPU held by other work: the decode tasks never start, and the stage stops with one
    line naming the CPUs after --stall-timeout instead of waiting."""
    import time

    from ensemble.errors import StallError
    from ensemble.image_cache import cache_images

    with _every_cpu_held():
        started = time.time()
        with pytest.raises(StallError, match=r"^image decoding made no progress in 2 s: its tasks need 1 CPU each, "
                                             r"the cluster has 0 of 2 CPU free"):
            cache_images(scan_layout(tiny_digits), _config(tiny_digits, tmp_path, stall_timeout=2.0), max_bytes=1e9)
        # Data too large to cache: the Ray Data check alone, watched the same way.
        with pytest.raises(StallError, match=r"^the image check made no progress in [23] s: its tasks need 1 CPU "
                                             r"each, the cluster has 0 of 2 CPU free"):
            cache_images(scan_layout(tiny_digits), _config(tiny_digits, tmp_path, stall_timeout=2.0), max_bytes=0)
        assert time.time() - started < 40


def test_vote_stage_that_cannot_start_is_reported(cluster, tiny_digits, tmp_path):
    """Every CPU held by other work: no voter can start, and the vote stops with one line naming
    what a voter needs after --stall-timeout instead of waiting."""
    import time

    from ensemble.errors import StallError
    from ensemble.vote_stage import vote_splits

    with _every_cpu_held():
        cfg = _config(tiny_digits, tmp_path, stall_timeout=2.0)
        weights = [ray.put(make_member_model(cfg.arch, 4, None, "none").state_dict())]
        started = time.time()
        with pytest.raises(StallError, match=r"^the soft vote made no progress in [23] s: each voter needs 1 CPU, "
                                             r"the cluster has 0 of 2 CPU free \(other work holds the rest\); "
                                             r"free them; no CPU is free, so a lower --cpus-per-infer-actor would "
                                             r"not start either, then rerun"):
            vote_splits(cfg, {"test": scan_layout(tiny_digits).test}, weight_refs=weights, num_classes=4, gpus=0.0)
        assert time.time() - started < 30


def test_cache_block_that_cannot_be_fetched_is_an_error_not_a_wait(cluster):
    """A block whose ref never resolves (lost, and no CPU free to decode it again) is one clear
    error after the cache's fetch timeout (--stall-timeout), not a member waiting forever."""
    from ensemble.errors import StallError
    from ensemble.image_cache import BlockReader, ImageCache

    @ray.remote(num_cpus=1)
    def block():
        return np.zeros((1, 16, 16, 3), np.uint8)

    with _every_cpu_held():
        never = block.remote()  # waits for a CPU the holder keeps
        cache = ImageCache(eval_blocks=[never], train_blocks=[None], image_size=16, side=18, resize="squash",
                           fetch_timeout=1.0)
        with pytest.raises(StallError, match=r"^image cache block 0 could not be fetched in 1 s \(lost with its "
                                             r"node, and no CPU free to decode it again\)"):
            BlockReader(cache).eval(0, 0)


def test_user_error_in_a_ray_task_reaches_the_driver_as_its_own_class(cluster):
    """ray.get raises a task's error as a subclass of RayTaskError and of the error's class
    (RayTaskError.as_instanceof_cause); errors.worker_error gives back the error itself."""
    from ensemble.errors import RunError, UserError, worker_error

    @ray.remote(num_cpus=0)
    def unfinished():
        raise RunError("--run r: member 1 has not finished")

    with pytest.raises(RunError) as raised:
        ray.get(unfinished.remote())
    assert isinstance(raised.value, ray.exceptions.RayTaskError)  # its message is the worker's traceback
    error = worker_error(raised.value)
    assert type(error) is RunError and str(error) == "--run r: member 1 has not finished"
    assert isinstance(raised.value, UserError)


def test_user_error_in_a_ray_data_worker_reaches_the_driver_as_its_own_class(cluster, capsys):
    """A voter that cannot fetch a cache block: its StallError reaches the driver as that error,
    with no Ray Data console lines about it. Ray Data's default wraps a stage function's error in
    a UserCodeException that keeps only the worker's traceback text; quiet_ray_data sets
    raise_original_map_exception, so the error keeps its class across the actor pool."""
    from ensemble.data import quiet_ray_data
    from ensemble.errors import StallError
    from ensemble.watch import watched

    quiet_ray_data()  # the Ray Data settings the driver, predict and tune run with
    # Ray Data's console handler writes to the sys.stderr of the moment ray.data was first imported
    # (ray 2.60's PlainRayHandler keeps StreamHandler's stream), here an earlier test's capture,
    # closed by now (setStream would flush it): point it at this test's.
    import logging
    import sys

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.stream = sys.stderr

    class Voter:
        def __call__(self, batch):
            raise StallError("image cache block 3 could not be fetched in 2 s (its node may be gone)")

    def produce():
        return ray.data.range(4).map_batches(Voter, compute=ray.data.ActorPoolStrategy(size=1)).iter_batches()

    capsys.readouterr()
    with pytest.raises(StallError) as raised:
        watched(produce, stall_timeout=120, stalled=lambda waited: AssertionError(f"stalled {waited}"))
    assert type(raised.value) is StallError  # the worker's error itself, not Ray's subclass of it
    assert str(raised.value) == "image cache block 3 could not be fetched in 2 s (its node may be gone)"
    assert raised.value.__cause__ is None
    assert "An exception was raised from a task" not in capsys.readouterr().err

    def fails():  # any other error stays as Ray raised it, and Ray Data says so on the console
        return ray.data.range(4).map_batches(lambda batch: 1 / 0).iter_batches()

    with pytest.raises(ray.exceptions.RayError, match="ZeroDivisionError"):
        watched(fails, stall_timeout=120, stalled=lambda waited: AssertionError(f"stalled {waited}"))
    assert "An exception was raised from a task" in capsys.readouterr().err


def test_a_run_json_or_model_pt_changed_with_its_hash_is_one_line(run, tmp_path):
    """A run.json without its config, and a member whose model.pt (and recorded sha256) were
    replaced by one of another shape: one line each (RunError), not a KeyError or load_state_dict traceback."""
    import shutil

    import torch

    from ensemble.checkpoint import sha256, torch_bytes
    from ensemble.errors import RunError
    from ensemble.run_folder import load_run

    _, _, output = run
    copy = tmp_path / "copy"
    shutil.copytree(output, copy)
    record = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({k: v for k, v in record.items() if k != "config"}))
    with pytest.raises(RunError, match=r"its run.json has no config, fingerprint or classes"):
        load_run(str(copy))
    (copy / "run.json").write_text(json.dumps(record))
    member = copy / "members" / "member-1"
    state = torch.load(member / "model.pt", weights_only=True)
    state["fc.weight"] = torch.zeros(3, state["fc.weight"].shape[1])
    data = torch_bytes(state)
    (member / "model.pt").write_bytes(data)
    meta = json.loads((member / "member.json").read_text())
    meta["sha256"]["model.pt"] = sha256(data)
    (member / "member.json").write_text(json.dumps(meta))
    with pytest.raises(RunError) as info:
        load_run(str(copy))
    assert str(info.value).startswith(f"--run {copy}: member 1: its model.pt is not a ")
    assert f"fc.weight is [3, {state['fc.weight'].shape[1]}], not [" in str(info.value)
