"""Local multi-node clusters (``ray.cluster_utils.Cluster``): members asking for half a GPU spread
over the GPU nodes. (A node lost mid-training, with killed members: test_storm.py.)"""

from __future__ import annotations


import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from ensemble.config import CPU_PRESET, build_config  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


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
