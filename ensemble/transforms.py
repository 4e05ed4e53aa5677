"""Image transforms of the recipe, as small keyword-only builders (torchvision v2)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from ensemble.config import EVAL_RESIZES, resize_side

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# How the eval transform brings an image to R x R before the centre crop:
#   squash      the study's Resize((S, S)) -> Resize(R): aspect ratio NOT kept, the crop trims only a border
#   short-side  Resize(R) on the short side: aspect ratio kept, the long side cropped
# (EVAL_RESIZES, the choices, live in config.py beside the --eval-resize flag they validate)


def _check_resize(resize: str) -> None:
    if resize not in EVAL_RESIZES:
        raise ValueError(f"resize {resize!r}: choose {' or '.join(EVAL_RESIZES)}")


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(*, image_size: int, resize: str = "squash") -> v2.Compose:
    """``squash``: Resize((S, S)) -> Resize((R, R)) -> CenterCrop(S) -> tensor -> Normalize.
    ``short-side``: Resize(R) on the short side -> CenterCrop(S) -> tensor -> Normalize.

    R = ``resize_side(S)``. ``squash`` is the study's evaluation at any S; its two resamplings are
    kept on purpose (one Resize((R, R)) gives different pixels).
    """
    return v2.Compose([*eval_steps(image_size=image_size, resize=resize), *_to_normalized_tensor()])


def eval_steps(*, image_size: int, resize: str = "squash") -> list:
    """The eval transform's geometry (PIL in, PIL out): what ``pixels.eval_pixels`` applies."""
    _check_resize(resize)
    r = resize_side(image_size)
    if resize == "squash":
        steps = [v2.Resize((image_size, image_size)), v2.Resize((r, r))]
    else:
        steps = [v2.Resize(r)]
    return [*steps, v2.CenterCrop(image_size)]


def train_transform(*, image_size: int, augment: str, resize: str = "squash") -> v2.Compose:
    """``seed``: AutoAugment(ImageNet) -> RandomResizedCrop(S) -> RandomHorizontalFlip.
    ``light``: RandomResizedCrop(S, scale=(0.6, 1)) only, for data that flips would corrupt.
    ``none``: the eval transform with this ``resize`` (checked for every ``augment``).
    """
    _check_resize(resize)
    if augment == "seed":
        steps = [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), v2.RandomResizedCrop(image_size),
                 v2.RandomHorizontalFlip()]
    elif augment == "light":
        steps = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0))]
    elif augment == "none":
        return eval_transform(image_size=image_size, resize=resize)
    else:
        raise ValueError(f"augment {augment!r}: choose seed, light or none")
    return v2.Compose([*steps, *_to_normalized_tensor()])
