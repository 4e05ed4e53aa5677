"""Model registry, weight loading and freezing (torch/torchvision only, no Ray)."""

from __future__ import annotations

import os
from typing import Callable, Optional

import torch
import torchvision
from torch import nn

from ensemble.config import ARCHS, ConfigError

# Explicit registry: name -> (builder, weights enum). No models.__dict__ lookups.
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], type]] = {
    name: (torchvision.models.get_model_builder(name), torchvision.models.get_model_weights(name))
    for name in ARCHS
}
STEM = ("conv1", "bn1")
STAGES = ("layer1", "layer2", "layer3", "layer4")


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A randomly initialised model with a ``num_classes`` head."""
    if arch not in _REGISTRY:
        raise ConfigError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    builder, _ = _REGISTRY[arch]
    return builder(weights=None, num_classes=num_classes)


def resolve_weights(arch: str, weights: str) -> Optional[dict]:
    """The initial state dict for ``--weights``: None, or tensors on CPU.

    ``none`` -> None; a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``) -> downloaded
    by torchvision (cached under TORCH_HOME); otherwise a local state-dict file, loaded with
    ``weights_only=True``. Called once by the driver; members receive it via the object store.
    """
    if weights.lower() == "none":
        return None
    if arch not in _REGISTRY:
        raise ConfigError(f"--arch {arch!r}: choose one of {', '.join(ARCHS)}")
    _, enum = _REGISTRY[arch]
    if os.path.exists(weights):
        return load_state_dict_file(weights)
    if os.sep in weights or weights.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise ConfigError(f"--weights {weights}: no such file")
    try:
        entry = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(dict.fromkeys(["DEFAULT", *enum.__members__]))
        raise ConfigError(
            f"--weights {weights!r}: not a file and not a weights name for {arch} ({names}, none)"
        ) from None
    try:
        return entry.get_state_dict(progress=False)
    except Exception as exc:  # network errors come in many types
        raise ConfigError(
            f"--weights {weights}: download failed ({exc.__class__.__name__}); "
            f"put the file under $TORCH_HOME/hub/checkpoints, pass a local file, or use --weights none"
        ) from None


def load_state_dict_file(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--weights {path}: not a loadable state dict ({exc.__class__.__name__})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--weights {path}: expected a dict of tensors (a model state_dict)")
    return state


def load_initial_weights(model: nn.Module, state: Optional[dict]) -> list[str]:
    """Load ``state`` into ``model``, skipping the classifier head when its shape differs.

    Returns the names of the tensors left at their random init (the head, usually). Any other
    mismatch means the file is for another architecture and raises ConfigError.
    """
    if state is None:
        return []
    own = model.state_dict()
    head = {k: v for k, v in state.items() if k.startswith("fc.") and k in own and v.shape != own[k].shape}
    body = {k: v for k, v in state.items() if k not in head}
    missing = [k for k in own if k not in body]
    unexpected = [k for k in body if k not in own]
    wrong = [k for k in body if k in own and body[k].shape != own[k].shape]
    if unexpected or wrong or [k for k in missing if not k.startswith("fc.")]:
        raise ConfigError(
            f"--weights: the state dict does not fit {type(model).__name__} "
            f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} mis-shaped tensors); "
            f"is it for another --arch?")
    model.load_state_dict(body, strict=False)
    return sorted(missing)


def freeze(model: nn.Module, stage: str, *, freeze_stem: bool = False) -> None:
    """Freeze residual stages layer1..``stage`` (and the stem if ``freeze_stem`` or stage=='stem').

    The study's ``layer1`` setting leaves the stem trainable: 81,217,956 of resnext101_64x4d's
    81,611,172 parameters (100 classes) train.
    """
    names: list[str] = []
    if stage == "stem" or freeze_stem:
        names += list(STEM)
    if stage in STAGES:
        names += list(STAGES[: STAGES.index(stage) + 1])
    for name in names:
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)


def count_parameters(model: nn.Module) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}


def make_member_model(arch: str, num_classes: int, initial_state: Optional[dict], freeze_stage: str,
                      freeze_stem: bool = False) -> nn.Module:
    model = build_model(arch, num_classes)
    load_initial_weights(model, initial_state)
    freeze(model, freeze_stage, freeze_stem=freeze_stem)
    return model
