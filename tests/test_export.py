"""python -m ensemble.export: a finished run as one ONNX file, run with ONNX Runtime.

Pure tests first: the exported graph's maths against ``scores.vote.vote_outputs`` (every rule,
weights, temperature, TTA) with small stand-in members, and ``pixels.load_eval_pixels`` against
the pixels predict decodes. Then the session's finished tiny run (helpers.finished_tiny_run),
exported twice in all: its members against the run's own probabilities.parquet and
predictions.csv (predict's output on its test images), and a selection with a member of weight 0
written with external data against the members' recorded val probabilities. These tests are
``reuses_tiny_run``: they run after the modules that make the run, so this file starts no cluster
unless it runs alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from ensemble import export  # noqa: E402
from ensemble.scores.vote import vote_outputs  # noqa: E402

TOLERANCE = 1e-4
# The tests on the tiny run are marked ray (run alone, this file makes the run on a cluster of its
# own) and reuses_tiny_run (in the whole suite they run last, when the run is made).


# ---------------------------------------------------------------- pure: the graph's maths

class StandIn(torch.nn.Module):
    """A small member: logits from a seeded linear map of the normalised (N, 3, S, S) input (a
    mirrored image gives other logits, so TTA changes the numbers)."""

    def __init__(self, seed: int, size: int, classes: int):
        super().__init__()
        self.linear = torch.nn.Linear(3 * size * size, classes)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape,
                                                 generator=torch.Generator().manual_seed(seed)))

    def forward(self, x):
        return self.linear(x.flatten(1)) / 8


def _reference(models, pixels: np.ndarray, *, rule, tta, temperature, weights) -> dict:
    """What predict computes: the package's torch path, voted in numpy."""
    from ensemble.engine import vote_member_probabilities

    with torch.no_grad():
        member_probs = vote_member_probabilities(models, torch.from_numpy(pixels), None, tta).numpy()
    return vote_outputs(member_probs, rule, temperature, weights)


@pytest.mark.parametrize("rule, tta, temperature, weights", [
    ("soft", "none", 1.0, None),
    ("soft", "hflip", 0.43, None),
    ("hard", "hflip", 2.5, None),                 # the label: majority, ties to the summed probability
    ("hard", "none", 0.6, [0.5, 0.0, 0.3, 0.2]),  # a selection: weighted soft vote, its argmax
])
def test_graph_and_its_onnx_file_vote_as_predict(tmp_path, rule, tta, temperature, weights):
    size, classes = 4, 3
    models = [StandIn(seed, size, classes).eval() for seed in range(4)]
    pixels = np.random.default_rng(0).integers(0, 256, size=(64, size, size, 3), dtype=np.uint8)
    expected = _reference(models, pixels, rule=rule, tta=tta, temperature=temperature, weights=weights)
    used = models if weights is None else [m for m, w in zip(models, weights) if w > 0]
    graph = export.EnsembleGraph(used, rule=rule, tta=tta, temperature=temperature,
                                 weights=None if weights is None else [w for w in weights if w > 0]).eval()
    with torch.no_grad():
        probs, label = graph(torch.from_numpy(pixels))
    np.testing.assert_allclose(probs.numpy(), expected["probs"], atol=1e-6)
    assert label.tolist() == expected["label"].tolist()
    if rule == "hard" and weights is None:  # the rule decides some rows against the soft vote's top class
        assert (expected["label"] != expected["probs"].argmax(1)).any()

    path = str(tmp_path / "g.onnx")
    export._save(export._trace(graph, pixels, str(tmp_path / "traced")), path, {}, external_data=None)
    for rows in (slice(None), slice(0, 1)):  # traced on two images, run on 64 and on one
        got_probs, got_label = export.run_onnx(path, pixels[rows])
        np.testing.assert_allclose(got_probs, expected["probs"][rows], atol=1e-6)
        assert got_label.tolist() == expected["label"][rows].tolist()


def test_load_eval_pixels_are_the_pixels_predict_decodes(tmp_path, tiny_digits):
    """The public eval-geometry function == data.decode_batch (what predict's vote stage decodes),
    for a PNG and for a JPEG large enough to be decoded at a reduced scale."""
    from PIL import Image

    from ensemble.data import decode_batch
    from ensemble.pixels import load_eval_pixels

    jpeg = str(tmp_path / "big.jpg")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, size=(300, 410, 3), dtype=np.uint8)).save(jpeg, quality=90)
    png = os.path.join(tiny_digits, "test", min(os.listdir(os.path.join(tiny_digits, "test"))))
    for resize in ("squash", "short-side"):
        batch = {"id": np.arange(2), "label": np.full(2, -1), "path": np.array([png, jpeg], dtype=object)}
        decoded = decode_batch(batch, image_size=16, resize=resize, side=18)["image"]
        for k, path in enumerate([png, jpeg]):
            np.testing.assert_array_equal(load_eval_pixels(path, image_size=16, resize=resize, side=18), decoded[k])


# ---------------------------------------------------------------- the session's tiny run

@pytest.fixture(scope="module")
def run(tiny_digits, tiny_run_cache, tmp_path_factory) -> str:
    """The session's finished 3-member run's folder. Made here, on a cluster of this module's own
    that stops once it is made, only when no module before made it (this file run alone)."""
    from tests.helpers import finished_tiny_run

    if "run" not in tiny_run_cache:
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
        try:
            finished_tiny_run(tiny_run_cache, tiny_digits, tmp_path_factory)
        finally:
            ray.shutdown()
    return tiny_run_cache["run"][2]


def _copy_run(src: str, dst) -> str:
    """The run's folder with its files hard-linked (cheap): change a file only by replacing it."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)
    return str(dst)


def _replace(path, data: bytes) -> None:
    os.unlink(path)  # never write through a hard link into the original run
    with open(path, "wb") as fh:
        fh.write(data)


def _test_images(tiny_digits) -> tuple[list, list]:
    folder = os.path.join(tiny_digits, "test")
    files = sorted(os.listdir(folder))
    return [os.path.splitext(f)[0] for f in files], [os.path.join(folder, f) for f in files]


def _pixels(paths, finished_config) -> np.ndarray:
    from ensemble.config import cache_side
    from ensemble.pixels import load_eval_pixels

    cfg = finished_config
    return np.stack([load_eval_pixels(p, image_size=cfg.image_size, resize=cfg.eval_resize, side=cache_side(cfg))
                     for p in paths])


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> tuple[str, dict]:
    """(path, export_run's result) of the run's members, all of them, as one file."""
    path = str(tmp_path_factory.mktemp("export") / "tiny.onnx")
    return path, export.export_run(run, path)


@pytest.fixture(scope="module")
def session(exported):
    return ort.InferenceSession(exported[0], providers=["CPUExecutionProvider"])


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_onnx_runtime_gives_predicts_probabilities_and_labels(exported, session, run, tiny_digits):
    """ONNX Runtime on the run's test images == the run's probabilities.parquet (predict's output
    on them, scaled by the run's temperature) to 1e-4, and its labels == predictions.csv."""
    import pyarrow.parquet as pq

    from ensemble.run_folder import load_run

    path, result = exported
    finished = load_run(run)
    assert result["members"] == [0, 1, 2] and result["external_data"] is None
    assert result["parity_max_abs_diff"] <= TOLERANCE and "val image" in result["parity_on"]
    assert os.listdir(os.path.dirname(path)) == ["tiny.onnx"]  # no temporary folder left beside it
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == finished.classes and float(meta["temperature"]) == finished.temperature

    names, paths = _test_images(tiny_digits)
    probs, label = session.run(None, {"pixels": _pixels(paths, finished.config)})
    table = pq.read_table(os.path.join(run, "probabilities.parquet"))
    order = [table.column("image_name").to_pylist().index(n) for n in names]
    expected = np.stack([table.column(c).to_numpy() for c in finished.classes], axis=1)[order]
    assert finished.temperature != 1.0  # the file's numbers are scaled, as the run's are
    assert np.abs(probs - expected).max() <= TOLERANCE
    with open(os.path.join(run, "predictions.csv")) as fh:
        labels = dict(line.strip().split(",") for line in fh.readlines()[1:])
    assert [finished.classes[i] for i in label] == [labels[n] for n in names]


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_batch_size_is_free(session, run, tiny_digits):
    from ensemble.run_folder import load_run

    dims = session.get_inputs()[0].shape
    assert isinstance(dims[0], str) and dims[1:] == [16, 16, 3]  # (batch, S, S, 3)
    pixels = _pixels(_test_images(tiny_digits)[1], load_run(run).config)
    batch = session.run(None, {"pixels": pixels})[0]
    assert batch.shape == (len(pixels), 4)
    for k in (0, len(pixels) - 1):
        one = session.run(None, {"pixels": pixels[k:k + 1]})[0]
        assert one.shape == (1, 4)
        np.testing.assert_allclose(one[0], batch[k], atol=1e-6)


SELECTED_T = 0.625  # the selection's own temperature in the copy's report


@pytest.fixture(scope="module")
def selected_export(run, tmp_path_factory) -> tuple[str, dict]:
    """The run with a known selection (weights 0.75, 0, 0.25; its own temperature 0.625) and member
    1's weights altered (loading it would fail its sha256 check), exported with --members selected
    past an external-data threshold of 0 bytes: (the folder the two files were moved to, result)."""
    from ensemble.run_folder import write_report_sha256

    copy = _copy_run(run, tmp_path_factory.mktemp("selected") / "run")
    report = json.loads(Path(copy, "report.json").read_text())
    report["ensemble"]["selection"].update(weights=[0.75, 0.0, 0.25], temperature=SELECTED_T)
    _replace(os.path.join(copy, "report.json"), json.dumps(report).encode())
    os.unlink(os.path.join(copy, "report.json.sha256"))
    write_report_sha256(copy)  # as if the run had written this report
    model = os.path.join(copy, "members", "member-1", "model.pt")
    _replace(model, Path(model).read_bytes() + b"\0")

    written = tmp_path_factory.mktemp("selected-onnx")
    result = export.export_run(copy, str(written / "sel.onnx"), members="selected", external_data_over=0)
    assert sorted(os.listdir(written)) == ["sel.onnx", "sel.onnx.data"]  # nothing else left beside them
    moved = tmp_path_factory.mktemp("moved")
    for name in ("sel.onnx", "sel.onnx.data"):  # a client copies the pair elsewhere
        shutil.move(str(written / name), str(moved / name))
    return str(moved), result


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_selected_members_weighted_with_their_own_temperature(selected_export, run, tiny_digits):
    """--members selected: members 0 and 2 (member 1, of weight 0, is not even loaded), voted
    0.75/0.25 and scaled by 0.625, equal to the members' own recorded val probabilities voted so."""
    from ensemble.data import scan_layout
    from ensemble.run_folder import load_run

    folder, result = selected_export
    assert result["members"] == [0, 2] and result["weights"] == [0.75, 0.25]
    assert result["temperature"] == SELECTED_T and result["parity_max_abs_diff"] <= TOLERANCE
    recorded = [np.load(os.path.join(run, "members", f"member-{i}", "val_probs.npz")) for i in (0, 2)]
    ids = recorded[0]["ids"]
    val = scan_layout(tiny_digits).val.to_pydict()
    paths = [val["path"][val["id"].index(i)] for i in ids]
    expected = vote_outputs(np.stack([r["probs"] for r in recorded]), "soft", SELECTED_T, [0.75, 0.25])

    session = ort.InferenceSession(os.path.join(folder, "sel.onnx"), providers=["CPUExecutionProvider"])
    probs, label = session.run(None, {"pixels": _pixels(paths, load_run(run).config)})
    assert np.abs(probs - expected["probs"]).max() <= TOLERANCE
    assert label.tolist() == expected["label"].tolist()
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["members"]) == [0, 2] and meta["vote"] == "weighted soft"


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_past_the_threshold_the_weights_go_to_one_external_data_file(selected_export):
    import onnx

    folder, result = selected_export
    graph, data = os.path.join(folder, "sel.onnx"), os.path.join(folder, "sel.onnx.data")
    assert result["external_data"].endswith("sel.onnx.data")
    assert os.path.getsize(graph) < 1e6 < os.path.getsize(data)  # the weights (two resnet18s) are in the .data
    model = onnx.load(graph, load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"sel.onnx.data"}  # one file, named relative to the graph


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_bad_runs_and_outputs_are_one_line_exit_2_and_write_nothing(run, tmp_path, capsys, monkeypatch):
    unfinished = _copy_run(run, tmp_path / "unfinished")
    os.unlink(os.path.join(unfinished, "members", "member-2", "member.json"))
    changed = _copy_run(run, tmp_path / "changed")
    report = json.loads(Path(changed, "report.json").read_text())
    report["ensemble"]["calibration"]["temperature"] = 0.5
    _replace(os.path.join(changed, "report.json"), json.dumps(report).encode())
    damaged = _copy_run(run, tmp_path / "damaged")
    model = os.path.join(damaged, "members", "member-0", "model.pt")
    _replace(model, Path(model).read_bytes()[:-1])
    out = tmp_path / "out"
    out.mkdir()
    cases = [
        (["--run", run, "--output", os.path.join(run, "m.onnx")], "inside the run folder"),
        (["--run", run, "--output", str(out / "m.pt")], "name the file *.onnx"),
        (["--run", run, "--output", str(out / "m.onnx"), "--members", "best"],
         "--members best: choose all or selected"),
        (["--run", unfinished, "--output", str(out / "m.onnx")], "member 2 has not finished"),
        (["--run", changed, "--output", str(out / "m.onnx")], "report.json changed after the run wrote it"),
        (["--run", damaged, "--output", str(out / "m.onnx")], "sha256"),
        (["--run", str(tmp_path / "changed" / "figures"), "--output", str(out / "m.onnx")], "no readable run.json"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert export.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert os.listdir(out) == [] and not os.path.exists(os.path.join(run, "m.onnx"))

    find_spec = export.importlib.util.find_spec
    monkeypatch.setattr(export.importlib.util, "find_spec", lambda name: None if name == "onnx" else find_spec(name))
    assert export.main(["--run", run, "--output", str(out / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: ensemble.export needs the onnx package, which is not installed: "
                   "pip install 'ensemble[onnx]'"]


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
@pytest.mark.parametrize("failure, message", [("disk full", "writing it failed (OSError: "),
                                              ("parity", "differ from the members run in torch by up to")])
def test_a_failed_write_or_parity_check_leaves_nothing(run, tmp_path, capsys, monkeypatch, failure, message):
    """Stand-ins for the writer and ONNX Runtime (no export here): a disk that fills mid-write, and
    a file whose numbers are off. Either ends in one line, exit 1, and no file or temporary folder."""
    def save(traced, path, props, external_data):
        with open(path, "wb") as fh:
            fh.write(b"half a file")
        if failure == "disk full":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "_trace", lambda graph, example, folder: os.path.join(folder, "graph.onnx"))
    monkeypatch.setattr(export, "_save", save)
    monkeypatch.setattr(export, "run_onnx", lambda path, pixels: [np.full((len(pixels), 4), 0.25, np.float32)])
    out = tmp_path / "out"
    out.mkdir()
    assert export.main(["--run", run, "--output", str(out / "m.onnx")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert os.listdir(out) == []


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_a_crash_between_the_two_moves_never_pairs_an_earlier_graph_with_new_weights(run, tmp_path, monkeypatch):
    """Stand-ins for the writer (no export here): a first export of graph + .data, then a second
    one killed after its .data moved into place and before its .onnx did. No .onnx is left (export
    again), rather than the first graph beside the second's weights."""
    def save(traced, path, props, external_data):
        Path(path).write_text(f"graph {len(os.listdir(out))}")
        Path(path + ".data").write_text(f"weights {len(os.listdir(out))}")

    monkeypatch.setattr(export, "_trace", lambda graph, example, folder: os.path.join(folder, "graph.onnx"))
    monkeypatch.setattr(export, "_save", save)
    monkeypatch.setattr(export, "has_onnxruntime", lambda: False)
    out = tmp_path / "out"
    out.mkdir()
    export.export_run(run, str(out / "m.onnx"), external_data_over=0)
    first = {name: (out / name).read_text() for name in ("m.onnx", "m.onnx.data")}
    real_replace = os.replace

    def crash_on_the_graph(src, dst):
        if dst.endswith(".onnx"):
            raise KeyboardInterrupt  # the process stops here
        real_replace(src, dst)

    monkeypatch.setattr(export.os, "replace", crash_on_the_graph)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run, str(out / "m.onnx"), external_data_over=0)
    left = sorted(os.listdir(out))
    assert "m.onnx" not in left and (out / "m.onnx.data").read_text() != first["m.onnx.data"]


def test_the_parity_search_opens_no_fifo_and_gives_up_on_unreadable_data(tmp_path, monkeypatch):
    """inputs.parquet naming a FIFO (which blocks a reader forever) and 40 moved files: the check
    opens none of them, tries at most PARITY_TRIES, and falls back to random pixels at once."""
    import types

    import pyarrow as pa
    import pyarrow.parquet as pq

    from ensemble.config import EnsembleConfig

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    paths = [str(fifo)] + [str(tmp_path / f"gone-{k}.png") for k in range(40)]
    run = tmp_path / "run"
    run.mkdir()
    pq.write_table(pa.table({"split": ["val"] * len(paths), "path": paths}), run / "inputs.parquet")
    tried = []
    monkeypatch.setattr("ensemble.pixels.load_eval_pixels", lambda path, **kw: tried.append(path) or
                        (_ for _ in ()).throw(FileNotFoundError(path)))
    finished = types.SimpleNamespace(config=EnsembleConfig(image_size=32, weights="none", arch="resnet18"))
    pixels, what = export.parity_pixels(str(run), finished, n=4)
    assert pixels.shape == (4, 32, 32, 3) and what.startswith("4 random images")
    assert str(fifo) not in tried and len(tried) <= export.PARITY_TRIES


@pytest.mark.ray
@pytest.mark.reuses_tiny_run
def test_two_exports_to_one_file_do_not_interleave(run, tmp_path):
    """One export writes a file at a time: while one holds it, a second to the same --output is
    refused in one line (two would pair one's graph with the other's weights); the lock goes with it."""
    from ensemble.run_lock import RunFolderBusy, RunLock

    out = tmp_path / "m.onnx"
    with RunLock(str(tmp_path), name=".m.onnx.lock"):  # as a running export holds it
        with pytest.raises(RunFolderBusy, match=r"is in use by another process .*\.m\.onnx\.lock"):
            export.export_run(run, str(out))
    assert os.listdir(tmp_path) == []
