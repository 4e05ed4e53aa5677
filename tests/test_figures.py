"""Figures written as real PNGs: training curves, size curve, reliability diagram, confusion matrix."""

import numpy as np

from ensemble import figures
from ensemble.scores.metrics import size_curve
from ensemble.scores.vote import soft_vote
from tests.helpers import random_members

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _check_png(path, *, min_side=300, max_side=3000):
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    image = imread(path)
    height, width = image.shape[:2]
    assert min_side <= height <= max_side and min_side <= width <= max_side, image.shape
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    return image


def test_figures_write_png_files(tmp_path):
    histories = [[{"epoch": e, "train_loss": 2.0 / e + 0.1 * m, "train_acc": 1 - 0.5 / e,
                   "val_loss": 2.2 / e, "val_acc": 0.9 - 0.5 / e} for e in range(1, 6)] for m in range(3)]
    member_probs, labels = random_members(members=4, n=400, classes=5, seed=9)
    ensemble = soft_vote(member_probs)
    paths = [
        figures.training_curves(histories, str(tmp_path / "figs" / "training_curves.png")),
        figures.size_curve_plot(size_curve(member_probs, labels, n_orders=5), str(tmp_path / "size.png")),
        figures.reliability_diagram(ensemble, labels, str(tmp_path / "reliability.png")),
        figures.confusion_matrix_plot(labels, ensemble.argmax(axis=1), [f"class_{i}" for i in range(5)],
                                      str(tmp_path / "confusion_5.png")),
    ]
    assert paths[0] == str(tmp_path / "figs" / "training_curves.png")
    for path in paths:
        _check_png(path)


def test_reliability_diagram_with_scaled_probabilities_draws_them_beside_the_vote(tmp_path):
    from ensemble.scores.calibration import scale_probs

    member_probs, labels = random_members(members=4, n=400, classes=5, seed=9)
    vote = soft_vote(member_probs)
    one = _check_png(figures.reliability_diagram(vote, labels, str(tmp_path / "one.png")))
    two = _check_png(figures.reliability_diagram(vote, labels, str(tmp_path / "two.png"),
                                                 scaled=scale_probs(vote, 0.5), temperature=0.5))
    assert two.shape[0] == one.shape[0] and two.shape[1] == 2 * one.shape[1]


def test_confusion_matrix_plot_with_100_classes(tmp_path):
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 100, size=3000)
    preds = np.where(rng.random(3000) < 0.7, labels, rng.integers(0, 100, size=3000))
    names = [f"n{i:03d}_some_long_wordnet_class_name" for i in range(100)]
    image = _check_png(figures.confusion_matrix_plot(labels, preds, names, str(tmp_path / "cm100.png")),
                       min_side=1000)
    assert image.shape[0] <= 2100 and image.shape[1] <= 2300


def test_class_names_with_dollar_signs_are_labels_not_math(tmp_path):
    """matplotlib reads ``$...$`` as math: ``$\\frac{$`` cannot be parsed and stopped the report
    after training; the tick labels show the names as typed."""
    names = ["$\\frac{$", "price $5$", "a$b"]
    labels = np.array([0, 1, 2, 0])
    _check_png(figures.confusion_matrix_plot(labels, labels, names, str(tmp_path / "cm.png")), min_side=100)
    assert [figures._short(n) for n in names] == ["\\$\\frac{\\$", "price \\$5\\$", "a\\$b"]
