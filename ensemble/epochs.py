"""The epoch loop, once: build the model, resume it, train its epochs, keep its best, checkpoint.

Members (``actors.MemberTrainer``) and Tune trials (``tune.train_trial``) call ``fit``; what differs
between them is passed in: which rows each epoch trains on (a bootstrap sample, or every row),
where each epoch's numbers go (gauges and a log line, or ``tune.report``) and how a checkpoint is
committed (a background write, or none). Plain torch and numpy: a test calls it without Ray.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch import nn

from ensemble.bootstrap import epoch_rows, epoch_seed
from ensemble.checkpoint import rng_state, set_rng_state
from ensemble.config import EnsembleConfig
from ensemble.engine import (cpu_copy, cross_entropy, evaluate, make_optimizer, prepare_for_device,
                             resolve_precision, train_one_epoch)
from ensemble.models import make_member_model


@dataclass(frozen=True)
class EpochStats:
    """One finished epoch: what the log line, the gauges, member.json's history and Tune see."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    images: int             # training images of the epoch (bootstrap repeats counted)
    images_per_s: float     # training throughput (val excluded)
    seconds: float          # training time of the epoch (val excluded)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Best:
    """The epoch with the highest val accuracy so far (the first on ties): what a member keeps."""

    epoch: int
    val_acc: float
    val_loss: float
    val_ids: np.ndarray     # (n_val,) row ids, sorted
    val_probs: np.ndarray   # (n_val, classes) softmax outputs at that epoch
    state: dict             # the model's weights at that epoch, on CPU


@dataclass(frozen=True)
class FitResult:
    history: list           # [EpochStats] of every epoch, resumed ones included
    best: Best
    resumed: list           # [epoch] after which an earlier process stopped and this one resumed


@dataclass(frozen=True)
class Trainee:
    """What trains: the model on its device, its optimizer, the autocast dtype (None: fp32)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    device: torch.device
    amp: Optional[torch.dtype]


def build_trainee(cfg: EnsembleConfig, num_classes: int, initial_state: Optional[dict],
                  device: torch.device) -> Trainee:
    """The config's model (arch, initial weights, frozen stages) on ``device`` with Adam at
    ``cfg.lr``; call after seeding, which fixes a head's random initial weights."""
    model = make_member_model(cfg.arch, num_classes, initial_state, cfg.freeze, cfg.freeze_stem)
    model = prepare_for_device(model, device)
    return Trainee(model, make_optimizer(model, cfg.lr), device, resolve_precision(cfg.precision, device))


def train_batches(images, counts: np.ndarray, member_seed: int, epoch: int, *, batch_size: int, augment: str,
                  threads: int, pin: bool = False, targets: Optional["Targets"] = None) -> Iterator[tuple]:
    """(uint8 images (B, S, S, 3), labels) of one epoch: row ``i`` of ``images`` (a
    ``batches.SplitImages``) ``counts[i]`` times, in the epoch's seeded order, augmented with
    draws from the epoch's seed; pinned for asynchronous copies to a GPU when ``pin``. With
    ``targets`` (a student's teacher), each batch also carries its rows' teacher probabilities."""
    from ensemble.batches import batches

    seed = epoch_seed(member_seed, epoch)
    for b in batches(images, epoch_rows(counts, seed), batch_size=batch_size, augment=augment, seed=seed,
                     threads=threads):
        if targets is None:
            yield _pinned(b, pin), torch.from_numpy(b["label"])
        else:
            yield _pinned(b, pin), torch.from_numpy(b["label"]), torch.from_numpy(targets.of(b["id"]))


@dataclass(frozen=True)
class Targets:
    """Soft targets per training row: a teacher's probabilities, looked up by row id."""

    ids: np.ndarray      # (n,) row ids, sorted
    probs: np.ndarray    # (n, classes) float32

    def of(self, ids: np.ndarray) -> np.ndarray:
        at = np.searchsorted(self.ids, ids)
        if np.any(at >= len(self.ids)) or np.any(self.ids[np.minimum(at, len(self.ids) - 1)] != ids):
            raise ValueError("a training row has no teacher probabilities")
        return self.probs[at]


def eval_batches(images, *, batch_size: int, threads: int,
                 pin: bool = False) -> Iterator[tuple[np.ndarray, torch.Tensor, np.ndarray]]:
    """(ids, uint8 images, labels) of every row of ``images``, with the eval transform's pixels."""
    from ensemble.batches import batches

    for b in batches(images, batch_size=batch_size, threads=threads):
        yield b["id"], _pinned(b, pin), b["label"]


@torch.no_grad()
def member_outputs(model: nn.Module, batches: Iterable, *, device: torch.device, amp: Optional[torch.dtype],
                   tta: str = "none") -> np.ndarray:
    """``model`` (a member with its weights loaded, on ``device``) on every (ids, images, labels)
    batch of ``batches`` (in their order), under the run's test-time augmentation: (rows, classes)
    float32 softmax outputs, the numbers the voter pool computes for this member
    (``engine.vote_member_probabilities``)."""
    from ensemble.engine import vote_member_probabilities

    model.eval()
    out = [vote_member_probabilities([model], images, amp, tta, device=device)[0].cpu().numpy()
           for _, images, _ in batches]
    return np.concatenate(out)


def _pinned(batch: dict, pin: bool) -> torch.Tensor:
    image = torch.from_numpy(batch["image"])  # no copy
    return image.pin_memory() if pin else image


def fit(trainee: Trainee, *, epochs: int, train: Callable[[int], Iterable], val: Callable[[], Iterable],
        saved: Optional[dict] = None, on_epoch: Callable[[EpochStats, Best], None] = lambda stats, best: None,
        commit: Optional[Callable[[dict], None]] = None,
        loss: Callable[..., torch.Tensor] = cross_entropy) -> FitResult:
    """Train epochs ``len(history) + 1 .. epochs``: ``train(epoch)`` gives the epoch's (images,
    labels, *targets) batches, trained on with ``loss(logits, labels, *targets)``, ``val()`` the
    (ids, images, labels) batches scored after it. ``saved``: a snapshot to resume from
    (``commit``'s argument, as loaded back). After each epoch ``on_epoch(stats, best)``; before
    every epoch but the last, ``commit(snapshot)`` (the model, optimizer, RNG states, history and
    best so far, on CPU)."""
    model, optimizer = trainee.model, trainee.optimizer
    history, best, resumed = _restore(saved, model, optimizer) if saved is not None else ([], None, [])
    for epoch in range(len(history) + 1, epochs + 1):
        done = train_one_epoch(model, train(epoch), optimizer, trainee.device, trainee.amp, loss)
        ev = evaluate(model, val(), trainee.device, trainee.amp)
        stats = EpochStats(epoch=epoch, train_loss=done["loss"], train_acc=done["acc"], val_loss=ev["loss"],
                           val_acc=ev["acc"], images=done["images"], images_per_s=done["images_per_s"],
                           seconds=done["seconds"])
        history.append(stats)
        if best is None or stats.val_acc > best.val_acc:
            best = Best(epoch=epoch, val_acc=ev["acc"], val_loss=ev["loss"], val_ids=ev["ids"], val_probs=ev["probs"],
                        state=cpu_copy(model.state_dict()))
        on_epoch(stats, best)
        if commit is not None and epoch < epochs:
            commit(snapshot(epoch, trainee, history, best, resumed))
    return FitResult(history=history, best=best, resumed=resumed)


def snapshot(epoch: int, trainee: Trainee, history: list, best: Best, resumed: list) -> dict:
    """A checkpoint's content: tensors and plain values only, so ``weights_only`` loading takes it.
    When this epoch is the best so far, the model's weights are the best state's very tensors:
    torch.save writes shared storages once (a quarter less to write with Adam's state)."""
    weights = best.state if best.epoch == epoch else cpu_copy(trainee.model.state_dict())
    return {"epoch": epoch, "model": weights, "optimizer": cpu_copy(trainee.optimizer.state_dict()),
            "rng": rng_state(), "history": [h.to_dict() for h in history],
            "best": {"epoch": best.epoch, "val_acc": best.val_acc, "val_loss": best.val_loss,
                     "ids": torch.from_numpy(best.val_ids), "probs": torch.from_numpy(best.val_probs),
                     "state": best.state},
            "resumed": list(resumed)}


def _restore(saved: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[list, Best, list]:
    """Load a snapshot into the model, the optimizer and the RNGs; (history, best, resumed)."""
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"])
    b = saved["best"]
    best = Best(epoch=b["epoch"], val_acc=b["val_acc"], val_loss=b["val_loss"], val_ids=b["ids"].numpy(),
                val_probs=b["probs"].numpy(), state=b["state"])
    return [EpochStats(**h) for h in saved["history"]], best, saved["resumed"] + [saved["epoch"]]
