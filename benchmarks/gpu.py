"""Section 5 (needs CUDA): the study's member on one GPU.

``ensemble.engine.train_one_epoch`` on resnext101_64x4d (layer1 frozen, as the recipe), 224 px,
batch 64, on batches already on the GPU (so only the training step is timed):
- fp32 vs bf16 autocast, both channels_last (the package's GPU path, ``prepare_for_device``);
- two members sharing one GPU (two processes, as two 0.5-GPU actors) vs one member alone,
  in the package's GPU default (bf16 where supported): aggregate images/s.
"""

from __future__ import annotations

import time

import numpy as np
import torch


def time_member(*, mode: str, arch: str = "resnext101_64x4d", batch: int = 64, size: int = 224,
                num_classes: int = 100, steps: int = 20, warmup: int = 3, device: str = "cuda",
                feed: str = "synthetic", threads: int = 1, photos: str | None = None) -> dict:
    """images/s of train_one_epoch over ``steps`` batches after ``warmup``.

    ``mode``: ``fp32`` (``--precision fp32``) or ``bf16`` (``--precision auto`` on a bf16 GPU:
    autocast). Both go through the package's GPU path, ``prepare_for_device`` (channels_last,
    cudnn.benchmark) and ``train_one_epoch``'s channels_last inputs.
    ``feed``: ``synthetic`` = one float batch already on the device, reused; ``pipeline`` = the
    members' input path on the photo JPEGs in ``photos``: decoded once into memory as the image
    cache holds them (short side round(S*256/224)), then ``batches.batches`` with ``threads``
    threads (seed recipe, uint8, pinned) and the cast + normalisation on the device.
    """
    from ensemble.engine import make_optimizer, prepare_for_device, train_one_epoch
    from ensemble.models import make_member_model

    if mode not in ("fp32", "bf16"):
        raise ValueError(f"mode {mode!r}: fp32 or bf16")
    device = torch.device(device)  # "cpu" only to check this code without a GPU
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = prepare_for_device(make_member_model(arch, num_classes, None, "layer1"), device)
    amp = torch.bfloat16 if mode == "bf16" else None
    optimizer = make_optimizer(model, 8e-5)  # as the members train
    if feed == "synthetic":
        x = torch.randn(batch, 3, size, size, device=device)
        y = torch.randint(0, num_classes, (batch,), device=device)
        warm, timed = [(x, y)] * warmup, [(x, y)] * steps
    elif feed == "pipeline":
        warm, timed = _pipeline_batches(photos, batch=batch, size=size, num_classes=num_classes, steps=steps,
                                        warmup=warmup, threads=threads, pin=cuda)
    else:
        raise ValueError(f"feed {feed!r}: synthetic or pipeline")
    train_one_epoch(model, warm, optimizer, device, amp)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = train_one_epoch(model, timed, optimizer, device, amp)  # reads the loss once, after the last step
    end = time.time()
    from ensemble.gpu_memory import member_memory

    estimate = member_memory(arch, num_classes, size, "layer1", False, mode == "bf16").need(batch)
    return {"images_per_s": result["images_per_s"], "images": result["images"], "start": start, "end": end,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
            "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else float("nan"),
            "estimate_gib": estimate / 2**30}


class _InMemoryImages:
    """What ``batches.SplitImages`` gives a member, from images decoded once into this process."""

    def __init__(self, paths: list, *, size: int, num_classes: int):
        from ensemble.config import resize_side
        from ensemble.data import read_image
        from ensemble.pixels import eval_pixels, shrink

        side = resize_side(size)
        decoded = [read_image(p, min_size=side) for p in paths]
        self.sources = [shrink(img, side) for img in decoded]
        self.evals = [eval_pixels(img, image_size=size) for img in decoded]
        self.image_size = size
        self.ids = np.arange(len(paths))
        self.labels = self.ids % num_classes

    def __len__(self) -> int:
        return len(self.ids)

    def train(self, i: int):
        return self.sources[i]

    def eval(self, i: int):
        return self.evals[i]


def _pipeline_batches(photos: str, *, batch: int, size: int, num_classes: int, steps: int, warmup: int,
                      threads: int, pin: bool):
    """(warm-up batches, a generator of the timed ones): the member's input path, lazily."""
    import os

    from ensemble.batches import batches

    paths = sorted(os.path.join(root, f) for root, _, files in os.walk(photos) for f in files if f.endswith(".jpg"))
    images = _InMemoryImages(paths, size=size, num_classes=num_classes)
    rows = np.random.default_rng(0).integers(0, len(images), size=(warmup + steps) * batch)

    def feed(part, seed):
        for b in batches(images, part, batch_size=batch, augment="seed", seed=seed, threads=threads):
            x = torch.from_numpy(b["image"])
            yield (x.pin_memory() if pin else x), torch.from_numpy(b["label"])

    return list(feed(rows[:warmup * batch], 0)), feed(rows[warmup * batch:], 1)


def _share_worker(barrier, queue, kwargs):
    barrier.wait()
    queue.put(time_member(**kwargs))


def shared_gpu(processes: int, **kwargs) -> dict:
    """``processes`` members training at once on the one GPU; aggregate images/s over the overlap."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_share_worker, args=(barrier, queue, kwargs)) for _ in range(processes)]
    for p in procs:
        p.start()
    results = []
    while len(results) < processes:
        try:
            results.append(queue.get(timeout=5))
        except Exception:  # queue.Empty: check nobody died before reporting
            dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for p in procs:
                    p.kill()
                raise RuntimeError(f"a GPU sharing worker exited with code {dead[0]}")
    for p in procs:
        p.join()
    span = max(r["end"] for r in results) - min(r["start"] for r in results)
    return {"aggregate_images_per_s": sum(r["images"] for r in results) / span,
            "per_member_images_per_s": [r["images_per_s"] for r in results],
            "peak_gib": [r["peak_gib"] for r in results], "reserved_gib": [r["reserved_gib"] for r in results],
            "estimate_gib": results[0]["estimate_gib"]}


def run_gpu(*, steps: int = 20) -> dict | None:
    """None without CUDA; otherwise the precision and sharing comparisons."""
    if not torch.cuda.is_available():
        return None
    default = "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fp32 = time_member(mode="fp32", steps=steps)
    bf16 = time_member(mode="bf16", steps=steps) if default == "bf16" else None
    torch.cuda.empty_cache()  # hand this process's cached blocks back before the worker processes start
    alone = shared_gpu(1, mode=default, steps=steps)
    two = shared_gpu(2, mode=default, steps=steps)
    fed = pipeline_vs_synthetic(default, steps=steps)
    return {"device": torch.cuda.get_device_name(0), "fp32": fp32, "bf16": bf16, "shared_mode": default,
            "alone": alone, "two": two, "fed": fed}


def pipeline_vs_synthetic(mode: str, *, steps: int = 20, **kwargs) -> dict:
    """The members' real input path (photo JPEGs, seed recipe, uint8 to the device) vs synthetic
    batches already on the device: one member with every CPU core as input threads, and two
    members sharing the GPU with half the cores each. Ratios near 1 mean the input keeps up."""
    import os
    import shutil
    import sys
    import tempfile

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.images import write_photo_images

    work = tempfile.mkdtemp(prefix="ensemble-gpu-photos-")
    try:
        photos = write_photo_images(os.path.join(work, "photos"), n_train=256, n_val=0, n_test=0)
        cores = os.cpu_count() or 1
        out = {"cores": cores}
        for name, procs in (("one", 1), ("two", 2)):
            threads = max(1, cores // procs)
            synthetic = shared_gpu(procs, mode=mode, steps=steps, **kwargs)
            fed = shared_gpu(procs, mode=mode, steps=steps, feed="pipeline", threads=threads, photos=photos, **kwargs)
            out[name] = {"threads_per_member": threads, "synthetic": synthetic["aggregate_images_per_s"],
                         "pipeline": fed["aggregate_images_per_s"],
                         "ratio": fed["aggregate_images_per_s"] / synthetic["aggregate_images_per_s"]}
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
