"""Search one member's lr, frozen stages and epochs with Ray Tune + ASHA; write a config the driver takes.

    python -m ensemble.tune --output runs/tune1                         # bundled digits, CPU preset
    python -m ensemble.tune --data DATA --output runs/tune1 --trials 16 --max-epochs 20 --gpus-per-trial 0.5
    python -m ensemble.driver --config runs/tune1/best_config.yaml --output runs/exp1

Each trial trains ONE model on the full train split (no bootstrap) and reports its val accuracy
after every epoch; ASHA stops the weaker trials early. The best trial (highest val accuracy at
any epoch) gives ``lr``, ``freeze`` and ``epochs`` (the epoch of that best val accuracy).
Every trial starts from the same seed (same initial weights, same batches, same augmentation
draws), so trials differ only in their hyperparameters.

Stages: config -> data index -> ray.init -> image check -> Tuner.fit (ASHA) -> table + files.
Trials decode their images in-process (``batches.batches``): a Tune trial holding the CPUs that
nested Ray Data tasks would need can hang a small machine (see RAY_NOTES).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ensemble import storage
from ensemble.cluster import cluster_capacity, connect, fit_cpus, resolve_gpus
from ensemble.config import (AUGMENTS, ARCHS, INT_RANGES, NUMBER_RANGES, PRECISIONS, ConfigError, EnsembleConfig,
                             check_gpus, check_int, check_number, config_with_preset, load_yaml)
from ensemble.errors import CommandParser, run_cli, stop_on_sigterm
from ensemble.trials import best_config_values, format_table, pick_best, summarize_trial, trials_csv
from ensemble.run_folder import check_output

log = logging.getLogger("ensemble.tune")

FREEZE_CHOICES = ("none", "layer1", "layer2")  # the --freeze stages searched
LR_RANGE = (1e-5, 1e-3)        # log-uniform, around the recipe's 8e-5
ASHA_GRACE_EPOCHS = 1          # every trial trains at least this many epochs
ASHA_REDUCTION_FACTOR = 2      # each rung keeps the top half; Ray's default 4 stops most of a small search


@dataclass(frozen=True)
class SearchSettings:
    output: str                        # results folder
    trials: int = 8                    # sampled (lr, freeze) configurations
    max_epochs: int = 4                # ASHA's max_t: the most epochs a trial trains
    lr_min: float = LR_RANGE[0]        # log-uniform lr range
    lr_max: float = LR_RANGE[1]
    gpus_per_trial: Optional[float] = None  # 0, a fraction or 1 GPU; None = 1 if the cluster has GPUs
    cpus_per_trial: float = 1.0        # CPUs per trial = its torch threads
    carried_keys: tuple = ()           # keys of --config that best_config.yaml keeps (it can replace that file)

    def __post_init__(self) -> None:
        check_int(self, "trials", low=1, high=10_000)
        check_int(self, "max_epochs", low=1, high=INT_RANGES["epochs"][1])
        for name, high in (("lr_min", NUMBER_RANGES["lr"][1]), ("lr_max", NUMBER_RANGES["lr"][1]),
                           ("cpus_per_trial", NUMBER_RANGES["cpus_per_member"][1])):
            check_number(self, name, positive=True, high=high)
        if self.lr_min >= self.lr_max:
            raise ConfigError(f"--lr-min {self.lr_min:g} --lr-max {self.lr_max:g}: lr-min must be below lr-max")
        check_gpus(self, "gpus_per_trial")


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m ensemble.tune", argument_default=argparse.SUPPRESS, allow_abbrev=False,
                examples=("python -m ensemble.tune --data photos --output runs/tune1 --trials 8 --max-epochs 4",
                          "python -m ensemble.driver --config runs/tune1/best_config.yaml --output runs/exp1"),
                description="Ray Tune + ASHA search of lr, --freeze and epochs for one member trained on the "
                            "full train split and scored on val; writes best_config.yaml for ensemble.driver. "
                            "Without --data: the bundled digits with the driver's CPU preset.")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data", help="dataset root with train/<class>/, val/<class>/, test/ (default: bundled digits)")
    g.add_argument("--output", help="results folder (default: runs/tune-<timestamp>)")
    g.add_argument("--config", metavar="FILE.yaml", help="a driver config to start from; lr, freeze and epochs "
                                                         "are searched, the other keys are kept")
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=int, help="sampled configurations (default 8)")
    g.add_argument("--max-epochs", type=int, help="most epochs a trial trains; ASHA stops weak trials sooner "
                                                  "(default: the config's epochs)")
    g.add_argument("--lr-min", type=float, help=f"lower end of the log-uniform lr range (default {LR_RANGE[0]:g})")
    g.add_argument("--lr-max", type=float, help=f"upper end of the log-uniform lr range (default {LR_RANGE[1]:g})")
    g.add_argument("--seed", type=int, help="seeds the sampled configs and every trial's training (default 0)")
    g = p.add_argument_group("model and data (as for ensemble.driver)")
    g.add_argument("--arch", help=f"one of {', '.join(ARCHS)}")
    g.add_argument("--weights", help="none, a torchvision weights name (IMAGENET1K_V1, DEFAULT) or a state-dict file")
    g.add_argument("--freeze-stem", action="store_true", help="also freeze the stem (conv1 + bn1) in every trial")
    g.add_argument("--image-size", type=int, help="train crop size S")
    g.add_argument("--augment", help=" | ".join(AUGMENTS))
    g.add_argument("--batch-size", type=int, help="images per step")
    g.add_argument("--precision", help=f"{' | '.join(PRECISIONS)}: auto = bf16 autocast + channels_last on GPUs "
                                       f"that support it, fp32 on CPU")
    g = p.add_argument_group("resources")
    g.add_argument("--gpus-per-trial", type=float, help="0, a fraction (0.25, 0.5) or 1 GPU "
                                                        "(default: 1 if the cluster has GPUs, else 0)")
    g.add_argument("--cpus-per-trial", type=float, help="CPUs per trial = its torch threads (default 1)")
    g.add_argument("--address", help="Ray cluster (auto, host:port, ray://...; 'local' starts a new one); "
                                     "default: RAY_ADDRESS or the running local cluster, else a new one")
    return p


SEARCH_FLAGS = ("output", "trials", "max_epochs", "lr_min", "lr_max", "gpus_per_trial", "cpus_per_trial")


def settings_from_argv(argv: Optional[Sequence[str]]) -> tuple[EnsembleConfig, SearchSettings]:
    """(base config, search settings). Base config precedence as in the driver:
    defaults < CPU preset (no --data) < --config < flags."""
    args = vars(_parser().parse_args(argv))
    search = {k: args.pop(k) for k in SEARCH_FLAGS if k in args}
    file_values = load_yaml(args.pop("config")) if "config" in args else {}
    base = config_with_preset(file_values, args)
    search.setdefault("max_epochs", base.epochs)
    search["carried_keys"] = tuple(k.replace("-", "_") for k in file_values if k.replace("-", "_") != "output")
    search.setdefault("output", os.path.join("runs", time.strftime("tune-%Y%m%d-%H%M%S")))
    return base, SearchSettings(**search)


# ---------------------------------------------------------------- one trial (runs in a Tune actor)

def check_trial_memory(cfg: EnsembleConfig, num_classes: int, device, *, gpus: float, trial: str) -> None:
    """On a GPU: GpuMemoryError (one line, the batch size or share that fits) when the trial's
    training step, estimated as a member's (``gpu_memory``), exceeds its --gpus-per-trial share."""
    if device.type != "cuda":
        return
    from ensemble.engine import resolve_precision
    from ensemble.gpu_memory import check_fit, gpu_total_bytes, member_memory

    import torch

    bf16 = resolve_precision(cfg.precision, device) is torch.bfloat16
    memory = member_memory(cfg.arch, num_classes, cfg.image_size, cfg.freeze, cfg.freeze_stem, bf16)
    check_fit(memory, member=0, arch=cfg.arch, batch=cfg.batch_size, image_size=cfg.image_size,
              precision="bf16" if bf16 else "fp32", gpu_total=gpu_total_bytes(device),
              gpus_per_member=gpus or 1.0, who=f"trial {trial} (--freeze {cfg.freeze})",
              share_flag="--gpus-per-trial", fresh="")


def train_trial(config: dict, *, base: EnsembleConfig, train_table, val_table, num_classes: int,
                initial_state, max_epochs: int, threads: float, gpus: float = 1.0) -> None:
    """Tune function trainable: the members' epoch loop (``epochs.fit``) on every train row, with
    the trial's lr and frozen stages, reporting each epoch's val accuracy (ASHA may stop it)."""
    import ray
    from ray import tune

    from ensemble.batches import SplitImages
    from ensemble.config import cache_side
    from ensemble.engine import pick_device, seed_everything, set_threads
    from ensemble.epochs import build_trainee, eval_batches, fit, train_batches

    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    set_threads(threads)
    seed_everything(base.seed)
    cfg = base.replace(lr=config["lr"], freeze=config["freeze"])
    device = pick_device(ray.get_gpu_ids())
    check_trial_memory(cfg, num_classes, device, gpus=gpus, trial=tune.get_context().get_trial_id())
    trainee = build_trainee(cfg, num_classes, initial_state, device)
    train_images, val_images = (SplitImages(t, None, image_size=cfg.image_size, resize=cfg.eval_resize,
                                            side=cache_side(cfg)) for t in (train_table, val_table))
    every_row = np.ones(train_table.num_rows, dtype=np.int64)  # no bootstrap: each row once per epoch

    def report(stats, best) -> None:
        log.info("trial %s lr %.3g freeze %s epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f "
                 "val_acc %.4f", tune.get_context().get_trial_id(), cfg.lr, cfg.freeze, stats.epoch, max_epochs,
                 stats.train_loss, stats.train_acc, stats.val_loss, stats.val_acc)
        tune.report({"epoch": stats.epoch, "val_acc": stats.val_acc, "val_loss": stats.val_loss,
                     "train_loss": stats.train_loss, "train_acc": stats.train_acc})

    fit(trainee, epochs=max_epochs, on_epoch=report,
        train=lambda epoch: train_batches(train_images, every_row, cfg.seed, epoch, batch_size=cfg.batch_size,
                                          augment=cfg.augment, threads=threads),
        val=lambda: eval_batches(val_images, batch_size=cfg.batch_size, threads=threads))


# ---------------------------------------------------------------- cluster

def trial_resources(search: SearchSettings) -> dict:
    """{"cpu": .., "gpu": ..} for each trial; refuses requests no node of the cluster can meet."""
    capacity = cluster_capacity()
    gpus = resolve_gpus(search.gpus_per_trial, capacity, "gpus-per-trial")
    return {"cpu": fit_cpus(search.cpus_per_trial, capacity, "cpus-per-trial"), "gpu": float(gpus)}


# ---------------------------------------------------------------- main

def run_search(base: EnsembleConfig, search: SearchSettings) -> dict:
    """The whole search; returns the summary written to tune_report.json.

    Raises a UserError (errors.py) for what the user can fix, before anything is written to
    --output; SearchFailed when no trial reported a result.
    """
    if len(base.archs) > 1 or base.recipes:
        raise ConfigError(f"--arch {base.arch}: a search tunes one architecture's recipe; search each one "
                          f"(--arch {base.archs[0]}), then give the driver their results as recipes in its --config")
    import yaml
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from ensemble.data import quiet_ray_data, scan_layout
    from ensemble.image_check import check_images
    from ensemble.digits import ensure_digits
    from ensemble.models import build_model, load_initial_weights, resolve_weights
    from ensemble.run_folder import versions
    from ensemble.run_lock import RunLock

    started = time.time()
    # config -> data index (names only) -> weights -> output (checked, not yet written)
    data = base.data if base.data is None or storage.is_uri(base.data) else os.path.abspath(base.data)
    index = scan_layout(data or ensure_digits(), val_fraction=base.val_fraction,
                        seed=base.split_seed)  # absolute paths: Tune trials run in their own folders
    num_classes = len(index.classes)
    initial_state = resolve_weights(base.arch, base.weights)
    model = build_model(base.arch, num_classes)
    load_initial_weights(model, initial_state)  # fails here, once, if the file is for another arch
    del model
    output = check_output(search.output)
    if not storage.is_uri(output):
        output = os.path.abspath(output)  # Tune runs trials in their own working directories

    # one process writes the folder at a time (run_lock.py), from before the cluster is asked for work
    with RunLock(output):
        # ray.init -> resources -> every image decoded once (unreadable files skipped)
        connect(base.address)
        quiet_ray_data()
        resources = trial_resources(search)
        index, skipped = check_images(index, base)
        log.info("search: %d trials x up to %d epochs of %s (%d classes; train %d, val %d images), lr %g..%g, "
                 "freeze %s; %g CPU + %g GPU per trial", search.trials, search.max_epochs, base.arch, num_classes,
                 index.train.num_rows, index.val.num_rows, search.lr_min, search.lr_max, "/".join(FREEZE_CHOICES),
                 resources["cpu"], resources["gpu"])
        storage.makedirs(output)

        trainable = tune.with_resources(
            tune.with_parameters(train_trial, base=base, train_table=index.train, val_table=index.val,
                                 num_classes=num_classes, initial_state=initial_state,
                                 max_epochs=search.max_epochs, threads=search.cpus_per_trial,
                                 gpus=resources["gpu"]),
            resources=resources)
        tuner = tune.Tuner(
            trainable,
            param_space={"lr": tune.loguniform(search.lr_min, search.lr_max), "freeze": tune.choice(FREEZE_CHOICES)},
            tune_config=tune.TuneConfig(
                metric="val_acc", mode="max", num_samples=search.trials,
                reuse_actors=True,  # one process per concurrent trial: torch is imported once, not per trial
                search_alg=BasicVariantGenerator(random_state=base.seed),  # same seed -> same sampled configs
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=search.max_epochs,
                                        grace_period=min(ASHA_GRACE_EPOCHS, search.max_epochs),
                                        reduction_factor=ASHA_REDUCTION_FACTOR)),
            run_config=tune.RunConfig(name=time.strftime("ray_tune-%Y%m%d-%H%M%S"), storage_path=output, verbose=0))
        results = tuner.fit()

        rows = []
        for result in results:
            history = [] if result.metrics_dataframe is None else \
                result.metrics_dataframe[["epoch", "val_acc"]].to_dict("records")
            if result.error is not None:
                log.error("trial %s failed: %s", result.path, str(result.error).strip().splitlines()[-1][:300])
            rows.append(summarize_trial(_trial_id(result), result.config, history, max_epochs=search.max_epochs,
                                        failed=result.error is not None))
        rows.sort(key=lambda r: r["trial_id"])  # creation order: ids of one search share a prefix, end in a counter
        best = pick_best(rows)
        values = best_config_values(base, best, data=index.root if base.data is not None else None,
                                    carried_keys=search.carried_keys)
        storage.write_text(storage.join(output, "best_config.yaml"), yaml.safe_dump(values, sort_keys=False))
        storage.write_text(storage.join(output, "trials.csv"), trials_csv(rows))
        summary = {"best_config": values, "best_trial": best["trial_id"], "trials": rows,
                   "search": {"trials": search.trials, "max_epochs": search.max_epochs,
                              "lr_range": [search.lr_min, search.lr_max], "freeze_choices": list(FREEZE_CHOICES),
                              "seed": base.seed, "resources_per_trial": resources,
                              "asha": {"grace_period": ASHA_GRACE_EPOCHS, "reduction_factor": ASHA_REDUCTION_FACTOR}},
                   "base_config": base.to_dict(), "data": {"root": index.root, **index.sizes()},
                   "skipped_files": skipped, "ray_tune_dir": results.experiment_path,
                   "versions": versions(), "seconds": time.time() - started}
        storage.write_text(storage.join(output, "tune_report.json"), json.dumps(summary, indent=2))

        print(format_table(rows, best))
        print("best config: " + ", ".join(f"{k}={v}" for k, v in values.items() if k in ("lr", "freeze", "epochs")))
        print(f"outputs in {output}: best_config.yaml, trials.csv, tune_report.json; "
              f"train with: python -m ensemble.driver --config {storage.join(output, 'best_config.yaml')}")
        return summary


def _trial_id(result) -> str:
    """Tune's trial id (``8028b_00003``); a trial that failed before reporting has it only in its folder name."""
    if result.metrics and "trial_id" in result.metrics:
        return str(result.metrics["trial_id"])
    found = re.search(r"_([0-9a-f]{5}_[0-9]{5})_", os.path.basename(result.path))
    return found.group(1) if found else os.path.basename(result.path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stop_on_sigterm()  # as Ctrl-C: the lock released, temporary files removed, then one line
    argv = list(sys.argv[1:] if argv is None else argv)

    def search() -> int:
        run_search(*settings_from_argv(argv))
        return 0

    return run_cli(search, interrupted="interrupted: the search stopped (best_config.yaml is written only when it "
                                       "ends); rerun the same command to search again")


if __name__ == "__main__":
    # Run through the imported module, so Ray pickles ``train_trial`` by reference
    # (ensemble.tune.train_trial) rather than by value from __main__.
    from ensemble.tune import main as _main

    from ensemble.errors import exit_process

    exit_process(_main())
