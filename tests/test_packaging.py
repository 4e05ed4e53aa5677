"""The wheel a user installs holds the whole package: every module of the source tree.

`pip install .` (and cluster.yaml's nodes, and a Docker image) install the wheel, not the
checkout; a subpackage the build leaves out (ensemble.scores was once) only shows as an
ImportError on a node. The installed package run end to end, outside the checkout, on a cluster
of two nodes: test_installed_cluster.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_module_of_the_source_tree(tmp_path):
    src = tmp_path / "src"  # a copy: a build in the checkout would leave build/ and *.egg-info there
    shutil.copytree(ROOT / "ensemble", src / "ensemble", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-cache-dir", "-q", "-w", str(tmp_path / "dist"), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    wheels = list((tmp_path / "dist").glob("ensemble-*.whl"))
    assert len(wheels) == 1, wheels
    shipped = set(zipfile.ZipFile(wheels[0]).namelist())
    modules = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "ensemble").rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert "ensemble/scores/vote.py" in modules  # the tree has subpackages: the check is not vacuous
    missing = [m for m in modules if m not in shipped]
    assert missing == [], f"the wheel leaves out {missing}"
