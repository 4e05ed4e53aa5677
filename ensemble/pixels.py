"""The recipe's transforms as uint8 pixel work, and the float input the model sees.

CPU work ends at uint8 (H, W, 3) pixels: decode, resize, augment. The cast to float, the
ImageNet normalisation and channels_last happen where the model runs (``model_input``, on the
GPU for GPU members), so a batch crosses processes and the PCIe bus at a quarter of its float32
size.

Every random draw of the train augmentation comes from a numpy ``Generator`` made per image from
(epoch seed, the image's place in the epoch), never from torch's global generator: any number of
threads can augment a member's batches and the pixels are the same on every run, and a row drawn
twice by the bootstrap gets two independent draws.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import numpy as np
from PIL import Image

from ensemble.config import resize_side

CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop aspect ratio range
CROP_SCALES = {"seed": (0.08, 1.0), "light": (0.6, 1.0)}  # its area range per --augment
# The most pixels the eval geometry may resize an image to before its centre crop. Only
# --eval-resize short-side can pass it (its size depends on the aspect ratio alone: a 4,000,000 x 10
# strip would become 102,400,000 x 256): 40 MP allows an aspect ratio of ~600:1 at S = 224.
MAX_RESIZED_PIXELS = 40_000_000


# The most pixels a train image may keep (at short side ``side`` or below, aspect kept) as a
# multiple of side x side, what the cache estimates an image at: a 60000 x 100 strip would keep
# 6 megapixels (18 MB) against an estimate of 0.2. 16 allows an aspect ratio of 16:1.
MAX_TRAIN_PIXELS_FACTOR = 16


class ImageTooLarge(ValueError):
    """An image that would decode, or resize, to more pixels than allowed (checked before the work)."""


def _resize_short(img: Image.Image, side: int) -> Image.Image:
    """torchvision's Resize(side) on a PIL image: the short side to ``side``, the long side to
    int(side * long / short), bilinear (PIL antialiases); an image of that size already is kept."""
    w, h = img.size
    short, long = min(w, h), max(w, h)
    size = (side, int(side * long / short)) if w <= h else (int(side * long / short), side)
    return img if size == img.size else img.resize(size, Image.BILINEAR)


def shrink(img: Image.Image, side: int) -> np.ndarray:
    """(H, W, 3) uint8 with the short side at most ``side`` (aspect kept; smaller images as they are)."""
    return np.array(_resize_short(img, side) if min(img.size) > side else img)


def check_train_size(width: int, height: int, *, side: int) -> None:
    """ImageTooLarge when a train image kept at short side ``side`` (smaller ones as they are: see
    ``shrink``) would hold more than MAX_TRAIN_PIXELS_FACTOR x side x side pixels, before any pixel is made."""
    short, long = min(width, height), max(width, height)
    if not short:
        return
    kept = (side, int(side * long / short)) if short > side else (short, long)
    if kept[0] * kept[1] > MAX_TRAIN_PIXELS_FACTOR * side * side:
        raise ImageTooLarge(f"image is {width} x {height} pixels: kept for training at {kept[0]} x {kept[1]} "
                            f"({kept[0] * kept[1] / 1e6:.1f} megapixels, over {MAX_TRAIN_PIXELS_FACTOR} x {side} x "
                            f"{side}: an aspect ratio past {MAX_TRAIN_PIXELS_FACTOR}:1); crop it")


def check_eval_size(width: int, height: int, *, image_size: int, resize: str) -> None:
    """ImageTooLarge when the eval geometry would resize a ``width`` x ``height`` image to more than
    MAX_RESIZED_PIXELS (a short-side resize of an extreme aspect ratio), before any pixel is made."""
    if resize != "short-side" or not width or not height:
        return
    r, short, long = resize_side(image_size), min(width, height), max(width, height)
    if r * int(r * long / short) > MAX_RESIZED_PIXELS:
        raise ImageTooLarge(f"image is {width} x {height} pixels: --eval-resize short-side would resize it to "
                            f"{r} x {int(r * long / short)} ({r * int(r * long / short) / 1e6:.1f} megapixels, over "
                            f"{MAX_RESIZED_PIXELS / 1e6:g}); crop it, or use --eval-resize squash")


def eval_pixels(img: Image.Image, *, image_size: int, resize: str = "squash") -> np.ndarray:
    """The eval transform's geometry on a decoded image -> (S, S, 3) uint8: exactly the pixels
    ``transforms.eval_transform`` normalises (its PIL steps, reproduced without torch, so the
    image cache's decode tasks start without importing it; tests compare the two).
    ImageTooLarge for an image ``check_eval_size`` refuses."""
    s, r = image_size, resize_side(image_size)
    check_eval_size(*img.size, image_size=image_size, resize=resize)
    if resize == "squash":
        img = img.resize((s, s), Image.BILINEAR).resize((r, r), Image.BILINEAR)
    elif resize == "short-side":
        img = _resize_short(img, r)
    else:
        raise ValueError(f"resize {resize!r}: choose squash or short-side")
    w, h = img.size  # torchvision's CenterCrop offsets
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return np.array(img.crop((left, top, left + s, top + s)))


def load_eval_pixels(path: str, *, image_size: int, resize: str = "squash", side: Optional[int] = None) -> np.ndarray:
    """One image file (a local path or ``s3://...``) -> (S, S, 3) uint8: the pixels predict, serve
    and the run's own vote give its members for that file. Decoded as ``data.read_image`` decodes
    (RGB; a JPEG far larger than needed at a reduced scale, never below ``side``), then
    ``eval_pixels``. Pass the run's ``image_size``, ``eval_resize`` and ``side`` =
    ``config.cache_side`` of its config; a file written by ``python -m ensemble.export`` records
    them in its metadata (``image_size``, ``eval_resize``, ``decode_side``), and takes a batch of
    these stacked, (N, S, S, 3). ImageTooLarge as ``eval_pixels``; PIL's errors as they are."""
    from ensemble.data import read_image  # data imports this module

    return eval_pixels(read_image(path, min_size=side or image_size), image_size=image_size, resize=resize)


def crop_box(height: int, width: int, scale: tuple, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w), torchvision's algorithm with numpy draws: 10 tries at
    an area share in ``scale`` and a log-uniform aspect ratio, else the central crop."""
    area = height * width
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < CROP_RATIO[0]:
        w, h = width, int(round(width / CROP_RATIO[0]))
    elif in_ratio > CROP_RATIO[1]:
        h, w = height, int(round(height * CROP_RATIO[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


class Augmenter:
    """The train augmentation of ``--augment`` seed | light on one (H, W, 3) uint8 image.

    seed:  AutoAugment (ImageNet policy) -> RandomResizedCrop(S) -> RandomHorizontalFlip
    light: RandomResizedCrop(S, scale=(0.6, 1))
    The operations are torchvision's (its AutoAugment policy table and ops, ``resized_crop``,
    ``horizontal_flip`` on PIL images); only the draws come from ``rng``. ``none`` trains on the
    eval pixels and needs no augmenter.
    """

    def __init__(self, *, image_size: int, augment: str):
        from torchvision.transforms import v2

        if augment not in CROP_SCALES:
            raise ValueError(f"augment {augment!r}: the augmenter does seed or light")
        self.size, self.augment, self.scale = image_size, augment, CROP_SCALES[augment]
        self.auto = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET) if augment == "seed" else None

    def __call__(self, pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        from torchvision.transforms.v2 import functional as F

        img = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
        if self.auto is not None:
            img = self._auto_augment(img, rng)
        top, left, h, w = crop_box(img.height, img.width, self.scale, rng)
        img = F.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if self.auto is not None and rng.random() < 0.5:
            img = F.horizontal_flip(img)
        return np.asarray(img)

    def _auto_augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """torchvision's ``AutoAugment.forward`` with the draws from ``rng``: one sub-policy of
        two ops, each applied with its probability, signed magnitudes mirrored half the time."""
        auto = self.auto
        policy = auto._policies[int(rng.integers(len(auto._policies)))]
        for op, probability, magnitude_bin in policy:
            if not rng.random() <= probability:
                continue
            magnitudes_fn, signed = auto._AUGMENTATION_SPACE[op]
            magnitudes = magnitudes_fn(10, img.height, img.width)
            magnitude = 0.0
            if magnitudes is not None:
                magnitude = float(magnitudes[magnitude_bin])
                if signed and rng.random() <= 0.5:
                    magnitude = -magnitude
            img = auto._apply_image_or_video_transform(img, op, magnitude, interpolation=auto.interpolation,
                                                       fill=auto._fill)
        return img


def image_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the image at ``position`` in an epoch whose seed is ``seed``."""
    return np.random.default_rng([seed, position])


@lru_cache(maxsize=8)
def _mean_std(device):
    import torch

    from ensemble.transforms import IMAGENET_MEAN, IMAGENET_STD

    return (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1))


def model_input(images, device):
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) on ``device``, scaled and normalised as torchvision's
    ToDtype(scale=True) -> Normalize(ImageNet) (same operations, same order). On CUDA the result
    is channels_last (a permuted (B, H, W, 3) batch already is); on CPU contiguous."""
    import torch

    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"model_input takes uint8 (B, H, W, 3) batches, got {images.dtype} {tuple(images.shape)}")
    mean, std = _mean_std(device)
    x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).to(torch.float32).mul_(1.0 / 255)
    x = x.sub_(mean).div_(std)
    if device.type == "cuda":
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()
