"""The recipe's image transforms (torchvision v2)."""

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_image
from torchvision import transforms as T
from torchvision.transforms import v2

from ensemble.config import resize_side
from ensemble.transforms import (EVAL_RESIZES, IMAGENET_MEAN, IMAGENET_STD, eval_transform,
                                 train_transform)


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
@pytest.mark.parametrize("resize", EVAL_RESIZES)
def test_none_train_transform_is_eval(size, resize):
    tf = train_transform(image_size=size, augment="none", resize=resize)
    assert isinstance(tf, v2.Compose)
    assert _describe(tf) == _describe(eval_transform(image_size=size, resize=resize))


def test_none_train_transform_defaults_to_squash():
    assert _describe(train_transform(image_size=32, augment="none")) == \
        _describe(eval_transform(image_size=32, resize="squash"))


def test_unknown_augment_raises():
    with pytest.raises(ValueError, match="augment"):
        train_transform(image_size=32, augment="heavy")


def test_eval_resizes():
    assert EVAL_RESIZES == ("squash", "short-side")


@pytest.mark.parametrize("build", [
    lambda resize: eval_transform(image_size=32, resize=resize),
    lambda resize: train_transform(image_size=32, augment="none", resize=resize),
    lambda resize: train_transform(image_size=32, augment="seed", resize=resize),  # checked even if unused
])
@pytest.mark.parametrize("bad", ["crop", "Squash", "short_side", "", None])
def test_unknown_resize_raises(build, bad):
    with pytest.raises(ValueError, match=r"resize .*: choose squash or short-side"):
        build(bad)


@pytest.mark.parametrize("size,resize", [(224, 256), (32, 37), (64, 73), (16, 18)])
def test_resize_side(size, resize):
    assert resize_side(size) == resize == round(size * 256 / 224)


@pytest.mark.parametrize("size,resize", [(224, 256), (32, 37), (64, 73)])
def test_short_side_eval_transform_steps(size, resize):
    tf = eval_transform(image_size=size, resize="short-side")
    assert isinstance(tf, v2.Compose)
    steps = tf.transforms
    assert len(steps) == 5
    assert type(steps[0]) is v2.Resize
    assert list(steps[0].size) == [resize]      # shorter side, aspect kept
    assert type(steps[1]) is v2.CenterCrop
    assert tuple(steps[1].size) == (size, size)
    _assert_tensor_tail(steps[2:])


@pytest.mark.parametrize("size,resize", [(224, 256), (32, 37), (64, 73)])
def test_squash_eval_transform_steps(size, resize):
    tf = eval_transform(image_size=size)        # squash is the default
    steps = tf.transforms
    assert [type(s) for s in steps[:3]] == [v2.Resize, v2.Resize, v2.CenterCrop]
    assert list(steps[0].size) == [size, size]  # both sides: aspect ratio not kept
    assert list(steps[1].size) == [resize, resize]
    assert tuple(steps[2].size) == (size, size)
    assert len(steps) == 6
    _assert_tensor_tail(steps[3:])


def _noise_image(w, h, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("augment", ["seed", "light", "none", "eval-squash", "eval-short-side"])
def test_transforms_give_float32_chw(size, augment):
    if augment.startswith("eval-"):
        tf = eval_transform(image_size=size, resize=augment.removeprefix("eval-"))
    else:
        tf = train_transform(image_size=size, augment=augment)
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


@pytest.mark.parametrize("resize", EVAL_RESIZES)
def test_eval_transform_center_crops(resize):
    # left half black, right half white, 2:1 wide: the centre crop keeps both halves equally
    arr = np.zeros((64, 128, 3), np.uint8)
    arr[:, 64:] = 255
    out = eval_transform(image_size=32, resize=resize)(Image.fromarray(arr))
    left, right = out[:, :, :14], out[:, :, 18:]
    assert (left < 0).all() and (right > 0).all()


# --- values against torchvision's own (v1) composition of the study's eval transform ---------
#
# Our v2 builders get PIL images (ensemble.data.read_image), and v2 resizes a PIL image with
# PIL, as v1 does, so the pixels match; only ToTensor's divide vs ToDtype's scale differs in
# the last float bit (max |diff| ~7e-7 after Normalize).


def _v1_squash(size):
    return T.Compose([T.Resize((size, size)), T.Resize(resize_side(size)), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _v1_short_side(size):
    return T.Compose([T.Resize(resize_side(size)), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _china(w, h):
    """scikit-learn's sample photo (640x427), resized small: a real, smooth, non-square image."""
    return Image.fromarray(load_sample_image("china.jpg")).resize((w, h), Image.BILINEAR)


NON_SQUARE = {
    "noise-300x200": lambda: _noise_image(300, 200, seed=0),
    "noise-200x300": lambda: _noise_image(200, 300, seed=1),
    "china-320x214": lambda: _china(320, 214),
    "china-150x225": lambda: _china(150, 225),
}


@pytest.mark.parametrize("resize", ["squash", "short-side"])
@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("name", NON_SQUARE)
def test_eval_transform_matches_torchvision_v1(resize, size, name):
    img = NON_SQUARE[name]()
    ours = eval_transform(image_size=size, resize=resize)(img)
    ref = {"squash": _v1_squash, "short-side": _v1_short_side}[resize](size)(img)
    assert ours.shape == ref.shape == (3, size, size)
    torch.testing.assert_close(ours.as_subclass(torch.Tensor), ref, atol=1e-5, rtol=0)


def test_squash_at_32_is_resize_32_then_37():
    # spelled out: Resize((32, 32)) -> Resize(37) -> CenterCrop(32)
    img = _china(320, 214)
    ref = T.Compose([T.Resize((32, 32)), T.Resize(37), T.CenterCrop(32),
                     T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(img)
    torch.testing.assert_close(eval_transform(image_size=32)(img).as_subclass(torch.Tensor), ref,
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("name", NON_SQUARE)
def test_squash_and_short_side_differ_on_non_square(size, name):
    img = NON_SQUARE[name]()
    squash = eval_transform(image_size=size, resize="squash")(img)
    short = eval_transform(image_size=size, resize="short-side")(img)
    # not a rounding difference: whole regions of the picture move
    assert (squash - short).abs().mean().item() > 0.05


@pytest.mark.parametrize("size", [224, 32])
@pytest.mark.parametrize("img", [lambda s: _noise_image(s, s, seed=2), lambda s: _china(s, s)])
def test_squash_and_short_side_agree_on_square(size, img):
    # An S x S image: squashing to (S, S) is a no-op, so both are Resize to R -> CenterCrop(S).
    # (A square image of another size differs by squash's extra resampling, as in the study.)
    img = img(size)
    squash = eval_transform(image_size=size, resize="squash")(img)
    short = eval_transform(image_size=size, resize="short-side")(img)
    torch.testing.assert_close(squash, short, atol=1e-5, rtol=0)
