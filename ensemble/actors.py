"""Ray actors: thin wiring around the plain torch epoch loop (epochs.py) and engine.py.

``MemberTrainer`` trains one bagged member on its bootstrap shard; ``SoftVoter`` is the callable
class of the soft-vote inference stage (Ray Data ``map_batches`` on an actor pool).
"""

from __future__ import annotations

import contextlib
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

from ensemble.batches import SplitImages
from ensemble.bootstrap import member_counts
from ensemble.config import EnsembleConfig, cache_side
from ensemble.data import decode_batch, quiet_ray_data
from ensemble.engine import (cross_entropy, distillation_loss, eval_models, pick_device, resolve_precision,
                             seed_everything, set_threads, vote_member_probabilities)
from ensemble.epochs import Best, EpochStats, build_trainee, eval_batches, fit, member_outputs, train_batches
from ensemble.gpu_memory import check_fit, gpu_total_bytes, inference_batch, member_memory, out_of_memory_line
from ensemble.image_cache import BlockReader, ImageCache
from ensemble.member_files import BackgroundWriter, MemberFiles, MemberSummary
from ensemble.scores.vote import soft_vote
from ensemble.shared_storage import NodeStorage
from ensemble.tracking import MemberRun, MemberTracking, member_params

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
    initial_state: Optional[dict] = None  # {arch: ObjectRef of the initial state dict its members share}; None: none
    progress: bool = False           # draw a progress bar per epoch in the driver's terminal
    cache: Optional[ImageCache] = None  # the run's decoded pixels (None: members decode the files)
    teacher: Optional["Teacher"] = None  # a distilled student's: its targets and loss (None: a member's)
    tracking: Optional[MemberTracking] = None  # --mlflow: where each member logs its child run (None: untracked)
    storage: Optional[NodeStorage] = None  # what this node must see before it trains (None: not checked)

    def images(self, table: pa.Table) -> SplitImages:
        """A split's images in this process: from the cache, or decoded from its files."""
        cfg = self.config
        return SplitImages(table, self.cache, image_size=cfg.image_size, resize=cfg.eval_resize, side=cache_side(cfg))


@dataclass(frozen=True)
class Teacher:
    """What a distilled student learns from (``distill.py``): an ensemble's probabilities on every
    training row, and the loss's temperature and label weight (``engine.distillation_loss``)."""

    targets: Any                     # ObjectRef of an ``epochs.Targets``
    temperature: float
    alpha: float

    def loss(self):
        return functools.partial(distillation_loss, temperature=self.temperature, alpha=self.alpha)


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

    @ray.method(num_returns=3)
    def fit(self, member: int, member_seed: int, plan: MemberPlan, train_table: pa.Table,
            val_table: pa.Table, vote_table: Optional[pa.Table] = None) -> tuple[MemberSummary, dict, Any]:
        """Train member ``member`` with the epoch loop (``epochs.fit``); returns its summary, its
        best state dict (on CPU) and, when ``vote_table`` is given, its softmax outputs on those
        rows with the best weights ((rows, classes) float32 in the table's order; else None): the
        member's share of the soft vote, computed while the model is still in this process.

        ``train_table`` / ``val_table``: the splits' rows (id, path, label, and block/row into the
        run's image cache when there is one). The member's bootstrap counts are regenerated here
        from its seed (a pure function: nothing per member waits in the object store).
        Input work runs in this process: ``cpus_per_member`` threads augment the epoch's images
        (from the cache, or decoded from the files) ahead of the training step.
        """
        cfg, start = plan.config.member_config(member), time.time()  # its architecture and that one's recipe
        if plan.storage is not None:  # a node that joined after the driver's storage check, or any other
            plan.storage.check_here(f"member {member}")
        files = MemberFiles(plan.output, member, plan.fingerprint)
        node = ray.get_runtime_context().get_node_id()
        metrics = self.metrics.setdefault(member, MemberMetrics(member))
        oom = self._check_gpu_memory(member, plan)  # a member that cannot fit stops here, in one line
        seed_everything(member_seed)  # the head's (or, from scratch, every layer's) initial weights
        initial_ref = (plan.initial_state or {}).get(cfg.arch)
        initial_state = ray.get(initial_ref) if initial_ref is not None else None
        trainee = build_trainee(cfg, plan.num_classes, initial_state, self.device)
        saved = files.load_checkpoint()
        if saved is not None:
            log.info("member %d resumes after epoch %d/%d", member, saved["epoch"], cfg.epochs)
        tracked = MemberRun(plan.tracking, member, member_params(cfg, plan.fingerprint, member, member_seed))
        counts = member_counts(cfg.bagging, member_seed, train_table.num_rows, plan.fingerprint["bootstrap_size"])
        train_images, val_images = plan.images(train_table), plan.images(val_table)
        threads, pin = max(1, int(cfg.cpus_per_member)), self.device.type == "cuda"

        targets = ray.get(plan.teacher.targets) if plan.teacher is not None else None

        def train(epoch: int):
            batches = train_batches(train_images, counts, member_seed, epoch, batch_size=cfg.batch_size,
                                    augment=cfg.augment, threads=threads, pin=pin, targets=targets)
            if plan.progress:
                return _progress(batches, total=-(-int(counts.sum()) // cfg.batch_size),
                                 desc=f"member {member} epoch {epoch}/{cfg.epochs}")
            return batches

        def on_epoch(stats: EpochStats, best: Best) -> None:
            metrics.update(epoch=stats.epoch, train_loss=stats.train_loss, val_acc=stats.val_acc,
                           best_val_acc=best.val_acc, images_per_s=stats.images_per_s)
            log.info("member %d epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                     "images/s %.1f", member, stats.epoch, cfg.epochs, stats.train_loss, stats.train_acc,
                     stats.val_loss, stats.val_acc, stats.images_per_s)
            tracked.epoch(stats)

        writer = BackgroundWriter()  # serializing, hashing and writing a checkpoint overlap the next epoch
        try:
            with oom:
                result = fit(trainee, epochs=cfg.epochs, train=train, saved=saved, on_epoch=on_epoch,
                             loss=plan.teacher.loss() if plan.teacher is not None else cross_entropy,
                             val=lambda: eval_batches(val_images, batch_size=cfg.batch_size, threads=threads, pin=pin),
                             commit=lambda snapshot: writer.submit(files.save_checkpoint, snapshot, node=node))
            writer.wait()
        finally:
            writer.close()  # waits for the epoch being written: committed epochs are kept

        best = result.best
        summary = MemberSummary(
            member=member, seed=member_seed, best_epoch=best.epoch, val_acc=best.val_acc, val_loss=best.val_loss,
            history=[h.to_dict() for h in result.history], resumed_after_epochs=result.resumed, node=node,
            device=str(self.device), gpu_ids=[str(g) for g in ray.get_gpu_ids()], seconds=time.time() - start,
            started=start, finished=time.time())
        summary = files.save_final(summary, best.state, best.val_ids, best.val_probs, cfg.to_dict())
        tracked.finish(summary)
        votes = None
        if vote_table is not None:
            trainee.model.load_state_dict(best.state)
            votes = self._outputs(member, trainee.model, plan, vote_table)
        del trainee
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the slot's next member starts from an empty cache
        return summary, best.state, votes

    def _check_gpu_memory(self, member: int, plan: MemberPlan):
        """On a GPU: GpuMemoryError (one line, the batch size or share that fits) when the
        member's estimated need exceeds its share of the GPU's memory (Ray's fractions do not
        limit memory), and the context in which CUDA running out of memory becomes such a line.
        On CPU: a context that changes nothing."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        cfg = plan.config.member_config(member)
        bf16 = resolve_precision(cfg.precision, self.device) is torch.bfloat16
        memory = member_memory(cfg.arch, plan.num_classes, cfg.image_size, cfg.freeze, cfg.freeze_stem, bf16)
        gpu_total = gpu_total_bytes(self.device)
        gpus, precision = cfg.gpus_per_member or 1.0, "bf16" if bf16 else "fp32"
        check_fit(memory, member=member, arch=cfg.arch, batch=cfg.batch_size, image_size=cfg.image_size,
                  precision=precision, gpu_total=gpu_total, gpus_per_member=gpus)
        return out_of_memory_line(memory, member=member, batch=cfg.batch_size, precision=precision,
                                  gpu_total=gpu_total, gpus_per_member=gpus, output=plan.output)

    def vote(self, member: int, plan: MemberPlan, state: dict, vote_table: pa.Table) -> np.ndarray:
        """A member finished by an earlier run (``state``: its best weights): its outputs on
        ``vote_table``, as ``fit`` returns them for the members it trains. The driver queues these
        on the slots it starts anyway, so a resumed run starts no voter pool."""
        cfg = plan.config.member_config(member)
        model = eval_models(cfg.arch, plan.num_classes, [state], self.device)[0]
        return self._outputs(member, model, plan, vote_table)

    def _outputs(self, member: int, model: torch.nn.Module, plan: MemberPlan, vote_table: pa.Table) -> np.ndarray:
        """The member's softmax outputs on ``vote_table``, said in a line first: on large data (the
        study's 23.6k rows, on CPUs) this takes as long as an epoch, and is not a silent wait."""
        cfg = plan.config.member_config(member)
        log.info("member %d: scoring the vote's %d rows with its best weights", member, vote_table.num_rows)
        batches = eval_batches(plan.images(vote_table), batch_size=cfg.batch_size,
                               threads=max(1, int(cfg.cpus_per_member)), pin=self.device.type == "cuda")
        return member_outputs(model, batches, device=self.device, amp=resolve_precision(cfg.precision, self.device),
                              tta=cfg.tta)


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


class SoftVoter:
    """Ray Data callable class: each batch's pixels once (from the run's image cache, or decoded
    from the files), every member on them, softmax averaged.

    The members' weights are fetched from the object store once, when the actor starts.
    Output per row: ``probs`` (classes,) the soft vote, ``member_probs`` (members, classes).
    """

    def __init__(self, *, arch, num_classes: int, weight_refs: list, image_size: int,
                 threads: float, tta: str = "none", precision: str = "auto", resize: str = "squash",
                 side: Optional[int] = None, cache: Optional[ImageCache] = None, batch: int = 64, gpus: float = 0):
        set_threads(threads)
        self.device = pick_device(ray.get_gpu_ids())
        self.image_size, self.tta, self.resize, self.side = image_size, tta, resize, side
        self.reader = BlockReader(cache) if cache is not None else None
        self.amp = resolve_precision(precision, self.device)
        # on a GPU: --infer-batch-size in passes that fit this voter's share (one line if it must),
        # before any weight moves
        self.max_batch = inference_batch(
            self.device, [arch] * len(weight_refs) if isinstance(arch, str) else arch, num_classes, image_size, tta,
            self.amp is torch.bfloat16, who="a voter", batch=batch, batch_flag="--infer-batch-size", share=gpus,
            share_flag="--gpus-per-infer-actor", log=log.warning)
        self.models = eval_models(arch, num_classes, ray.get(list(weight_refs)), self.device)

    def __call__(self, batch: dict) -> dict:
        if self.reader is not None and "block" in batch:
            pixels = np.stack([self.reader.eval(int(b), int(r)) for b, r in zip(batch["block"], batch["row"])])
        else:
            pixels = decode_batch(batch, image_size=self.image_size, resize=self.resize, side=self.side)["image"]
        probs = vote_member_probabilities(self.models, torch.from_numpy(pixels), self.amp, self.tta,
                                          device=self.device, max_batch=self.max_batch)  # (members, B, classes)
        probs = probs.cpu().numpy()
        return {"id": batch["id"], "image_name": batch["image_name"], "label": batch["label"],
                "probs": soft_vote(probs).astype(np.float32),
                "member_probs": np.ascontiguousarray(probs.transpose(1, 0, 2))}
