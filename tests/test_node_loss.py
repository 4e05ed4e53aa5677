"""Local multi-node clusters (``ray.cluster_utils.Cluster``): members asking for half a GPU are
planned two to a GPU and spread over the GPU nodes. (A node lost mid-training, with killed
members: test_storm.py.)"""

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


def test_half_gpu_members_spread_over_gpu_nodes(gpu_cluster, tiny_digits, tmp_path, caplog):
    """Four members asking 0.5 GPU on two one-GPU nodes: four slots planned at once (two share each
    GPU), each member gets its node's GPU 0 and trains on CPU (torch sees no CUDA). Whether the
    epochs of two members on one GPU overlap in time is the scheduler's business, not asserted."""
    import logging

    from ensemble.driver import run

    caplog.set_level(logging.INFO, logger="ensemble.driver")
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
    assert "running up to 4 member(s) at once" in caplog.text  # two slots per GPU
    assert [m["gpu_ids"] for m in report["members"]] == [["0"]] * 4
    assert all(m["device"] == "cpu" for m in report["members"])
    assert report["config"]["gpus_per_member"] == 0.5
    # The voters followed the members onto GPUs, which only the worker nodes have.
    assert report["config"]["gpus_per_infer_actor"] == 1.0
    assert (tmp_path / "out" / "predictions.csv").read_text().count("\n") == 26
