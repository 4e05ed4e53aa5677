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
