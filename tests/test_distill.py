"""The distillation loss, the teacher's targets per row, the student's config and its report:
pure, no Ray. The student's run end to end is in test_pipeline_ray.py (it shares that cluster)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensemble.config import ConfigError, build_config
from ensemble.distill import (Distillation, _read_targets, check_kd, distill_summary, gflops_per_image, main,
                              student_config, total_params)
from ensemble.engine import distillation_loss
from ensemble.epochs import Targets


def test_distillation_loss_is_hinton_t_squared_kl_plus_alpha_ce():
    torch.manual_seed(0)
    logits, teacher_logits = torch.randn(5, 4), torch.randn(5, 4)
    teacher = torch.softmax(teacher_logits, 1)
    labels = torch.tensor([0, 1, 2, 3, 0])
    t, alpha = 3.0, 0.25
    p = torch.softmax(teacher_logits / t, 1)            # the teacher's logits softened: log(p) / T is the same
    q = torch.log_softmax(logits / t, 1)
    by_hand = t * t * (p * (p.log() - q)).sum(1).mean() + alpha * F.cross_entropy(logits, labels)
    got = distillation_loss(logits, labels, teacher, temperature=t, alpha=alpha)
    assert torch.allclose(got, by_hand, atol=1e-6)
    # a student that already matches the teacher has only the label term left
    matched = distillation_loss(teacher_logits, labels, teacher, temperature=t, alpha=alpha)
    assert torch.allclose(matched, alpha * F.cross_entropy(teacher_logits, labels), atol=1e-5)
    # T = 1 and a one-hot teacher, no label term: plain cross-entropy on the teacher's labels
    one_hot = F.one_hot(labels, 4).float()
    assert torch.allclose(distillation_loss(logits, labels, one_hot, temperature=1.0, alpha=0.0),
                          F.cross_entropy(logits, labels), atol=1e-5)


def test_targets_are_looked_up_by_row_id_and_a_missing_row_is_an_error():
    targets = Targets(ids=np.array([0, 2, 5, 9]), probs=np.arange(8, dtype=np.float32).reshape(4, 2))
    assert targets.of(np.array([9, 0, 5, 5])).tolist() == [[6, 7], [0, 1], [4, 5], [4, 5]]
    for missing in ([3], [10]):
        with pytest.raises(ValueError, match="no teacher probabilities"):
            targets.of(np.array(missing))


def test_student_config_keeps_the_teachers_data_and_eval_geometry():
    teacher = build_config(flag_values={"data": "/d", "output": "/runs/t", "members": 9, "image_size": 32,
                                        "eval_resize": "short-side", "tta": "hflip", "calibrate_on": "oob",
                                        "bootstrap_size": 50, "arch": "resnet50", "lr": 1e-4})
    cfg = student_config(teacher, {"arch": "resnet18", "epochs": 7}, "/runs/s")
    assert (cfg.members, cfg.bagging, cfg.bootstrap_size, cfg.calibrate_on) == (1, "full", None, "val")
    assert (cfg.data, cfg.output, cfg.image_size, cfg.eval_resize, cfg.tta) == ("/d", "/runs/s", 32, "short-side",
                                                                                "hflip")
    assert (cfg.arch, cfg.epochs, cfg.lr) == ("resnet18", 7, 1e-4)
    with pytest.raises(ConfigError, match="--lr"):
        student_config(teacher, {"lr": 5.0}, "/runs/s")


@pytest.mark.parametrize("name, value", [("kd_temperature", 0.5), ("kd_temperature", 21.0),
                                         ("kd_temperature", math.nan), ("kd_alpha", -0.1), ("kd_alpha", 11.0)])
def test_kd_flags_have_both_bounds(name, value):
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} .*must be from"):
        check_kd(name, value)


def test_bad_flags_and_a_folder_that_is_no_run_are_one_line_exit_2(tmp_path, capsys):
    assert main(["--run", str(tmp_path), "--output", str(tmp_path / "s"), "--kd-temperature", "0"]) == 2
    assert main(["--run", str(tmp_path), "--output", str(tmp_path / "s")]) == 2
    assert main(["--run", str(tmp_path), "--output", str(tmp_path / "s"), "--speed-images", "5000"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 3
    assert "--kd-temperature 0: must be from 1 to 20" in lines[0]
    assert "no readable run.json" in lines[1]
    assert "--speed-images 5000" in lines[2]


def _report(accs, ensemble_acc, temperature=0.5):
    members = [{"member": i, "val_acc": a, "metrics": {"accuracy": a, "nll": 1.0 - a, "ece": 0.1}}
               for i, a in enumerate(accs)]
    cal = {"temperature": temperature, "val_after": {"accuracy": ensemble_acc, "nll": 0.2, "ece": 0.02}}
    return {"members": members, "ensemble": {"metrics": {"accuracy": ensemble_acc, "nll": 0.3, "ece": 0.05},
                                             "calibration": cal}}


def test_summary_gives_the_share_of_the_ensembles_gain_the_student_keeps():
    teacher, student = _report([0.80, 0.84, 0.82], 0.90), _report([0.88], 0.88, temperature=0.7)
    s = distill_summary(teacher, student, teacher_params=300, student_params=10, teacher_gflops=6.0,
                        student_gflops=0.5)
    assert s["val"]["mean_member"]["accuracy"] == pytest.approx(0.82)
    assert s["val"]["best_member"]["member"] == 1
    assert s["gain_kept"] == pytest.approx((0.88 - 0.82) / (0.90 - 0.82))
    assert s["params"] == {"student": 10, "ensemble": 300}
    assert s["gflops_per_image"] == {"student": 0.5, "ensemble": 6.0}
    assert s["val_after_temperature"]["student"]["temperature"] == 0.7
    no_gain = distill_summary(_report([0.9, 0.9], 0.9), student, teacher_params=1, student_params=1,
                              teacher_gflops=1, student_gflops=1)
    assert no_gain["gain_kept"] is None


def test_gflops_are_counted_on_the_meta_device():
    # resnet18 at 224 px: torchvision's documented 1.81 GFLOPS (multiply-adds) = 3.6 GFLOPs here
    assert gflops_per_image("resnet18", 1000, 224) == pytest.approx(2 * 1.81, rel=0.02)


def test_saved_targets_are_read_back_only_for_the_same_teacher_and_rows(tmp_path):
    import io
    import json

    spec = Distillation(run="r", temperature=2.0, alpha=0.5, report_sha256="ab")
    identity = json.dumps(spec.identity(), sort_keys=True)
    ids, probs = np.arange(3), np.full((3, 2), 0.5, np.float32)
    buf = io.BytesIO()
    np.savez(buf, ids=ids, probs=probs, identity=np.array(identity))
    path = tmp_path / "teacher.npz"
    path.write_bytes(buf.getvalue())
    back = _read_targets(str(path), ids, identity)
    assert back is not None and back.probs.tolist() == probs.tolist()
    other = json.dumps(Distillation(run="r", temperature=3.0, alpha=0.5, report_sha256="ab").identity(), sort_keys=True)
    assert _read_targets(str(path), ids, other) is None             # another loss (after --fresh)
    assert _read_targets(str(path), np.arange(4), identity) is None  # other rows
    assert _read_targets(str(tmp_path / "none.npz"), ids, identity) is None
    path.write_bytes(b"torn")
    assert _read_targets(str(path), ids, identity) is None


def test_parameters_come_from_the_runs_report_per_member():
    mixed = {"params": {"by_arch": {"resnet18": {"total": 3, "trainable": 1},
                                    "resnet34": {"total": 5, "trainable": 5}}}}
    assert total_params(mixed, ["resnet18", "resnet34", "resnet18"]) == 11
    one = {"params": {"total": 7, "trainable": 2}}  # a run of one architecture
    assert total_params(one, ["resnet50"] * 3) == 21


def test_a_student_with_its_own_seed_keeps_the_teachers_val_rows(tmp_path):
    """--val-fraction run, distill --seed 9: the student's val rows are the teacher's (its own seed
    drew other rows, some of them the teacher's training images), and they stay out of its train rows."""
    from ensemble.driver import data_index
    from tests.helpers import write_digits_tree

    import shutil

    data = write_digits_tree(tmp_path / "data", per_class_train=10, per_class_val=1, n_test=2, classes=3)
    shutil.rmtree(os.path.join(data, "val"))
    teacher = build_config(flag_values={"data": str(data), "output": "/runs/t", "val_fraction": 0.3, "seed": 3})
    student = student_config(teacher, {"seed": 9}, "/runs/s")
    assert student.seed == 9
    names = {who: {split: sorted(getattr(data_index(cfg), split).column("path").to_pylist())
                   for split in ("train", "val")}
             for who, cfg in (("teacher", teacher), ("student", student))}
    assert names["student"] == names["teacher"]
    own = data_index(student.replace(val_seed=None))  # what the student's own seed would have drawn
    assert sorted(own.val.column("path").to_pylist()) != names["teacher"]["val"]


def test_the_timing_pass_skips_val_images_the_run_skipped(tmp_path):
    """distill times inference on val images from the unchecked index: an unreadable one (which
    the run skipped) is skipped there too, instead of raising after the student trained."""
    from ensemble.data import scan_layout
    from ensemble.distill import val_pixels
    from ensemble.pixels import load_eval_pixels
    from tests.helpers import write_digits_tree

    data = write_digits_tree(tmp_path / "data", per_class_train=2, per_class_val=2, n_test=1, classes=2)
    index = scan_layout(data)
    paths = index.val.column("path").to_pylist()
    with open(paths[0], "wb") as fh:
        fh.write(b"truncated")
    cfg = build_config(flag_values={"data": data, "output": "/runs/s", "image_size": 16})
    pixels = val_pixels(index, cfg, 2)
    assert pixels.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(pixels[0], load_eval_pixels(paths[1], image_size=16, side=18))
