"""A node lost mid-training: its member restarts on another node and resumes from its checkpoint."""

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
