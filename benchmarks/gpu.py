"""Section 5 (needs CUDA): the study's member on one GPU.

``ensemble.engine.train_one_epoch`` on resnext101_64x4d (layer1 frozen, as the recipe), 224 px,
batch 64, on batches already on the GPU (so only the training step is timed):
- fp32 vs bf16 autocast, both channels_last (the package's GPU path, ``prepare_for_device``);
- two members sharing one GPU (two processes, as two 0.5-GPU actors) vs one member alone,
  in the package's GPU default (bf16 where supported): aggregate images/s.
"""

from __future__ import annotations

import time

import torch


def time_member(*, mode: str, arch: str = "resnext101_64x4d", batch: int = 64, size: int = 224,
                num_classes: int = 100, steps: int = 20, warmup: int = 3, device: str = "cuda") -> dict:
    """images/s of train_one_epoch over ``steps`` batches after ``warmup``.

    ``mode``: ``fp32`` (``--precision fp32``) or ``bf16`` (``--precision auto`` on a bf16 GPU:
    autocast). Both go through the package's GPU path, ``prepare_for_device`` (channels_last,
    cudnn.benchmark) and ``train_one_epoch``'s channels_last inputs.
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
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, num_classes, (batch,), device=device)
    optimizer = make_optimizer(model, 8e-5)  # as the members train
    train_one_epoch(model, [(x, y)] * warmup, optimizer, device, amp)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.time()
    result = train_one_epoch(model, [(x, y)] * steps, optimizer, device, amp)  # float(loss) syncs each step
    end = time.time()
    return {"images_per_s": result["images_per_s"], "images": result["images"], "start": start, "end": end,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


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
            "peak_gib": [r["peak_gib"] for r in results]}


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
    return {"device": torch.cuda.get_device_name(0), "fp32": fp32, "bf16": bf16, "shared_mode": default,
            "alone": alone, "two": two}
