"""The scores package is numpy alone: importing every module of it loads neither torch nor Ray."""

from __future__ import annotations

import subprocess
import sys


def test_scores_package_loads_neither_torch_nor_ray():
    code = ("import sys, pkgutil, importlib, ensemble.scores as s\n"
            "names = [m.name for m in pkgutil.iter_modules(s.__path__)]\n"
            "for n in names: importlib.import_module('ensemble.scores.' + n)\n"
            "print(','.join(sorted(names)))\n"
            "print(','.join(sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules)))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules, loaded = out.stdout.splitlines()
    assert set(modules.split(",")) >= {"vote", "metrics", "calibration", "selection", "scoring"}
    assert loaded == "", f"importing ensemble.scores loaded {loaded}"
