"""uint8 pixel work: the eval transform's exact pixels, the seeded augmenter, the float input the
model sees, and a member's threaded batches (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from ensemble.batches import SplitImages, batches
from ensemble.config import resize_side
from ensemble.pixels import (CROP_SCALES, Augmenter, crop_box, eval_pixels, image_rng, model_input,
                             shrink)
from ensemble.transforms import eval_transform, train_transform


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth non-square RGB image (gradients + noise), like a photo's content."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("resize", ["squash", "short-side"])
@pytest.mark.parametrize("size", [(500, 375), (300, 640), (64, 64)])
def test_eval_pixels_then_model_input_is_torchvisions_eval_transform_exactly(resize, size):
    img = _photo(*size)
    ours = model_input(torch.from_numpy(eval_pixels(img, image_size=224, resize=resize))[None], torch.device("cpu"))[0]
    theirs = eval_transform(image_size=224, resize=resize)(img).as_subclass(torch.Tensor)
    assert torch.equal(ours, theirs)


def test_model_input_refuses_float_or_chw_batches():
    with pytest.raises(ValueError, match="uint8"):
        model_input(torch.zeros(2, 3, 8, 8), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        model_input(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.device("cpu"))


def test_shrink_keeps_the_aspect_and_never_enlarges():
    assert shrink(_photo(500, 375), 256).shape == (256, 341, 3)   # torchvision Resize(256) on the short side
    assert shrink(_photo(300, 640), 256).shape == (546, 256, 3)
    assert shrink(_photo(40, 30), 256).shape == (30, 40, 3)       # smaller than the side: as it is
    assert resize_side(224) == 256 and resize_side(16) == 18


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (300, 641), (257, 256)])
def test_shrink_is_torchvisions_resize_exactly(size):
    from torchvision.transforms.v2 import functional as F

    img = _photo(*size)
    np.testing.assert_array_equal(shrink(img, 256), np.asarray(F.resize(img, 256)))


def test_crop_box_follows_random_resized_crop():
    """Areas within the scale range, aspect ratios within 3/4..4/3, the box inside the image."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        h_img, w_img = int(rng.integers(20, 400)), int(rng.integers(20, 400))
        top, left, h, w = crop_box(h_img, w_img, CROP_SCALES["seed"], rng)
        assert 0 <= top and top + h <= h_img and 0 <= left and left + w <= w_img
        assert h > 0 and w > 0
    # A fallback is the central crop at the allowed ratio nearest the image's.
    never = np.random.default_rng(1)
    top, left, h, w = crop_box(10, 1000, (0.99, 1.0), never)  # 100:1 panorama: no try can fit
    assert (h, w) == (10, 13) and left == (1000 - 13) // 2 and top == 0
    rng = np.random.default_rng(2)
    ratios = []
    for _ in range(2000):
        _, _, h, w = crop_box(1000, 1000, CROP_SCALES["light"], rng)
        ratios.append(w / h)
        assert 0.6 * 1e6 * 0.98 <= h * w <= 1e6
    assert math.log(min(ratios)) == pytest.approx(math.log(3 / 4), abs=0.05)
    assert math.log(max(ratios)) == pytest.approx(math.log(4 / 3), abs=0.05)


@pytest.mark.parametrize("augment", ["seed", "light"])
def test_augmenter_is_a_function_of_its_generator(augment):
    src = shrink(_photo(500, 375), 256)
    aug = Augmenter(image_size=224, augment=augment)
    a = aug(src, image_rng(7, 3))
    assert a.shape == (224, 224, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, aug(src, image_rng(7, 3)))
    assert not np.array_equal(a, aug(src, image_rng(7, 4)))  # another place in the epoch
    assert not np.array_equal(a, aug(src, image_rng(8, 3)))  # another epoch


def test_augmenter_uses_torchvisions_ops():
    """With the draws pinned, the output is torchvision's own resized_crop (+ flip) of the image."""
    from torchvision.transforms.v2 import functional as F

    src = shrink(_photo(500, 375), 256)
    rng = image_rng(1, 0)
    top, left, h, w = crop_box(src.shape[0], src.shape[1], CROP_SCALES["light"], image_rng(1, 0))
    ours = Augmenter(image_size=64, augment="light")(src, rng)
    theirs = np.asarray(F.resized_crop(Image.fromarray(src), top, left, h, w, [64, 64], antialias=True))
    np.testing.assert_array_equal(ours, theirs)


def test_seed_recipe_statistics_match_torchvision():
    """The seeded AutoAugment -> crop -> flip and torchvision's transform give images of the same
    mean brightness and spread on average (each over 300 draws of one photo)."""
    img = _photo(320, 240, seed=3)
    ours = Augmenter(image_size=64, augment="seed")
    theirs = train_transform(image_size=64, augment="seed")
    torch.manual_seed(0)
    a = np.stack([ours(np.asarray(img), image_rng(0, k)) for k in range(300)]).astype(np.float64) / 255
    b = np.stack([(theirs(img).permute(1, 2, 0).numpy() * np.array([0.229, 0.224, 0.225])
                   + np.array([0.485, 0.456, 0.406])) for _ in range(300)])
    assert a.mean() == pytest.approx(b.mean(), abs=0.03)
    assert a.std() == pytest.approx(b.std(), abs=0.03)


def _images(tmp_path, n=7):
    paths = []
    for k in range(n):
        path = tmp_path / f"img{k}.jpg"
        _photo(60 + 10 * k, 40 + 5 * k, seed=k).save(path, quality=90)
        paths.append(str(path))
    table = pa.table({"id": pa.array(np.arange(n, dtype=np.int64)), "path": paths,
                      "label": pa.array(np.arange(n, dtype=np.int64) % 3)})
    return SplitImages(table, None, image_size=32, resize="squash", side=resize_side(32))


def test_batches_are_the_same_for_any_number_of_threads(tmp_path):
    images = _images(tmp_path)
    rows = np.array([3, 1, 3, 0, 6, 5, 3, 2])  # bootstrap rows: 3 drawn three times
    one = list(batches(images, rows, batch_size=3, augment="seed", seed=11, threads=1))
    four = list(batches(images, rows, batch_size=3, augment="seed", seed=11, threads=4))
    assert [len(b["id"]) for b in one] == [3, 3, 2]
    for a, b in zip(one, four):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["id"], b["id"])
    flat = np.concatenate([b["image"] for b in one])
    assert flat.dtype == np.uint8 and flat.shape == (8, 32, 32, 3)
    # A row drawn three times gets three independent draws.
    assert not np.array_equal(flat[0], flat[2]) and not np.array_equal(flat[2], flat[6])
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in one]), rows % 3)


def test_eval_batches_are_the_eval_pixels_in_order(tmp_path):
    images = _images(tmp_path)
    out = list(batches(images, batch_size=4, threads=2))
    np.testing.assert_array_equal(np.concatenate([b["id"] for b in out]), np.arange(7))
    for k, pixels in enumerate(np.concatenate([b["image"] for b in out])):
        with Image.open(images.paths[k]) as img:
            np.testing.assert_array_equal(pixels, eval_pixels(img.convert("RGB"), image_size=32))


def test_short_side_resize_of_an_extreme_aspect_ratio_is_refused_before_any_pixel_is_made(tmp_path):
    """A 6200 x 10 strip (a few hundred bytes as PNG) would resize to 256 x 158720 under
    --eval-resize short-side at S = 224: refused by every path that decodes it (the server's
    decode, the image check, the cache's decode task) in one line, never allocated."""
    from ensemble.data import ImageTooLarge, decode_image
    from ensemble.image_cache import decode_chunk
    from ensemble.image_check import check_batch
    from ensemble.pixels import MAX_RESIZED_PIXELS, check_eval_size

    strip = Image.new("RGB", (6200, 10), (200, 30, 30))
    expected = (r"^image is 6200 x 10 pixels: --eval-resize short-side would resize it to 256 x 158720 "
                r"\(40\.6 megapixels, over 40\); crop it, or use --eval-resize squash$")
    with pytest.raises(ImageTooLarge, match=expected):
        eval_pixels(strip, image_size=224, resize="short-side")
    assert eval_pixels(strip, image_size=224, resize="squash").shape == (224, 224, 3)  # squash: S x S first
    check_eval_size(6000, 10, image_size=224, resize="short-side")  # 256 x 153600 fits
    assert 256 * 153600 <= MAX_RESIZED_PIXELS < 256 * 158720
    path = tmp_path / "strip.png"
    strip.save(path)
    with pytest.raises(ImageTooLarge, match=expected):
        decode_image(path.read_bytes(), image_size=224, resize="short-side")  # the server answers it 400
    checked = check_batch({"split": np.array(["test"]), "id": np.array([0]), "path": np.array([str(path)])},
                          image_size=224, resize="short-side")
    assert checked["ok"].tolist() == [False] and checked["reason"][0].startswith("ImageTooLarge: image is 6200 x 10")
    check, _, _ = decode_chunk([str(path)], image_size=224, resize="short-side", side=256, keep_train=True)
    assert check["ok"].tolist() == [False] and check["reason"][0] == checked["reason"][0]


def test_a_train_image_whose_training_copy_would_be_huge_is_refused_like_an_unreadable_one(tmp_path):
    """A 60000 x 100 PNG (a few KB) keeps its 6 megapixels at short side 100 (<= the cache side),
    18 MB of the raw cache against an estimate of 0.2 MB: the image check and the cache's decode
    refuse it as a train image (skipped and listed, or --strict stops), in one reason; as a test
    image (squashed to S x S) it is fine, and so is an ordinary photo's training copy."""
    from ensemble.image_cache import decode_chunk
    from ensemble.image_check import check_batch
    from ensemble.pixels import check_train_size

    path = tmp_path / "strip.png"
    Image.new("L", (60000, 100), 128).save(path)
    expected = ("ImageTooLarge: image is 60000 x 100 pixels: kept for training at 100 x 60000 (6.0 megapixels, over "
                "16 x 256 x 256: an aspect ratio past 16:1); crop it")
    batch = {"split": np.array(["train", "test"]), "id": np.array([0, 0]), "path": np.array([str(path)] * 2)}
    checked = check_batch(batch, image_size=224, resize="squash", side=256)
    assert checked["ok"].tolist() == [False, True] and checked["reason"][0] == expected
    check, _, _ = decode_chunk([str(path)], image_size=224, resize="squash", side=256, keep_train=True)
    assert check["ok"].tolist() == [False] and check["reason"][0] == expected
    assert decode_chunk([str(path)], image_size=224, resize="squash", side=256, keep_train=False)[0]["ok"].all()
    check_train_size(4000, 3000, side=256)  # a photo: kept at 341 x 256
    check_train_size(256 * 16, 256, side=256)  # 16:1 at the cache side: at the bound, kept
