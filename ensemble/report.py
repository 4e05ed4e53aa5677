"""A run's results: report.json (built from the scores), predictions.csv, probabilities.parquet,
figures/, report.md, and what the driver prints (the plan, the members' table).

Pure functions plus writes through ``storage``; no Ray here.
"""

from __future__ import annotations

import io
import json
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ensemble import storage
from ensemble.config import EnsembleConfig
from ensemble.scores.vote import ensemble_labels, rule_title, vote_outputs


def predictions_csv(image_names: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                    pred_index: np.ndarray | None = None) -> str:
    """``image_name,pred_label`` rows; the label is the class folder name (argmax unless ``pred_index``)."""
    if pred_index is None:
        pred_index = np.asarray(probs).argmax(axis=1)
    labels = np.asarray(classes, dtype=object)[np.asarray(pred_index)]
    lines = ["image_name,pred_label"] + [f"{_csv(n)},{_csv(label)}" for n, label in zip(image_names, labels)]
    return "\n".join(lines) + "\n"


#: A cell a spreadsheet would read as a formula (or as a command, through DDE) starts with one of these.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _csv(value: str) -> str:
    """A CSV cell: quoted where it holds a comma, quote or line break; one that a spreadsheet would
    run as a formula (``=HYPERLINK(...)``, ``+1``, ``-1+1``, ``@SUM``) gets a leading ``'``, which
    spreadsheets show as text (probabilities.parquet keeps the names as they are)."""
    value = str(value)
    if value.lstrip("'").startswith(FORMULA_STARTS):  # (and "'=x" -> "''=x": each name reads back as it was)
        value = "'" + value
    if any(c in value for c in ',"\n\r'):
        return '"' + value.replace('"', '""') + '"'
    return value


def probabilities_table(image_names: Sequence[str], probs: np.ndarray, classes: Sequence[str],
                        extra_columns: dict | None = None) -> pa.Table:
    """image_name + one float32 column per class, named by the class folder, + ``extra_columns``."""
    columns = {"image_name": pa.array(list(image_names), pa.string())}
    probs = np.asarray(probs, dtype=np.float32)
    for j, cls in enumerate(classes):
        if str(cls) in columns:  # data.scan_layout refuses such class names before training
            raise ValueError(f"class {cls!r} clashes with the column of that name")
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


def write_predictions(output: str, voted: dict, classes, rule: str, temperature: float = 1.0,
                      weights=None) -> None:
    """predictions.csv (labels under the vote ``rule``) and probabilities.parquet (the vote's
    probabilities scaled by the run's ``temperature``, their predictive entropy, member
    disagreement) for the vote stage's arrays of one split (``image_name``, ``member_probs``
    (members, n, classes)); ``weights``: a member selection's weighted soft vote (``vote_outputs``)."""
    out = vote_outputs(voted["member_probs"], rule, temperature, weights)
    storage.write_text(storage.join(output, "predictions.csv"),
                       predictions_csv(voted["image_name"], out["probs"], classes, out["label"]))
    extra = {"predictive_entropy": out["entropy"], "member_disagreement": out["disagreement"]}
    buf = io.BytesIO()
    pq.write_table(probabilities_table(voted["image_name"], out["probs"], classes, extra), buf)
    storage.write_bytes(storage.join(output, "probabilities.parquet"), buf.getvalue())


def write_json(path: str, value) -> None:
    """Strict JSON (NaN -> null), indented."""
    storage.write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False))


def build_report(cfg: EnsembleConfig, *, summaries: list, scores: dict, params: dict, index, skipped: list,
                 seeds: list, fingerprint: dict, versions: dict, seconds: dict,
                 cache_tier: Optional[str] = None) -> dict:
    """report.json's content: each member's summary with its scores, the ensemble's scores, the run
    (``image_cache``: the tier the members trained from, ``none`` when they streamed the files)."""
    members = [{**summary.to_dict(), "arch": cfg.arch_of(summary.member), **scored}
               for summary, scored in zip(summaries, scores["members"])]
    ensemble = {**scores["ensemble"], "vote": cfg.vote, "tta": cfg.tta, "bagging": cfg.bagging,
                "mean_member_val_acc": float(np.mean([s.val_acc for s in summaries]))}
    return {"members": members, "ensemble": ensemble, "params": params,
            "data": {"root": index.root, **index.sizes(), "class_names": list(index.classes)},
            "skipped_files": skipped, "config": cfg.to_dict(), "seeds": seeds, "fingerprint": fingerprint,
            "image_cache": {"tier": cache_tier or "none"},
            "versions": versions, "seconds": dict(seconds)}


def write_report(output: str, report: dict, *, val: dict, test: Optional[dict], classes,
                 started: float) -> None:
    """figures/, then predictions.csv, probabilities.parquet, report.json (+ its sha256) and report.md.

    ``val``/``test``: the vote stage's arrays of that split (``member_probs`` (members, n, classes),
    ``probs``, ``label``, ``image_name``); ``test`` None: the data has no test images, and no
    predictions are written. ``started``: the run's start, for the total time.
    """
    import time

    from ensemble.figures import write_figures
    from ensemble.markdown import render_report_md
    from ensemble.run_folder import write_report_sha256

    t_report = time.time()
    rule = report["ensemble"]["vote"]
    figures = write_figures(output, report, val, ensemble_labels(val["member_probs"], rule), classes)
    report["seconds"].update(report=time.time() - t_report, total=time.time() - started)
    if test is not None:
        write_predictions(output, test, classes, rule, report["ensemble"]["calibration"]["temperature"])
    write_json(storage.join(output, "report.json"), report)
    write_report_sha256(output)  # after report.json: load_run refuses a report changed since
    storage.write_text(storage.join(output, "report.md"), render_report_md(report, figures))


def columns(rows: list[Sequence], widths: Sequence[Optional[int]]) -> str:
    """Rows of cells as fixed-width text: each cell right-aligned to its column's width (None: as is)."""
    return "\n".join("  ".join(str(cell) if w is None else f"{cell:>{w}}" for cell, w in zip(row, widths))
                     for row in rows)


def format_table(members: list[dict], ensemble_val_acc: float, rule: str = "soft") -> str:
    """Each member's val accuracy, their mean, and the ensemble's under its vote ``rule``."""
    rows = [["member", "seed", "best epoch", "val acc"]]
    rows += [[m["member"], m["seed"], m["best_epoch"], f"{m['val_acc']:.4f}"] for m in members]
    mean = float(np.mean([m["val_acc"] for m in members]))
    table = columns(rows, (8, 10, 10, 8))
    return "\n".join([table, f"{'mean of members':>32}  {mean:>8.4f}",
                      f"{rule_title(rule):>32}  {ensemble_val_acc:>8.4f}"])


def _members_plan(cfg: EnsembleConfig) -> str:
    """``9 x resnet50``, or with several architectures ``9: 5 x resnet50, 4 x wide_resnet50_2``."""
    if len(cfg.archs) == 1:
        return f"{cfg.members} x {cfg.arch}"
    counts = [sum(cfg.arch_of(i) == a for i in range(cfg.members)) for a in cfg.archs]
    return f"{cfg.members}: " + ", ".join(f"{n} x {a}" for n, a in zip(counts, cfg.archs))


def _vote_plan(cfg: EnsembleConfig, members_vote: Optional[bool]) -> str:
    pool = f"{cfg.infer_actors} actor(s) x batch {cfg.infer_batch_size}"
    if members_vote is None:
        return f"{pool} (each member itself as it finishes when the images fit the image cache)"
    if members_vote:
        return (f"each member as it finishes, on the cached images (members an earlier run finished: by the "
                f"trainers too; {pool} only when no member is left to train)")
    return pool


def plan_lines(cfg: EnsembleConfig, params: dict, sizes: Optional[dict], num_classes: int, *,
               members_vote: Optional[bool] = None) -> list[str]:
    """The run's plan as the driver logs it (and --dry-run prints it). ``members_vote``: whether
    each member's trainer scores the vote's rows itself (the images are in the cache); None: not
    known yet (a dry run)."""
    n_boot = cfg.bootstrap_size or (sizes["train"] if sizes else None)
    gpus = "auto (1 if the cluster has GPUs)" if cfg.gpus_per_member is None else f"{cfg.gpus_per_member:g}"
    cpus = "auto (2, or a node's all if fewer)" if cfg.cpus_per_member is None else f"{cfg.cpus_per_member:g}"
    lines = [
        f"members          {_members_plan(cfg)} ({num_classes} classes), weights {cfg.weights}, "
        f"freeze {cfg.freeze}{' + stem' if cfg.freeze_stem else ''}",
        f"per member       {gpus} GPU, {cpus} CPU; {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"Adam lr {cfg.lr:g}, image {cfg.image_size}, augment {cfg.augment}, eval resize {cfg.eval_resize}",
        f"soft vote        {_vote_plan(cfg, members_vote)}",
    ]
    if "by_arch" in params:
        lines += [f"parameters       {arch}: {p['total']:,} total, {p['trainable']:,} trainable"
                  for arch, p in params["by_arch"].items()]
    else:
        lines.append(f"parameters       {params['total']:,} total, {params['trainable']:,} trainable")
    for arch in cfg.archs:
        recipe = (cfg.recipes or {}).get(arch)
        if recipe:
            lines.append(f"recipe           {arch}: " + ", ".join(f"{k} {v}" for k, v in sorted(recipe.items())))
    if sizes:
        lines.insert(1, f"data             {sizes['classes']} classes; train {sizes['train']}, val {sizes['val']}, "
                        f"test {sizes['test']} images; bootstrap {n_boot} rows per member")
    return lines
