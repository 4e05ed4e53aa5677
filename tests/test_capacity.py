"""How the driver sizes GPU use and member slots from the cluster: fixed, or autoscaling with the
node types of a `ray up` head's config. Pure: no Ray cluster."""

from __future__ import annotations

import pytest

from ensemble.cluster import (Capacity, member_window, node_types_from_launcher_config, resolve_gpus,
                              resolve_resources, slot_members, slot_name)
from ensemble.config import CPU_PRESET, ConfigError, build_config

LAPTOP = Capacity(nodes=({"CPU": 2.0},))
ONE_GPU_BOX = Capacity(nodes=({"CPU": 8.0, "GPU": 1.0},))
# A CPU head and up to three single-GPU workers of 4 CPUs, none running yet.
AUTOSCALING = Capacity(nodes=({"CPU": 2.0},), node_types=(({"CPU": 4.0, "GPU": 1.0}, 3),))


def _cfg(**values):
    return build_config(preset=CPU_PRESET, flag_values=values)


def test_capacity_counts_nodes_and_what_the_autoscaler_may_add():
    assert AUTOSCALING.most("GPU") == 3.0 and AUTOSCALING.most("CPU") == 14.0
    assert AUTOSCALING.largest("GPU") == 1.0 and AUTOSCALING.largest("CPU") == 4.0
    assert AUTOSCALING.autoscaling and not LAPTOP.autoscaling and not ONE_GPU_BOX.autoscaling
    assert LAPTOP.most("GPU") == 0.0 and LAPTOP.largest("GPU") == 0.0


@pytest.mark.parametrize("capacity, expected", [(LAPTOP, 0.0), (ONE_GPU_BOX, 1.0), (AUTOSCALING, 1.0)])
def test_auto_gpus_follow_what_the_cluster_has_or_can_add(capacity, expected):
    assert resolve_gpus(None, capacity, "gpus-per-member") == expected


def test_auto_for_voters_follows_gpu_members():
    assert resolve_gpus(None, LAPTOP, "gpus-per-infer-actor", auto=1.0) == 1.0
    assert resolve_gpus(0.0, AUTOSCALING, "gpus-per-infer-actor", auto=1.0) == 0.0


def test_explicit_gpus_checked_against_launchable_nodes():
    assert resolve_gpus(0.5, AUTOSCALING, "gpus-per-member") == 0.5  # no GPU node yet: the autoscaler adds one
    with pytest.raises(ConfigError, match=r"^--gpus-per-member 2 but the largest node has 1 GPU\(s\); "
                                          r"use --gpus-per-member 1 or less$"):
        resolve_gpus(2.0, AUTOSCALING, "gpus-per-member")
    with pytest.raises(ConfigError, match=r"^--gpus-per-member 0.5 but the cluster has no GPUs; "
                                          r"use --gpus-per-member 0$"):
        resolve_gpus(0.5, LAPTOP, "gpus-per-member")
    cpu_only = Capacity(nodes=({"CPU": 2.0},), node_types=(({"CPU": 8.0}, 4),))
    with pytest.raises(ConfigError, match="no GPUs and its autoscaler cannot add any"):
        resolve_gpus(1.0, cpu_only, "gpus-per-member")


def test_member_window_fills_the_cpus_members_decode_on_their_own():
    assert member_window(_cfg(members=9, cpus_per_member=0.5), LAPTOP, 0.0) == 4
    assert member_window(_cfg(members=9, cpus_per_member=1.0), LAPTOP, 0.0) == 2
    assert member_window(_cfg(members=9, cpus_per_member=2.0), LAPTOP, 0.0) == 1
    assert member_window(_cfg(members=1, cpus_per_member=0.5), LAPTOP, 0.0) == 1


def test_member_window_counts_gpus_the_autoscaler_can_add():
    # 3 launchable GPUs at 0.5 per member: 6 at once, though no GPU node runs yet.
    assert member_window(_cfg(members=9, cpus_per_member=1.0), AUTOSCALING, 0.5) == 6
    assert member_window(_cfg(members=9, cpus_per_member=1.0), ONE_GPU_BOX, 0.25) == 4
    assert member_window(_cfg(members=9, cpus_per_member=4.0), ONE_GPU_BOX, 0.25) == 2  # CPU-bound


def test_slots_deal_members_round_robin():
    assert slot_members([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert slot_members([3], 4) == [[3]]
    assert slot_members([], 2) == []
    assert slot_name([3]) == "ensemble-member-3" and slot_name([0, 2, 4]) == "ensemble-members-0-2-4"
    assert slot_name(list(range(1, 1000, 2))) == "ensemble-members-1-3-5-...-999"  # 500 members: a short name


def test_node_types_from_a_launcher_config(tmp_path):
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(
        "max_workers: 4\nhead_node_type: head\navailable_node_types:\n"
        "  head: {resources: {CPU: 2}, node_config: {}, max_workers: 0}\n"
        "  gpu1: {resources: {CPU: 4, GPU: 1}, node_config: {}, min_workers: 0, max_workers: 8}\n"
        "  gpu4: {resources: {CPU: 48, GPU: 4}, node_config: {}, min_workers: 0, max_workers: 2}\n"
        "  off: {resources: {CPU: 4, GPU: 1}, node_config: {}, max_workers: 0}\n")
    assert node_types_from_launcher_config(str(path)) == (({"CPU": 4.0, "GPU": 1.0}, 4),
                                                          ({"CPU": 48.0, "GPU": 4.0}, 2))
    assert node_types_from_launcher_config(str(tmp_path / "missing.yaml")) == ()


def test_this_projects_cluster_yaml_offers_gpu_workers():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    types = node_types_from_launcher_config(os.path.join(root, "cluster.yaml"))
    assert types and all(r.get("GPU", 0) >= 1 for r, _ in types)


ONE_CPU = Capacity(nodes=({"CPU": 1.0},))


def test_default_cpus_per_member_shrink_to_the_largest_node():
    """The study's defaults (2 CPUs per member, 2 voters of 1 CPU) on 1- and 2-CPU machines: every
    actor fits, so nothing waits for a CPU that will never exist."""
    one = resolve_resources(build_config(), ONE_CPU)
    assert (one.cpus_per_member, one.infer_actors, one.gpus_per_member, one.gpus_per_infer_actor) == (1.0, 1, 0.0, 0.0)
    assert member_window(one, ONE_CPU, 0.0) == 1
    two = resolve_resources(build_config(), LAPTOP)
    assert (two.cpus_per_member, two.infer_actors) == (2.0, 2)
    assert member_window(two, LAPTOP, 0.0) == 1
    big = resolve_resources(build_config(), AUTOSCALING)  # launchable 4-CPU GPU nodes
    assert (big.cpus_per_member, big.gpus_per_member, big.gpus_per_infer_actor) == (2.0, 1.0, 1.0)


def test_explicit_cpus_no_node_has_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"^--cpus-per-member 2 but the largest node has 1 CPU\(s\); "
                                          r"use --cpus-per-member 1 or less$"):
        resolve_resources(build_config(flag_values={"cpus_per_member": 2.0}), ONE_CPU)
    with pytest.raises(ConfigError, match=r"^--cpus-per-infer-actor 3 but the largest node has 2 CPU"):
        resolve_resources(build_config(flag_values={"cpus_per_infer_actor": 3.0}), LAPTOP)


def test_smallest_store_is_the_smallest_node_that_can_train():
    """The image cache must fit on every node that trains (each reads all of it): the 0-CPU head's
    store does not count while a node with CPUs exists."""
    cluster = Capacity(nodes=({"CPU": 0.0, "object_store_memory": 1e9},
                              {"CPU": 4.0, "object_store_memory": 8e9},
                              {"CPU": 2.0, "GPU": 1.0, "object_store_memory": 3e9}))
    assert cluster.smallest_store() == (3e9, "the smallest node's")
    assert Capacity(nodes=({"CPU": 0.0, "object_store_memory": 2e9},)).smallest_store()[0] == 2e9
    assert Capacity(nodes=()).smallest_store()[0] == 0.0


def test_smallest_store_counts_the_node_types_an_autoscaler_may_add():
    """A fresh `ray up` cluster is its head alone when the cache is sized: the GPU workers that will
    train join later, and their stores count. `ray up` fills in a worker type's "memory" (70% of its
    RAM), so its store is Ray's default 30%: cluster.yaml's g5.xlarge workers (16 GiB) get ~5.2 GB,
    under the m5.2xlarge head's ~10 GB (32 GiB). A type that declares no memory is left out."""
    head = {"CPU": 8.0, "object_store_memory": 0.3 * 32 * 2**30}
    g5 = ({"CPU": 4.0, "GPU": 1.0, "memory": 0.7 * 16 * 2**30}, 10)
    store, whose = Capacity(nodes=(head,), node_types=(g5,)).smallest_store()
    assert whose == "the smallest launchable node type's" and store == pytest.approx(0.3 * 16 * 2**30)
    declared = ({"CPU": 4.0, "object_store_memory": 1e9}, 2)
    assert Capacity(nodes=(head,), node_types=(g5, declared)).smallest_store()[0] == 1e9
    assert Capacity(nodes=(head,), node_types=(({"CPU": 4.0, "GPU": 1.0}, 10),)).smallest_store() == (
        0.3 * 32 * 2**30, "the smallest node's")
