"""The driver on clusters started the way users start them, on this machine (loopback only):

- an autoscaling cluster (Ray's fake multi-node provider) with zero GPU workers: the driver
  joins with ``--address auto``, reads the launcher config a `ray up` head has
  (``~/ray_bootstrap_config.yaml``), and the members' GPU demand makes the autoscaler launch
  GPU worker nodes, on which they train;
- (``ray job submit`` of the driver to a ``ray start --head`` cluster, which succeeds and writes
  its outputs: test_stop_resume.py, after ``ray job stop``.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("ray")

from tests.helpers import RECIPE_FLAGS, RayHead, free_port, ray_env as _env  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE_HEAD_NODE_ID = "f" * 51 + "00000"  # Ray's fake provider gives its head this node id

AUTOSCALING_CONFIG = """\
cluster_name: ensemble-test
max_workers: 2
upscaling_speed: 1.0
idle_timeout_minutes: 5
provider:
  type: fake_multinode
  gcs_address: 127.0.0.1:{port}
  # Simulated nodes share this machine's IP and need no SSH set-up (as Ray's fake example config).
  use_node_id_as_ip: true
  disable_node_updaters: true
  disable_launch_config_check: true
auth:
  ssh_user: ubuntu
head_node_type: ray.head.default
available_node_types:
  ray.head.default:
    resources: {{CPU: 1}}
    node_config: {{}}
    max_workers: 0
  ray.worker.gpu:
    resources: {{CPU: 1, GPU: 1}}
    node_config: {{}}
    min_workers: 0
    max_workers: 2
# The rest of a launcher config, empty: the autoscaler reads these keys.
file_mounts: {{}}
cluster_synced_files: []
file_mounts_sync_continuously: false
rsync_exclude: []
rsync_filter: []
initialization_commands: []
setup_commands: []
head_setup_commands: []
worker_setup_commands: []
head_start_ray_commands: []
worker_start_ray_commands: []
"""


def _driver_args(data, output, *extra):
    return ["-m", "ensemble.driver", "--data", data, "--output", str(output), "--members", "2", "--epochs", "1",
            "--image-size", "16", "--batch-size", "16", "--cpus-per-member", "0.5", "--cpus-per-infer-actor", "0.5",
            "--infer-batch-size", "32", "--seed", "1", *RECIPE_FLAGS, *extra]


def test_autoscaler_adds_gpu_nodes_for_members(tiny_digits, tmp_path, short_tmp):
    port = free_port()
    home = os.path.join(short_tmp, "home")
    os.makedirs(home)
    config = os.path.join(home, "ray_bootstrap_config.yaml")  # where `ray up` leaves it on the head
    with open(config, "w") as fh:
        fh.write(AUTOSCALING_CONFIG.format(port=port))
    env = _env(home, RAY_FAKE_CLUSTER="1", RAY_ADDRESS=f"127.0.0.1:{port}")
    head = RayHead([f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                    f"--autoscaling-config={config}"], env, temp_dir=os.path.join(short_tmp, "ray"),
                   log_path=str(tmp_path / "head.log"))
    try:
        head.wait_ready()
        output = tmp_path / "out"
        proc = subprocess.run([sys.executable, *_driver_args(tiny_digits, output, "--address", "auto")],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
    finally:
        head.stop()
    # GPU members by default (the launcher config offers GPU nodes), two at once, and a line saying so.
    assert "running up to 2 member(s) at once on 3 CPU / 2 GPU (with the nodes its autoscaler may add)" in proc.stderr
    report = json.loads((output / "report.json").read_text())
    assert report["config"]["gpus_per_member"] == 1.0 and report["config"]["gpus_per_infer_actor"] == 1.0
    members = report["members"]
    nodes = [m["node"] for m in members]
    # Each member got a whole (logical) GPU, which only the worker nodes the autoscaler launched
    # have. Which member lands on which node is the autoscaler's business: most runs put one on
    # each of two nodes, but a member that finishes before the second node joins leaves its GPU to
    # the next (seen in CI: both on one node), so the README promises no more than this.
    assert nodes and FAKE_HEAD_NODE_ID not in nodes, nodes
    assert all(m["gpu_ids"] == ["0"] for m in members), [m["gpu_ids"] for m in members]
    assert (output / "predictions.csv").read_text().count("\n") == 26
