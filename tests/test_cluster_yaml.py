"""cluster.yaml: Ray's own schema check (offline), then the choices this project relies on."""

from __future__ import annotations

import copy
import re
import socket
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")
jsonschema = pytest.importorskip("jsonschema")

from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_FAMILIES = ("g4dn.", "g5.", "g6.", "g6e.", "p3.", "p4d.", "p4de.", "p5.")


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a connection (AWS included) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"cluster.yaml validation tried the network: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(scope="module")
def raw() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture
def config(raw) -> dict:
    return yaml.safe_load(raw)


@pytest.fixture
def prepared(config, offline) -> dict:
    """As `ray up` sees it: merged with Ray's AWS defaults, then checked against Ray's schema."""
    cfg = prepare_config(copy.deepcopy(config))
    validate_config(cfg)
    return cfg


def _workers(cfg: dict) -> dict:
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def test_passes_rays_schema_offline(prepared, config, offline):
    validate_config(copy.deepcopy(config))  # the file as written, without defaults, is valid too
    assert prepared["provider"]["type"] == "aws"


def test_a_typo_fails_the_schema(config, offline):
    """The check can fail: `min_worker` is not a key Ray knows."""
    broken = copy.deepcopy(config)
    worker = next(iter(_workers(broken).values()))
    worker["min_worker"] = worker.pop("min_workers")
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def test_gpu_workers_scale_from_zero(config):
    workers = _workers(config)
    assert workers, "no worker node types"
    for name, node_type in workers.items():
        assert node_type["min_workers"] == 0, name
        assert node_type["max_workers"] >= 1, name
        assert node_type["resources"].get("GPU", 0) >= 1, name
        assert node_type["node_config"]["InstanceType"].startswith(GPU_FAMILIES), name
    assert any(t["resources"]["GPU"] == 1 for t in workers.values()), "no single-GPU worker type"
    head = config["available_node_types"][config["head_node_type"]]
    assert not head["resources"].get("GPU") and not head["node_config"]["InstanceType"].startswith(GPU_FAMILIES)


def test_dashboard_stays_on_loopback(raw, prepared):
    assert "0.0.0.0" not in raw
    # Ray's AWS defaults start the head with --dashboard-host=0.0.0.0; ours must replace them.
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert re.findall(r"--dashboard-host[= ](\S+)", head_start) == ["127.0.0.1"]
    assert "8265" not in yaml.safe_dump(prepared["provider"].get("security_group", {}))
    for node_type in prepared["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]  # Ray's group: intra-cluster + SSH only


def test_token_auth_on_every_node(prepared):
    starts = {"head": prepared["head_start_ray_commands"], "worker": prepared["worker_start_ray_commands"]}
    for role, commands in starts.items():
        ray_start = [c for c in commands if "ray start" in c]
        assert len(ray_start) == 1, role
        # `VAR=value ... ray start`: the token mode is among the variables set for that command.
        env = re.search(r"((?:\w+=\S+ )+)ray start", ray_start[0])
        assert env and "RAY_AUTH_MODE=token" in env.group(1).split(), (role, ray_start[0])
    # The token travels from `ray get-auth-token --generate` on this machine to Ray's default path on each node.
    assert prepared["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # Shells on the nodes (ray exec, job entrypoints) also talk to Ray with the token.
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("export RAY_AUTH_MODE=token" in c for c in prepared[key]), key


def test_pinned_ray_image_matches_this_ray(config):
    docker = config["docker"]
    images = [docker["image"], docker["head_image"]]
    for image in images:
        repo, tag = image.split(":")
        assert repo == "rayproject/ray", image  # ray-ml images stopped at Ray 2.49
        assert tag.startswith(f"{ray.__version__}-py"), image
    assert ray.__version__ == "2.60.0"
    assert docker["image"].endswith("-gpu")  # the workers' CUDA image


def test_setup_installs_this_project(prepared):
    mounts = prepared["file_mounts"]
    sources = {remote: local for remote, local in mounts.items() if remote.startswith("~/ensemble-src")}
    for local in sources.values():
        assert (ROOT / local).exists(), local  # run `ray up` from the repository root
    assert sources["~/ensemble-src/pyproject.toml"] == "./pyproject.toml"
    assert sources["~/ensemble-src/ensemble"] == "./ensemble"
    for key in ("head_setup_commands", "worker_setup_commands"):
        installs = [c for c in prepared[key] if "pip install" in c and "ensemble-src" in c]
        assert installs, f"{key} does not install the project"
    # what pip builds needs only these files: the readme pyproject.toml names is among them
    pyproject = (ROOT / "pyproject.toml").read_text()
    readme = re.search(r'^readme\s*=\s*"([^"]+)"', pyproject, re.M).group(1)
    assert f"~/ensemble-src/{readme}" in mounts
