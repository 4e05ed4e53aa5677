"""Section 1: the same training work three ways.

(a) this project's pipeline (``ensemble.driver.run``), (b) the plain loop a user would write
(one process, members one after another, torch DataLoader over torchvision ImageFolder, the
same bootstrap rows), (c) torchensemble's BaggingClassifier. Each counts only training images
(members x bootstrap rows x epochs) over the wall time from the start of training to its end.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import time

import numpy as np
import torch
from torch import nn


def train_images(members: int, rows: int, epochs: int) -> int:
    return members * rows * epochs


# ---------------------------------------------------------------- (a) the pipeline

def run_pipeline(values: dict) -> dict:
    """``ensemble.driver.run`` in this process (Ray must be initialised by the caller)."""
    from ensemble.config import build_config
    from ensemble.driver import run

    cfg = build_config(flag_values=values)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the driver's result table
        report = run(cfg, fresh=True)
    wall = time.perf_counter() - start
    rows = cfg.bootstrap_size or report["data"]["train"]
    images = train_images(cfg.members, rows, cfg.epochs)
    members = report["members"]
    in_loop = sum(h["seconds"] for m in members for h in m["history"])   # inside train_one_epoch
    in_fit = sum(m["seconds"] for m in members)                          # whole MemberTrainer.fit
    return {"images": images, "train_s": report["seconds"]["train"], "wall_s": wall,
            "vote_s": report["seconds"]["vote"], "in_train_loop_s": in_loop, "in_fit_s": in_fit,
            "val_acc": report["ensemble"]["val_acc"],
            "member_val_acc": [m["val_acc"] for m in members], "output": cfg.output}


# ---------------------------------------------------------------- (b) the plain loop

def _as_tensor(image) -> torch.Tensor:
    """torchvision v2 returns tv_tensors.Image; the loader collates plain tensors."""
    return image.as_subclass(torch.Tensor)


def _image_folders(data: str, image_size: int, augment: str):
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from ensemble.transforms import eval_transform, train_transform

    train = ImageFolder(os.path.join(data, "train"), transform=v2.Compose(
        [train_transform(image_size=image_size, augment=augment), _as_tensor]))
    val = ImageFolder(os.path.join(data, "val"), transform=v2.Compose(
        [eval_transform(image_size=image_size), _as_tensor]))
    return train, val


def bootstrap_rows(data: str, train_set) -> tuple[np.ndarray, int]:
    """(ImageFolder index of each pipeline row id, number of rows).

    The pipeline numbers rows in ``scan_layout`` order and bootstraps those ids; mapping each id to
    ImageFolder's index makes ``np.repeat(order, counts)`` the pipeline's exact row multiset.
    """
    from ensemble.data import scan_layout

    index = scan_layout(data)
    where = {os.path.abspath(p): k for k, (p, _) in enumerate(train_set.samples)}
    paths = index.train.column("path").to_pylist()
    order = np.array([where[os.path.abspath(p)] for p in paths])
    labels = np.array([train_set.samples[k][1] for k in order])
    if not np.array_equal(labels, index.train.column("label").to_numpy()):
        raise RuntimeError("ImageFolder and scan_layout number the classes differently")
    return order, index.train.num_rows


def run_plain(values: dict, *, loader_workers: int, out_dir: str) -> dict:
    """One process, N members one after another, same rows/arch/transforms/batch/threads/epochs.

    Does the pipeline's per-member work: train each epoch, evaluate on val, keep the best
    weights, save them once at the end.
    """
    from torch.utils.data import DataLoader, Subset

    from ensemble.bootstrap import bootstrap_counts, member_seeds
    from ensemble.engine import evaluate, train_one_epoch
    from ensemble.models import make_member_model

    data, members, epochs, batch = values["data"], values["members"], values["epochs"], values["batch_size"]
    train_set, val_set = _image_folders(data, values["image_size"], values["augment"])
    order, n_rows = bootstrap_rows(data, train_set)
    seeds = member_seeds(values["seed"], members)
    device = torch.device("cpu")
    os.makedirs(out_dir, exist_ok=True)
    accs = []

    def val_batches():
        loader = DataLoader(val_set, batch_size=batch, shuffle=False, num_workers=loader_workers)
        seen = 0
        for images, labels in loader:
            yield np.arange(seen, seen + len(labels)), images, labels.numpy()
            seen += len(labels)

    start = time.perf_counter()
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)   # as MemberTrainer: same seed -> same initial weights
        np.random.seed(seed % 2**32)
        random.seed(seed)
        rows = np.repeat(order, bootstrap_counts(seed, n_rows, n_rows))
        loader = DataLoader(Subset(train_set, rows.tolist()), batch_size=batch, shuffle=True,
                            num_workers=loader_workers, generator=torch.Generator().manual_seed(seed))
        model = make_member_model(values["arch"], len(train_set.classes), None, values["freeze"])
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=values["lr"])
        best = None
        for _ in range(epochs):
            train_one_epoch(model, loader, optimizer, device)
            ev = evaluate(model, val_batches(), device)
            if best is None or ev["acc"] > best[0]:
                best = (ev["acc"], {k: v.detach().clone() for k, v in model.state_dict().items()})
        torch.save(best[1], os.path.join(out_dir, f"member-{i}.pt"))
        accs.append(best[0])
    train_s = time.perf_counter() - start
    return {"images": train_images(members, n_rows, epochs), "train_s": train_s, "member_val_acc": accs}


# ---------------------------------------------------------------- (c) torchensemble

class TorchvisionMember(nn.Module):
    """A torchvision classifier built by name, for estimator classes that take constructor args."""

    def __init__(self, arch: str, num_classes: int, freeze_stage: str = "none"):
        super().__init__()
        from ensemble.models import make_member_model

        self.net = make_member_model(arch, num_classes, None, freeze_stage)

    def forward(self, x):
        return self.net(x)


def run_torchensemble(values: dict, *, loader_workers: int) -> dict:
    """torchensemble.BaggingClassifier on the same data, sequential (n_jobs=1), val each epoch.

    It bootstraps its own rows (len(train) draws per estimator, torch's RNG), so the number of
    training images equals the pipeline's; the multiset differs. Returns {"skipped": why} when
    torchensemble is missing or fails on this torch.
    """
    try:
        from torchensemble import BaggingClassifier
    except Exception as exc:  # ImportError, or an incompatibility raised at import time
        return {"skipped": f"torchensemble not importable ({exc.__class__.__name__}: {exc}); "
                           f"install it with `pip install torchensemble` to compare"}
    from torch.utils.data import DataLoader

    data, members, epochs, batch = values["data"], values["members"], values["epochs"], values["batch_size"]
    train_set, val_set = _image_folders(data, values["image_size"], values["augment"])
    torch.manual_seed(values["seed"])
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=loader_workers)
    val_loader = DataLoader(val_set, batch_size=batch, shuffle=False, num_workers=loader_workers)
    try:
        ensemble = BaggingClassifier(
            estimator=TorchvisionMember, n_estimators=members, cuda=False, n_jobs=1,
            estimator_args={"arch": values["arch"], "num_classes": len(train_set.classes),
                            "freeze_stage": values["freeze"]})
        ensemble.set_optimizer("Adam", lr=values["lr"])
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a line per estimator per epoch
            ensemble.fit(train_loader, epochs=epochs, log_interval=10**9, test_loader=val_loader,
                         save_model=False)
        train_s = time.perf_counter() - start
    except Exception as exc:
        return {"skipped": f"torchensemble failed on torch {torch.__version__} "
                           f"({exc.__class__.__name__}: {str(exc)[:200]})"}
    return {"images": train_images(members, len(train_set), epochs), "train_s": train_s}
