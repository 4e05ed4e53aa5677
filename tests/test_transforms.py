"""The recipe's image transforms (torchvision v2)."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from ensemble.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_resize, eval_transform, train_transform


def _assert_tensor_tail(steps):
    """ToImage -> ToDtype(float32, scale=True) -> Normalize(ImageNet)."""
    assert [type(s) for s in steps] == [v2.ToImage, v2.ToDtype, v2.Normalize]
    assert steps[1].dtype == torch.float32
    assert steps[1].scale is True
    assert list(steps[2].mean) == pytest.approx([0.485, 0.456, 0.406])
    assert list(steps[2].std) == pytest.approx([0.229, 0.224, 0.225])


def _describe(tf):
    """A comparable description of a Compose: step types and their settings."""
    out = []
    for s in tf.transforms:
        attrs = {k: v for k, v in vars(s).items()
                 if not k.startswith("_") and k != "training"}
        out.append((type(s).__name__, repr(sorted(attrs.items()))))
    return out


def test_imagenet_constants():
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


def test_seed_train_transform_steps():
    tf = train_transform(image_size=224, augment="seed")
    assert isinstance(tf, v2.Compose)
    steps = tf.transforms
    assert [type(s) for s in steps[:3]] == [v2.AutoAugment, v2.RandomResizedCrop, v2.RandomHorizontalFlip]
    assert steps[0].policy == v2.AutoAugmentPolicy.IMAGENET
    assert tuple(steps[1].size) == (224, 224)
    assert tuple(steps[1].scale) == (0.08, 1.0)   # torchvision's default, as in the study
    assert steps[2].p == 0.5
    assert len(steps) == 6
    _assert_tensor_tail(steps[3:])


def test_light_train_transform_steps():
    tf = train_transform(image_size=32, augment="light")
    assert isinstance(tf, v2.Compose)
    steps = tf.transforms
    assert len(steps) == 4
    assert type(steps[0]) is v2.RandomResizedCrop
    assert tuple(steps[0].size) == (32, 32)
    assert tuple(steps[0].scale) == (0.6, 1.0)
    assert not any(isinstance(s, (v2.AutoAugment, v2.RandomHorizontalFlip)) for s in steps)
    _assert_tensor_tail(steps[1:])


@pytest.mark.parametrize("size", [32, 64, 224])
def test_none_train_transform_is_eval(size):
    tf = train_transform(image_size=size, augment="none")
    assert isinstance(tf, v2.Compose)
    assert _describe(tf) == _describe(eval_transform(image_size=size))


def test_unknown_augment_raises():
    with pytest.raises(ValueError, match="augment"):
        train_transform(image_size=32, augment="heavy")


@pytest.mark.parametrize("size,resize", [(224, 256), (32, 37), (64, 73), (16, 18)])
def test_eval_resize(size, resize):
    assert eval_resize(size) == resize == round(size * 256 / 224)


@pytest.mark.parametrize("size,resize", [(224, 256), (32, 37), (64, 73)])
def test_eval_transform_steps(size, resize):
    tf = eval_transform(image_size=size)
    assert isinstance(tf, v2.Compose)
    steps = tf.transforms
    assert len(steps) == 5
    assert type(steps[0]) is v2.Resize
    assert list(steps[0].size) == [resize]      # shorter side, aspect kept
    assert type(steps[1]) is v2.CenterCrop
    assert tuple(steps[1].size) == (size, size)
    _assert_tensor_tail(steps[2:])


def _noise_image(w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("augment", ["seed", "light", "none", "eval"])
def test_transforms_give_float32_chw(size, augment):
    tf = eval_transform(image_size=size) if augment == "eval" else train_transform(image_size=size, augment=augment)
    torch.manual_seed(0)
    for w, h in [(100, 60), (40, 90), (size, size)]:
        out = tf(_noise_image(w, h))
        assert isinstance(out, torch.Tensor)
        assert out.dtype == torch.float32
        assert tuple(out.shape) == (3, size, size)


def test_normalization_of_mean_coloured_image_is_near_zero():
    rgb = tuple(int(round(m * 255)) for m in IMAGENET_MEAN)  # (124, 116, 104)
    img = Image.new("RGB", (50, 40), rgb)
    out = eval_transform(image_size=32)(img)
    assert tuple(out.shape) == (3, 32, 32)
    # rounding to whole pixel values moves at most 0.5/255/std
    assert out.abs().max().item() < 0.01


def test_normalization_values_exact_for_black_and_white():
    black = eval_transform(image_size=16)(Image.new("RGB", (20, 20), (0, 0, 0)))
    white = eval_transform(image_size=16)(Image.new("RGB", (20, 20), (255, 255, 255)))
    for c in range(3):
        expect_black = -IMAGENET_MEAN[c] / IMAGENET_STD[c]
        expect_white = (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(black[c], torch.full((16, 16), expect_black), atol=1e-5)
        assert torch.allclose(white[c], torch.full((16, 16), expect_white), atol=1e-5)


def test_eval_transform_center_crops():
    # left half black, right half white, 2:1 wide: the centre crop keeps both halves equally
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, 64:] = 255
    out = eval_transform(image_size=32)(Image.fromarray(arr))
    left, right = out[:, :, :14], out[:, :, 18:]
    assert (left < 0).all() and (right > 0).all()
