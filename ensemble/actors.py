"""Ray actors: thin wiring around the plain torch loop in engine.py.

``MemberTrainer`` trains one bagged member on its bootstrap shard; ``SoftVoter`` is the callable
class of the soft-vote inference stage (Ray Data ``map_batches`` on an actor pool).
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import time

import numpy as np
import ray
import torch

from ensemble import storage
from ensemble.bootstrap import epoch_seed
from ensemble.checkpoint import (CheckpointError, load_torch_bytes, read_json, read_verified, rng_state,
                                 set_rng_state, torch_bytes, write_file)
from ensemble.config import EnsembleConfig
from ensemble.data import bootstrap_dataset, decode_batch, decoded, quiet_ray_data
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
        from ray.util.metrics import Gauge

        self.tags = {"member": str(member)}
        self.gauges = {k: Gauge(f"ensemble_member_{k}", description=d, tag_keys=("member",))
                       for k, d in self.NAMES.items()}

    def update(self, **values: float) -> None:
        for key, value in values.items():
            self.gauges[key].set(float(value), tags=self.tags)


def member_dir(output: str, member: int) -> str:
    return storage.join(output, "members", f"member-{member}")


def _setup_worker(threads: float, seed: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    torch.set_num_threads(max(1, int(threads)))  # a fractional CPU share still gets one thread
    quiet_ray_data()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@ray.remote
class MemberTrainer:
    """One member: bootstrap shard -> epochs of train + val -> best weights by val accuracy.

    After every epoch it writes a checkpoint (model, optimizer, RNG, history, best so far), so a
    restarted actor (Ray's ``max_restarts``) or a rerun driver resumes after the last finished
    epoch instead of epoch 0.
    """

    def __init__(self, member: int, member_seed: int, config: EnsembleConfig, output: str,
                 fingerprint: dict):
        self.member, self.seed, self.cfg, self.output = member, member_seed, config, output
        self.fingerprint = fingerprint
        self.folder = member_dir(output, member)
        _setup_worker(config.cpus_per_member, member_seed)
        self.device = pick_device(ray.get_gpu_ids())
        self.metrics = MemberMetrics(member)

    @ray.method(num_returns=2)
    def fit(self, train_ds, val_ds, counts_box: list, initial_state, num_classes: int):
        """Returns (summary dict, best state dict on CPU). ``counts_box`` = [ObjectRef of counts]."""
        cfg, start = self.cfg, time.time()
        model = make_member_model(cfg.arch, num_classes, initial_state, cfg.freeze, cfg.freeze_stem)
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
        shard = bootstrap_dataset(train_ds, counts_box[0])
        val = decoded(val_ds, image_size=cfg.image_size, batch_size=cfg.batch_size, num_cpus=DATA_CPUS)

        for epoch in range(len(history) + 1, cfg.epochs + 1):
            seed = epoch_seed(self.seed, epoch)
            epoch_ds = decoded(shard.random_shuffle(seed=seed, num_cpus=DATA_CPUS),
                               image_size=cfg.image_size, batch_size=cfg.batch_size,
                               augment=cfg.augment, seed=seed, num_cpus=DATA_CPUS)
            pin = self.device.type == "cuda"
            train = train_one_epoch(model, _xy(epoch_ds, cfg.batch_size, pin), optimizer, self.device, amp)
            ev = evaluate(model, _ixy(val, cfg.batch_size, pin), self.device, amp)
            history.append({"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                            "val_loss": ev["loss"], "val_acc": ev["acc"],
                            "images": train["images"], "images_per_s": train["images_per_s"],
                            "seconds": train["seconds"]})
            if best is None or ev["acc"] > best["val_acc"]:
                best = {"epoch": epoch, "val_acc": ev["acc"], "val_loss": ev["loss"],
                        "ids": torch.from_numpy(ev["ids"]), "probs": torch.from_numpy(ev["probs"]),
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            self.metrics.update(epoch=epoch, train_loss=train["loss"], val_acc=ev["acc"],
                                best_val_acc=best["val_acc"], images_per_s=train["images_per_s"])
            log.info("member %d epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                     "images/s %.1f", self.member, epoch, cfg.epochs, train["loss"], train["acc"],
                     ev["loss"], ev["acc"], train["images_per_s"])
            if epoch < cfg.epochs:
                self._save_checkpoint(epoch, model, optimizer, history, best, resumed)

        summary = {"member": self.member, "seed": self.seed, "best_epoch": best["epoch"],
                   "val_acc": best["val_acc"], "val_loss": best["val_loss"], "history": history,
                   "resumed_after_epochs": resumed,
                   "node": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                   "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                   "seconds": time.time() - start, "started": start, "finished": time.time(),
                   "val_ids": best["ids"].numpy(), "val_probs": best["probs"].numpy()}
        summary["files"] = self._save_final(summary, best["state"])
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

    def _save_checkpoint(self, epoch, model, optimizer, history, best, resumed) -> None:
        name = f"checkpoint-e{epoch}.pt"
        digest = write_file(storage.join(self.folder, name), torch_bytes({
            "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_state(), "history": history, "best": best, "resumed": resumed}))
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


def _xy(ds, batch_size: int, pin: bool = False):
    """(images, labels) batches; pinned host memory on GPU members for asynchronous copies."""
    for b in ds.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2, pin_memory=pin):
        yield b["image"], b["label"]


def _ixy(ds, batch_size: int, pin: bool = False):
    for b in ds.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2, pin_memory=pin):
        yield b["id"].numpy(), b["image"], b["label"].numpy()


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
