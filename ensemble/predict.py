"""Label new images with a finished run: its members, soft-voted in the same Ray Data stage.

    python -m ensemble.predict --run runs/exp1 --images new_photos/ --output runs/exp1-new
    python -m ensemble.predict --run runs/exp1 --images s3://bucket/incoming
    python -m ensemble.predict --run runs/exp1 --images new_photos/ --members selected

``--images`` is a flat folder of images, or class folders named like the run's classes (then the
predictions are also scored). Writes predictions.csv and probabilities.parquet with the run's
columns (probabilities scaled by the temperature the run's report fitted), and predict.json
(what was labelled, skipped files, the members and weights used, the temperature, accuracy when
labels are known). ``--members selected`` votes only the members the run's report selected
(Caruana; report.json ``ensemble.selection``), weighted. Every loaded member's files are checked
against the sha256 recorded when it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import uuid
from typing import Optional, Sequence, Union

from ensemble import storage
from ensemble.config import ConfigError
from ensemble.errors import CommandParser, parse_command, run_cli, stop_on_sigterm
from ensemble.run_folder import MEMBER_CHOICES, check_output, check_outside, load_run, versions
from ensemble.run_lock import LOCK_NAME, RunLock


def predict(run: str, images: Union[str, Sequence[str]], output: str, *, address: Optional[str] = None,
            infer_actors: Optional[int] = None, strict: bool = False, members: str = "all",
            kept: bool = True) -> dict:
    """Vote the run's members (``members``: all, or the report's selection, weighted) on ``images``
    (a folder, flat or of class folders, or a list of image files); write the outputs to
    ``output``; return predict.json's content. ``kept=False`` (the Python API's temporary
    folder): the summary line does not name a folder that is about to be removed."""
    from ensemble.data import image_rows, scan_images

    started = time.time()
    finished = load_run(run, members)
    classes = finished.classes
    if isinstance(images, str):
        table, labelled = scan_images(images, classes)
    else:  # the Python API's list of files (ensemble.api.Run.predict)
        table, labelled = image_rows(images), False
        images = list(images)
    root = images if isinstance(images, str) else f"({len(images)} files)"
    output = check_output(output)
    check_outside(run, output)
    check_predict_output(output, run, images)
    with RunLock(output):  # one process writes the folder at a time (run_lock.py), from here on
        return _predict(finished, run, images, table, labelled, root, output, started, address=address,
                        infer_actors=infer_actors, strict=strict, members=members, kept=kept)


def _same_place(a, b) -> bool:
    if isinstance(a, str) and isinstance(b, str):
        return storage.canonical(a) == storage.canonical(b)
    return a == b


def check_predict_output(output: str, run: str, images) -> None:
    """ConfigError (one line) unless ``output`` is new, empty, or an earlier predict of the same
    run on the same images (then rewritten): a run's folder, another predict's or any other
    files are never overwritten."""
    if not storage.is_dir(output):
        if storage.exists(output) and storage.is_local(output):
            raise ConfigError(f"--output {output}: is a file; name a folder for the predictions")
        return
    names = {name for name, _ in storage.list_dir(output)} - {LOCK_NAME}
    if not names:
        return
    if "run.json" in names or "members" in names:
        raise ConfigError(f"--output {output}: holds a training run (run.json, members/), whose files predict would "
                          f"overwrite; pick a new folder for the predictions")
    if "predict.json" in names:
        try:
            earlier = json.loads(storage.read_bytes(storage.join(output, "predict.json")))
        except (OSError, ValueError):
            earlier = {}
        if _same_place(earlier.get("run"), run) and _same_place(earlier.get("images"), images):
            return
        raise ConfigError(f"--output {output}: holds the predictions of another run or other images "
                          f"(its predict.json); pick a new folder, or remove that one")
    raise ConfigError(f"--output {output}: is not empty ({', '.join(sorted(names)[:3])}...), and predict writes "
                      f"predictions.csv, probabilities.parquet and predict.json there; pick a new or empty folder")


def _predict(finished, run, images, table, labelled, root, output, started, *, address, infer_actors, strict,
             members, kept) -> dict:
    import ray

    from ensemble.cluster import cluster_capacity, connect, resolve_resources
    from ensemble.data import quiet_ray_data
    from ensemble.image_check import check_files
    from ensemble.report import write_json, write_predictions
    from ensemble.scores.vote import vote_outputs
    from ensemble.vote_stage import vote_splits

    cfg, classes, temperature = finished.config, finished.classes, finished.temperature
    connect(address)
    quiet_ray_data()
    # The run's vote recipe (image size, eval resize, TTA, rule) on this cluster's resources.
    sized = resolve_resources(cfg.replace(cpus_per_member=None, gpus_per_member=0.0, gpus_per_infer_actor=None,
                                          infer_actors=infer_actors or cfg.infer_actors), cluster_capacity())
    checked, skipped = check_files({"images": table}, flag="--images", root=root, strict=strict,
                                   stall_timeout=cfg.stall_timeout, image_size=cfg.image_size, resize=cfg.eval_resize)
    voted = vote_splits(sized, {"images": checked["images"]}, weight_refs=[ray.put(s) for s in finished.states],
                        num_classes=len(classes), gpus=sized.gpus_per_infer_actor, archs=finished.archs)["images"]
    storage.makedirs(output)
    write_predictions(output, voted, classes, cfg.vote, temperature, finished.weights)
    weights = finished.weights or [1 / len(finished.members)] * len(finished.members)
    summary = {"run": run, "images": images, "n_images": int(len(voted["id"])), "skipped_files": skipped,
               "vote": cfg.vote if finished.weights is None else "weighted soft",
               "members": cfg.members, "member_choice": members, "members_used": finished.members,
               "member_weights": weights, "temperature": temperature, "versions": versions(),
               "seconds": time.time() - started}
    if labelled:
        predicted = vote_outputs(voted["member_probs"], cfg.vote, temperature, finished.weights)["label"]
        summary["accuracy"] = float((predicted == voted["label"]).mean())
    write_json(storage.join(output, "predict.json"), summary)
    scored = f"; accuracy {summary['accuracy']:.4f}" if labelled else ""
    used = f"{len(finished.members)} members" if finished.weights is None else \
        f"{len(finished.members)} of {cfg.members} members (the report's selection, weighted)"
    where = f"; outputs in {output}: predictions.csv, probabilities.parquet, predict.json" if kept else ""
    print(f"labelled {summary['n_images']} image(s) with {used}{scored}{where}")
    if skipped:
        listed = "listed in predict.json under skipped_files" if kept else "pass output= to keep their list"
        print(f"skipped {len(skipped)} unreadable image file(s); {listed}")
    return summary


def default_predict_output() -> str:
    """runs/predict-<date>-<time>-<6 hex digits>: predicts started in the same second get folders of their own."""
    return os.path.join("runs", f"predict-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")


def _parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="python -m ensemble.predict",
                      description="Label images with a finished run's members (soft vote).", examples=(
                          "python -m ensemble.predict --run runs/exp1 --images new_photos          # a flat folder",
                          "python -m ensemble.predict --run runs/exp1 --images photos/val --output runs/exp1-val"
                          "   # class folders: also scored",
                          "python -m ensemble.predict --run s3://bucket/runs/exp1 --images s3://bucket/new"
                          " --members selected"))
    p.add_argument("--run", required=True, help="the --output folder of a finished ensemble.driver run")
    p.add_argument("--images", required=True, help="a flat folder of images, or class folders (then scored); "
                                                   "local or s3://...")
    p.add_argument("--output", help="a new or empty folder for the predictions "
                                    "(default: runs/predict-<date>-<time>-<6 hex digits>)")
    p.add_argument("--infer-actors", type=int, help="soft-vote actor pool size (default: the run's)")
    p.add_argument("--address", help="Ray cluster address, as for ensemble.driver")
    p.add_argument("--strict", action="store_true", help="stop if any image is unreadable (default: skip, list)")
    p.add_argument("--members", choices=MEMBER_CHOICES, default="all",
                   help="all (default), or selected: the Caruana selection the run's report recorded, as a "
                        "weighted soft vote (members of weight 0 are not loaded)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stop_on_sigterm()  # as Ctrl-C: the lock released, temporary files removed, then one line
    args = parse_command(_parser(), argv)
    if isinstance(args, int):  # a bad flag: its one line is printed
        return args
    output = args.output or default_predict_output()

    def label() -> int:
        if args.infer_actors is not None and args.infer_actors < 1:
            raise ConfigError(f"--infer-actors {args.infer_actors}: must be >= 1")
        predict(args.run, args.images, output, address=args.address, infer_actors=args.infer_actors,
                strict=args.strict, members=args.members)
        return 0

    return run_cli(label, interrupted="interrupted: nothing was written that a rerun would not write again")


if __name__ == "__main__":
    from ensemble.errors import exit_process

    exit_process(main())
