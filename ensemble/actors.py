"""Ray actors: thin wiring around the plain torch loop in engine.py.

``MemberTrainer`` trains one bagged member on its bootstrap shard; ``SoftVoter`` is the callable
class of the soft-vote inference stage (Ray Data ``map_batches`` on an actor pool).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import ray
import torch

from ensemble.bootstrap import epoch_rows, epoch_seed
from ensemble.checkpoint import rng_state, set_rng_state
from ensemble.config import EnsembleConfig
from ensemble.batches import batches as image_batches
from ensemble.data import decode_batch, quiet_ray_data
from ensemble.batches import SplitImages
from ensemble.config import cache_side
from ensemble.image_cache import BlockReader, ImageCache
from ensemble.engine import (cpu_copy, eval_models, evaluate, make_optimizer, pick_device, prepare_for_device,
                             resolve_precision, seed_everything, set_threads, train_one_epoch,
                             vote_member_probabilities)
from ensemble.member_files import BackgroundWriter, MemberFiles
from ensemble.models import make_member_model
from ensemble.scores.vote import soft_vote

log = logging.getLogger("ensemble.member")

class MemberMetrics:
    """Per-member gauges on Ray's metrics endpoint (charted by Prometheus/Grafana, tagged by member)."""

    NAMES = {"epoch": "last finished epoch", "train_loss": "mean training loss of the last epoch",
             "val_acc": "validation accuracy of the last epoch", "best_val_acc": "best validation accuracy so far",
             "images_per_s": "training images per second in the last epoch"}

    def __init__(self, member: int):
        self.tags = {"member": str(member)}
        self.gauges = _member_gauges()

    def update(self, **values: float) -> None:
        for key, value in values.items():
            self.gauges[key].set(float(value), tags=self.tags)


@functools.lru_cache(maxsize=None)
def _member_gauges() -> dict:
    """One set of gauges per process; a trainer that runs several members sets them by tag."""
    from ray.util.metrics import Gauge

    return {k: Gauge(f"ensemble_member_{k}", description=d, tag_keys=("member",))
            for k, d in MemberMetrics.NAMES.items()}


def _setup_worker(threads: float) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    # Batches from the object store are read-only numpy arrays; the model only reads its inputs.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    set_threads(threads)
    quiet_ray_data()


def show_progress() -> bool:
    """Progress bars (members' epochs, the soft vote) only on a terminal; CI logs stay plain.
    ENSEMBLE_PROGRESS=1 or 0 overrides."""
    forced = os.environ.get("ENSEMBLE_PROGRESS")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty() and not os.environ.get("CI")


@dataclass(frozen=True)
class MemberPlan:
    """What the driver hands every member of a run (put in the object store once)."""

    config: EnsembleConfig
    output: str                      # the run's folder (local or a URI every node can reach)
    fingerprint: dict                # what a saved checkpoint must match (run_folder.training_fingerprint)
    num_classes: int
    initial_state: Any = None        # ObjectRef of the initial state dict shared by the members, or None
    progress: bool = False           # draw a progress bar per epoch in the driver's terminal
    cache: Optional[ImageCache] = None  # the run's decoded pixels (None: members decode the files)

    def images(self, table: pa.Table) -> SplitImages:
        """A split's images in this process: from the cache, or decoded from its files."""
        cfg = self.config
        return SplitImages(table, self.cache, image_size=cfg.image_size, resize=cfg.eval_resize, side=cache_side(cfg))


@ray.remote
class MemberTrainer:
    """Trains members one after another: bootstrap shard -> epochs of train + val -> best weights.

    One actor per concurrent slot, reused for the slot's members, so each process imports torch
    and starts once, not once per member. After every epoch ``fit`` writes the member's
    checkpoint (model, optimizer, RNG, history, best so far), so a restarted actor (Ray's
    ``max_restarts``; the call is retried) or a rerun driver resumes after the last finished
    epoch instead of epoch 0.
    """

    def __init__(self, threads: float):
        # Only what the process needs: the driver starts trainers while it still checks the images.
        _setup_worker(threads)
        self.device = pick_device(ray.get_gpu_ids())
        self.metrics: dict[int, MemberMetrics] = {}

    def started(self) -> str:
        """Returns (the node id) once the actor runs: the driver's sign that its slot got resources."""
        return ray.get_runtime_context().get_node_id()

    @ray.method(num_returns=2)
    def fit(self, member: int, member_seed: int, plan: MemberPlan, train_table: pa.Table, val_table: pa.Table,
            counts_box: list):
        """Train member ``member``; returns (summary dict, best state dict on CPU).

        ``train_table`` / ``val_table``: the splits' rows (id, path, label, and block/row into the
        run's image cache when there is one); ``counts_box`` = [ObjectRef of bootstrap counts].
        Input work runs in this process: ``cpus_per_member`` threads augment the epoch's images
        (from the cache, or decoded from the files) ahead of the training step.
        """
        cfg, start = plan.config, time.time()
        files = MemberFiles(plan.output, member, plan.fingerprint)
        node = ray.get_runtime_context().get_node_id()
        seed_everything(member_seed)
        metrics = self.metrics.setdefault(member, MemberMetrics(member))
        initial_state = ray.get(plan.initial_state) if plan.initial_state is not None else None
        model = make_member_model(cfg.arch, plan.num_classes, initial_state, cfg.freeze, cfg.freeze_stem)
        model = prepare_for_device(model, self.device)
        amp = resolve_precision(cfg.precision, self.device)
        optimizer = make_optimizer(model, cfg.lr)
        history, best, resumed = [], None, []
        saved = files.load_checkpoint()
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            set_rng_state(saved["rng"])
            history, best = saved["history"], saved["best"]
            resumed = saved["resumed"] + [saved["epoch"]]
            log.info("member %d resumes after epoch %d/%d", member, saved["epoch"], cfg.epochs)
        counts = ray.get(counts_box[0])
        pin = self.device.type == "cuda"
        train_images, val_images = plan.images(train_table), plan.images(val_table)
        threads = max(1, int(cfg.cpus_per_member))
        writer = BackgroundWriter()

        try:
            for epoch in range(len(history) + 1, cfg.epochs + 1):
                seed = epoch_seed(member_seed, epoch)
                rows = epoch_rows(counts, seed)  # this epoch's bootstrap rows, shuffled
                batches = _xy(image_batches(train_images, rows, batch_size=cfg.batch_size, augment=cfg.augment,
                                            seed=seed, threads=threads), pin)
                if plan.progress:
                    batches = _progress(batches, total=-(-len(rows) // cfg.batch_size),
                                        desc=f"member {member} epoch {epoch}/{cfg.epochs}")
                train = train_one_epoch(model, batches, optimizer, self.device, amp)
                ev = evaluate(model, _ixy(image_batches(val_images, batch_size=cfg.batch_size, threads=threads), pin),
                              self.device, amp)
                history.append({"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                                "val_loss": ev["loss"], "val_acc": ev["acc"],
                                "images": train["images"], "images_per_s": train["images_per_s"],
                                "seconds": train["seconds"]})
                if best is None or ev["acc"] > best["val_acc"]:
                    best = {"epoch": epoch, "val_acc": ev["acc"], "val_loss": ev["loss"],
                            "ids": torch.from_numpy(ev["ids"]), "probs": torch.from_numpy(ev["probs"]),
                            "state": cpu_copy(model.state_dict())}
                metrics.update(epoch=epoch, train_loss=train["loss"], val_acc=ev["acc"],
                               best_val_acc=best["val_acc"], images_per_s=train["images_per_s"])
                log.info("member %d epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                         "images/s %.1f", member, epoch, cfg.epochs, train["loss"], train["acc"],
                         ev["loss"], ev["acc"], train["images_per_s"])
                if epoch < cfg.epochs:
                    # A snapshot now; serializing, hashing and writing overlap the next epoch. When this
                    # epoch is the best so far, the model's weights are the best state's very tensors:
                    # torch.save writes shared storages once (a quarter less to write with Adam's state).
                    weights = best["state"] if best["epoch"] == epoch else cpu_copy(model.state_dict())
                    snapshot = {"epoch": epoch, "model": weights,
                                "optimizer": cpu_copy(optimizer.state_dict()), "rng": rng_state(),
                                "history": list(history), "best": best, "resumed": resumed}
                    writer.submit(files.save_checkpoint, snapshot, node=node)
            writer.wait()
        finally:
            writer.close()

        summary = {"member": member, "seed": member_seed, "best_epoch": best["epoch"],
                   "val_acc": best["val_acc"], "val_loss": best["val_loss"], "history": history,
                   "resumed_after_epochs": resumed, "node": node, "device": str(self.device),
                   "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                   "seconds": time.time() - start, "started": start, "finished": time.time(),
                   "val_ids": best["ids"].numpy(), "val_probs": best["probs"].numpy()}
        summary["files"] = files.save_final(summary, best["state"], cfg.to_dict())
        del model, optimizer
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the slot's next member starts from an empty cache
        return summary, best["state"]


def _tensors(batches, pin: bool):
    """Numpy batches with their images as tensors, without a copy (pinned on GPU members, for
    asynchronous copies)."""
    for b in batches:
        image = torch.from_numpy(b["image"])
        yield b, (image.pin_memory() if pin else image)


def _progress(batches, *, total: int, desc: str):
    """A progress bar per epoch in the driver's terminal (Ray's distributed tqdm)."""
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=desc, unit="batch")
    try:
        for batch in batches:
            yield batch
            bar.update(1)
    finally:
        bar.close()


def _xy(batches, pin: bool = False):
    """(images, labels) batches."""
    for b, image in _tensors(batches, pin):
        yield image, torch.from_numpy(b["label"])


def _ixy(batches, pin: bool = False):
    """(ids, images, labels) batches; ids and labels as numpy."""
    for b, image in _tensors(batches, pin):
        yield b["id"], image, b["label"]


class SoftVoter:
    """Ray Data callable class: each batch's pixels once (from the run's image cache, or decoded
    from the files), every member on them, softmax averaged.

    The members' weights are fetched from the object store once, when the actor starts.
    Output per row: ``probs`` (classes,) the soft vote, ``member_probs`` (members, classes).
    """

    def __init__(self, *, arch: str, num_classes: int, weight_refs: list, image_size: int,
                 threads: float, tta: str = "none", precision: str = "auto", resize: str = "squash",
                 side: Optional[int] = None, cache: Optional[ImageCache] = None):
        set_threads(threads)
        self.device = pick_device(ray.get_gpu_ids())
        self.image_size, self.tta, self.resize, self.side = image_size, tta, resize, side
        self.reader = BlockReader(cache) if cache is not None else None
        self.amp = resolve_precision(precision, self.device)
        self.models = eval_models(arch, num_classes, ray.get(list(weight_refs)), self.device)

    def __call__(self, batch: dict) -> dict:
        if self.reader is not None and "block" in batch:
            pixels = np.stack([self.reader.eval(int(b), int(r)) for b, r in zip(batch["block"], batch["row"])])
        else:
            pixels = decode_batch(batch, image_size=self.image_size, resize=self.resize, side=self.side)["image"]
        probs = vote_member_probabilities(self.models, torch.from_numpy(pixels), self.amp, self.tta,
                                          device=self.device)  # (members, B, classes)
        probs = probs.cpu().numpy()
        return {"id": batch["id"], "image_name": batch["image_name"], "label": batch["label"],
                "probs": soft_vote(probs).astype(np.float32),
                "member_probs": np.ascontiguousarray(probs.transpose(1, 0, 2))}
