"""Feed rate: member-images/s the input path delivers to N members that only touch their batches.

    .venv/bin/python benchmarks/feed_rate.py                  # 9 members, 300 photo JPEGs, 224 px, seed recipe
    .venv/bin/python benchmarks/feed_rate.py --images 60 --members 3 --epochs 1   # smoke size
    .venv/bin/python benchmarks/feed_rate.py --study          # the study's shape at a fifth: every cache tier

``--study``: 100 classes, 4,200 train + 60 val + 460 test JPEGs (a fifth of the study's 21k / 300 /
2.3k), each tier's cache stage over all of them, each member fed ``--rows`` 300 bootstrap rows for
1 epoch; bytes and cache seconds are also scaled to the study's 21k (times 5).

Both paths get the same CPUs (``--cpus``), the same photos (camera-size JPEGs, 500x375, quality
90, cut from scikit-learn's sample photographs), the same seed recipe (AutoAugment ImageNet ->
RandomResizedCrop(S) -> flip) and the same bootstrap rows per member and epoch:

(a) the pipeline: ``image_cache.cache_images`` decodes every file once into the object store
    (Ray tasks on a local cluster of ``--cpus`` CPUs); then ``--cpus`` member slots (Ray actors of
    1 CPU; their start and imports not timed, as the DataLoader's process has imported torch) each
    feed their members in turn with ``batches.batches`` (uint8 batches augmented from the cache,
    1 thread).
(b) the loop a user would write: per member, a torch ``DataLoader`` (``--cpus`` workers) over
    torchvision ``ImageFolder`` with ``transforms.train_transform`` (decode + augment + float
    normalise in the workers), members one after another.

Member-images = members x bootstrap rows x epochs. (a) counts the cache stage in its time.
Prints the ratio a/b (target >= 3). ``--tiers`` runs (a) once per image cache tier (raw,
compressed, stream: the files decoded by the members every epoch) and prints the compressed
tier's bytes and feed rate against the raw tier's (targets <= 1/5 and >= 0.7) and its feed rate
against (b)'s (>= 2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import numpy as np  # noqa: E402


def member_rows(members: int, n: int, epochs: int, seed: int, draws: int = 0) -> list[list[np.ndarray]]:
    """Each member's rows per epoch: its bootstrap counts (``draws`` of ``n`` rows; default n),
    shuffled per epoch (as the driver)."""
    from ensemble.bootstrap import bootstrap_counts, epoch_rows, epoch_seed, member_seeds

    out = []
    for s in member_seeds(seed, members):
        counts = bootstrap_counts(s, n, draws or n)
        out.append([epoch_rows(counts, epoch_seed(s, e)) for e in range(1, epochs + 1)])
    return out


def run_loader(data: str, rows: list, *, image_size: int, batch_size: int, workers: int) -> float:
    """(b): seconds for every member's DataLoader epochs, one member after another."""
    import torch
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from ensemble.transforms import train_transform

    folder = ImageFolder(os.path.join(data, "train"), transform=v2.Compose(
        [train_transform(image_size=image_size, augment="seed"), lambda t: t.as_subclass(torch.Tensor)]))
    start = time.perf_counter()
    for epochs in rows:
        for epoch_rows in epochs:
            loader = DataLoader(Subset(folder, epoch_rows.tolist()), batch_size=batch_size, num_workers=workers)
            for images, labels in loader:
                _touch(images)
    return time.perf_counter() - start


def _touch(images) -> None:
    """What a consumer that only touches its batch does: read one value of it."""
    float(images.reshape(-1)[-1])


def run_pipeline(data: str, rows: list, *, image_size: int, batch_size: int, cpus: int, tier: str = "raw") -> dict:
    """(a): seconds for the cache stage (in ``tier``; ``stream`` = the image check only) and for
    every member's epochs from the cache (or, streaming, from the files)."""
    import logging

    import ray

    from ensemble.config import build_config, cache_side
    from ensemble.data import quiet_ray_data, scan_layout
    from ensemble.image_cache import cache_images

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    quiet_ray_data()  # the streaming tier's image check is a Ray Data stage
    try:
        cfg = build_config(flag_values={"data": data, "image_size": image_size, "augment": "seed",
                                        "batch_size": batch_size, "cache_tier": "raw" if tier == "stream" else tier})
        side = cache_side(cfg)

        @ray.remote(num_cpus=1)
        class Slot:
            def ready(self) -> bool:
                from ensemble.pixels import Augmenter

                return Augmenter(image_size=image_size, augment="seed") is not None  # torchvision imported

            def feed(self, table, cache, epochs: list) -> int:
                from ensemble.batches import batches
                from ensemble.batches import SplitImages

                images = SplitImages(table, cache, image_size=image_size, resize="squash", side=side)
                seen = 0
                for e, epoch_rows in enumerate(epochs):
                    for b in batches(images, epoch_rows, batch_size=batch_size, augment="seed", seed=e, threads=1):
                        _touch(b["image"])
                        seen += len(b["id"])
                return seen

        index = scan_layout(data)
        start = time.perf_counter()
        index, _, cache = cache_images(index, cfg, max_bytes=0 if tier == "stream" else 1e12)
        assert (cache is None) == (tier == "stream") and (cache is None or cache.tier == tier)
        cached = time.perf_counter()
        # The slots start after the cache stage (its tasks need the CPUs they take, as in the
        # driver); their start and torch import are not timed.
        slots = [Slot.remote() for _ in range(cpus)]
        ray.get([s.ready.remote() for s in slots])
        table = ray.put(index.train)
        fed = time.perf_counter()
        seen = ray.get([slots[m % cpus].feed.remote(table, cache, epochs) for m, epochs in enumerate(rows)])
        end = time.perf_counter()
        return {"cache_s": cached - start, "feed_s": end - fed, "total_s": (cached - start) + (end - fed),
                "cache_bytes": cache.nbytes if cache is not None else 0, "images": int(sum(seen))}
    finally:
        ray.shutdown()


def pixel_difference(data: str, *, image_size: int, n: int = 256) -> dict:
    """What the compressed tier changes, over the first ``n`` train files: |JPEG-decoded - exact|
    of the augmentation source (cache-side pixels) and of the eval pixels computed from it (vs
    the file's exact eval pixels). Val and test pixels are exact in both tiers (tested)."""
    from PIL import Image

    from ensemble.config import build_config, cache_side
    from ensemble.data import scan_layout
    from ensemble.image_cache import decode_chunk, decode_jpeg
    from ensemble.pixels import eval_pixels

    paths = scan_layout(data).train.column("path").to_pylist()[:n]
    side = cache_side(build_config(flag_values={"data": data, "image_size": image_size}))
    _, exact_eval, raw = decode_chunk(paths, image_size=image_size, resize="squash", side=side, keep_train=True)
    _, _, small = decode_chunk(paths, image_size=image_size, resize="squash", side=side, keep_train=True,
                               tier="compressed")
    source, evals = [], []
    for k in range(len(paths)):
        lo, hi = raw["offsets"][k], raw["offsets"][k + 1]
        exact = raw["pixels"][lo:hi].reshape(*raw["shapes"][k], 3).astype(np.int16)
        decoded = decode_jpeg(small["jpeg"][small["offsets"][k]:small["offsets"][k + 1]])
        source.append(np.abs(decoded - exact).ravel())
        derived = eval_pixels(Image.fromarray(decoded), image_size=image_size, resize="squash")
        evals.append(np.abs(derived.astype(np.int16) - exact_eval[k]).ravel())
    out = {}
    for name, diffs in (("train source", np.concatenate(source)), ("train eval pixels", np.concatenate(evals))):
        out[name] = {"mean": float(diffs.mean()), "p99": float(np.percentile(diffs, 99)), "max": int(diffs.max()),
                     "changed": float((diffs > 0).mean())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=300, help="training JPEGs (default 300; --study 4200)")
    p.add_argument("--classes", type=int, default=2, help="classes (default 2; --study 100)")
    p.add_argument("--rows", type=int, help="bootstrap rows fed per member and epoch (default: --images; --study 300)")
    p.add_argument("--members", type=int, default=9)
    p.add_argument("--epochs", type=int, default=2, help="default 2; --study 1")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for each path (default: all)")
    p.add_argument("--tiers", default=None, help="comma-separated image cache tiers for (a): raw, compressed, "
                                                 "stream (default raw; --study all three)")
    p.add_argument("--study", action="store_true", help="the study's shape at a fifth (see the module's docstring)")
    p.add_argument("--data", help="keep the generated photos here and reuse them when present")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the numbers to this file")
    args = p.parse_args(argv)
    n_val = n_test = 10
    if args.study:
        args.images, args.classes, args.epochs, n_val, n_test = 4200, 100, 1, 60, 460
        args.rows = args.rows or 300
        args.tiers = args.tiers or "raw,compressed,stream"
    tiers = (args.tiers or "raw").split(",")
    rows_per_member = args.rows or args.images

    from benchmarks.images import write_photo_images

    work = tempfile.mkdtemp(prefix="ensemble-feed-")
    try:
        data = args.data or os.path.join(work, "photos")
        if not os.path.isdir(os.path.join(data, "train")):
            started = time.perf_counter()
            write_photo_images(data, n_train=args.images, n_val=n_val, n_test=n_test, seed=args.seed,
                               classes=args.classes)
            print(f"wrote {args.images + n_val + n_test} photos in {args.classes} classes to {data} in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
        rows = member_rows(args.members, args.images, args.epochs, args.seed, rows_per_member)
        total = sum(len(r) for m in rows for r in m)
        print(f"feed rate: {args.members} members x {rows_per_member} bootstrap rows x {args.epochs} epoch(s) = "
              f"{total} member-images of 500x375 JPEGs ({args.images} train, {args.classes} classes) at "
              f"{args.image_size} px, seed recipe, {args.cpus} CPU(s); load average {os.getloadavg()[0]:.2f}",
              flush=True)
        b = run_loader(data, rows, image_size=args.image_size, batch_size=args.batch_size, workers=args.cpus)
        print(f"(b) DataLoader x {args.members}: {b:7.1f} s  {total / b:8.1f} member-images/s", flush=True)
        results = {}
        for tier in tiers:
            a = results[tier] = run_pipeline(data, rows, image_size=args.image_size, batch_size=args.batch_size,
                                             cpus=args.cpus, tier=tier)
            assert a["images"] == total, (a["images"], total)
            a["feed_rate"] = total / a["feed_s"]
            print(f"(a) pipeline, {tier:10s}: {a['total_s']:7.1f} s  {total / a['total_s']:8.1f} member-images/s  "
                  f"(cache stage {a['cache_s']:.1f} s, {a['cache_bytes'] / 1e6:.1f} MB; feeding {a['feed_s']:.1f} s "
                  f"= {a['feed_rate']:.1f} member-images/s)", flush=True)
        out = {"args": vars(args), "loader_s": b, "member_images": total, "tiers": results}
        first = results[tiers[0]]
        out["ratio"] = ratio = b / first["total_s"]
        if not args.study:  # --study feeds a few of the rows it caches: its cache stage is not amortised
            print(f"ratio a/b ({tiers[0]}, cache stage included) {ratio:.2f} (target >= 3: "
                  f"{'met' if ratio >= 3 else 'missed'})")
        if "raw" in results and "compressed" in results:
            raw, small = results["raw"], results["compressed"]
            checks = {"bytes compressed/raw": (small["cache_bytes"] / raw["cache_bytes"], "<= 0.2", lambda r: r <= 0.2),
                      "feed rate compressed/raw": (small["feed_rate"] / raw["feed_rate"], ">= 0.7", lambda r: r >= 0.7),
                      "feed rate compressed/DataLoader": (small["feed_rate"] / (total / b), ">= 2", lambda r: r >= 2)}
            for name, (value, target, met) in checks.items():
                out[name] = value
                print(f"{name} {value:.3f} (target {target}: {'met' if met(value) else 'missed'})")
        if "compressed" in results:
            out["pixels"] = pixel_difference(data, image_size=args.image_size)
            for name, d in out["pixels"].items():
                print(f"compressed tier, {name}: |difference| mean {d['mean']:.2f}, 99th percentile {d['p99']:.0f}, "
                      f"max {d['max']} (of 255); {d['changed']:.0%} of values changed")
        if args.study:
            scale = 21_000 / args.images
            for tier, a in results.items():
                print(f"at the study's 21k train images (x{scale:g}): {tier:10s} "
                      f"{a['cache_bytes'] * scale / 1e9:6.2f} GB, "
                      f"cache stage ~{a['cache_s'] * scale:.0f} s on {args.cpus} CPU(s)")
        print(f"load average {os.getloadavg()[0]:.2f}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
