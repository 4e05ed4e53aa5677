"""Model registry, freezing, weight loading, and the driver's --dry-run / error / --help CLI."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

from ensemble.config import ARCHS, ConfigError
from ensemble.models import (build_model, count_parameters, freeze, load_initial_weights, load_state_dict_file,
                             make_member_model, resolve_weights)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDY_COUNTS = {"total": 81611172, "trainable": 81217956}


def _frozen_prefixes(model):
    """Top-level module names that own at least one frozen parameter."""
    return {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}


def _numel(model, prefixes):
    return sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in prefixes)


# ------------------------------------------------------------------ registry and counts

def test_study_parameter_counts():
    model = build_model("resnext101_64x4d", 100)
    assert model.fc.out_features == 100
    freeze(model, "layer1")
    assert count_parameters(model) == STUDY_COUNTS
    assert _frozen_prefixes(model) == {"layer1"}


def test_resnet18_no_freeze_all_trainable():
    model = build_model("resnet18", 10)
    assert isinstance(model, torchvision.models.ResNet)
    assert model.fc.out_features == 10
    freeze(model, "none")
    counts = count_parameters(model)
    # torchvision's resnet18 has 11,689,512 parameters with 1000 classes; 10 classes: 512*990+990 fewer
    assert counts == {"total": 11689512 - 990 * 513, "trainable": 11689512 - 990 * 513}
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("stage,frozen", [
    ("layer1", {"layer1"}),
    ("layer2", {"layer1", "layer2"}),
    ("layer3", {"layer1", "layer2", "layer3"}),
    ("layer4", {"layer1", "layer2", "layer3", "layer4"}),
    ("stem", {"conv1", "bn1"}),
    ("none", set()),
])
def test_freeze_stages(stage, frozen):
    model = build_model("resnet18", 10)
    freeze(model, stage)
    assert _frozen_prefixes(model) == frozen
    # every parameter of a frozen module is frozen, nothing else is
    for name, p in model.named_parameters():
        assert p.requires_grad == (name.split(".")[0] not in frozen), name
    counts = count_parameters(model)
    assert counts["total"] - counts["trainable"] == _numel(model, frozen)


@pytest.mark.parametrize("stage,frozen", [
    ("none", {"conv1", "bn1"}),
    ("stem", {"conv1", "bn1"}),
    ("layer1", {"conv1", "bn1", "layer1"}),
    ("layer2", {"conv1", "bn1", "layer1", "layer2"}),
])
def test_freeze_stem_adds_the_stem(stage, frozen):
    model = build_model("resnet18", 10)
    freeze(model, stage, freeze_stem=True)
    assert _frozen_prefixes(model) == frozen
    counts = count_parameters(model)
    assert counts["total"] - counts["trainable"] == _numel(model, frozen)


def test_fc_never_frozen():
    model = build_model("resnet18", 10)
    freeze(model, "layer4", freeze_stem=True)
    assert count_parameters(model)["trainable"] == 512 * 10 + 10
    assert all(p.requires_grad for p in model.fc.parameters())


def test_build_model_unknown_arch():
    with pytest.raises(ConfigError, match="--arch"):
        build_model("resnet9000", 10)


def test_registry_covers_every_arch():
    # meta device: builds the graphs without allocating or initialising weights
    with torch.device("meta"):
        for arch in ARCHS:
            model = build_model(arch, 7)
            assert model.fc.out_features == 7, arch
            for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
                assert hasattr(model, name), (arch, name)


# ------------------------------------------------------------------ weights

@pytest.fixture
def resnet18_1000_file(tmp_path):
    torch.manual_seed(1)
    src = torchvision.models.resnet18(weights=None, num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    return str(path), src.state_dict()


def test_resolve_weights_local_file(resnet18_1000_file):
    path, expected = resnet18_1000_file
    state = resolve_weights("resnet18", path)
    assert isinstance(state, dict)
    assert list(state) == list(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
        assert state[k].device.type == "cpu"


def test_load_state_dict_file_unwraps_state_dict_key(tmp_path, resnet18_1000_file):
    _, expected = resnet18_1000_file
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": expected, "epoch": 3}, path)
    state = load_state_dict_file(str(path))
    assert list(state) == list(expected)


def test_load_initial_weights_copies_body_and_reports_head(resnet18_1000_file):
    path, expected = resnet18_1000_file
    state = resolve_weights("resnet18", path)
    torch.manual_seed(2)
    model = build_model("resnet18", 10)
    fc_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc.")}
    left = load_initial_weights(model, state)
    assert left == ["fc.bias", "fc.weight"]
    own = model.state_dict()
    body_keys = [k for k in expected if not k.startswith("fc.")]
    assert len(body_keys) == len(own) - 2
    for k in body_keys:
        assert torch.equal(own[k], expected[k]), k
    for k, v in fc_before.items():
        assert torch.equal(own[k], v), k            # head left at its init
    assert own["fc.weight"].shape == (10, 512)


def test_load_initial_weights_same_head_loads_everything(resnet18_1000_file):
    path, expected = resnet18_1000_file
    model = build_model("resnet18", 1000)
    assert load_initial_weights(model, resolve_weights("resnet18", path)) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_load_initial_weights_none_is_noop():
    model = build_model("resnet18", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_initial_weights(model, None) == []
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_make_member_model_loads_and_freezes(resnet18_1000_file):
    path, expected = resnet18_1000_file
    model = make_member_model("resnet18", 10, resolve_weights("resnet18", path), "layer2")
    assert torch.equal(model.state_dict()["layer3.0.conv1.weight"], expected["layer3.0.conv1.weight"])
    assert _frozen_prefixes(model) == {"layer1", "layer2"}


def test_list_file_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], path)
    with pytest.raises(ConfigError, match="--weights"):
        resolve_weights("resnet18", str(path))


def test_dict_of_non_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "dict.pth"
    torch.save({"a": 1}, path)
    with pytest.raises(ConfigError, match="--weights"):
        resolve_weights("resnet18", str(path))


def test_text_file_is_not_a_state_dict(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("these are not weights\n")
    with pytest.raises(ConfigError, match="--weights"):
        resolve_weights("resnet18", str(path))


def test_other_arch_state_dict_raises(tmp_path):
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    state = resolve_weights("resnet18", str(path))
    model = build_model("resnet18", 10)
    with pytest.raises(ConfigError, match="--weights.*--arch"):
        load_initial_weights(model, state)


def test_bottleneck_state_dict_into_basic_block_raises(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(ConfigError, match="--weights"):
        load_initial_weights(build_model("resnet18", 10), resolve_weights("resnet18", str(path)))


def test_unknown_weights_name_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # "FOO" is certainly not a file here
    with pytest.raises(ConfigError, match="--weights 'FOO'"):
        resolve_weights("resnet18", "FOO")


@pytest.mark.parametrize("name", ["none", "None", "NONE"])
def test_weights_none(name):
    assert resolve_weights("resnet18", name) is None


# ------------------------------------------------------------------ CLI

def _driver(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "ensemble.driver", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_dry_run_study_numbers():
    proc = _driver("--dry-run", "--arch", "resnext101_64x4d", "--num-classes", "100", "--freeze", "layer1")
    assert proc.returncode == 0, proc.stderr
    assert "81,611,172" in proc.stdout
    assert "81,217,956" in proc.stdout
    assert re.search(r"9 x resnext101_64x4d \(100 classes\)", proc.stdout)


def test_cli_bad_value_exits_2_with_one_line():
    proc = _driver("--epochs", "0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error:")
    assert "--epochs" in lines[0]
    assert proc.stdout == ""


FLAGS = ["--data", "--output", "--members", "--arch", "--weights", "--freeze", "--epochs", "--batch-size", "--lr",
         "--image-size", "--augment", "--bootstrap-size", "--gpus-per-member", "--cpus-per-member",
         "--infer-actors", "--infer-batch-size", "--gpus-per-infer-actor", "--seed", "--address",
         "--num-classes", "--dry-run", "--config"]


def test_cli_help_mentions_every_flag():
    proc = _driver("--help")
    assert proc.returncode == 0, proc.stderr
    for flag in FLAGS:
        assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", proc.stdout), flag
