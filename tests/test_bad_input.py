"""Bad input: one clear line (what is wrong, what to do), exit code 2, no traceback, and nothing
written to --output. Unreadable images are skipped and listed (or stop the run with --strict)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

ray = pytest.importorskip("ray")

from ensemble.driver import main  # noqa: E402
from tests.helpers import RECIPE_FLAGS, write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray]

# No resource flags: the defaults (--cpus-per-member 2, two voters of 1 CPU) on this 2-CPU cluster
# must run, not wait for a CPU that the members hold (test_small_clusters.py: 1 CPU).
QUICK = [*RECIPE_FLAGS, "--image-size", "16", "--epochs", "1", "--members", "2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")  # no GPUs
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return write_digits_tree(tmp_path_factory.mktemp("good"), per_class_train=6, per_class_val=3, n_test=6,
                             classes=3)


def _copy(good, tmp_path) -> str:
    target = str(tmp_path / "data")
    shutil.copytree(good, target)
    return target


def _refused(capsys, argv, output, expect: str):
    """Run the CLI in-process: exit 2, one stderr line naming the problem, no output folder."""
    code = main([*argv, "--output", str(output)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and expect in lines[0], err[-2000:]
    assert "Traceback" not in err
    assert not os.path.isdir(output) or os.listdir(output) == []
    return lines[0]


# ---------------------------------------------------------------- the data folder

def test_data_dir_missing(capsys, tmp_path):
    _refused(capsys, ["--data", str(tmp_path / "nope"), *QUICK], tmp_path / "out", "no such folder")


@pytest.mark.parametrize("split", ["train", "val"])
def test_no_train_or_val(capsys, good, tmp_path, split):
    data = _copy(good, tmp_path)
    shutil.rmtree(os.path.join(data, split))
    _refused(capsys, ["--data", data, *QUICK], tmp_path / "out", f"no {split}/ folder")


def test_class_folder_without_images(capsys, good, tmp_path):
    data = _copy(good, tmp_path)
    os.makedirs(os.path.join(data, "train", "class_9"))
    open(os.path.join(data, "train", "class_9", "notes.txt"), "w").write("x")
    _refused(capsys, ["--data", data, *QUICK], tmp_path / "out", "train/class_9/ has no images")


def test_val_class_not_in_train(capsys, good, tmp_path):
    data = _copy(good, tmp_path)
    shutil.copytree(os.path.join(data, "val", "class_0"), os.path.join(data, "val", "zebra"))
    _refused(capsys, ["--data", data, *QUICK], tmp_path / "out", "val/ has classes not in train/: zebra")


def test_a_layout_without_test_trains_and_scores_on_val(cluster, capsys, good, tmp_path):
    """Only train/ and val/: the run trains, scores and reports on val, writes no predictions (and
    says where they come from), and is a finished run that predict and serve load."""
    import ensemble

    data = _copy(good, tmp_path)
    shutil.rmtree(os.path.join(data, "test"))
    output = tmp_path / "out"
    assert main(["--data", data, *QUICK, "--output", str(output)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"outputs in {output}: report.json, report.md, figures/, members/ (no test images, so no predictions.csv: "
        f"label images with python -m ensemble.predict --run {output} --images DIR)")
    report = json.loads((output / "report.json").read_text())
    assert report["data"]["test"] == 0 and report["data"]["val"] == 9 and 0 <= report["ensemble"]["val_acc"] <= 1
    assert not (output / "predictions.csv").exists() and not (output / "probabilities.parquet").exists()
    assert ensemble.load(str(output)).report == report  # a finished run predict and serve take


def test_test_dir_without_images(capsys, good, tmp_path):
    data = _copy(good, tmp_path)
    shutil.rmtree(os.path.join(data, "test"))
    os.makedirs(os.path.join(data, "test"))
    _refused(capsys, ["--data", data, *QUICK], tmp_path / "out", "test/ has no images")


# ---------------------------------------------------------------- flags and config

@pytest.mark.parametrize("flags, expect", [
    (["--arch", "resnet9"], "--arch 'resnet9': choose one of"),
    (["--calibrate-on", "test"], "--calibrate-on 'test': choose one of val, oob"),
    (["--members", "0"], "--members 0: must be >= 1"),
    (["--epochs", "0"], "--epochs 0: must be >= 1"),
    (["--epochs", "-2"], "--epochs -2: must be >= 1"),
    (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--lr", "-0.1"], "--lr -0.1: must be > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--batch-size", "-4"], "--batch-size -4: must be >= 1"),
    # upper bounds (config.INT_RANGES / NUMBER_RANGES), refused before anything is written
    (["--members", "100000"], "--members 100000: must be <= 1000"),
    (["--bootstrap-size", "1000000000000"], "--bootstrap-size 1000000000000: must be <= 100000000"),
    (["--bootstrap-size", "181"], "--bootstrap-size 181: at most 10 x the train split's 18 images (180)"),
    (["--image-size", "4096"], "--image-size 4096: must be <= 1024"),
    (["--lr", "5"], "--lr 5: must be <= 1"),
    (["--stall-timeout", "1e9"], "--stall-timeout 1e+09: must be <= 604800"),
])
def test_bad_numbers_and_names(capsys, good, tmp_path, flags, expect):
    _refused(capsys, ["--data", good, *QUICK, *flags], tmp_path / "out", expect)


def test_gpus_per_member_without_gpus(capsys, cluster, good, tmp_path):
    _refused(capsys, ["--data", good, *QUICK, "--gpus-per-member", "0.5"], tmp_path / "out",
             "--gpus-per-member 0.5 but the cluster has no GPUs; use --gpus-per-member 0")


def test_weights_missing_file(capsys, good, tmp_path):
    _refused(capsys, ["--data", good, *QUICK, "--weights", str(tmp_path / "w.pth")], tmp_path / "out",
             "no such file")


def test_weights_not_a_state_dict(capsys, good, tmp_path):
    path = tmp_path / "w.pth"
    torch.save([1, 2, 3], path)
    _refused(capsys, ["--data", good, *QUICK, "--weights", str(path)], tmp_path / "out", "expected a dict of tensors")
    path.write_text("not a checkpoint")
    _refused(capsys, ["--data", good, *QUICK, "--weights", str(path)], tmp_path / "out", "not a loadable state dict")


def test_weights_for_another_arch(capsys, good, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(torchvision.models.resnet34(num_classes=3).state_dict(), path)
    _refused(capsys, ["--data", good, *QUICK, "--weights", str(path)], tmp_path / "out", "is it for another --arch?")


def test_config_unknown_key_and_wrong_type(capsys, good, tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("epochz: 3\n")
    _refused(capsys, ["--data", good, *QUICK, "--config", str(bad_key)], tmp_path / "out", "unknown key 'epochz'")
    bad_type = tmp_path / "b.yaml"
    bad_type.write_text("members: three\n")
    _refused(capsys, ["--data", good, "--config", str(bad_type)], tmp_path / "out",
             "--members 'three': must be a whole number")


def test_output_is_a_file_or_not_writable(capsys, good, tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    _refused(capsys, ["--data", good, *QUICK], a_file, "is a file; pass a folder")
    code = main(["--data", good, *QUICK, "--output", str(a_file / "sub")])
    err = capsys.readouterr().err
    assert code == 2 and "is not a writable folder" in err and "Traceback" not in err


def test_unreachable_address(good, tmp_path):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "ensemble.driver", "--data", good, *QUICK, "--address",
                           f"127.0.0.1:{port}", "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --address 127.0.0.1:{port}: nothing answers")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- image files

def _messy(good, tmp_path) -> tuple[str, dict]:
    """Good data plus files a real folder has: broken ones and odd-but-valid ones."""
    data = _copy(good, tmp_path)
    train = os.path.join(data, "train", "class_0")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(os.path.join(train, "ok.jpg"))
    jpeg = open(os.path.join(train, "ok.jpg"), "rb").read()
    open(os.path.join(train, "truncated.jpg"), "wb").write(jpeg[: len(jpeg) // 2])
    open(os.path.join(train, "notes.png"), "w").write("this is text, not a PNG")
    open(os.path.join(train, "empty.jpg"), "wb").close()
    # Valid but unusual: grayscale, RGBA, CMYK, 16-bit PNG, 1x1 and a large photo.
    Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8), mode="L").save(os.path.join(train, "gray.png"))
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), mode="RGBA").save(
        os.path.join(train, "rgba.png"))
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(
        os.path.join(train, "cmyk.jpg"))
    Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(os.path.join(train, "deep16.png"))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(os.path.join(train, "tiny.png"))
    Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8)).save(
        os.path.join(data, "test", "huge.jpg"), quality=70)
    return data, {"truncated.jpg", "notes.png", "empty.jpg"}


def test_unreadable_images_are_skipped_and_listed(cluster, caplog, good, tmp_path):
    data, broken = _messy(good, tmp_path)
    assert Image.open(os.path.join(data, "train", "class_0", "deep16.png")).mode.startswith("I")
    assert Image.open(os.path.join(data, "train", "class_0", "cmyk.jpg")).mode == "CMYK"
    output = tmp_path / "out"
    assert main(["--data", data, *QUICK, "--output", str(output)]) == 0
    report = json.loads((output / "report.json").read_text())
    skipped = {os.path.basename(s["path"]): s["reason"] for s in report["skipped_files"]}
    assert set(skipped) == broken
    assert "empty file" in skipped["empty.jpg"]
    assert report["data"]["train"] == 3 * 6 + 1 + 5  # the good rows + ok.jpg + five odd-but-valid images
    names = (output / "predictions.csv").read_text()
    assert "huge," in names
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert sum("skipping unreadable train image" in m for m in warned) == 3


def test_strict_stops_before_training(cluster, capsys, good, tmp_path):
    data, _ = _messy(good, tmp_path)
    line = _refused(capsys, ["--data", data, *QUICK, "--strict"], tmp_path / "out", "unreadable image file(s)")
    assert "3 unreadable" in line and "drop --strict" in line
