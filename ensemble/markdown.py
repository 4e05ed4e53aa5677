"""The one-page Markdown report a person reads first (pure string building; no Ray, no torch)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping

FIGURE_TITLES = {
    "training_curves": "Training curves",
    "size_curve": "Accuracy and NLL vs ensemble size",
    "reliability": "Reliability diagram (ensemble)",
    "confusion_matrix": "Confusion matrix (ensemble)",
}
METRIC_COLUMNS = (("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"))


def render_report_md(report: Mapping[str, Any], figures: Mapping[str, str]) -> str:
    """Markdown: headline, members-vs-ensemble table, figures, config table and phase times.

    Keys read from ``report`` (everything marked optional may be missing or None):
      report["members"]: list, one per member, of
          "member" (int), "seed" (int), "val_acc" (float), "best_epoch" (int),
          "metrics" (optional): ``metrics.summary_metrics`` output (accuracy, nll, ece, brier),
          "oob_acc" (optional): the member's out-of-bag accuracy
      report["ensemble"]:
          "val_acc" (float),
          "metrics" (optional): ``metrics.summary_metrics`` of the ensemble's vote,
          "oob" (optional): ``metrics.oob_scores`` output (reads acc, n_rows_scored, n_rows_without_oob),
          "size_curve" (optional): ``metrics.size_curve`` output (reads k, accuracy),
          "calibration" (optional): ``scoring.calibration_scores`` output (reads fitted_on, n_rows,
              temperature, val_before, val_after, folds),
          "selection" (optional): ``scoring.selection_scores`` output (reads fitted_on, n_rows,
              weights, val, val_after, temperature),
          "vote" (optional): "soft" | "hard", default "soft",
          "bagging" (optional): "bootstrap" | "full", default "bootstrap"
      report["data"] (optional): "classes", "train", "val", "test" row counts
      report["config"] (optional): flat dict of the resolved config
      report["seconds"] (optional): phase name -> seconds, in display order
    ``figures``: figure name -> file name relative to the report's folder, shown in the order
    given; the names in FIGURE_TITLES get a readable heading, others their own name.
    NaN and None values print as an en dash.
    """
    members = list(report.get("members") or [])
    ensemble = report.get("ensemble") or {}
    vote = ensemble.get("vote") or "soft"
    bagging = ensemble.get("bagging") or "bootstrap"
    lines = ["# Ensemble report", ""]
    lines += _headline(members, ensemble, vote, bagging, report.get("data"))
    lines += ["", "## Members vs ensemble", ""] + _score_table(members, ensemble, vote)
    if ensemble.get("by_arch"):
        lines += ["", "## Architectures", ""] + _arch_table(ensemble["by_arch"], vote)
    curve = ensemble.get("size_curve")
    if curve and curve.get("k"):
        lines += ["", "## Ensemble size", ""] + _size_table(curve)
    if ensemble.get("calibration"):
        lines += ["", "## Calibration", ""] + _calibration_section(ensemble["calibration"])
    if ensemble.get("selection") and ensemble["selection"].get("weights"):
        lines += ["", "## Ensemble selection", ""] + _selection_section(ensemble["selection"], ensemble, members)
    if figures:
        lines += ["", "## Figures"]
        for name, file in figures.items():
            title = FIGURE_TITLES.get(name, name.replace("_", " "))
            lines += ["", f"### {title}", "", f"![{title}]({file})"]
    config = report.get("config")
    if config:
        lines += ["", "## Config", ""] + _config_table(config)
    seconds = report.get("seconds")
    if seconds:
        lines += ["", "## Time per phase", "", "| phase | time |", "|---|---:|"]
        lines += [f"| {_cell(phase)} | {_duration(s)} |" for phase, s in seconds.items()]
    return "\n".join(lines) + "\n"


def _headline(members: list, ensemble: Mapping, vote: str, bagging: str, data) -> list[str]:
    out = []
    accs = [m["val_acc"] for m in members if _is_number(m.get("val_acc"))]
    what = f"{len(members)} member(s), {bagging} bagging, {vote} vote"
    if accs and _is_number(ensemble.get("val_acc")):
        mean = sum(accs) / len(accs)
        gain = 100 * (ensemble["val_acc"] - mean)
        out.append(f"**Validation accuracy {_num(ensemble['val_acc'])}** for the ensemble ({what}) vs "
                   f"{_num(mean)} for the mean member ({gain:+.1f} points) and {_num(max(accs))} for the best.")
    else:
        out.append(f"Ensemble of {what}; validation accuracy {_num(ensemble.get('val_acc'))}.")
    oob = ensemble.get("oob")
    if oob:
        out += ["", f"Out-of-bag accuracy {_num(oob.get('acc'))} on {oob.get('n_rows_scored', '–')} training "
                    f"rows ({oob.get('n_rows_without_oob', '–')} rows drawn by every member are left out)."]
    curve = ensemble.get("size_curve")
    if curve and curve.get("accuracy"):
        acc = curve["accuracy"] if len(curve["accuracy"]) <= 12 else [curve["accuracy"][0], curve["accuracy"][-1]]
        out += ["", f"Accuracy with 1 → {curve['k'][-1]} members (member order): "
                    + " → ".join(_num(a) for a in acc) + "."]
    if data:
        out += ["", f"Data: {data.get('classes', '–')} classes; {data.get('train', '–')} train, "
                    f"{data.get('val', '–')} validation, {data.get('test', '–')} test images."]
    return out


def _score_table(members: list, ensemble: Mapping, vote: str) -> list[str]:
    has_oob = any(m.get("oob_acc") is not None for m in members) or bool(ensemble.get("oob"))
    archs = {m.get("arch") for m in members}
    header = ["", "seed", "best epoch", "val acc"] + [title for _, title in METRIC_COLUMNS]
    header += ["OOB acc"] if has_oob else []
    rows = [header, ["---"] + ["---:"] * (len(header) - 1)]

    def scores(entry: Mapping, oob) -> list[str]:
        m = entry.get("metrics") or {}
        return [_num(entry.get("val_acc"))] + [_num(m.get(key)) for key, _ in METRIC_COLUMNS] + (
            [_num(oob)] if has_oob else [])

    for m in members:
        rows.append([f"member {m.get('member', '–')}" + (f" ({m['arch']})" if len(archs) > 1 else ""),
                     _cell(m.get("seed")), _cell(m.get("best_epoch"))]
                    + scores(m, m.get("oob_acc")))
    if len(members) > 1:
        mean = {"val_acc": _mean([m.get("val_acc") for m in members]),
                "metrics": {k: _mean([(m.get("metrics") or {}).get(k) for m in members]) for k, _ in METRIC_COLUMNS}}
        rows.append(["mean of members", "", ""] + scores(mean, _mean([m.get("oob_acc") for m in members])))
    oob = (ensemble.get("oob") or {}).get("acc")
    rows.append([f"**ensemble ({vote} vote)**", "", ""] + [f"**{s}**" for s in scores(ensemble, oob)])
    return ["| " + " | ".join(row) + " |" for row in rows]


def _arch_table(by_arch: Mapping[str, Any], vote: str) -> list[str]:
    """Per architecture: its members, their mean val accuracy, and its own sub-ensemble's scores."""
    rows = [f"| architecture | members | mean member val acc | its {vote} vote: val acc | NLL | ECE |",
            "| --- | --- | ---: | ---: | ---: | ---: |"]
    for arch, a in by_arch.items():
        m = a.get("metrics") or {}
        rows.append(f"| {arch} | {', '.join(map(str, a.get('members') or []))} | {_num(a.get('mean_member_val_acc'))} "
                    f"| {_num(a.get('val_acc'))} | {_num(m.get('nll'))} | {_num(m.get('ece'))} |")
    return rows


def _size_table(curve: Mapping[str, Any]) -> list[str]:
    """Soft vote of the first k members: accuracy and NLL in member order and over random orders."""
    rows = ["| k | val acc (member order) | NLL (member order) | val acc (mean of random orders) "
            "| NLL (mean of random orders) |", "|---:|---:|---:|---:|---:|"]
    n = len(curve["k"])
    for i, k in enumerate(curve["k"]):
        cells = [curve.get(key, [None] * n)[i] for key in ("accuracy", "nll", "accuracy_mean", "nll_mean")]
        rows.append(f"| {k} | " + " | ".join(_num(c) for c in cells) + " |")
    return rows


def _fitted_on(part: Mapping[str, Any]) -> str:
    """Where a temperature or a selection was fitted, in words."""
    n = part.get("n_rows", "–")
    if part.get("fitted_on") == "oob":
        return f"{n} out-of-bag training rows (each scored only by members that never drew it)"
    if part.get("fitted_on") == "val" and _is_number(part.get("folds")) and part["folds"] > 1:
        return (f"the vote of all members on the {n} validation rows; its validation scores are cross-fitted "
                f"({part['folds']} folds, each scaled by a T fitted on the others), so no row is scored by a T "
                f"that saw it")
    if part.get("fitted_on") == "val":
        return (f"the {n} validation rows it is also scored on (no out-of-bag rows: full bagging), so its "
                f"validation scores are optimistic")
    return f"{n} rows ({_cell(part.get('fitted_on'))})"


def _calibration_section(cal: Mapping[str, Any]) -> list[str]:
    """Temperature scaling after averaging: T, where it was fitted, val NLL/ECE/Brier before and after."""
    t = cal.get("temperature")
    if not _is_number(t):
        meaning = ""
    elif cal.get("at_bound"):
        meaning = (" Its fit ran to the lower end of its range: these rows hold no error for a temperature to "
                   "weigh (too few, or all classified with room to spare), and sharpening without limit would make "
                   "every later prediction look certain, so the probabilities are left as they are (T = 1).")
    elif t < 0.995:
        meaning = " T < 1 sharpens: the averaged vote was under-confident (right more often than it claimed)."
    elif t > 1.005:
        meaning = " T > 1 softens: the averaged vote was over-confident (claimed more than it delivered)."
    else:
        meaning = " T ≈ 1: the averaged vote was already calibrated."
    out = [f"One temperature **T = {_num(t)}** scales the ensemble's averaged probabilities, fitted on "
           f"{_fitted_on(cal)}.{meaning} The predicted class of every image stays the same.", "",
           "| validation | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |",
           "|---|" + "---:|" * len(METRIC_COLUMNS)]
    for name, key in (("before (soft vote)", "val_before"), (f"after (T = {_num(t)})", "val_after")):
        m = cal.get(key) or {}
        out.append(f"| {name} | " + " | ".join(_num(m.get(k)) for k, _ in METRIC_COLUMNS) + " |")
    return out


def _selection_section(sel: Mapping[str, Any], ensemble: Mapping[str, Any], members: list) -> list[str]:
    """Greedy selection: the members kept with their weights, and the kept set vs the full ensemble on val."""
    weights = list(sel["weights"])
    names = [f"member {m.get('member', i)}" for i, m in enumerate(members)] if len(members) == len(weights) \
        else [f"member {i}" for i in range(len(weights))]
    kept = [i for i, w in enumerate(weights) if _is_number(w) and w > 0]
    n_kept = len(kept)
    out = [f"Greedy forward selection with replacement (Caruana et al. 2004), minimising NLL on "
           f"{_fitted_on(sel)}, keeps **{n_kept} of {len(weights)} members** "
           f"({len(weights) - n_kept} fewer to run at prediction time) in a weighted soft vote.",
           "", "| member | weight |", "|---|---:|"]
    out += [f"| {names[i]} | {_num(weights[i])} |" for i in kept]
    full = ensemble.get("metrics") or {}
    full_after = (ensemble.get("calibration") or {}).get("val_after") or {}
    chosen, chosen_after = sel.get("val") or {}, sel.get("val_after") or {}
    out += ["", "| validation | members | accuracy | NLL | NLL, scaled by its T | ECE, scaled |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, n, m, after in (("selected (weighted soft vote)", n_kept, chosen, chosen_after),
                              ("all members (soft vote)", len(weights), full, full_after)):
        out.append(f"| {name} | {n} | {_num(m.get('accuracy'))} | {_num(m.get('nll'))} | "
                   f"{_num(after.get('nll'))} | {_num(after.get('ece'))} |")
    if _is_number(sel.get("temperature")) and sel.get("at_bound"):
        out += ["", "`--members selected` leaves the selected members' vote unscaled (T = 1): its fit on val ran "
                    "to the lower end of its range, as in Calibration."]
    elif _is_number(sel.get("temperature")):
        out += ["", f"`--members selected` scales the selected members' vote by their own T = "
                    f"{_num(sel['temperature'])}, fitted on val (scores cross-fitted, as in Calibration)."]
    return out


def _config_table(config: Mapping[str, Any]) -> list[str]:
    """Two key/value pairs per row keeps ~20 settings on one screen."""
    items = [(_cell(k), f"`{_cell(v)}`" if v is not None else "–") for k, v in config.items()]
    rows = ["| setting | value | setting | value |", "|---|---|---|---|"]
    for i in range(0, len(items), 2):
        pair = items[i:i + 2] + [("", "")] * (2 - len(items[i:i + 2]))
        rows.append("| " + " | ".join(f"{k} | {v}" for k, v in pair) + " |")
    return rows


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _mean(values) -> float | None:
    values = [v for v in values if _is_number(v)]
    return sum(values) / len(values) if values else None


def _num(x) -> str:
    return f"{x:.4f}" if _is_number(x) else "–"


def _cell(x) -> str:
    """A value as table-cell text: pipes escaped, newlines flattened."""
    if x is None:
        return "–"
    return str(x).replace("|", "\\|").replace("\n", " ")


def _duration(seconds) -> str:
    if not _is_number(seconds):
        return "–"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min {s:02d} s" if hours else f"{minutes} min {s:02d} s"
