"""The command line: bad flags, and what the package opens to the network. (The bundled demo end to
end, as a user types it on a terminal: tests/test_installed_cluster.py.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_project_opens_nothing_to_all_interfaces():
    """No dashboard_host / 0.0.0.0 anywhere in the package: Ray's loopback default stands."""
    import ensemble

    root = os.path.dirname(ensemble.__file__)
    for name in os.listdir(root):
        if name.endswith(".py"):
            text = open(os.path.join(root, name)).read()
            assert "0.0.0.0" not in text and "dashboard_host" not in text, name


def test_bad_flag_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ensemble.driver", "--lr", "-1", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --lr -1.0: must be > 0"]
    assert not (tmp_path / "o").exists()


def test_val_fraction_without_data_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ensemble.driver", "--val-fraction", "0.2", "--output",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --val-fraction 0.2: needs --data; the bundled digits come with their own val split"]
    assert not (tmp_path / "o").exists()


COMMANDS = ("driver", "predict", "serve", "distill", "export", "tune")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_s_bad_value_is_one_line_and_exit_2(command, signal_handlers, tmp_path, capsys):
    """A value of the wrong type, an unknown flag, a missing required flag: one line on stderr
    naming the flag and where the flags are listed, exit 2; no usage block, nothing on stdout."""
    import importlib

    main = importlib.import_module(f"ensemble.{command}").main
    needed = {"predict": ["--run", "r", "--images", "i"], "serve": ["--run", "r"], "export": ["--run", "r", "--output",
              "o.onnx"], "distill": ["--run", "r", "--output", "o"]}.get(command, ["--output", str(tmp_path / "o")])
    typed = {"serve": ["--port", "eighty"], "predict": ["--infer-actors", "two"],
             "export": ["--output"]}.get(command, ["--seed", "abc"])  # export has no number: a flag without its value
    for argv, words in ((needed + typed, typed[0]), (needed + ["--no-such-flag"], "--no-such-flag"),
                        (needed[2:] if len(needed) > 2 else [], "required")):
        if command in ("driver", "tune") and words == "required":
            continue  # nothing is required there
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, (argv, err)
        assert err.startswith("error: ") and words in err and err.rstrip().endswith(
            f"(the flags: python -m ensemble.{command} --help)"), err
    assert not (tmp_path / "o").exists()


def test_help_shows_the_allowed_values_the_defaults_and_examples(capsys):
    from ensemble.cli import _parser

    text = _parser().format_help()
    for shown in ("--vote {soft,hard}", "--bagging {bootstrap,full}", "--cache-tier {auto,raw,compressed}",
                  "(default 9)", "image cache (decoded once per run):", "examples:\n  python -m ensemble.driver "):
        assert shown in text, shown
    assert "--cache-side" in text.split("image cache (decoded once per run):")[1].split("resources:")[0]
