"""Local multi-node clusters (``ray.cluster_utils.Cluster``): members asking for half a GPU spread
over the GPU nodes, and a node lost mid-training: its member restarts on another node and
resumes from its checkpoint."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from ensemble.config import CPU_PRESET, build_config  # noqa: E402
from tests.conftest import write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture
def cluster():
    # A head without CPUs (it runs only the driver), and two worker nodes for the member and its data.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def _record(output):
    try:
        return json.load(open(os.path.join(output, "members", "member-0", "checkpoint.json")))
    except (OSError, ValueError):
        return None


def test_member_survives_losing_its_node(cluster, tmp_path):
    from ensemble.driver import run

    cluster, nodes = cluster
    data = write_digits_tree(tmp_path / "data", per_class_train=40, per_class_val=8, n_test=10, classes=4)
    cfg = build_config(flag_values={**CPU_PRESET, "data": data, "output": str(tmp_path / "out"), "members": 1,
                                    "epochs": 3, "image_size": 48, "batch_size": 16, "cpus_per_member": 1.0,
                                    "cpus_per_infer_actor": 0.5, "infer_batch_size": 32, "seed": 5})
    result = {}
    thread = threading.Thread(target=lambda: result.update(report=run(cfg)), daemon=True)
    thread.start()
    deadline = time.time() + 300
    while (_record(str(tmp_path / "out")) or {}).get("epoch") != 1:
        assert time.time() < deadline and thread.is_alive(), "member 0 never finished epoch 1"
        time.sleep(0.05)
    lost_node = _record(str(tmp_path / "out"))["node"]
    victim = [n for n in nodes if n.node_id == lost_node]
    assert victim, "the member should run on a worker node (the head has no CPUs)"
    cluster.remove_node(victim[0])
    thread.join(timeout=400)
    assert not thread.is_alive()
    member = result["report"]["members"][0]
    assert member["resumed_after_epochs"] == [1]
    assert [h["epoch"] for h in member["history"]] == [1, 2, 3]
    assert member["node"] != lost_node


@pytest.fixture
def gpu_cluster():
    # A CPU-only head (the driver) and two worker nodes with one logical GPU each; torch sees no
    # CUDA, so the members train on CPU wherever Ray places them.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_half_gpu_members_spread_over_gpu_nodes(gpu_cluster, tiny_digits, tmp_path):
    from ensemble.driver import run

    cluster, nodes = gpu_cluster
    cfg = build_config(flag_values={**CPU_PRESET, "data": tiny_digits, "output": str(tmp_path / "out"), "members": 4,
                                    "epochs": 1, "image_size": 16, "batch_size": 16, "gpus_per_member": 0.5,
                                    "cpus_per_member": 0.5, "cpus_per_infer_actor": 0.5, "infer_batch_size": 32,
                                    "seed": 2})
    report = run(cfg)
    placed = [m["node"] for m in report["members"]]
    gpu_nodes = {n.node_id for n in nodes}
    # Two members fill one GPU (0.5 each): so two members on each GPU node, none on the head.
    assert set(placed) == gpu_nodes and sorted(placed.count(n) for n in gpu_nodes) == [2, 2], placed
    assert all(m["gpu_ids"] for m in report["members"])
    # The voters followed the members onto GPUs, which only the worker nodes have.
    assert report["config"]["gpus_per_infer_actor"] == 1.0
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") == 26
