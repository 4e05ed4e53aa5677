"""Figures for the report, one PNG per function (matplotlib, no Ray, no torch).

Each function draws on its own ``matplotlib.figure.Figure`` (no pyplot, so no global state and
no display needed), writes a PNG to a local ``path`` (parent folders are created) and returns
``path``. Copy the files to object storage afterwards if the run's output lives there.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ensemble.scores import metrics

DPI = 120


def _save(fig: Figure, path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def _member_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def training_curves(histories: Sequence[Sequence[dict]], path: str) -> str:
    """Per-member loss and accuracy per epoch: train solid, validation dashed, one colour per member.

    histories: one list per member (in member order) of rows with keys
    epoch, train_loss, train_acc, val_loss, val_acc; a missing or None value is not drawn.
    """
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = _member_colors(len(histories))
    for i, (history, color) in enumerate(zip(histories, colors)):
        for ax, key in ((ax_loss, "loss"), (ax_acc, "acc")):
            for split, style in (("train", "-"), ("val", "--")):
                points = [(row["epoch"], row.get(f"{split}_{key}")) for row in history]
                points = [(e, v) for e, v in points if v is not None and np.isfinite(v)]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker="o", markersize=3, linewidth=1.3,
                            label=f"member {i}" if split == "train" and key == "loss" else None)
    for ax, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.set_title("Loss per epoch")
    ax_acc.set_title("Accuracy per epoch")
    # one legend beside the plots: a colour per member, then the two line styles
    ax_acc.plot([], [], "-", color="0.3", label="train")
    ax_acc.plot([], [], "--", color="0.3", label="validation")
    fig.legend(loc="outside right upper", fontsize=8, ncols=1 if len(histories) <= 16 else 2)
    return _save(fig, path)


def _short(name: str, limit: int = 18) -> str:
    """A class name as a tick label: cut at ``limit``, and its ``$`` shown as typed (matplotlib
    would read ``$...$`` as math, and a name like ``$\\frac{$`` would stop the report)."""
    name = str(name)
    name = name if len(name) <= limit else name[:limit - 1] + "\u2026"
    return name.replace("$", r"\$")


def confusion_matrix_plot(labels, preds, class_names: Sequence[str], path: str) -> str:
    """The ensemble's confusion matrix: rows true class, columns predicted, colour = row fraction.

    labels, preds: (n,) class indices into ``class_names``. Colours are normalised per true
    class so rare classes are as visible as common ones, on a square-root scale so small
    confusions show; counts are written in the cells up to 20 classes. Above 30 classes only
    every k-th class is labelled (at most ~50 labels per axis), in a small font.
    """
    from sklearn.metrics import confusion_matrix

    labels, preds = np.asarray(labels), np.asarray(preds)
    c = len(class_names)
    counts = confusion_matrix(labels, preds, labels=np.arange(c))  # (c, c)
    support = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)

    side = float(np.clip(3.0 + 0.13 * c, 6.0, 16.0))  # inches; ~0.13 in per class up to 100 classes
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    # square-root colour scale: a 4 % confusion shows as 20 % blue, visible among 100 classes
    image = ax.imshow(fraction, cmap="Blues", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0), interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.6, ticks=[0, 0.05, 0.2, 0.5, 1],
                 label="fraction of the true class (square-root scale)")

    step = 1 if c <= 30 else math.ceil(c / 50)  # at most ~50 labels per axis
    fontsize = 9 if c <= 20 else 7 if c <= 50 else 6
    ticks = np.arange(0, c, step)
    names = [_short(class_names[i]) for i in ticks]
    ax.set_xticks(ticks, names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    n = int(counts.sum())
    acc = float(np.trace(counts) / n) if n else float("nan")
    ax.set_title(f"Ensemble confusion matrix (n = {n}, accuracy = {acc:.3f})")
    if c <= 20:
        for i, j in zip(*np.nonzero(counts)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if fraction[i, j] > 0.5 else "black")
    return _save(fig, path)


def size_curve_plot(curve: dict, path: str) -> str:
    """Accuracy and NLL of the soft vote against the number of members k.

    curve: ``metrics.size_curve`` output; uses "k", "accuracy", "nll" (member order) and, when
    present, "accuracy_mean"/"nll_mean" with "accuracy_std"/"nll_std" (random orders, drawn as
    mean +- one standard deviation).
    """
    k = np.asarray(curve["k"])
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, title in ((axes[0], "accuracy", "Accuracy"), (axes[1], "nll", "NLL (nats)")):
        ax.plot(k, curve[key], "o-", color="tab:blue", label="member order")
        if f"{key}_mean" in curve:
            mean = np.asarray(curve[f"{key}_mean"])
            n_orders = curve.get("n_orders")
            ax.plot(k, mean, "s--", color="tab:orange",
                    label=f"mean of {n_orders} random orders" if n_orders else "mean of random orders")
            if f"{key}_std" in curve:
                std = np.asarray(curve[f"{key}_std"])
                ax.fill_between(k, mean - std, mean + std, color="tab:orange", alpha=0.2, linewidth=0)
        ax.set_xlabel("members in the soft vote (k)")
        ax.set_ylabel(title)
        ax.set_title(f"{title} vs ensemble size")
        ax.set_xticks(k if len(k) <= 20 else k[:: math.ceil(len(k) / 20)])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def reliability_diagram(probs, labels, path: str, bins: int = 15, scaled=None, temperature=None) -> str:
    """Accuracy against confidence per bin, the diagonal of perfect calibration, ECE in the title.

    probs: (n, classes); labels: (n,). Uses ``metrics.calibration_bins`` so the bars match
    ``metrics.ece`` exactly. A lower panel shows how many rows fall in each bin. With ``scaled``
    (n, classes), the same probabilities after temperature scaling, a second column shows them
    beside the first (``temperature`` goes in its title).
    """
    panels = [("soft vote", probs)]
    if scaled is not None:
        panels.append((f"scaled by T = {temperature:.3g}" if temperature is not None else "scaled", scaled))
    fig = Figure(figsize=(5.5 * len(panels), 6.5), layout="constrained")
    axes = fig.subplots(2, len(panels), sharex=True, height_ratios=[3, 1], squeeze=False)
    for column, (name, p) in enumerate(panels):
        _reliability_panel(axes[0, column], axes[1, column], p, labels, bins, name)
    return _save(fig, path)


def _reliability_panel(ax, ax_count, probs, labels, bins: int, name: str) -> None:
    cal = metrics.calibration_bins(probs, labels, bins)
    ece = metrics.ece(probs, labels, bins)
    edges, count = cal["edges"], cal["count"]
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / bins
    used = count > 0
    ax.bar(centers[used], cal["accuracy"][used], width=width, color="tab:blue", edgecolor="black",
           linewidth=0.6, label="accuracy")
    # the gap from accuracy to mean confidence, as in Guo et al. (2017), Figure 1; unfilled so an
    # under-confident bin (gap inside the bar) still shows where the bar ends
    ax.bar(centers[used], cal["confidence"][used] - cal["accuracy"][used], bottom=cal["accuracy"][used],
           width=width, fill=False, edgecolor="tab:red", hatch="//", linewidth=0.8,
           label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="0.3", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability, {name}\n(ECE = {ece:.4f}, {bins} bins, n = {int(count.sum())})")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    ax_count.bar(centers, count, width=width, color="0.6", edgecolor="black", linewidth=0.6)
    ax_count.set_xlabel("confidence (top probability)")
    ax_count.set_ylabel("rows")
    ax_count.grid(alpha=0.3)


def write_figures(output: str, report: dict, val: dict, preds, classes) -> dict:
    """The report's PNGs under OUTPUT/figures/ (drawn locally, then written through storage).

    ``report``: report.json's content (the members' histories, the size curve, the calibration);
    ``val``: the vote stage's val arrays (``probs`` (n, classes), ``label`` (n,)); ``preds``:
    the ensemble's val labels under the run's vote rule. Returns {figure name: path relative to OUTPUT}.
    """
    import tempfile

    from ensemble import storage

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        drawn = {
            "training_curves": training_curves([m["history"] for m in report["members"]], os.path.join(tmp, "a.png")),
            "size_curve": size_curve_plot(report["ensemble"]["size_curve"], os.path.join(tmp, "b.png")),
            "reliability": reliability_diagram(val["probs"], val["label"], os.path.join(tmp, "c.png"),
                                               **_scaled_val(report, val)),
            "confusion_matrix": confusion_matrix_plot(val["label"], preds, list(classes), os.path.join(tmp, "d.png")),
        }
        for name, path in drawn.items():
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(output, "figures", f"{name}.png"), fh.read())
            out[name] = f"figures/{name}.png"
    return out


def _scaled_val(report: dict, val: dict) -> dict:
    """The val probabilities the report's "after" scores describe, for the reliability diagram's
    second column ({} when the report has no calibration)."""
    from ensemble.scores.scoring import report_scaled_probs

    cal = report.get("ensemble", {}).get("calibration")
    if not cal:
        return {}
    seed = report.get("config", {}).get("seed", 0)
    return {"scaled": report_scaled_probs(cal, val["probs"], val["label"], seed=seed),
            "temperature": cal["temperature"]}
