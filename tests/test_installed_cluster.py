"""The package as a cluster node gets it: cluster.yaml's own install command, run here.

The files `ray up` copies to a node (cluster.yaml's ``file_mounts`` under ``~/ensemble-src``) go to
a HOME of the test's own; the install command of cluster.yaml's ``setup_commands``, as written,
installs them (a plain, non-editable `pip install`) into a fresh virtual environment. That
environment reaches this one's dependencies through a .pth file (no second torch download), but
not this checkout: every command runs outside it, so `ensemble` is imported from what the wheel
installed. From it, a `ray start` head and a second node (one CPU each) run the bundled demo both
ways a cluster user does: `ray job submit` without `--working-dir`, and `python -m
ensemble.driver` in a shell on the head (what `ray exec` runs). Then a third node joins in a mount
namespace of its own, where a tmpfs hides a folder the other nodes see: a run whose --output and
--data lie there is refused in one line before anything is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")

from tests.helpers import RECIPE_FLAGS, RayHead, free_port, ray_env, run_on_a_terminal, write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# The bundled demo, kept as small as the assertions allow: two members (one per node), one epoch.
DEMO = ["--members", "2", "--epochs", "1"]
ENSEMBLE_AT = "ensemble imported from"


@pytest.fixture(scope="module")
def installed():
    """A HOME with cluster.yaml's file mounts and a fresh environment its install command filled."""
    short = tempfile.mkdtemp(prefix="ens-", dir="/tmp")  # Ray's socket paths stay under 108 bytes
    try:
        home, work, venv = Path(short, "home"), Path(short, "work"), Path(short, "env")
        work.mkdir()
        env = ray_env(str(home))
        config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
        for remote, local in config["file_mounts"].items():  # what `ray up` rsyncs to the node
            if remote.startswith("~/ensemble-src"):
                target, source = home / remote[2:], ROOT / local
                target.parent.mkdir(parents=True, exist_ok=True)
                if source.is_dir():
                    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(source, target)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
        packages = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
        # this environment's dependencies, as plain paths: its .pth files (the editable install of
        # this checkout among them) are not read from there
        (packages / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
        # `pip` and `ray` as their console scripts run them, with the fresh environment's python
        # (pip installs into that environment; its own copy would take ensurepip 7 s)
        for command, module in (("pip", "pip._internal.cli.main"), ("ray", "ray.scripts.scripts")):
            (venv / "bin" / command).write_text(
                f"#!{venv}/bin/python\nimport sys\nfrom {module} import main\nsys.exit(main())\n")
            (venv / "bin" / command).chmod(0o755)
        installs = [c for c in config["setup_commands"] if "pip install" in c and "ensemble-src" in c]
        assert len(installs) == 1, config["setup_commands"]
        env["PATH"] = f"{venv}/bin{os.pathsep}{env['PATH']}"  # `pip` and `python` are the node's
        # The command as written; what it builds and installs is this project's own packaging. Its
        # dependencies (and the build backend) are this environment's: pip neither resolves them
        # again (10 s) nor installs setuptools into a build environment of its own (8 s).
        env_install = {**env, "PIP_NO_DEPS": "1", "PIP_NO_BUILD_ISOLATION": "0"}  # pip's spelling of "off"
        proc = subprocess.run(["bash", "-c", installs[0]], env=env_install, cwd=work, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        yield {"short": Path(short), "home": home, "work": work, "venv": venv, "packages": packages, "env": env}
    finally:
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(installed):
    short, env = installed["short"], installed["env"]
    port, dashboard = free_port(), free_port()
    ray_cli = str(installed["venv"] / "bin" / "ray")
    nodes = [RayHead([f"--port={port}", "--num-cpus=1", f"--dashboard-port={dashboard}",
                      "--dashboard-host=127.0.0.1"], env, temp_dir=str(short / "head"), cli=ray_cli,
                     cwd=installed["work"], log_path=str(short / "head.log"))]
    try:
        nodes[0].wait_ready()
        nodes.append(RayHead(["--num-cpus=1"], env, temp_dir=str(short / "n2"), join=f"127.0.0.1:{port}",
                             cli=ray_cli, cwd=installed["work"], log_path=str(short / "n2.log")))
        nodes[1].wait_ready()
        info = {**installed, "address": f"127.0.0.1:{port}", "jobs": f"http://127.0.0.1:{dashboard}", "ray": ray_cli,
                "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"}, "nodes": nodes}
        _wait_for_nodes(info, 2)
        yield info
    finally:
        for node in reversed(nodes):
            node.stop()


def _wait_for_nodes(cluster: dict, count: int, timeout_s: float = 60) -> None:
    """Until the cluster's state API lists ``count`` alive nodes (a node registers after its start)."""
    token = (cluster["home"] / ".ray" / "auth_token").read_text().strip()
    request = urllib.request.Request(f"{cluster['jobs']}/api/v0/nodes?limit=100",
                                     headers={"Authorization": f"Bearer {token}"})
    deadline, alive = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                rows = json.load(response)["data"]["result"]["result"]
            alive = sum(r.get("state") == "ALIVE" for r in rows)
            if alive == count:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the cluster has {alive} alive node(s), not {count}, after {timeout_s} s")


def _demo_ran_on_both_nodes(cluster: dict, output: Path, log: str) -> None:
    assert f"{ENSEMBLE_AT} {cluster['packages'] / 'ensemble' / '__init__.py'}" in log, log[-3000:]
    assert "checking that the cluster's 2 nodes see --output" in log, log[-3000:]  # the storage check ran
    report = json.loads((output / "report.json").read_text())
    assert len({m["node"] for m in report["members"]}) == 2, report["members"]  # one CPU each: one per node
    # the bundled demo (its CPU preset, each node's own copy of the digits), and real learning:
    # ten classes after one epoch, well above chance (0.1)
    assert (report["config"]["arch"], report["config"]["image_size"]) == ("resnet18", 16)
    assert report["data"]["class_names"] == [str(c) for c in range(10)]
    assert (report["data"]["train"], report["data"]["val"], report["data"]["test"]) == (1078, 359, 360)
    assert report["ensemble"]["val_acc"] > 0.3, report["ensemble"]
    test_images = cluster["home"] / ".cache" / "ensemble" / "digits-v1" / "test"
    assert (output / "predictions.csv").read_text().count("\n") == 1 + len(os.listdir(test_images))


def _where_from() -> str:
    return f"python -c 'import ensemble; print(\"{ENSEMBLE_AT}\", ensemble.__file__)'"


def test_the_demo_runs_as_a_job_submitted_without_working_dir(cluster):
    output = cluster["short"] / "job-out"
    entrypoint = f"{_where_from()} && python -m ensemble.driver --output {output} {' '.join(DEMO)}"
    for _ in range(30):  # the head's job agent may still be registering: Ray answers "try again later"
        proc = subprocess.run([cluster["ray"], "job", "submit", "--address", cluster["jobs"], "--", "bash", "-c",
                               entrypoint],
                              env=cluster["env"], cwd=cluster["work"], capture_output=True, text=True, timeout=600)
        if proc.returncode == 0 or "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "succeeded" in log, log[-4000:]
    _demo_ran_on_both_nodes(cluster, output, log)


def test_the_demo_runs_from_a_shell_on_the_head_with_its_progress_bars(cluster):
    """What `ray exec cluster.yaml "python -m ensemble.driver ..."` runs, or a user in `ray attach`:
    a shell on the head, its PATH the node's environment, RAY_ADDRESS naming the cluster (a `ray up`
    head finds its own); on a terminal, so each member's epoch shows as a bar (Ray's distributed
    tqdm: the member on the other node too). (Piped, as in CI's log, the driver draws none:
    test_stop_resume.py's resubmitted job.)"""
    output = cluster["short"] / "exec-out"
    shown = run_on_a_terminal(["bash", "-c", f"{_where_from()} && python -m ensemble.driver --output {output} "
                                             f"{' '.join(DEMO)}"], {**cluster["env"], "ENSEMBLE_PROGRESS": ""},
                              cwd=str(cluster["work"]), timeout_s=600)
    _demo_ran_on_both_nodes(cluster, output, shown)
    assert "ensemble (soft vote)" in shown and "mean of members" in shown, shown[-3000:]
    for member in (0, 1):  # a bar that reached its end, for each member
        assert f"member {member} epoch 1/1: 100%|" in shown, shown[-3000:]
    assert "batch/s" in shown
    # The images fit the cache, so each member votes as it finishes: no voter pool, no dataset's bar.
    assert "soft vote        each member as it finishes" in shown and "Running Dataset" not in shown
    assert "outputs in" in shown


def test_a_node_that_cannot_see_output_and_data_is_refused_before_anything_is_written(cluster):
    """A third node whose mount namespace hides ``hidden/`` under a tmpfs (as a node without the
    NFS mount the others have): both paths named in one line, exit 2, no folder made."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to start a node in a mount namespace of its own")
    short, hidden = cluster["short"], cluster["short"] / "hidden"
    data = write_digits_tree(hidden / "data", per_class_train=4, per_class_val=2, n_test=4, classes=2)
    # the node's view: `hidden/` is an empty tmpfs there; the other nodes (and the driver) see the data
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
              f"mount -t tmpfs tmpfs {hidden} && exec \"$@\"", "sh"]
    blind = RayHead(["--num-cpus=1"], cluster["env"], temp_dir=str(short / "n3"), join=cluster["address"],
                    cli=cluster["ray"], prefix=prefix, cwd=cluster["work"], log_path=str(short / "n3.log"))
    try:
        blind.wait_ready()
        _wait_for_nodes(cluster, 3)
        output = hidden / "out"
        proc = subprocess.run([str(cluster["venv"] / "bin" / "python"), "-m", "ensemble.driver", "--data", data,
                               "--output", str(output), *DEMO, *RECIPE_FLAGS], env=cluster["env"],
                              cwd=cluster["work"], capture_output=True, text=True, timeout=600)
    finally:
        blind.stop()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-4000:]
    assert len(errors) == 1, proc.stderr[-4000:]
    line = errors[0]
    assert re.match(rf"error: --output {output} and --data {data} are not visible from node [\d.]+ \(id \w{{8}}\): "
                    rf"the file the driver just wrote in it is not there; {data}/train/class_0/img\d+\.png is not "
                    rf"there \(members there would keep their files on that node's own disk\); ", line), line
    assert line.endswith("use s3://BUCKET/PREFIX, or a folder that every node mounts at the same path"), line
    assert "Traceback" not in proc.stderr
    assert not output.exists()  # nothing written: not even the marker's folder is left
    assert sorted(os.listdir(hidden)) == ["data"]
