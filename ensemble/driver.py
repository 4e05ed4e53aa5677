"""Train a bagged ensemble on Ray and soft-vote its predictions.

    python -m ensemble.driver                                  # bundled digits demo, CPU preset
    python -m ensemble.driver --data DATA --output runs/exp1   # your images, the study's recipe
    python -m ensemble.driver --dry-run --arch resnext101_64x4d --num-classes 100 --freeze layer1

On a cluster (started with ``ray up cluster.yaml``) the same command joins it (``--address``
or ``RAY_ADDRESS``; by default the local cluster if one is running, else a new local one).
Stages, each a call into the module that owns it:
inputs -> cluster -> image check -> output folder -> train -> vote -> report.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Optional, Sequence

from ensemble.bootstrap import check_bootstrap_size, member_counts, member_seeds
from ensemble.cli import config_from_argv
from ensemble.config import ConfigError, EnsembleConfig, cache_side, check_vote_size
from ensemble.errors import exit_process, redact, run_cli
from ensemble.run_folder import (check_output, default_output, input_files, matching_earlier, open_output,
                                 save_run_config, training_fingerprint, versions)
from ensemble.run_lock import RunLock

log = logging.getLogger("ensemble.driver")

def run(cfg: EnsembleConfig, *, fresh: bool = False, distillation=None, lock: Optional[RunLock] = None) -> dict:
    """The whole pipeline; returns the report.

    Raises a UserError (errors.py) for what the user can fix, before anything is written
    to the output folder. ``fresh`` discards an earlier run in that folder instead of resuming it.
    ``distillation`` (``distill.Distillation``): the run is a student of that finished run, its
    one member trained on the run's soft vote (``python -m ensemble.distill``). ``lock``: the
    output folder's lock, when the caller holds it (distill, which writes there after the run);
    else the run takes it (run_lock.RunLock) before anything is written.
    """
    import numpy as np
    import ray

    from ensemble.actors import MemberPlan, show_progress
    from ensemble.cluster import cluster_capacity, connect, member_window, resolve_resources
    from ensemble.data import quiet_ray_data
    from ensemble.image_cache import cache_images
    from ensemble.scores.scoring import score_run
    from ensemble.shared_storage import check_nodes_see_storage, node_storage
    from ensemble.report import build_report, format_table, plan_lines, write_report
    from ensemble.tracking import RunTracking, tracking_uri
    from ensemble.train_stage import train_members
    from ensemble.vote_stage import stack_splits, vote_splits

    started = time.time()
    _Stop.signum = None  # a stop this process saw before (an earlier run in a notebook or a test) is not this run's
    cfg = cfg.replace(cache_side=cache_side(cfg))  # resolved: part of what a finished member depends on
    # inputs: the data index (names only), the initial weights, the output folder (nothing written yet)
    index = data_index(cfg)
    num_classes = len(index.classes)
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise ConfigError(f"--num-classes {cfg.num_classes} but the data has {num_classes} classes")
    check_bootstrap_size(cfg.bootstrap_size, index.train.num_rows)
    scored = index.val.num_rows + index.test.num_rows + (index.train.num_rows if cfg.bagging == "bootstrap" else 0)
    check_vote_size(scored, cfg.members, num_classes, index.root)
    # per architecture, its initial weights and parameter counts (each model built once: a weights
    # file for another arch fails here)
    initial_states, params = arch_weights_and_params(cfg, num_classes)
    needs = node_storage(check_output(cfg.output or default_output()), cfg.data or index.root, index,
                         bundled=cfg.data is None)
    output = needs.output  # absolute: members on every node name the same folder
    # the folder's lock, before anything is written or the cluster is asked for work: one process
    # writes a run folder at a time (run_lock.py), held until the run ends; a folder it created for
    # a run refused below (an image check with --strict) is removed again
    with contextlib.ExitStack() as stack:
        held = lock if lock is not None else stack.enter_context(RunLock(output))
        tracked = RunTracking(tracking_uri(cfg, output), cfg.mlflow_experiment)  # --mlflow: tracking.py; else inert

        # cluster: join or start one, size GPU use and member slots to it
        connect(cfg.address)
        quiet_ray_data()
        capacity = cluster_capacity()
        sized = resolve_resources(cfg, capacity)  # CPUs and GPUs per member and voter, the voter pool
        window = member_window(sized, capacity, sized.gpus_per_member)
        # storage: every alive node sees --output and --data (a local folder only this node has would
        # keep the members' files on their own nodes' disks); nodes that join later: each trainer checks
        check_nodes_see_storage(needs, timeout_s=cfg.stall_timeout)

        # image check + cache: every file decoded once in Ray tasks (unreadable ones skipped, or --strict
        # stops); the pixels stay in the object store for the members and voters when they fit
        store, whose = capacity.smallest_store()
        index, skipped, cache = cache_images(index, cfg, max_bytes=cfg.cache_share * store, budget_from=whose)
        tier = cache.tier if cache is not None else None  # the pixels the members train from

        # output folder: the first write; an earlier run there is resumed (same fingerprint) or refused
        n_samples = cfg.bootstrap_size or index.train.num_rows
        inputs = input_files(index)  # the train and val files' sizes and modification times
        fingerprint = training_fingerprint(cfg, index, n_samples, inputs, cache_tier=tier)
        if distillation is not None:  # another teacher, or another loss, trains another student
            fingerprint = {**fingerprint, "teacher": distillation.identity()}
        fingerprint = matching_earlier(output, fingerprint)  # a run from before content hashes resumes
        held.check()  # (object stores: a driver that raced us to the lock within seconds)
        with tracked:
            resuming = open_output(output, fingerprint, fresh=fresh, inputs=inputs)
            resolved = sized.replace(data=index.root, output=output)
            tracked.start(resolved, output, fingerprint, fresh=fresh)  # the MLflow parent run (continued on resume)
            seeds = member_seeds(cfg.seed, cfg.members)
            save_run_config(output, resolved, seeds, fingerprint, inputs)
            # vote: val (report), test (predictions; a layout may have none) and, for out-of-bag scores,
            # train. With the pixels in the cache each member scores them as it finishes (no pool to start
            # once training ends).
            splits = {"val": index.val, "test": index.test} if index.test.num_rows else {"val": index.val}
            if cfg.bagging == "bootstrap":
                splits["train"] = index.train
            vote_table = stack_splits(splits)[0] if cache is not None else None
            for line in plan_lines(resolved, params, index.sizes(), num_classes, members_vote=vote_table is not None):
                log.info(line)
            grows = " (with the nodes its autoscaler may add)" if capacity.autoscaling else ""
            log.info("running up to %d member(s) at once on %g CPU / %g GPU%s", window, capacity.most("CPU"),
                     capacity.most("GPU"), grows)

            # teacher (a student only): the run's soft vote on every training row, once
            teacher = distillation.teacher(resolved, index, cache, output) if distillation is not None else None
            _Stop.check()
            held.check()

            # train: each member augments its bootstrap rows from the cache with threads of its own CPUs
            t_train = time.time()
            plan = MemberPlan(config=resolved, output=output, fingerprint=fingerprint, num_classes=num_classes,
                              initial_state={a: ray.put(s) for a, s in initial_states.items() if s is not None},
                              progress=show_progress(), cache=cache, teacher=teacher, tracking=tracked.members(),
                              storage=needs)
            summaries, weight_refs, vote_refs = train_members(
                plan, seeds=seeds, train_table=index.train, val_table=index.val, gpus=resolved.gpus_per_member,
                window=window, resuming=resuming, vote_table=vote_table)
            _Stop.check()
            held.check()

            # vote: the members' own outputs, and one pass of the voter pool for those without them
            t_vote = time.time()
            voted = vote_splits(resolved, splits, weight_refs=weight_refs, num_classes=num_classes,
                                gpus=resolved.gpus_per_infer_actor, cache=cache, member_votes=vote_refs)
            _Stop.check()
            held.check()

            # report: scores (data) -> report.json, predictions, figures, report.md -> the printed table
            t_report = time.time()
            oob = {}
            if cfg.bagging == "bootstrap":
                counts = np.stack([member_counts(cfg.bagging, s, index.train.num_rows, n_samples) for s in seeds])
                oob = {"train_member_probs": voted["train"]["member_probs"], "train_labels": voted["train"]["label"],
                       "counts": counts}
            scores = score_run(voted["val"]["member_probs"], voted["val"]["label"], rule=cfg.vote, seed=cfg.seed,
                                calibrate_on=cfg.calibrate_on, archs=[cfg.arch_of(i) for i in range(cfg.members)],
                                **oob)
            report = build_report(resolved, summaries=summaries, scores=scores, params=params, index=index,
                                  skipped=skipped, seeds=seeds, fingerprint=fingerprint, versions=versions(),
                                  cache_tier=tier,
                                  seconds={"train": t_vote - t_train, "vote": t_report - t_vote})
            write_report(output, report, val=voted["val"], test=voted.get("test"), classes=index.classes,
                         started=started)
            tracked.finish(report, output)
            print(format_table(report["members"], report["ensemble"]["val_acc"], cfg.vote))
            if skipped:
                print(f"skipped {len(skipped)} unreadable image file(s); listed in report.json under skipped_files")
            if "test" in voted:
                print(f"outputs in {output}: predictions.csv, probabilities.parquet, report.json, report.md, "
                      f"figures/, members/")
            else:  # a layout or manifest without test images: scored on val, nothing to label
                print(f"outputs in {output}: report.json, report.md, figures/, members/ (no test images, so no "
                      f"predictions.csv: label images with python -m ensemble.predict --run {output} --images DIR)")
            return report


def data_index(cfg: EnsembleConfig):
    """The run's data index (names only): ``--data`` or the bundled digits, with val drawn from
    train by ``--val-fraction`` seeded by ``cfg.split_seed`` (``--val-seed``, else ``--seed``)."""
    from ensemble.data import scan_layout
    from ensemble.digits import ensure_digits

    return scan_layout(cfg.data or ensure_digits(), val_fraction=cfg.val_fraction, seed=cfg.split_seed)


def dry_run(cfg: EnsembleConfig) -> int:
    """Print the plan and the parameter counts; trains nothing, starts no cluster."""
    from ensemble.report import plan_lines

    sizes = None
    if cfg.data is not None or cfg.num_classes is None:
        sizes = data_index(cfg).sizes()
        if cfg.num_classes is not None and cfg.num_classes != sizes["classes"]:
            raise ConfigError(f"--num-classes {cfg.num_classes} but the data has {sizes['classes']} classes")
        check_bootstrap_size(cfg.bootstrap_size, sizes["train"])
    num_classes = sizes["classes"] if sizes else cfg.num_classes
    params = arch_weights_and_params(cfg, num_classes, load_weights=False)[1]
    print("\n".join(plan_lines(cfg, params, sizes, num_classes)))
    return 0


def arch_weights_and_params(cfg: EnsembleConfig, num_classes: int, *, load_weights: bool = True) -> tuple[dict, dict]:
    """({arch: its initial state dict or None}, the parameter counts): per architecture of the run,
    with its recipe's weights and frozen stages. The counts are the one architecture's
    (``total``, ``trainable``), or ``by_arch`` of each when there are several."""
    from ensemble.models import count_parameters, make_member_model, resolve_weights

    states, counts = {}, {}
    for i, arch in enumerate(cfg.archs):
        member_cfg = cfg.member_config(i)  # member i has the i-th architecture
        states[arch] = resolve_weights(arch, member_cfg.weights) if load_weights else None
        counts[arch] = count_parameters(make_member_model(arch, num_classes, states[arch], member_cfg.freeze,
                                                          member_cfg.freeze_stem))
    return states, (counts[cfg.archs[0]] if len(counts) == 1 else {"by_arch": counts})


class _Stop:
    """The stop signal (SIGINT, SIGTERM) the driver has seen, if any: a KeyboardInterrupt that a
    library swallowed mid-stage still stops the run at the next stage boundary."""

    signum: Optional[int] = None

    @classmethod
    def on_signal(cls, signum, frame):
        cls.signum = signum
        raise KeyboardInterrupt

    @classmethod
    def check(cls) -> None:
        if cls.signum is not None:
            raise KeyboardInterrupt


def _run_argv(argv: list[str]) -> int:
    cfg, is_dry_run, fresh = config_from_argv(argv)
    if is_dry_run:
        return dry_run(cfg)
    run(cfg, fresh=fresh)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for sig in (signal.SIGINT, signal.SIGTERM):  # Ctrl-C, `kill`, `ray job stop`: the same clean stop
        signal.signal(sig, _Stop.on_signal)      # (cluster.connect puts them back after ray.init)
    argv = list(sys.argv[1:] if argv is None else argv)
    again = redact(" ".join(["python -m ensemble.driver", *[a for a in argv if a != "--fresh"]]))
    return run_cli(lambda: _run_argv(argv), interrupted=(
        f"interrupted: members stopped; finished members and epoch checkpoints are kept. "
        f"To resume, run the same command with the same --output: {again}"))


if __name__ == "__main__":
    exit_process(main())
