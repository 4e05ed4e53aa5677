"""Train a bagged ensemble on Ray and soft-vote its predictions.

    python -m ensemble.driver                                  # bundled digits demo, CPU preset
    python -m ensemble.driver --data DATA --output runs/exp1   # your images, the study's recipe
    python -m ensemble.driver --dry-run --arch resnext101_64x4d --num-classes 100 --freeze layer1

On a cluster (started with ``ray up cluster.yaml``) the same command joins it (``--address``
or ``RAY_ADDRESS``; by default the local cluster if one is running, else a new local one).
Stages: config -> ray.init -> data -> launch members -> gather -> vote -> report.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import math
import os
import sys
import time
import warnings
from typing import Optional, Sequence

import numpy as np

from ensemble import storage
from ensemble.bootstrap import bootstrap_counts, member_seeds
from ensemble.checkpoint import CheckpointError
from ensemble.cluster import check_output, cluster_capacity, connect, resolve_gpus
from ensemble.config import (AUGMENTS, CPU_PRESET, FREEZE_STAGES, ARCHS, ConfigError, EnsembleConfig,
                             build_config, load_yaml)
from ensemble.analysis import render_report_md
from ensemble.metrics import disagreement, hard_vote, oob_scores, predictive_entropy, size_curve, summary_metrics
from ensemble.report import format_table, versions, write_outputs
from ensemble.vote import soft_vote

log = logging.getLogger("ensemble.driver")
DEFAULTS = EnsembleConfig()


# ---------------------------------------------------------------- command line

def _parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m ensemble.driver", argument_default=argparse.SUPPRESS,
        description="Train N bootstrap members on Ray, soft-vote them, write predictions and a report. "
                    "Without --data: the bundled digits demo with a CPU preset (flags still override).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data and outputs")
    g.add_argument("--data", help="dataset root (local path or s3://...) with train/<class>/, val/<class>/, "
                                  "test/ (default: bundled scikit-learn digits)")
    g.add_argument("--output", help="results folder (default: runs/<timestamp>)")
    g.add_argument("--config", metavar="FILE.yaml", help="YAML with the same keys as these flags; flags override")
    g = p.add_argument_group("ensemble")
    g.add_argument("--members", type=int, help=f"bagged models (default {d.members})")
    g.add_argument("--bootstrap-size", type=int, help="rows drawn with replacement per member (default: train size)")
    g.add_argument("--seed", type=int, help=f"run seed; member seeds derive from it (default {d.seed})")
    g.add_argument("--bagging", help="bootstrap: each member samples the train set with replacement; full: every "
                                     f"member trains on all of it with its own seed (deep ensemble) (default {d.bagging})")
    g.add_argument("--vote", help=f"soft: average probabilities; hard: majority of member top-1, ties by summed "
                                  f"probability (default {d.vote})")
    g.add_argument("--tta", help=f"none | hflip: also run each member on the mirrored image and average (default {d.tta})")
    g = p.add_argument_group("model")
    g.add_argument("--arch", help=f"one of {', '.join(ARCHS)} (default {d.arch})")
    g.add_argument("--weights", help="none, a torchvision weights name (IMAGENET1K_V1, DEFAULT) or a "
                                     f"state-dict file (default {d.weights})")
    g.add_argument("--freeze", help=f"freeze residual stages layer1..this one; one of {', '.join(FREEZE_STAGES)}; "
                                    f"'stem' freezes the stem only (default {d.freeze}, the study's)")
    g.add_argument("--freeze-stem", action="store_true", help="also freeze the stem (conv1 + bn1)")
    g.add_argument("--num-classes", type=int, help="classes for --dry-run without --data")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, help=f"epochs per member (default {d.epochs})")
    g.add_argument("--batch-size", type=int, help=f"images per step per member (default {d.batch_size})")
    g.add_argument("--lr", type=float, help=f"Adam learning rate (default {d.lr})")
    g.add_argument("--image-size", type=int, help=f"train crop size S; eval resizes to S*256/224 (default {d.image_size})")
    g.add_argument("--precision", help=f"auto | bf16 | fp32: auto = bf16 autocast + channels_last on GPUs that "
                                       f"support it, fp32 on CPU (default {d.precision})")
    g.add_argument("--augment", help=f"{' | '.join(AUGMENTS)}: seed = AutoAugment+RandomResizedCrop+flip; "
                                     f"light = RandomResizedCrop(scale 0.6-1) only; none = eval transform "
                                     f"(default {d.augment})")
    g = p.add_argument_group("resources")
    g.add_argument("--gpus-per-member", type=float, help="0, a fraction (0.25, 0.5) or whole GPUs "
                                                         "(default: 1 if the cluster has or its autoscaler can add GPUs, else 0)")
    g.add_argument("--cpus-per-member", type=float, help=f"CPUs per member = its torch threads (default {d.cpus_per_member:g})")
    g.add_argument("--infer-actors", type=int, help=f"soft-vote actor pool size (default {d.infer_actors})")
    g.add_argument("--infer-batch-size", type=int, help=f"images per soft-vote batch (default {d.infer_batch_size})")
    g.add_argument("--gpus-per-infer-actor", type=float, help="like --gpus-per-member")
    g.add_argument("--cpus-per-infer-actor", type=float, help=f"CPUs per soft-vote actor (default {d.cpus_per_infer_actor:g})")
    g.add_argument("--address", help="Ray cluster address (ray://..., host:port, auto); default: the running "
                                     "local cluster or RAY_ADDRESS if any, else start a local one")
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
    # The CPU preset is for the bundled demo; --num-classes without --data plans for your own data.
    named = {k.replace("-", "_") for k, v in file_values.items() if v is not None} | set(args)
    uses_bundled = not named & {"data", "num_classes"}
    cfg = build_config(preset=CPU_PRESET if uses_bundled else None, file_values=file_values, flag_values=args)
    return cfg, dry_run, fresh


# ---------------------------------------------------------------- stages

def member_window(cfg: EnsembleConfig, capacity, gpus: float, data_cpus: float) -> int:
    """How many members run at once, leaving ``data_cpus`` for their decode tasks.

    Members that hold every CPU would starve their own Ray Data tasks (a hang, not an error).
    This many trainer actors start; each trains its share of the members in turn. Ray queues
    the actors that do not fit yet, and an autoscaler adds nodes for them: the count is taken
    from what the cluster can grow to.
    """
    slots = math.floor((capacity.most("CPU") - data_cpus) / cfg.cpus_per_member + 1e-9)
    if gpus > 0:
        slots = min(slots, math.floor(capacity.most("GPU") / gpus + 1e-9))
    return max(1, min(cfg.members, slots))


def plan_lines(cfg: EnsembleConfig, params: dict, sizes: Optional[dict], num_classes: int) -> list[str]:
    n_boot = cfg.bootstrap_size or (sizes["train"] if sizes else None)
    gpus = "auto (1 if the cluster has GPUs)" if cfg.gpus_per_member is None else f"{cfg.gpus_per_member:g}"
    lines = [
        f"members          {cfg.members} x {cfg.arch} ({num_classes} classes), weights {cfg.weights}, "
        f"freeze {cfg.freeze}{' + stem' if cfg.freeze_stem else ''}",
        f"per member       {gpus} GPU, {cfg.cpus_per_member:g} CPU; {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"Adam lr {cfg.lr:g}, image {cfg.image_size}, augment {cfg.augment}",
        f"soft vote        {cfg.infer_actors} actor(s) x batch {cfg.infer_batch_size}",
        f"parameters       {params['total']:,} total, {params['trainable']:,} trainable",
    ]
    if sizes:
        lines.insert(1, f"data             {sizes['classes']} classes; train {sizes['train']}, val {sizes['val']}, "
                        f"test {sizes['test']} images; bootstrap {n_boot} rows per member")
    return lines


def training_fingerprint(cfg: EnsembleConfig, index, n_samples: int) -> dict:
    """What a finished member depends on; a run may reuse members only when this matches."""
    import hashlib

    digest = hashlib.sha256()
    for table in (index.train, index.val):
        for column in ("path", "label"):
            digest.update("\n".join(map(str, table.column(column).to_pylist())).encode())
    keys = ("arch", "weights", "freeze", "freeze_stem", "epochs", "batch_size", "lr", "image_size", "augment", "seed",
            "bagging", "precision")
    return {**{k: getattr(cfg, k) for k in keys}, "bootstrap_size": n_samples, "classes": list(index.classes),
            "files_sha256": digest.hexdigest()}


RESULT_FILES = ("predictions.csv", "probabilities.parquet", "report.json", "config.yaml", "run.json")


def open_output(output: str, fingerprint: dict, *, fresh: bool) -> bool:
    """Create the folder; with an earlier run there, resume it (same fingerprint) or refuse.

    Returns True when an earlier run's members may be reused.
    """
    previous = storage.join(output, "run.json")
    resuming = False
    if storage.exists(previous):
        if fresh:
            storage.remove_tree(storage.join(output, "members"))
            for name in RESULT_FILES:
                if storage.exists(storage.join(output, name)):
                    storage.remove(storage.join(output, name))
        else:
            try:
                old = json.loads(storage.read_bytes(previous)).get("fingerprint")
            except ValueError:
                old = None
            if old != fingerprint:
                changed = sorted(k for k in set(old or {}) | set(fingerprint)
                                 if (old or {}).get(k) != fingerprint.get(k))
                raise ConfigError(f"--output {output} holds a run with another config ({', '.join(changed) or 'unreadable'}"
                                  f" differ); use another --output, or add --fresh to discard it")
            resuming = True
    try:
        storage.makedirs(output)
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot create it ({exc.__class__.__name__}); pick another folder") from None
    return resuming


EVAL_CACHE_SHARE = 0.2  # decoded val may take up to this share of the object store; larger streams

MEMBER_RESTARTS = 3  # a member's process may die this often (preemption, OOM) before the run fails


def slot_members(queue: list[int], window: int) -> list[list[int]]:
    """Members per trainer slot: at most ``window`` slots, members dealt round-robin."""
    slots = max(1, min(window, len(queue)))
    return [queue[k::slots] for k in range(slots)] if queue else []


def slot_name(members: list[int]) -> str:
    """The actor's name in the dashboard: ensemble-member-3, or ensemble-members-0-2-4 for a slot of several."""
    if len(members) == 1:
        return f"ensemble-member-{members[0]}"
    return "ensemble-members-" + "-".join(map(str, members))


def show_progress() -> bool:
    """Progress bars (members' epochs, the soft vote) only on a terminal; CI logs stay plain.
    ENSEMBLE_PROGRESS=1 or 0 overrides."""
    forced = os.environ.get("ENSEMBLE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() and not os.environ.get("CI")


def train_members(cfg: EnsembleConfig, *, output: str, train_ref, make_val, seeds: list[int],
                  n_train: int, initial_ref, num_classes: int, gpus: float, window: int,
                  fingerprint: dict, resuming: bool):
    """Train every unfinished member on at most ``window`` trainer actors; wait with ray.wait; gather.

    Each actor (a slot) trains its members one after another, so a process starts once per slot,
    not once per member; ``make_val()`` (the decoded val split) runs while the actors start. Members an earlier run finished are loaded (hashes checked), not
    retrained. A slot whose process dies is restarted by Ray; its member resumes from its last
    epoch checkpoint, and its later members follow.
    Returns (summaries sorted by member, weight ObjectRefs in member order).
    """
    import ray

    from ensemble.actors import MemberTrainer, load_finished_member

    summaries, weights = {}, {}
    queue = []
    for i in range(cfg.members):
        finished = load_finished_member(output, i, fingerprint) if resuming else None
        if finished is None:
            queue.append(i)
        else:
            summaries[i], weights[i] = finished[0], ray.put(finished[1])
            log.info("member %d: finished earlier (val acc %.4f), loaded from %s", i, finished[0]["val_acc"], output)
    plan = ray.put({"config": cfg, "output": output, "fingerprint": fingerprint, "num_classes": num_classes,
                    "initial_state": initial_ref, "progress": show_progress()})
    running: dict = {}   # summary ref -> (member, slot, weights ref)
    actors, left = [], []  # per slot: the actor, and how many of its members are unfinished
    try:
        for slot, members in enumerate(slot_members(queue, window)):
            # Named after its members, so the dashboard's Actors view reads like the ensemble.
            actor = MemberTrainer.options(
                name=slot_name(members), num_cpus=cfg.cpus_per_member, num_gpus=gpus,
                max_restarts=MEMBER_RESTARTS, max_task_retries=MEMBER_RESTARTS,
            ).remote(cfg.cpus_per_member)
            actors.append(actor)
            left.append(len(members))
        val_ds = make_val() if queue else None
        for slot, members in enumerate(slot_members(queue, window)):
            actor = actors[slot]
            for i in members:  # queued on the actor; it runs them in this order
                counts = (np.ones(n_train, dtype=np.int64) if cfg.bagging == "full"
                          else bootstrap_counts(seeds[i], n_train, fingerprint["bootstrap_size"]))
                summary_ref, weights_ref = actor.fit.options(name=f"ensemble-member-{i}.fit").remote(
                    i, seeds[i], plan, train_ref, val_ds, [ray.put(counts)])
                running[summary_ref] = (i, slot, weights_ref)
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                i, slot, weights_ref = running.pop(ref)
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, (CheckpointError, ConfigError)):
                        raise cause from None
                    raise MemberFailed(f"member {i} failed after {MEMBER_RESTARTS} restarts "
                                       f"({exc.__class__.__name__}); finished members are saved in {output}: "
                                       f"rerun the same command to resume") from exc
                left[slot] -= 1
                if left[slot] == 0:
                    ray.kill(actors[slot])  # frees its resources; returned weights stay in the object store
                summaries[i], weights[i] = summary, weights_ref
                log.info("member %d done: best val acc %.4f at epoch %d (%.0f s) [%d/%d]", i, summary["val_acc"],
                         summary["best_epoch"], summary["seconds"], len(summaries), cfg.members)
    finally:
        for slot, actor in enumerate(actors):  # on Ctrl-C or a failure: stop the others now
            if left[slot]:
                ray.kill(actor)
    order = sorted(summaries)
    return [summaries[i] for i in order], [weights[i] for i in order]


class MemberFailed(RuntimeError):
    """A member died more often than Ray may restart it."""


_VOTERS = itertools.count()


def voter_names():
    """Ray Data calls this for each pool actor it starts: ensemble-voter-0, -1, ... in the dashboard.
    Numbered per driver process, so a second run in it cannot meet a name still in use."""
    return lambda: {"name": f"ensemble-voter-{next(_VOTERS)}"}


def soft_vote_stage(cfg: EnsembleConfig, table, *, weight_refs: list, num_classes: int, gpus: float) -> dict:
    """Ray Data inference: an actor pool of SoftVoters over file rows.

    Returns arrays sorted by row id: id, image_name, label, probs (n, classes) = soft vote,
    member_probs (n, members, classes).
    """
    import ray.data

    from ensemble.actors import SoftVoter
    from ensemble.data import to_dataset

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = show_progress()  # the vote's own bar (a dataset keeps the context it was made in)
    try:
        with warnings.catch_warnings():  # deprecated from Ray 2.60 (removal planned for 2.64); names the pool's actors
            warnings.filterwarnings("ignore", message="`ray_remote_args_fn` is deprecated")
            ds = to_dataset(table, rows_per_block=cfg.infer_batch_size).map_batches(
                SoftVoter, batch_size=cfg.infer_batch_size, batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=cfg.infer_actors),
                num_cpus=cfg.cpus_per_infer_actor, num_gpus=gpus, ray_remote_args_fn=voter_names(),
                fn_constructor_kwargs={"arch": cfg.arch, "num_classes": num_classes, "weight_refs": weight_refs,
                                       "image_size": cfg.image_size, "threads": cfg.cpus_per_infer_actor,
                                       "tta": cfg.tta, "precision": cfg.precision})
        parts = list(ds.iter_batches(batch_size=None, batch_format="numpy"))
    finally:
        context.enable_progress_bars = False
    keys = ("id", "image_name", "label", "probs", "member_probs")
    out = {k: np.concatenate([p[k] for p in parts]) for k in keys}
    order = np.argsort(out["id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def stack_splits(tables: dict):
    """One table of several splits with ids offset so they stay unique; returns (table, id ranges)."""
    import pyarrow as pa

    parts, ranges, offset = [], {}, 0
    for name, table in tables.items():
        ids = table.column("id").to_numpy() + offset
        parts.append(table.set_column(0, "id", pa.array(ids)))
        ranges[name] = (offset, offset + table.num_rows)
        offset += table.num_rows
    return pa.concat_tables(parts), ranges


# ---------------------------------------------------------------- main

def dry_run(cfg: EnsembleConfig) -> int:
    from ensemble.data import scan_layout
    from ensemble.digits import ensure_digits
    from ensemble.models import build_model, count_parameters, freeze

    sizes = None
    if cfg.data is not None or cfg.num_classes is None:
        sizes = scan_layout(cfg.data or ensure_digits()).sizes()
        if cfg.num_classes is not None and cfg.num_classes != sizes["classes"]:
            raise ConfigError(f"--num-classes {cfg.num_classes} but the data has {sizes['classes']} classes")
    num_classes = sizes["classes"] if sizes else cfg.num_classes
    model = build_model(cfg.arch, num_classes)
    freeze(model, cfg.freeze, freeze_stem=cfg.freeze_stem)
    print("\n".join(plan_lines(cfg, count_parameters(model), sizes, num_classes)))
    return 0


def run(cfg: EnsembleConfig, *, fresh: bool = False) -> dict:
    """The whole pipeline; returns the report.

    Raises ConfigError / CheckpointError for what the user can fix, before anything is written
    to the output folder. ``fresh`` discards an earlier run in that folder instead of resuming it.
    """
    import ray

    from ensemble.data import check_images, decoded_eval, quiet_ray_data, scan_layout
    from ensemble.digits import ensure_digits
    from ensemble.models import build_model, count_parameters, freeze, load_initial_weights, resolve_weights

    started = time.time()
    # config -> data index (names only) -> weights -> output folder (checked, not yet written)
    index = scan_layout(cfg.data or ensure_digits())
    num_classes = len(index.classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"--num-classes {cfg.num_classes} but the data has {num_classes} classes")
    initial_state = resolve_weights(cfg.arch, cfg.weights)
    model = build_model(cfg.arch, num_classes)
    load_initial_weights(model, initial_state)  # fails here, once, if the file is for another arch
    freeze(model, cfg.freeze, freeze_stem=cfg.freeze_stem)
    params = count_parameters(model)
    del model
    output = check_output(cfg.output or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S")))
    seeds = member_seeds(cfg.seed, cfg.members)

    # ray.init -> resources -> every image decoded once (bad files skipped, or --strict stops)
    dashboard = connect(cfg.address)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    quiet_ray_data()
    capacity = cluster_capacity()
    gpus = resolve_gpus(cfg.gpus_per_member, capacity, "gpus-per-member")
    # Voters follow GPU members, also onto GPU nodes an autoscaler has yet to add.
    infer_gpus = resolve_gpus(cfg.gpus_per_infer_actor, capacity, "gpus-per-infer-actor",
                              auto=1.0 if gpus > 0 else None)
    index, skipped = check_images(index, strict=cfg.strict)
    for bad in skipped:
        log.warning("skipping unreadable %s image %s: %s", bad["split"], bad["path"], bad["reason"])
    n_samples = cfg.bootstrap_size or index.train.num_rows
    fingerprint = training_fingerprint(cfg, index, n_samples)
    resuming = open_output(output, fingerprint, fresh=fresh)  # first write to --output

    from ensemble.actors import DATA_CPUS
    window = member_window(cfg, capacity, gpus, DATA_CPUS)
    resolved = dataclasses.replace(cfg, data=index.root, output=output, gpus_per_member=gpus,
                                   gpus_per_infer_actor=infer_gpus)
    _save_config(output, resolved, seeds, fingerprint)
    for line in plan_lines(resolved, params, index.sizes(), num_classes):
        log.info(line)
    grows = " (with the nodes its autoscaler may add)" if capacity.autoscaling else ""
    log.info("running up to %d member(s) at once on %g CPU / %g GPU%s", window, capacity.most("CPU"),
             capacity.most("GPU"), grows)

    # data -> members -> gather. Members read the train rows (names) and decode their own
    # epochs; val is decoded once for all of them when it fits in the object store.
    t_train = time.time()
    train_ref = ray.put(index.train)

    def make_val():
        return decoded_eval(index.val, image_size=cfg.image_size, batch_size=cfg.batch_size, num_cpus=DATA_CPUS,
                            max_bytes=EVAL_CACHE_SHARE * ray.cluster_resources().get("object_store_memory", 0))[0]
    initial_ref = ray.put(initial_state) if initial_state is not None else None
    summaries, weight_refs = train_members(
        resolved, output=output, train_ref=train_ref, make_val=make_val, seeds=seeds, n_train=index.train.num_rows,
        initial_ref=initial_ref, num_classes=num_classes, gpus=gpus, window=window,
        fingerprint=fingerprint, resuming=resuming)
    t_vote = time.time()

    # vote: val (report), test (predictions) and, for out-of-bag scores, train, in one pass of the pool
    splits = {"val": index.val, "test": index.test}
    if cfg.bagging == "bootstrap":
        splits["train"] = index.train
    table, ranges = stack_splits(splits)
    voted = soft_vote_stage(resolved, table, weight_refs=weight_refs, num_classes=num_classes, gpus=infer_gpus)
    part = {name: slice(*r) for name, r in ranges.items()}
    t_report = time.time()

    counts = None
    if cfg.bagging == "bootstrap":
        counts = np.stack([bootstrap_counts(seed, index.train.num_rows, n_samples) for seed in seeds])
    analysis = analyse(resolved, summaries, voted, part, counts, index.classes)
    test = {k: v[part["test"]] for k, v in voted.items()}
    report = {
        "members": analysis["members"],
        "ensemble": analysis["ensemble"],
        "params": params,
        "data": {"root": index.root, **index.sizes(), "class_names": list(index.classes)},
        "skipped_files": skipped,
        "config": resolved.to_dict(),
        "seeds": seeds,
        "fingerprint": fingerprint,
        "versions": versions(),
        "seconds": {"train": t_vote - t_train, "vote": t_report - t_vote},
    }
    figures = write_figures(output, report, summaries, voted, part, index.classes)
    report["seconds"].update(report=time.time() - t_report, total=time.time() - started)
    test_preds = analysis["test_labels"](test["member_probs"])
    write_outputs(output, image_names=test["image_name"], probs=test["probs"], classes=index.classes,
                  report=report, pred_index=test_preds,
                  extra_columns={"predictive_entropy": predictive_entropy(test["probs"]),
                                 "member_disagreement": disagreement(test["member_probs"].transpose(1, 0, 2))})
    storage.write_text(storage.join(output, "report.md"), render_report_md(report, figures))
    print(format_table(report["members"], report["ensemble"]["val_acc"]))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image file(s); listed in report.json under skipped_files")
    print(f"outputs in {output}: predictions.csv, probabilities.parquet, report.json, report.md, figures/, members/")
    return report


def analyse(cfg: EnsembleConfig, summaries: list, voted: dict, part: dict, counts, classes) -> dict:
    """Members vs ensemble on val (accuracy, NLL, ECE, Brier), the size curve and OOB scores."""
    val_members = voted["member_probs"][part["val"]].transpose(1, 0, 2)  # (members, n_val, classes)
    val_labels = voted["label"][part["val"]]
    val_probs = voted["probs"][part["val"]]
    if cfg.vote == "hard":
        def test_labels(member_probs):  # (n, members, classes) -> (n,)
            return hard_vote(member_probs.transpose(1, 0, 2))
    else:
        def test_labels(member_probs):
            return soft_vote(member_probs.transpose(1, 0, 2)).argmax(axis=1)
    val_pred = test_labels(voted["member_probs"][part["val"]])
    ensemble = {"val_acc": float((val_pred == val_labels).mean()), "vote": cfg.vote, "tta": cfg.tta,
                "bagging": cfg.bagging, "metrics": summary_metrics(val_probs, val_labels),
                "mean_member_val_acc": float(np.mean([s["val_acc"] for s in summaries])),
                "size_curve": size_curve(val_members, val_labels, seed=cfg.seed)}
    members = [{k: v for k, v in s.items() if k not in ("val_ids", "val_probs")} for s in summaries]
    for m, probs in zip(members, val_members):
        m["metrics"] = summary_metrics(probs, val_labels)
    if counts is not None:
        train_members = voted["member_probs"][part["train"]].transpose(1, 0, 2)
        oob = oob_scores(train_members, counts, voted["label"][part["train"]])
        ensemble["oob"] = oob
        for m, acc in zip(members, oob["member_acc"]):
            m["oob_acc"] = acc
    return {"members": members, "ensemble": ensemble, "test_labels": test_labels}


def write_figures(output: str, report: dict, summaries: list, voted: dict, part: dict, classes) -> dict:
    """PNG figures under OUTPUT/figures/ (drawn locally, then written through storage)."""
    import tempfile

    from ensemble import figures as fig

    val = {k: v[part["val"]] for k, v in voted.items()}
    if report["ensemble"]["vote"] == "hard":
        preds = hard_vote(val["member_probs"].transpose(1, 0, 2))
    else:
        preds = val["probs"].argmax(axis=1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        drawn = {
            "training_curves": fig.training_curves([s["history"] for s in summaries], os.path.join(tmp, "a.png")),
            "size_curve": fig.size_curve_plot(report["ensemble"]["size_curve"], os.path.join(tmp, "b.png")),
            "reliability": fig.reliability_diagram(val["probs"], val["label"], os.path.join(tmp, "c.png")),
            "confusion_matrix": fig.confusion_matrix_plot(val["label"], preds, list(classes),
                                                          os.path.join(tmp, "d.png")),
        }
        for name, path in drawn.items():
            rel = f"figures/{name}.png"
            with open(path, "rb") as fh:
                storage.write_bytes(storage.join(output, "figures", f"{name}.png"), fh.read())
            out[name] = rel
    return out


def _save_config(output: str, cfg: EnsembleConfig, seeds: list[int], fingerprint: dict) -> None:
    import yaml

    storage.write_text(storage.join(output, "config.yaml"), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    storage.write_text(storage.join(output, "run.json"), json.dumps(
        {"config": cfg.to_dict(), "member_seeds": seeds, "fingerprint": fingerprint, "versions": versions()},
        indent=2))


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `ray job stop`, kill: stop like Ctrl-C
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg, is_dry_run, fresh = config_from_argv(argv)
        if is_dry_run:
            return dry_run(cfg)
        run(cfg, fresh=fresh)
        return 0
    except (ConfigError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MemberFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = " ".join(["python -m ensemble.driver", *[a for a in argv if a != "--fresh"]])
        print(f"interrupted: members stopped; finished members and epoch checkpoints are kept. "
              f"To resume, run the same command with the same --output: {again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
