"""Ray actors: thin wiring around the plain torch loop in engine.py.

``MemberTrainer`` trains one bagged member on its bootstrap shard; ``SoftVoter`` is the callable
class of the soft-vote inference stage (Ray Data ``map_batches`` on an actor pool).
"""

from __future__ import annotations

import io
import json
import logging
import random
import time

import numpy as np
import ray
import torch

from ensemble import storage
from ensemble.bootstrap import epoch_seed
from ensemble.config import EnsembleConfig
from ensemble.data import bootstrap_dataset, decode_batch, decoded, quiet_ray_data
from ensemble.engine import evaluate, member_probabilities, pick_device, train_one_epoch
from ensemble.models import make_member_model
from ensemble.vote import soft_vote

log = logging.getLogger("ensemble.member")

# CPUs each Ray Data decode task asks for; the driver keeps this much free beside the members.
DATA_CPUS = 1.0


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
    """One member: bootstrap shard -> epochs of train + val -> best weights by val accuracy."""

    def __init__(self, member: int, member_seed: int, config: EnsembleConfig, output: str):
        self.member, self.seed, self.cfg, self.output = member, member_seed, config, output
        _setup_worker(config.cpus_per_member, member_seed)
        self.device = pick_device(ray.get_gpu_ids())

    @ray.method(num_returns=2)
    def fit(self, train_ds, val_ds, counts_box: list, initial_state, num_classes: int):
        """Returns (summary dict, best state dict on CPU). ``counts_box`` = [ObjectRef of counts]."""
        cfg, start = self.cfg, time.time()
        model = make_member_model(cfg.arch, num_classes, initial_state, cfg.freeze, cfg.freeze_stem)
        model.to(self.device)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        shard = bootstrap_dataset(train_ds, counts_box[0])
        val = decoded(val_ds, image_size=cfg.image_size, batch_size=cfg.batch_size, num_cpus=DATA_CPUS)

        history, best = [], None
        for epoch in range(1, cfg.epochs + 1):
            seed = epoch_seed(self.seed, epoch)
            epoch_ds = decoded(shard.random_shuffle(seed=seed, num_cpus=DATA_CPUS),
                               image_size=cfg.image_size, batch_size=cfg.batch_size,
                               augment=cfg.augment, seed=seed, num_cpus=DATA_CPUS)
            train = train_one_epoch(model, _xy(epoch_ds, cfg.batch_size), optimizer, self.device)
            ev = evaluate(model, _ixy(val, cfg.batch_size), self.device)
            history.append({"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                            "val_loss": ev["loss"], "val_acc": ev["acc"],
                            "images_per_s": train["images_per_s"], "seconds": train["seconds"]})
            if best is None or ev["acc"] > best["val_acc"]:
                best = {"epoch": epoch, "val_acc": ev["acc"], "val_loss": ev["loss"], "ids": ev["ids"],
                        "probs": ev["probs"],
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
            log.info("member %d epoch %d/%d train_loss %.4f train_acc %.4f val_loss %.4f val_acc %.4f "
                     "images/s %.1f", self.member, epoch, cfg.epochs, train["loss"], train["acc"],
                     ev["loss"], ev["acc"], train["images_per_s"])

        summary = {"member": self.member, "seed": self.seed, "best_epoch": best["epoch"],
                   "val_acc": best["val_acc"], "val_loss": best["val_loss"], "history": history,
                   "node": ray.get_runtime_context().get_node_id(), "device": str(self.device),
                   "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                   "seconds": time.time() - start, "started": start, "finished": time.time(),
                   "val_ids": best["ids"], "val_probs": best["probs"]}
        self._save(summary, best["state"])
        return summary, best["state"]

    def _save(self, summary: dict, state: dict) -> None:
        folder = member_dir(self.output, self.member)
        buf = io.BytesIO()
        torch.save(state, buf)
        storage.write_bytes(storage.join(folder, "model.pt"), buf.getvalue())
        buf = io.BytesIO()
        np.savez(buf, ids=summary["val_ids"], probs=summary["val_probs"])
        storage.write_bytes(storage.join(folder, "val_probs.npz"), buf.getvalue())
        record = {k: v for k, v in summary.items() if k not in ("val_ids", "val_probs")}
        record["config"] = self.cfg.to_dict()
        storage.write_text(storage.join(folder, "member.json"), json.dumps(record, indent=2))


def _xy(ds, batch_size: int):
    for b in ds.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2):
        yield b["image"], b["label"]


def _ixy(ds, batch_size: int):
    for b in ds.iter_torch_batches(batch_size=batch_size, device="cpu", prefetch_batches=2):
        yield b["id"].numpy(), b["image"], b["label"].numpy()


class SoftVoter:
    """Ray Data callable class: decode each batch once, run every member, average softmax.

    The members' weights are fetched from the object store once, when the actor starts.
    """

    def __init__(self, *, arch: str, num_classes: int, weight_refs: list, image_size: int,
                 threads: float):
        torch.set_num_threads(max(1, int(threads)))
        self.device = pick_device(ray.get_gpu_ids())
        self.image_size = image_size
        self.models = []
        for state in ray.get(list(weight_refs)):
            model = make_member_model(arch, num_classes, None, "none")
            model.load_state_dict(state)
            self.models.append(model.to(self.device).eval())

    def __call__(self, batch: dict) -> dict:
        decoded_batch = decode_batch(batch, image_size=self.image_size)
        images = torch.from_numpy(decoded_batch["image"]).to(self.device, non_blocking=True)
        probs = member_probabilities(self.models, images).cpu().numpy()  # (members, B, classes)
        return {"id": batch["id"], "image_name": batch["image_name"], "label": batch["label"],
                "probs": soft_vote(probs).astype(np.float32)}
