"""The Python API's arguments and errors, before anything runs: the command line's flags as keywords,
refused with the command's own error class and line. (The API on a finished run, its docstring's
example included: test_pipeline_ray.py; every run the tests share is made by ``ensemble.train``.)"""

from __future__ import annotations

import subprocess
import sys

import pytest

import ensemble
from ensemble.errors import ConfigError


def test_import_ensemble_stays_light():
    """A notebook's first cell: no torch, Ray or pandas until a function needs them."""
    code = ("import sys, ensemble; heavy = [m for m in ('torch', 'ray', 'pandas', 'pyarrow') if m in sys.modules]; "
            "print(heavy, callable(ensemble.train), callable(ensemble.load))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.strip() == "[] True True"
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        ensemble.trian


@pytest.mark.parametrize("flags, keywords", [
    (["--members", "0"], {"members": 0}),
    (["--image-size", "4096"], {"image_size": 4096}),
    (["--arch", "resnet9"], {"arch": "resnet9"}),
    (["--lr", "2"], {"lr": 2.0}),
    (["--cache-share", "1.5"], {"cache_share": 1.5}),
])
def test_a_bad_keyword_is_the_commands_error_and_line(flags, keywords, tmp_path, capsys):
    """The expected line is the command's own, as it prints it; the API raises it before writing."""
    from ensemble.driver import main

    data = tmp_path / "data"  # never read: the config is refused first
    assert main(["--data", str(data), "--output", str(tmp_path / "cli"), *flags]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "\n" not in line, line
    with pytest.raises(ConfigError) as raised:
        ensemble.train(data=str(data), output=tmp_path / "api", **keywords)
    assert f"error: {raised.value}" == line
    assert not (tmp_path / "api").exists() and not (tmp_path / "cli").exists()


def test_a_keyword_that_is_no_flag_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"ensemble.train: unknown argument 'image_szie' \(python -m "
                                          r"ensemble.driver has no --image-szie\); known: .*image_size"):
        ensemble.train(output=str(tmp_path / "out"), image_szie=32)
    with pytest.raises(ConfigError, match=r"--fresh 'yes': must be true or false"):
        ensemble.train(output=str(tmp_path / "out"), fresh="yes")
    assert not (tmp_path / "out").exists()


def test_load_refuses_a_folder_without_a_run_as_predict_does(tmp_path, capsys):
    from ensemble.predict import main

    (tmp_path / "images").mkdir()
    assert main(["--run", str(tmp_path), "--images", str(tmp_path / "images"), "--output", str(tmp_path / "o")]) == 2
    line = capsys.readouterr().err.strip()
    with pytest.raises(ConfigError) as raised:
        ensemble.load(str(tmp_path))
    assert f"error: {raised.value}" == line and "no readable run.json" in line


def test_a_distill_keyword_the_command_lacks_is_refused_before_loading(tmp_path):
    run = ensemble.Run(str(tmp_path / "no-run"))  # never read: the keyword is refused first
    with pytest.raises(ConfigError, match=r"Run.distill: unknown argument 'members' \(python -m ensemble.distill "
                                          r"has no --members\)"):
        run.distill(str(tmp_path / "student"), members=3)
    with pytest.raises(ConfigError, match=r"--speed-images 2000: must be from 0 to 1024"):
        run.distill(str(tmp_path / "student"), speed_images=2000)
    assert not (tmp_path / "student").exists()
