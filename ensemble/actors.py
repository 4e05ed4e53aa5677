"""Ray actors: thin wiring around the plain torch loop in engine.py.

``MemberTrainer`` trains one bagged member on its bootstrap shard; ``SoftVoter`` is the callable
class of the soft-vote inference stage (Ray Data ``map_batches`` on an actor pool).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import numpy as np
import ray
import torch

from ensemble import storage
from ensemble.bootstrap import epoch_rows, epoch_seed
from ensemble.checkpoint import (CheckpointError, load_torch_bytes, read_json, read_verified, rng_state,
                                 set_rng_state, torch_bytes, write_file)
from ensemble.config import EnsembleConfig
from ensemble.data import decode_batch, decoded, epoch_dataset, quiet_ray_data
from ensemble.engine import (evaluate, member_probabilities, pick_device, prepare_for_device, resolve_precision,
                             train_one_epoch)
from ensemble.models import make_member_model
from ensemble.vote import soft_vote

log = logging.getLogger("ensemble.member")

# CPUs each Ray Data decode task asks for; the driver keeps this much free beside the members.
DATA_CPUS = 1.0


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


def member_dir(output: str, member: int) -> str:
    return storage.join(output, "members", f"member-{member}")


def _setup_worker(threads: float) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    # Batches from the object store are read-only numpy arrays; the model only reads its inputs.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    torch.set_num_threads(max(1, int(threads)))  # a fractional CPU share still gets one thread
    quiet_ray_data()


def seed_everything(seed: int) -> None:
    """A member's torch, numpy and random seeds (its initial weights come from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


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

    @ray.method(num_returns=2)
    def fit(self, member: int, member_seed: int, plan: dict, train_table, val_ds, counts_box: list):
        """Train member ``member``; returns (summary dict, best state dict on CPU).

        ``plan``: config, output, fingerprint, num_classes and initial_state (None or a state
        dict), shared by the run's members. ``train_table``: the training split's file rows (id,
        path, label); ``val_ds``: the val split, already decoded (eval transform);
        ``counts_box`` = [ObjectRef of bootstrap counts].
        """
        self.cfg, self.output, self.fingerprint = plan["config"], plan["output"], plan["fingerprint"]
        self.member, self.seed, self.folder = member, member_seed, member_dir(self.output, member)
        seed_everything(member_seed)
        metrics = self.metrics.setdefault(member, MemberMetrics(member))
        cfg, start = self.cfg, time.time()
        initial_state = plan["initial_state"]  # an ObjectRef (shared by the members) or None
        initial_state = ray.get(initial_state) if initial_state is not None else None
        model = make_member_model(cfg.arch, plan["num_classes"], initial_state, cfg.freeze, cfg.freeze_stem)
        model = prepare_for_device(model, self.device)
        amp = resolve_precision(cfg.precision, self.device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        history, best, resumed = [], None, []
        saved = self._load_checkpoint()
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            set_rng_state(saved["rng"])
            history, best = saved["history"], saved["best"]
            resumed = saved["resumed"] + [saved["epoch"]]
            log.info("member %d resumes after epoch %d/%d", self.member, saved["epoch"], cfg.epochs)
        counts = ray.get(counts_box[0])
        pin = self.device.type == "cuda"
        writer = _BackgroundWriter()

        try:
            for epoch in range(len(history) + 1, cfg.epochs + 1):
                seed = epoch_seed(self.seed, epoch)
                rows = epoch_rows(counts, seed)  # this epoch's bootstrap rows, shuffled
                epoch_ds = decoded(epoch_dataset(train_table, rows, rows_per_block=cfg.batch_size),
                                   image_size=cfg.image_size, batch_size=cfg.batch_size,
                                   augment=cfg.augment, seed=seed, num_cpus=DATA_CPUS)
                batches = _xy(epoch_ds, cfg.batch_size, pin)
                if plan.get("progress"):
                    batches = _progress(batches, total=-(-len(rows) // cfg.batch_size),
                                        desc=f"member {member} epoch {epoch}/{cfg.epochs}")
                train = train_one_epoch(model, batches, optimizer, self.device, amp)
                ev = evaluate(model, _ixy(val_ds, cfg.batch_size, pin), self.device, amp)
                history.append({"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                                "val_loss": ev["loss"], "val_acc": ev["acc"],
                                "images": train["images"], "images_per_s": train["images_per_s"],
                                "seconds": train["seconds"]})
                if best is None or ev["acc"] > best["val_acc"]:
                    best = {"epoch": epoch, "val_acc": ev["acc"], "val_loss": ev["loss"],
                            "ids": torch.from_numpy(ev["ids"]), "probs": torch.from_numpy(ev["probs"]),
                            "state": _cpu_copy(model.state_dict())}
                metrics.update(epoch=epoch, train_loss=train["loss"], val_acc=ev["acc"],
                                    best_val_acc=best["val_acc"], images_per_s=train["images_per_s"])
                log.info("member %d epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                         "images/s %.1f", self.member, epoch, cfg.epochs, train["loss"], train["acc"],
                         ev["loss"], ev["acc"], train["images_per_s"])
                if epoch < cfg.epochs:
                    # A snapshot now; serializing, hashing and writing overlap the next epoch.
                    snapshot = {"epoch": epoch, "model": _cpu_copy(model.state_dict()),
                                "optimizer": _cpu_copy(optimizer.state_dict()), "rng": rng_state(),
                                "history": list(history), "best": best, "resumed": resumed}
                    writer.submit(self._save_checkpoint, snapshot)
            writer.wait()
        finally:
            writer.close()

        summary = {"member": self.member, "seed": self.seed, "best_epoch": best["epoch"],
                   "val_acc": best["val_acc"], "val_loss": best["val_loss"], "history": history,
                   "resumed_after_epochs": resumed,
                   "node": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                   "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                   "seconds": time.time() - start, "started": start, "finished": time.time(),
                   "val_ids": best["ids"].numpy(), "val_probs": best["probs"].numpy()}
        summary["files"] = self._save_final(summary, best["state"])
        del model, optimizer
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the slot's next member starts from an empty cache
        return summary, best["state"]

    # ------------------------------------------------------------ files

    def _load_checkpoint(self):
        record = read_json(storage.join(self.folder, "checkpoint.json"))
        if record is None:
            return None
        if record.get("fingerprint") != self.fingerprint:
            raise CheckpointError(f"{self.folder}: its checkpoint is from a run with another config; "
                                  f"rerun with --fresh to start over")
        data = read_verified(storage.join(self.folder, record["file"]), record["sha256"],
                             what=storage.join(self.folder, "checkpoint.json"))
        return load_torch_bytes(data)

    def _save_checkpoint(self, snapshot: dict) -> None:
        """checkpoint-e<k>.pt, then checkpoint.json (the commit point), then drop older epochs."""
        epoch = snapshot["epoch"]
        name = f"checkpoint-e{epoch}.pt"
        digest = write_file(storage.join(self.folder, name), torch_bytes(snapshot))
        storage.write_text(storage.join(self.folder, "checkpoint.json"), json.dumps(
            {"epoch": epoch, "file": name, "sha256": digest, "fingerprint": self.fingerprint,
             "pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}))
        self._remove_old_checkpoints(keep=name)

    def _remove_old_checkpoints(self, keep: str = "") -> None:
        for name, is_dir in storage.list_dir(self.folder):
            if not is_dir and name.startswith("checkpoint-e") and name != keep:
                storage.remove(storage.join(self.folder, name))

    def _save_final(self, summary: dict, state: dict) -> dict:
        """model.pt and val_probs.npz, then member.json (status done) as the commit point."""
        buf = io.BytesIO()
        np.savez(buf, ids=summary["val_ids"], probs=summary["val_probs"])
        files = {"model.pt": write_file(storage.join(self.folder, "model.pt"), torch_bytes(state)),
                 "val_probs.npz": write_file(storage.join(self.folder, "val_probs.npz"), buf.getvalue())}
        record = {k: v for k, v in summary.items() if k not in ("val_ids", "val_probs")}
        record.update(status="done", sha256=files, config=self.cfg.to_dict(), fingerprint=self.fingerprint)
        storage.write_text(storage.join(self.folder, "member.json"), json.dumps(record, indent=2))
        if storage.exists(storage.join(self.folder, "checkpoint.json")):
            storage.remove(storage.join(self.folder, "checkpoint.json"))
        self._remove_old_checkpoints()
        return files


def load_finished_member(output: str, member: int, fingerprint: dict):
    """(summary, best state) of a member a previous run finished, or None; hashes verified."""
    folder = member_dir(output, member)
    record = read_json(storage.join(folder, "member.json"))
    if record is None or record.get("status") != "done":
        return None
    if record.get("fingerprint") != fingerprint:
        raise CheckpointError(f"{folder}: trained with another config; rerun with --fresh to start over")
    what = storage.join(folder, "member.json")
    state = load_torch_bytes(read_verified(storage.join(folder, "model.pt"), record["sha256"]["model.pt"], what=what))
    saved = np.load(io.BytesIO(read_verified(storage.join(folder, "val_probs.npz"),
                                             record["sha256"]["val_probs.npz"], what=what)))
    summary = {k: v for k, v in record.items() if k not in ("status", "config", "fingerprint", "sha256")}
    summary.update(val_ids=saved["ids"], val_probs=saved["probs"], files=record["sha256"])
    return summary, state


def _cpu_copy(obj):
    """A detached CPU copy of the tensors in a (nested) state dict; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_copy(v) for v in obj)
    return obj


class _BackgroundWriter:
    """One checkpoint write at a time, on a thread; ``wait`` re-raises a failed write."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Optional[Future] = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _batches(ds, batch_size: int, pin: bool):
    """Numpy batches as tensors without a copy (pinned on GPU members, for asynchronous copies)."""
    for b in ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2):
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


def _xy(ds, batch_size: int, pin: bool = False):
    """(images, labels) batches."""
    for b, image in _batches(ds, batch_size, pin):
        yield image, torch.from_numpy(b["label"])


def _ixy(ds, batch_size: int, pin: bool = False):
    """(ids, images, labels) batches; ids and labels as numpy."""
    for b, image in _batches(ds, batch_size, pin):
        yield b["id"], image, b["label"]


class SoftVoter:
    """Ray Data callable class: decode each batch once, run every member, average softmax.

    The members' weights are fetched from the object store once, when the actor starts.
    Output per row: ``probs`` (classes,) the soft vote, ``member_probs`` (members, classes).
    """

    def __init__(self, *, arch: str, num_classes: int, weight_refs: list, image_size: int,
                 threads: float, tta: str = "none", precision: str = "auto"):
        torch.set_num_threads(max(1, int(threads)))
        self.device = pick_device(ray.get_gpu_ids())
        self.image_size, self.tta = image_size, tta
        self.amp = resolve_precision(precision, self.device)
        self.models = []
        for state in ray.get(list(weight_refs)):
            model = make_member_model(arch, num_classes, None, "none")
            model.load_state_dict(state)
            self.models.append(prepare_for_device(model, self.device).eval())

    def __call__(self, batch: dict) -> dict:
        decoded_batch = decode_batch(batch, image_size=self.image_size)
        images = torch.from_numpy(decoded_batch["image"]).to(self.device, non_blocking=True)
        probs = member_probabilities(self.models, images, self.amp)  # (members, B, classes)
        if self.tta == "hflip":
            probs = (probs + member_probabilities(self.models, torch.flip(images, dims=[3]), self.amp)) / 2
        probs = probs.cpu().numpy()
        return {"id": batch["id"], "image_name": batch["image_name"], "label": batch["label"],
                "probs": soft_vote(probs).astype(np.float32),
                "member_probs": np.ascontiguousarray(probs.transpose(1, 0, 2))}
