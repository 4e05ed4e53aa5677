"""Whole job: ``python -m ensemble.driver`` as a user runs it vs the plain loop a user would write,
each timed from its process's spawn to its exit, one after the other on an otherwise idle machine.

    .venv/bin/python benchmarks/whole_job.py                 # photos at 64 px, then handwriting at 32 px
    .venv/bin/python benchmarks/whole_job.py --sets photos --members 2 --epochs 1 --images 40   # smoke size

Same work on both sides: the data, members (their bootstrap rows), epochs, arch (resnet18 from
scratch: no pretrained weights offline), batch, learning rate, image size and recipe, and the
machine's CPUs:

- the driver with default resource flags (its members, image cache, val every epoch, best weights,
  the soft vote on val, test and, for out-of-bag scores, train; calibration, figures, report);
- the plain loop (``benchmarks/training.run_plain`` in a process of its own): a torch
  ``DataLoader`` (``--loader-workers``, default all CPUs) over torchvision ``ImageFolder`` with the
  recipe's transforms, members one after another, val every epoch, best weights kept; then the
  soft vote: every member's softmax on val and test averaged; the ensemble's val accuracy.

Sets (issue 22's): ``photos``, 20 classes of camera-size JPEGs (500x375, quality 90, cut from
scikit-learn's sample photographs), 800 train / 200 val / 200 test, 64 px, the seed recipe;
``handwriting``, 100 classes of two-digit numbers made of scikit-learn's digit scans, 3,000 train
/ 500 val / 500 test, 32 px, ``--augment light`` (flips change what a digit means). Targets: the
driver >= 1.2x the plain loop on the photos, >= 1.05x on the handwriting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SETS = {
    "photos": {"classes": 20, "train": 800, "val": 200, "test": 200, "image_size": 64, "augment": "seed",
               "target": 1.2},
    "handwriting": {"classes": 100, "train": 3000, "val": 500, "test": 500, "image_size": 32, "augment": "light",
                    "target": 1.05},
}


def write_set(name: str, root: str, spec: dict, seed: int) -> str:
    from benchmarks.images import write_digits_images, write_photo_images

    if name == "photos":
        return write_photo_images(root, n_train=spec["train"], n_val=spec["val"], n_test=spec["test"],
                                  classes=spec["classes"], seed=seed)
    return write_digits_images(root, n_train=spec["train"], n_val=spec["val"], n_test=spec["test"],
                               classes=spec["classes"], size=spec["image_size"], seed=seed)


def plain_job(values: dict, *, loader_workers: int, out_dir: str) -> dict:
    """The plain loop's whole job, in this process: train (``run_plain``), then the soft vote on val
    and test from the saved best weights; the ensemble's val accuracy."""
    import numpy as np
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader
    from torchvision.transforms import v2

    from benchmarks.training import _as_tensor, _image_folders, run_plain
    from ensemble.models import make_member_model
    from ensemble.transforms import eval_transform

    trained = run_plain(values, loader_workers=loader_workers, out_dir=out_dir)
    start = time.perf_counter()
    _, val_set = _image_folders(values["data"], values["image_size"], values["augment"])
    test_dir = os.path.join(values["data"], "test")
    test_files = sorted(os.path.join(test_dir, f) for f in os.listdir(test_dir))
    transform = v2.Compose([eval_transform(image_size=values["image_size"]), _as_tensor])

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(test_files)

        def __getitem__(self, k):
            return transform(Image.open(test_files[k]).convert("RGB")), 0

    loaders = {"val": DataLoader(val_set, batch_size=values["batch_size"], num_workers=loader_workers),
               "test": DataLoader(Files(), batch_size=values["batch_size"], num_workers=loader_workers)}
    sums = {name: 0.0 for name in loaders}
    model = make_member_model(values["arch"], len(val_set.classes), None, values["freeze"]).eval()
    with torch.no_grad():
        for i in range(values["members"]):
            model.load_state_dict(torch.load(os.path.join(out_dir, f"member-{i}.pt"), weights_only=True))
            for name, loader in loaders.items():
                sums[name] = sums[name] + torch.cat([model(x).softmax(1) for x, _ in loader]).numpy()
    labels = np.array([label for _, label in val_set.samples])
    val_acc = float((sums["val"].argmax(1) == labels).mean())
    np.savetxt(os.path.join(out_dir, "predictions.csv"), sums["test"].argmax(1), fmt="%d")
    return {**trained, "vote_s": time.perf_counter() - start, "ensemble_val_acc": val_acc}


def run_plain_process(values: dict, *, loader_workers: int, out_dir: str, timeout_s: float) -> dict:
    """``plain_job`` in a fresh interpreter, timed from spawn to exit."""
    result = os.path.join(out_dir, "result.json")
    argv = [sys.executable, os.path.abspath(__file__), "--plain", json.dumps(values), "--loader-workers",
            str(loader_workers), "--out", out_dir]
    start = time.time()
    subprocess.run(argv, cwd=REPO, check=True, timeout=timeout_s)
    wall = time.time() - start
    with open(result) as fh:
        return {**json.load(fh), "wall_s": wall}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sets", default="photos,handwriting", help="comma-separated: photos, handwriting")
    p.add_argument("--members", type=int, default=9)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--images", type=int, help="train images (default: the set's; val and test a quarter each)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="from scratch, as the bundled demo (default 1e-3)")
    p.add_argument("--loader-workers", type=int, default=os.cpu_count())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds each run may take")
    p.add_argument("--json", help="also write every number to this file")
    p.add_argument("--plain", help=argparse.SUPPRESS)  # internal: run the plain job with these values
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain:
        out = plain_job(json.loads(args.plain), loader_workers=args.loader_workers, out_dir=args.out)
        with open(os.path.join(args.out, "result.json"), "w") as fh:
            json.dump(out, fh)
        return 0

    from benchmarks.driver_runs import run_driver

    work = tempfile.mkdtemp(prefix="ensemble-whole-")
    results = {}
    try:
        for name in args.sets.split(","):
            spec = dict(SETS[name])
            if args.images:
                spec.update(train=max(spec["classes"], args.images), val=max(spec["classes"], args.images // 4),
                            test=max(10, args.images // 4))
            data = write_set(name, os.path.join(work, name), spec, args.seed)
            values = {"data": data, "members": args.members, "epochs": args.epochs, "arch": "resnet18",
                      "weights": "none", "freeze": "none", "batch_size": args.batch_size, "lr": args.lr,
                      "image_size": spec["image_size"], "augment": spec["augment"], "seed": args.seed}
            print(f"{name}: {spec['classes']} classes, train {spec['train']} / val {spec['val']} / test "
                  f"{spec['test']} at {spec['image_size']} px, augment {spec['augment']}; {args.members} members x "
                  f"{args.epochs} epochs, resnet18, batch {args.batch_size}; load average {os.getloadavg()[0]:.2f}",
                  flush=True)
            plain = run_plain_process(values, loader_workers=args.loader_workers,
                                      out_dir=os.path.join(work, f"{name}-plain"), timeout_s=args.timeout)
            print(f"  plain loop     {plain['wall_s']:7.1f} s spawn -> exit (training {plain['train_s']:.1f} s, vote "
                  f"{plain['vote_s']:.1f} s); ensemble val acc {plain['ensemble_val_acc']:.4f}", flush=True)
            cli = run_driver({**values, "output": os.path.join(work, f"{name}-driver")},
                             log_path=os.path.join(work, f"{name}-driver.log"), timeout_s=args.timeout)
            with open(os.path.join(work, f"{name}-driver", "report.json")) as fh:
                acc = json.load(fh)["ensemble"]["val_acc"]
            print(f"  the driver     {cli['wall_s']:7.1f} s spawn -> exit (training {cli['train_s']:.1f} s, start -> "
                  f"first fit {cli['start_to_first_fit_s']:.1f} s, last fit -> predictions "
                  f"{cli['last_finish_to_predictions_s']:.1f} s, predictions -> exit "
                  f"{cli['predictions_to_exit_s']:.1f} s); ensemble val acc {acc:.4f}", flush=True)
            speedup = plain["wall_s"] / cli["wall_s"]
            print(f"  ratio plain/driver {speedup:.2f} (target >= {spec['target']:g}: "
                  f"{'met' if speedup >= spec['target'] else 'missed'}); load average {os.getloadavg()[0]:.2f}",
                  flush=True)
            results[name] = {"spec": spec, "plain": plain, "driver": {**cli, "ensemble_val_acc": acc},
                             "ratio": speedup}
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=2, default=str)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
