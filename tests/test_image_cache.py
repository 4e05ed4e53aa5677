"""image_cache.py without a cluster: the size estimate the cache decides on, and one decode task's
chunk (check, eval block, train block) called directly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
from PIL import Image

from ensemble.config import build_config
from ensemble.image_cache import decode_chunk, estimate_bytes
from ensemble.pixels import eval_pixels, shrink


def _index(n_train: int, n_val: int, n_test: int) -> SimpleNamespace:
    def split(n):
        return pa.table({"path": [f"f{i}.png" for i in range(n)]})

    return SimpleNamespace(train=split(n_train), val=split(n_val), test=split(n_test))


def test_estimate_bytes_is_exact_eval_pixels_plus_4_to_3_train_images_at_the_cache_side():
    index = _index(3, 2, 1)
    # S = 16: eval pixels 6 x 16 x 16 x 3; cache side round(16 * 256 / 224) = 18, train 3 x 18 x 24 x 3
    assert estimate_bytes(index, build_config(flag_values={"image_size": 16})) == 4608 + 3888
    # --cache-side 30: train 3 x 30 x 40 x 3
    assert estimate_bytes(index, build_config(flag_values={"image_size": 16, "cache_side": 30})) == 4608 + 10800
    assert estimate_bytes(_index(0, 0, 0), build_config(flag_values={"image_size": 16})) == 0


def test_decode_chunk_keeps_eval_pixels_and_shrunk_train_images_and_says_why_a_file_failed(tmp_path):
    rng = np.random.default_rng(0)
    wide = tmp_path / "wide.png"  # 40 x 30 RGB
    Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(wide)
    grey = tmp_path / "grey.png"  # 20 x 20 greyscale, converted to RGB
    Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), mode="L").save(grey)
    empty, text = tmp_path / "empty.png", tmp_path / "text.png"
    empty.write_bytes(b"")
    text.write_text("not an image")
    paths = [str(wide), str(empty), str(grey), str(text)]

    check, evals, train = decode_chunk(paths, image_size=16, resize="squash", side=18, keep_train=True)

    assert check["ok"].tolist() == [True, False, True, False]
    assert check["reason"][:3] == ["", "empty file (0 bytes)", ""]
    assert check["reason"][3].startswith("UnidentifiedImageError: ")
    decoded = [Image.open(wide).convert("RGB"), Image.open(grey).convert("RGB")]
    assert evals.shape == (4, 16, 16, 3) and evals.dtype == np.uint8
    for row, img in zip((0, 2), decoded):
        np.testing.assert_array_equal(evals[row], eval_pixels(img, image_size=16, resize="squash"))
    assert not evals[[1, 3]].any()  # a failed file's rows are zeros, dropped by the driver
    # train images: short side shrunk to 18 (aspect kept), concatenated; failed files take no bytes
    assert train["shapes"].tolist() == [[18, 24], [0, 0], [18, 18], [0, 0]]
    assert train["offsets"].tolist() == [0, 1296, 1296, 2268, 2268]
    for row, img in zip((0, 2), decoded):
        start, end = train["offsets"][row], train["offsets"][row + 1]
        np.testing.assert_array_equal(train["pixels"][start:end].reshape(*train["shapes"][row], 3), shrink(img, 18))
    assert check["bytes"] == evals.nbytes + 2268 == 5340

    check, evals_only, none = decode_chunk(paths[:1], image_size=16, resize="short-side", side=18, keep_train=False)
    assert none is None and check["bytes"] == evals_only.nbytes == 768
    np.testing.assert_array_equal(evals_only[0], eval_pixels(decoded[0], image_size=16, resize="short-side"))


def test_the_compressed_tier_is_a_ninth_of_raw_for_photos_and_chosen_only_when_raw_does_not_fit():
    """Estimates per tier (val/test eval pixels exact in both; train images raw, or JPEG at ~0.4
    bytes a pixel plus 640 of headers), and the first tier that fits the budget; a forced tier that does not fit means
    no cache, said with its size."""
    from ensemble.image_cache import choose_tier

    index = _index(21_000, 300, 2_300)  # the study's shape at 224 px
    cfg = build_config(flag_values={"data": "x"})
    raw, compressed = estimate_bytes(index, cfg, "raw"), estimate_bytes(index, cfg, "compressed")
    assert raw == 23_600 * 224 * 224 * 3 + 21_000 * 256 * 342 * 3  # ~9 GB
    assert compressed == 2_600 * 224 * 224 * 3 + int(21_000 * 256 * 342 * 0.4) + 21_000 * 640  # ~1.1 GB
    sizes = {"raw": raw, "compressed": compressed}
    assert choose_tier(sizes, 10e9)[0] == "raw"
    tier, why = choose_tier(sizes, 2.4e9, budget="--cache-share 0.5 of the smallest node's object store")
    assert tier == "compressed" and why == ("raw pixels about 9.1 GB are over --cache-share 0.5 of the smallest "
                                            "node's object store = 2.4 GB; compressed about 1.1 GB")
    assert choose_tier(sizes, 10e9, "compressed")[0] == "compressed"
    assert choose_tier(sizes, 2.4e9, "raw") == (None, "raw pixels about 9.1 GB, over the budget = 2.4 GB")
    assert choose_tier(sizes, 0.5e9)[0] is None


def test_the_compressed_tier_keeps_val_and_test_exact_and_train_images_as_jpegs(tmp_path):
    """A train chunk holds one JPEG per image (no eval block); the reader decodes it to the cache-side
    pixels within JPEG's error, and computes a train row's eval pixels from it. Val and test chunks
    are the raw tier's, exactly. A file that fails takes no bytes."""
    from ensemble.image_cache import BlockReader, ImageCache

    rng = np.random.default_rng(0)
    photo = tmp_path / "photo.jpg"  # a smooth 120 x 90 image, as photos are at the cache side
    y, x = np.mgrid[0:90, 0:120]
    smooth = np.stack([x * 2, y * 2, (x + y)], -1).astype(np.uint8) + rng.integers(0, 8, (90, 120, 3), dtype=np.uint8)
    Image.fromarray(smooth).save(photo, quality=95)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [str(photo), str(empty)]

    check, evals, train = decode_chunk(paths, image_size=32, resize="squash", side=37, keep_train=True,
                                       tier="compressed")
    assert check["ok"].tolist() == [True, False] and evals is None and set(train) == {"jpeg", "offsets"}
    assert train["offsets"][2] == train["offsets"][1] == check["bytes"] == train["jpeg"].nbytes
    raw_check, raw_evals, raw_train = decode_chunk(paths, image_size=32, resize="squash", side=37, keep_train=True)
    val_chunk = decode_chunk(paths, image_size=32, resize="squash", side=37, keep_train=False, tier="compressed")
    np.testing.assert_array_equal(val_chunk[1], raw_evals)  # val/test: the raw tier's pixels, exactly

    cache = ImageCache(eval_blocks=[None], train_blocks=["block-0"], image_size=32, side=37, resize="squash",
                       tier="compressed")
    reader = BlockReader(cache)
    reader._blocks[("train", 0)] = train  # as ray.get would return it
    source = reader.train(0, 0)
    exact = raw_train["pixels"][:raw_train["offsets"][1]].reshape(*raw_train["shapes"][0], 3)
    assert source.shape == exact.shape == (37, 49, 3)
    error = np.abs(source.astype(int) - exact)
    np.testing.assert_array_equal(reader.eval(0, 0), eval_pixels(Image.fromarray(source), image_size=32,
                                                                resize="squash"))
    assert 0 < error.mean() < 2 and error.max() <= 10  # JPEG at quality 90 of a smooth image (0.9 and 5 here)
    derived = np.abs(reader.eval(0, 0).astype(int) - raw_evals[0])
    assert derived.mean() < 2 and derived.max() <= 10  # vs the original's eval pixels (0.7 and 3 here)
