"""The bundled default data set: scikit-learn's digits as an ImageFolder tree.

1,797 real 8x8 grayscale scans of handwritten digits ship inside scikit-learn. We write them
once as PNGs in the study's layout (train/<class>/, val/<class>/, flat test/) under a cache
folder, so the demo exercises exactly the code path a user's own images take.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

VERSION = "digits-v1"
SPLIT = (0.6, 0.2, 0.2)  # train, val, test fractions, stratified by class


def cache_root() -> str:
    base = os.environ.get("ENSEMBLE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ensemble")
    return os.path.join(base, VERSION)


def ensure_digits(root: str | None = None) -> str:
    """Build the tree if it is not there yet; returns its path. Safe to call concurrently."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = root or cache_root()
    if os.path.exists(os.path.join(root, "DONE")):
        return root
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target
    rng = np.random.default_rng(0)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".digits-", dir=parent)
    test_rows = []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(len(idx) * SPLIT[0]))
        n_val = int(round(len(idx) * SPLIT[1]))
        for split, part in (("train", idx[:n_train]), ("val", idx[n_train:n_train + n_val])):
            folder = os.path.join(tmp, split, str(label))
            os.makedirs(folder, exist_ok=True)
            for i in part:
                Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"digit-{i:04d}.png"))
        test_rows += [(i, label) for i in idx[n_train + n_val:]]
    os.makedirs(os.path.join(tmp, "test"), exist_ok=True)
    for i, _ in test_rows:
        Image.fromarray(images[i], mode="L").save(os.path.join(tmp, "test", f"digit-{i:04d}.png"))
    # Test labels beside (not inside) test/, so a user can score predictions.csv by hand.
    with open(os.path.join(tmp, "test_labels.csv"), "w") as fh:
        fh.write("image_name,label\n")
        fh.writelines(f"digit-{i:04d},{label}\n" for i, label in sorted(test_rows))
    open(os.path.join(tmp, "DONE"), "w").close()
    try:
        os.rename(tmp, root)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return root
