"""Outputs of a run: predictions.csv, probabilities.parquet, report.json and the printed table.

Pure functions plus writes through ``storage``; no Ray here.
"""

from __future__ import annotations

import io
import json
import platform
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ensemble import storage


def versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for name in ("ensemble", "ray", "torch", "torchvision", "numpy", "pyarrow"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def predictions_csv(image_names: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                    pred_index: np.ndarray | None = None) -> str:
    """``image_name,pred_label`` rows; the label is the class folder name (argmax unless ``pred_index``)."""
    if pred_index is None:
        pred_index = np.asarray(probs).argmax(axis=1)
    labels = np.asarray(classes, dtype=object)[np.asarray(pred_index)]
    lines = ["image_name,pred_label"] + [f"{_csv(n)},{_csv(l)}" for n, l in zip(image_names, labels)]
    return "\n".join(lines) + "\n"


def _csv(value: str) -> str:
    value = str(value)
    if any(c in value for c in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value


def probabilities_table(image_names: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                        extra_columns: dict | None = None) -> pa.Table:
    """image_name + one float32 column per class, named by the class folder, + ``extra_columns``."""
    columns = {"image_name": pa.array(list(image_names), pa.string())}
    probs = np.asarray(probs, dtype=np.float32)
    for j, cls in enumerate(classes):
        columns[str(cls)] = pa.array(probs[:, j])
    for name, values in (extra_columns or {}).items():
        if name in columns:
            raise ValueError(f"column {name!r} clashes with a class name")
        columns[name] = pa.array(np.asarray(values, dtype=np.float32))
    return pa.table(columns)


def json_safe(value):
    """NaN/inf -> None and numpy scalars/arrays -> Python, so report.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_outputs(output: str, *, image_names, probs, classes, report: dict, pred_index=None,
                  extra_columns: dict | None = None) -> None:
    storage.write_text(storage.join(output, "predictions.csv"),
                       predictions_csv(image_names, probs, classes, pred_index))
    buf = io.BytesIO()
    pq.write_table(probabilities_table(image_names, probs, classes, extra_columns), buf)
    storage.write_bytes(storage.join(output, "probabilities.parquet"), buf.getvalue())
    storage.write_text(storage.join(output, "report.json"), json.dumps(json_safe(report), indent=2, allow_nan=False))


def format_table(members: list[dict], ensemble_val_acc: float) -> str:
    """Each member's val accuracy, their mean, and the ensemble's."""
    lines = [f"{'member':>8}  {'seed':>10}  {'best epoch':>10}  {'val acc':>8}"]
    for m in members:
        lines.append(f"{m['member']:>8}  {m['seed']:>10}  {m['best_epoch']:>10}  {m['val_acc']:>8.4f}")
    mean = float(np.mean([m["val_acc"] for m in members]))
    lines.append(f"{'mean of members':>32}  {mean:>8.4f}")
    lines.append(f"{'ensemble (soft vote)':>32}  {ensemble_val_acc:>8.4f}")
    return "\n".join(lines)
