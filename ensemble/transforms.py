"""Image transforms of the recipe, as small keyword-only builders (torchvision v2)."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize(image_size: int) -> int:
    """The study resizes to 256 before a 224 crop; keep that ratio at other sizes."""
    return round(image_size * 256 / 224)


def _to_normalized_tensor() -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def eval_transform(*, image_size: int) -> v2.Compose:
    """Resize(round(S*256/224)) -> CenterCrop(S) -> tensor -> Normalize."""
    return v2.Compose([v2.Resize(eval_resize(image_size)), v2.CenterCrop(image_size),
                       *_to_normalized_tensor()])


def train_transform(*, image_size: int, augment: str) -> v2.Compose:
    """``seed``: AutoAugment(ImageNet) -> RandomResizedCrop(S) -> RandomHorizontalFlip.
    ``light``: RandomResizedCrop(S, scale=(0.6, 1)) only, for data that flips would corrupt.
    ``none``: the eval transform.
    """
    if augment == "seed":
        steps = [v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET), v2.RandomResizedCrop(image_size),
                 v2.RandomHorizontalFlip()]
    elif augment == "light":
        steps = [v2.RandomResizedCrop(image_size, scale=(0.6, 1.0))]
    elif augment == "none":
        return eval_transform(image_size=image_size)
    else:
        raise ValueError(f"augment {augment!r}: choose seed, light or none")
    return v2.Compose([*steps, *_to_normalized_tensor()])
