"""The hyperparameter search (ensemble.tune): pure selection rules, one real ASHA search on tiny
real images on a local 2-CPU cluster, and bad input."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from ensemble.config import CPU_PRESET, build_config
from ensemble.trials import best_config_values, pick_best, summarize_trial, trials_csv
from ensemble.tune import FREEZE_CHOICES, LR_RANGE, main, settings_from_argv
from tests.helpers import write_digits_tree

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TRIALS, MAX_EPOCHS = 4, 2


# ---------------------------------------------------------------- pure

def _row(trial_id, lr, accs, *, max_epochs=3, failed=False):
    history = [{"epoch": e + 1, "val_acc": a} for e, a in enumerate(accs)]
    return summarize_trial(trial_id, {"lr": lr, "freeze": "none"}, history, max_epochs=max_epochs, failed=failed)


def test_trial_row_takes_the_earliest_epoch_of_its_best_val_acc():
    row = _row("a_00000", 1e-4, [0.5, 0.75, 0.75])
    assert (row["best_epoch"], row["best_val_acc"], row["epochs_reached"], row["status"]) == (2, 0.75, 3, "completed")
    assert _row("a_00001", 1e-4, [0.5])["status"] == "stopped"
    assert _row("a_00002", 1e-4, [], failed=True)["best_epoch"] is None


def test_best_trial_is_highest_val_acc_then_fewer_epochs_then_earlier_trial():
    rows = [_row("a_00000", 1e-5, [0.5, 0.6]), _row("a_00001", 2e-5, [0.6]),
            _row("a_00002", 3e-5, [0.4, 0.6]), _row("a_00003", 4e-5, [], failed=True)]
    assert pick_best(rows)["lr"] == 2e-5          # 0.6 at epoch 1 beats 0.6 at epoch 2
    rows.append(_row("a_00004", 5e-5, [0.6]))
    assert pick_best(rows)["lr"] == 2e-5          # same score: the earlier trial
    rows.append(_row("a_00005", 6e-5, [0.1, 0.2, 0.9]))
    assert pick_best(rows)["lr"] == 6e-5


def test_trials_csv_keeps_lr_exact():
    rows = [_row("a_00000", 1.2076665792328143e-05, [0.5])]
    parsed = list(csv.DictReader(io.StringIO(trials_csv(rows))))
    assert float(parsed[0]["lr"]) == 1.2076665792328143e-05 and parsed[0]["best_epoch"] == "1"


def test_defaults_without_data_are_the_cpu_preset():
    base, search = settings_from_argv(["--output", "o"])
    assert (base.arch, base.weights, base.image_size, base.augment) == ("resnet18", "none", 16, "light")
    assert search.max_epochs == CPU_PRESET["epochs"] and (search.lr_min, search.lr_max) == LR_RANGE


def test_best_config_omits_data_for_the_bundled_digits_and_keeps_config_file_keys(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("members: 5\ncpus-per-member: 1\noutput: runs/x\n")
    base, search = settings_from_argv(["--config", str(cfg_file), "--output", "o"])
    values = best_config_values(base, {"lr": 3e-4, "freeze": "layer2", "best_epoch": 3}, data=None,
                                carried_keys=search.carried_keys)
    assert "data" not in values and "output" not in values
    assert (values["members"], values["cpus_per_member"]) == (5, 1.0)
    assert (values["lr"], values["freeze"], values["epochs"], values["arch"]) == (3e-4, "layer2", 3, "resnet18")


@pytest.mark.parametrize("argv, message", [
    (["--trials", "0"], "error: --trials 0: must be >= 1"),
    (["--lr-min", "1e-2", "--lr-max", "1e-3"], "error: --lr-min 0.01 --lr-max 0.001: lr-min must be below lr-max"),
    (["--gpus-per-trial", "1.5"], "error: --gpus-per-trial 1.5: each actor uses one GPU; to use more GPUs, run more "
                                  "of them at 1 GPU each (e.g. --members), or share GPUs with a fraction (0.5)"),
    (["--trials", "many"], "error: argument --trials: invalid int value: 'many' (the flags: python -m ensemble.tune "
                           "--help)"),
    (["--lr", "1e-3"], "error: unrecognized arguments: --lr 1e-3 (the flags: python -m ensemble.tune --help)"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [message]
    assert not (tmp_path / "o").exists()


def test_cli_bad_data_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ensemble.tune", "--data", str(tmp_path / "nope"),
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --data {tmp_path / 'nope'}: no such folder"]
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- a real search on Ray

@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_digits_tree(tmp_path_factory.mktemp("tune_digits"), per_class_train=10, per_class_val=4,
                             n_test=4, classes=3)


# Before the search below: a finished search's trials may still print (Ray forwards their lines
# to this process's stderr a moment later), which this one-line check would read as its own.
def test_no_gpus_in_the_cluster_is_one_line_and_exit_2(ray_cluster, data_root, tmp_path, capsys):
    assert main(["--data", data_root, "--output", str(tmp_path / "o"), "--arch", "resnet18", "--weights", "none",
                 "--gpus-per-trial", "0.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --gpus-per-trial 0.5 but the cluster has no GPUs; use --gpus-per-trial 0"]
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def search(ray_cluster, data_root, tmp_path_factory):
    """One 4-trial ASHA search, 2 epochs at most, 16 px images on CPU: (output folder, printed text).
    Each trial takes both CPUs, so the trials run one after another in their sampled order and
    ASHA's decisions do not depend on which finished first; seed 5's first trial scores highest
    at epoch 1 (0.75 against 0.42, 0.42 and 0.33 on this machine), so the later ones are stopped."""
    output = tmp_path_factory.mktemp("tune_out") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["--data", data_root, "--output", str(output), "--trials", str(TRIALS),
                   "--max-epochs", str(MAX_EPOCHS), "--image-size", "16", "--batch-size", "8", "--arch", "resnet18",
                   "--weights", "none", "--augment", "light", "--cpus-per-trial", "2", "--seed", "5"])
    assert rc == 0
    return output, printed.getvalue()


def _trials(output):
    with open(output / "trials.csv") as fh:
        return list(csv.DictReader(fh))


def test_best_config_is_accepted_by_the_driver(search, data_root):
    from ensemble.cli import config_from_argv

    output, _ = search
    values = yaml.safe_load((output / "best_config.yaml").read_text())
    cfg = build_config(file_values=values)
    assert (cfg.arch, cfg.weights, cfg.image_size, cfg.augment, cfg.batch_size) == ("resnet18", "none", 16, "light", 8)
    assert cfg.data == os.path.abspath(data_root)
    assert LR_RANGE[0] <= cfg.lr <= LR_RANGE[1] and cfg.freeze in FREEZE_CHOICES and 1 <= cfg.epochs <= MAX_EPOCHS
    # ... and through the driver's own command line, as `--config OUT/best_config.yaml`
    driver_cfg, _, _ = config_from_argv(["--config", str(output / "best_config.yaml")])
    assert (driver_cfg.lr, driver_cfg.freeze, driver_cfg.epochs) == (cfg.lr, cfg.freeze, cfg.epochs)


def test_best_config_is_the_trial_with_the_highest_val_acc(search):
    output, printed = search
    rows = _trials(output)
    assert len(rows) == TRIALS and len({r["trial_id"] for r in rows}) == TRIALS
    # highest val acc; ties: fewer epochs, then the earlier trial
    best = max(enumerate(rows), key=lambda kr: (float(kr[1]["best_val_acc"]), -int(kr[1]["best_epoch"]), -kr[0]))[1]
    values = yaml.safe_load((output / "best_config.yaml").read_text())
    assert values["lr"] == float(best["lr"])
    assert (values["freeze"], values["epochs"]) == (best["freeze"], int(best["best_epoch"]))
    assert "<- best" in printed and "best config:" in printed


def test_asha_stops_only_trials_that_another_trial_beat(search):
    output, _ = search
    rows = _trials(output)
    for r in rows:
        assert r["status"] in ("completed", "stopped")
        assert 1 <= int(r["best_epoch"]) <= int(r["epochs_reached"]) <= MAX_EPOCHS
        assert (r["status"] == "completed") == (int(r["epochs_reached"]) == MAX_EPOCHS)
    # The first trial to reach a rung is never stopped there, so one trial always trains to the end.
    assert any(r["status"] == "completed" for r in rows)
    # ASHA's rule at its one rung (epoch 1; reduction factor 2): a trial stops when its val accuracy
    # is below the median of the trials that reached the rung before it, here the earlier trials.
    trials = json.loads((output / "tune_report.json").read_text())["trials"]
    assert [t["trial_id"] for t in trials] == [r["trial_id"] for r in rows] == sorted(r["trial_id"] for r in rows)
    first_epoch = [t["history"][0]["val_acc"] for t in trials]
    expected = ["stopped" if k and first_epoch[k] < np.median(first_epoch[:k]) else "completed"
                for k in range(len(trials))]
    assert [t["status"] for t in trials] == expected
    assert expected.count("stopped") >= 1, first_epoch  # the search above must stop one, or this checks nothing


def test_trials_sample_the_search_space(search):
    output, _ = search
    rows = _trials(output)
    assert all(LR_RANGE[0] <= float(r["lr"]) <= LR_RANGE[1] and r["freeze"] in FREEZE_CHOICES for r in rows)
    assert len({r["lr"] for r in rows}) == TRIALS
