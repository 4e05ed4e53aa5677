"""Shared helpers: small real-image data sets (scikit-learn digits written as PNG/JPEG files)."""

from __future__ import annotations

import os

import numpy as np
import pytest


def write_digits_tree(root, *, per_class_train: int, per_class_val: int, n_test: int,
                      classes: int = 10, fmt: str = "png") -> str:
    """A study-layout folder of real digit scans: train/<c>/, val/<c>/, flat test/."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    root = str(root)
    used = set()
    for c in range(classes):
        idx = np.flatnonzero(digits.target == c)
        for split, part in (("train", idx[:per_class_train]),
                            ("val", idx[per_class_train:per_class_train + per_class_val])):
            folder = os.path.join(root, split, f"class_{c}")
            os.makedirs(folder, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").resize((16, 16)).convert("RGB").save(
                    os.path.join(folder, f"img{i:04d}.{fmt}"))
                used.add(int(i))
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    rest = [i for i in range(len(images)) if i not in used and digits.target[i] < classes][:n_test]
    for i in rest:
        Image.fromarray(images[i], mode="L").save(os.path.join(root, "test", f"t{i:04d}.png"))
    return root


def pytest_collection_modifyitems(config, items):
    """GPU-only tests skip cleanly where torch sees no CUDA device (CI, laptops)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> str:
    return write_digits_tree(tmp_path_factory.mktemp("tiny_digits"), per_class_train=12,
                             per_class_val=5, n_test=25, classes=4)
