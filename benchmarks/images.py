"""Real-image data sets of any size for benchmarks: scikit-learn's digits written as PNG files.

The digits set holds 1,797 scans; a larger tree reuses them, each copy shifted by a pixel or
two (np.roll) so files differ. Decoding cost per file is what a real 16x16 PNG costs.
"""

from __future__ import annotations

import os

import numpy as np


def write_digits_images(root: str, *, n_train: int, n_val: int, n_test: int, classes: int = 10,
                        size: int = 16, seed: int = 0) -> str:
    """A study-layout tree (train/<class>/, val/<class>/, flat test/) of real digit scans.

    Rows are spread evenly over ``classes``: up to 10 digits, or up to 100 two-digit numbers (two
    scans side by side, squeezed to a square); returns ``root``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(digits.target == c) for c in range(min(classes, 10))]

    def digit(label: int) -> np.ndarray:
        i = rng.choice(by_class[label])
        shift = rng.integers(-1, 2, size=2)
        return np.roll(images[i], tuple(shift), axis=(0, 1))

    def scan(label: int) -> np.ndarray:
        """One scan of a digit; with more than 10 classes (up to 100) two scans side by side: a number."""
        return digit(label) if classes <= 10 else np.hstack([digit(label // 10), digit(label % 10)])

    def save(pixels: np.ndarray, path: str) -> None:
        Image.fromarray(pixels, mode="L").resize((size, size)).convert("RGB").save(path)

    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            label = k % classes
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            save(scan(label), os.path.join(folder, f"{split}{k:06d}.png"))
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    for k in range(n_test):
        save(scan(k % classes), os.path.join(root, "test", f"test{k:06d}.png"))
    return root


def write_flat_images(folder: str, *, n: int, classes: int = 10, size: int = 16, seed: int = 1) -> list[str]:
    """``n`` unlabelled digit PNGs in one folder (a test set to vote on); returns their paths."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    keep = np.flatnonzero(digits.target < classes)
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(n):
        pixels = np.roll(images[rng.choice(keep)], tuple(rng.integers(-1, 2, size=2)), axis=(0, 1))
        path = os.path.join(folder, f"vote{k:06d}.png")
        Image.fromarray(pixels, mode="L").resize((size, size)).convert("RGB").save(path)
        paths.append(path)
    return paths


def write_photo_images(root: str, *, n_train: int, n_val: int, n_test: int, size: tuple = (500, 375),
                       quality: int = 90, seed: int = 0, classes: int = 2) -> str:
    """A study-layout tree of camera-size JPEGs (``size`` = width, height; quality 90) cut from the
    two real photographs that ship with scikit-learn (``load_sample_images``: a temple in China, a
    flower; 640x427 each). With two classes the class is the photo; with more, each class is its
    own region of one photo (half its width and height, on a grid). Each file is a random crop
    (60-100% of its class's region), scaled to ``size`` and maybe mirrored, so files differ and
    decode like real photos."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(seed)
    per_photo = -(-classes // len(photos))
    grid = max(1, int(np.ceil(np.sqrt(per_photo))))

    def region(label: int) -> tuple:
        """(left, top, width, height) of the class's region: the whole photo for two classes."""
        photo = photos[label % len(photos)]
        if classes <= len(photos):
            return 0, 0, photo.width, photo.height
        k, w, h = label // len(photos), photo.width // 2, photo.height // 2
        col, row = k % grid, k // grid
        return (col * (photo.width - w) // max(grid - 1, 1), row * (photo.height - h) // max(grid - 1, 1), w, h)

    def shot(label: int) -> Image.Image:
        photo = photos[label % len(photos)]
        x0, y0, width, height = region(label)
        scale = rng.uniform(0.6, 1.0)
        w, h = int(width * scale), int(height * scale)
        left, top = x0 + int(rng.integers(0, width - w + 1)), y0 + int(rng.integers(0, height - h + 1))
        img = photo.crop((left, top, left + w, top + h)).resize(size, Image.BILINEAR)
        return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img

    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(n):
            label = k % classes
            folder = os.path.join(root, split, f"photo_{label}")
            os.makedirs(folder, exist_ok=True)
            shot(label).save(os.path.join(folder, f"{split}{k:06d}.jpg"), quality=quality)
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    for k in range(n_test):
        shot(k % classes).save(os.path.join(root, "test", f"test{k:06d}.jpg"), quality=quality)
    return root
