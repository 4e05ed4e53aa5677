"""A Tune search's results as data (pure; no Ray): one row per trial, the best trial, the config
it gives the driver, trials.csv and the printed table."""

from __future__ import annotations

from typing import Optional

from ensemble.config import EnsembleConfig, build_config
from ensemble.errors import EnsembleError
from ensemble.report import columns

# Keys of the searched model that best_config.yaml carries; run-shape keys (members, resources,
# output) stay the driver's to choose.
RECIPE_KEYS = ("arch", "weights", "freeze", "freeze_stem", "epochs", "batch_size", "lr", "image_size", "augment",
               "precision")


def summarize_trial(trial_id: str, config: dict, history: list[dict], *, max_epochs: int, failed: bool) -> dict:
    """One row of trials.csv from a trial's per-epoch history (``epoch``, ``val_acc``).

    ``status``: completed (trained max_epochs), stopped (by ASHA, sooner) or error.
    """
    status = "error" if failed else "completed" if len(history) >= max_epochs else "stopped"
    row = {"trial_id": trial_id, "lr": float(config["lr"]), "freeze": str(config["freeze"]),
           "epochs_reached": len(history), "best_epoch": None, "best_val_acc": None, "status": status,
           "history": [{"epoch": int(h["epoch"]), "val_acc": float(h["val_acc"])} for h in history]}
    if history:
        best = max(row["history"], key=lambda h: (h["val_acc"], -h["epoch"]))  # earliest epoch on ties
        row["best_epoch"], row["best_val_acc"] = best["epoch"], best["val_acc"]
    return row


def pick_best(rows: list[dict]) -> dict:
    """Highest best_val_acc; ties go to fewer epochs, then to the earlier trial (rows in trial order)."""
    scored = [(r["best_val_acc"], -r["best_epoch"], -k, r) for k, r in enumerate(rows) if r["best_val_acc"] is not None]
    if not scored:
        raise SearchFailed("no trial reported a val accuracy; see the trial errors above")
    return max(scored, key=lambda s: s[:3])[3]


def best_config_values(base: EnsembleConfig, best: dict, *, data: Optional[str], carried_keys=()) -> dict:
    """What best_config.yaml holds: the model recipe with the searched lr, freeze and epochs, the
    other keys of the --config file searched from, and ``data`` only when the user gave one
    (without it the driver applies its CPU preset to the bundled digits, as this search did)."""
    values = {k: getattr(base, k) for k in (*carried_keys, *RECIPE_KEYS) if k != "data"}
    values.update(lr=float(best["lr"]), freeze=best["freeze"], epochs=int(best["best_epoch"]))
    if data is not None:
        values = {"data": data, **values}
    build_config(file_values=values)  # the driver must accept it back
    return values


def trials_csv(rows: list[dict]) -> str:
    cols = ("trial_id", "lr", "freeze", "epochs_reached", "best_epoch", "best_val_acc", "status")
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join("" if r[c] is None else repr(r[c]) if isinstance(r[c], float) else str(r[c])
                              for c in cols))
    return "\n".join(lines) + "\n"


def format_table(rows: list[dict], best: dict) -> str:
    table = [["trial", "lr", "freeze", "epochs", "best epoch", "val acc", "status"]]
    for k, r in enumerate(rows):
        status = "stopped by ASHA" if r["status"] == "stopped" else r["status"]
        table.append([k, f"{r['lr']:.3g}", r["freeze"], r["epochs_reached"],
                      "-" if r["best_epoch"] is None else r["best_epoch"],
                      "-" if r["best_val_acc"] is None else f"{r['best_val_acc']:.4f}",
                      status + ("  <- best" if r is best else "")])
    return columns(table, (5, 9, 6, 6, 10, 7, None))


class SearchFailed(EnsembleError, RuntimeError):
    """No trial produced a result (a failure: exit 1)."""
