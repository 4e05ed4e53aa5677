"""The driver's command line: flags -> a validated EnsembleConfig (no Ray, no torch)."""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ensemble.config import (AUGMENTS, ARCHS, BAGGINGS, CACHE_TIERS, CALIBRATE_ON, EVAL_RESIZES, FREEZE_STAGES,
                             PRECISIONS, TTAS, VOTES, EnsembleConfig, config_with_preset, load_yaml)
from ensemble.errors import CommandParser

DEFAULTS = EnsembleConfig()

EXAMPLES = (
    "python -m ensemble.driver                                     # the bundled digits demo (CPU preset)",
    "python -m ensemble.driver --data photos --output runs/exp1"
    "    # your train/ val/ [test/] folders: the study's recipe",
    "python -m ensemble.driver --data photos --output runs/exp1    # the same command again resumes it",
    "python -m ensemble.driver --data labels.csv --arch resnet18 --weights none --epochs 5 --members 5",
    "python -m ensemble.driver --data s3://bucket/photos --output s3://bucket/runs/exp1 --address auto",
    "python -m ensemble.driver --data photos --dry-run             # the plan and parameter counts only",
)


def one_of(choices) -> str:
    """A flag's metavar that shows its allowed values: {soft,hard}."""
    return "{" + ",".join(choices) + "}"


def _parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = CommandParser(
        prog="python -m ensemble.driver", argument_default=argparse.SUPPRESS, examples=EXAMPLES,
        description="Train N bootstrap members on Ray, soft-vote them, write predictions and a report. "
                    "Without --data: the bundled digits demo with a CPU preset (flags still override).")
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data", help="dataset root (local path or s3://...) with train/<class>/, val/<class>/, "
                                  "test/ (optional), or a manifest .csv / .parquet with columns path, label, split "
                                  "(default: bundled scikit-learn digits)")
    g.add_argument("--val-fraction", type=float, metavar="F",
                   help="draw val from train instead: this share of each class's train images (0 < F <= 0.5, "
                        "rounded half up, at least one image of each class left in train), seeded by --seed; "
                        "the data must then have no val split (default: the data's own val split)")
    g.add_argument("--val-seed", type=int, metavar="N",
                   help="seed of the --val-fraction draw instead of --seed: runs with other seeds keep one val split")
    g.add_argument("--output", help="results folder (default: runs/<date>-<time>-<6 hex digits>)")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML with the same keys as these flags; flags override")
    g = p.add_argument_group("ensemble")
    g.add_argument("--members", type=int, help=f"bagged models (default {d.members})")
    g.add_argument("--bootstrap-size", type=int, help="rows drawn with replacement per member (default: train size)")
    g.add_argument("--seed", type=int, help=f"run seed; member seeds derive from it (default {d.seed})")
    g.add_argument("--bagging", metavar=one_of(BAGGINGS),
                   help="bootstrap: each member samples the train set with replacement; full: every "
                   f"member trains on all of it with its own seed (deep ensemble) (default {d.bagging})")
    g.add_argument("--vote", metavar=one_of(VOTES),
                   help=f"soft: average probabilities; hard: majority of member top-1, ties by summed "
                   f"probability (default {d.vote})")
    g.add_argument("--tta", metavar=one_of(TTAS),
                   help=f"hflip: also run each member on the mirrored image and average (default {d.tta})")
    g.add_argument("--calibrate-on", metavar=one_of(CALIBRATE_ON),
                   help="val: fit the ensemble's temperature on the full vote over val (its "
                   "scores cross-fitted); oob: on out-of-bag training rows, which each "
                   f"vote with only the members that never drew them (default {d.calibrate_on})")
    g = p.add_argument_group("model")
    g.add_argument("--arch", help=f"one of {', '.join(ARCHS)}, or several comma-separated: members take them in "
                                  f"turn; a --config YAML's 'recipes' sets lr, weights, freeze, freeze_stem or "
                                  f"batch_size per architecture (default {d.arch})")
    g.add_argument("--weights", help="none, a torchvision weights name (IMAGENET1K_V1, DEFAULT) or a "
                                     f"state-dict file (default {d.weights})")
    g.add_argument("--freeze", metavar=one_of(FREEZE_STAGES), help=f"freeze residual stages layer1..this one; "
                                    f"'stem' freezes the stem only (default {d.freeze}, the study's)")
    g.add_argument("--freeze-stem", action="store_true", help="also freeze the stem (conv1 + bn1)")
    g.add_argument("--num-classes", type=int, help="classes for --dry-run without --data")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"epochs per member (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"images per step per member (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--image-size", type=int,
                   help=f"train crop size S; eval resizes to S*256/224 (default {d.image_size})")
    g.add_argument("--eval-resize", metavar=one_of(EVAL_RESIZES),
                   help=f"squash = the study's eval transform "
                   f"(S x S, then round(S*256/224) square, centre S; aspect ratio not kept); "
                   f"short-side = resize the short side, crop the centre (default {d.eval_resize})")
    g.add_argument("--precision", metavar=one_of(PRECISIONS), help=f"auto = bf16 autocast + channels_last on GPUs that "
                                       f"support it, fp32 on CPU (default {d.precision})")
    g.add_argument("--augment", metavar=one_of(AUGMENTS), help=f"seed = AutoAugment+RandomResizedCrop+flip; "
                                     f"light = RandomResizedCrop(scale 0.6-1) only; none = eval transform "
                                     f"(default {d.augment})")
    g = p.add_argument_group("image cache (decoded once per run)")
    g.add_argument("--cache-side", type=int, help="short side, in pixels, of the train images cached (decoded once "
                   "per run) as the source of every epoch's crops (default: round(S*256/224), 256 at S=224)")
    g.add_argument("--cache-share", type=float,
                   help=f"the image cache may take this share of the smallest node's object store; "
                   f"larger data is decoded by the members every epoch; 0 = never cache (default {d.cache_share:g})")
    g.add_argument("--cache-tier", metavar=one_of(CACHE_TIERS), help=f"raw = decoded pixels; compressed = train images "
                   f"kept as JPEGs (about a ninth of the bytes), val/test pixels exact; auto = raw if it fits "
                   f"--cache-share, else compressed, else no cache (default {d.cache_tier})")
    g = p.add_argument_group("resources")
    g.add_argument("--gpus-per-member", type=float,
                   help="0, a fraction (0.25, 0.5) or 1 GPU "
                   "(default: 1 if the cluster has or its autoscaler can add GPUs, else 0)")
    g.add_argument("--cpus-per-member", type=float, help="CPUs per member = its torch threads; it decodes its own "
                                                          "images on them (default: 2, or all of the largest "
                                                          "node's if it has fewer)")
    g.add_argument("--infer-actors", type=int, help=f"soft-vote actor pool size (default {d.infer_actors})")
    g.add_argument("--infer-batch-size", type=int, help=f"images per soft-vote batch (default {d.infer_batch_size})")
    g.add_argument("--gpus-per-infer-actor", type=float, help="like --gpus-per-member")
    g.add_argument("--cpus-per-infer-actor", type=float,
                   help=f"CPUs per soft-vote actor (default {d.cpus_per_infer_actor:g})")
    g.add_argument("--stall-timeout", type=float,
                   help="seconds with none of the run's member actors able to start "
                   "(their CPUs/GPUs held by other work, or never added), or the "
                   "image cache or the soft vote making no progress, before "
                   f"the run stops with a line saying why (default {d.stall_timeout:g})")
    g.add_argument("--address", help="Ray cluster address (ray://..., host:port, auto); default: the running "
                                     "local cluster or RAY_ADDRESS if any, else start a local one")
    g = p.add_argument_group("tracking")
    g.add_argument("--mlflow", action="store_true", help="log the run to MLflow: a parent run (config, the ensemble's "
                   "scores, report.md and figures) and a child run per member (its settings, per-epoch metrics)")
    g.add_argument("--mlflow-uri", metavar="URI", help="MLflow tracking URI (a server, http://HOST:5000, or "
                   "sqlite:///PATH.db) (default: MLFLOW_TRACKING_URI, else sqlite:///<output>/mlflow.db)")
    g.add_argument("--mlflow-experiment", metavar="NAME", help=f"the MLflow experiment (default {d.mlflow_experiment})")
    g = p.add_argument_group("runs")
    g.add_argument("--strict", action="store_true", help="stop before training if any image file is unreadable "
                                                       "(default: skip such files and list them in report.json)")
    g.add_argument("--fresh", action="store_true", help="discard an earlier run in --output instead of resuming it "
                                                      "(rerunning the same command resumes by default)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and parameter counts; train nothing")
    return p


def config_from_argv(argv: Optional[Sequence[str]]) -> tuple[EnsembleConfig, bool, bool]:
    """(config, dry_run, fresh). Precedence: defaults < CPU preset (no --data) < --config < flags."""
    args = vars(_parser().parse_args(argv))
    dry_run = args.pop("dry_run", False)
    fresh = args.pop("fresh", False)
    file_values = load_yaml(args.pop("config")) if "config" in args else {}
    return config_with_preset(file_values, args), dry_run, fresh
