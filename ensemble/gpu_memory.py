"""How much GPU memory one member's training step needs, and the one line when it does not fit.

Ray's GPU fractions schedule, they do not limit memory: two ``--gpus-per-member 0.5`` members of
resnext101_64x4d at batch 64 share one GPU's memory whatever their share says. The estimate is
made without a GPU: the member's model is built on the ``meta`` device (shapes, no data; ~0.4 s
for resnext101_64x4d) and one forward pass records the tensors autograd saves for backward.

    need = CUDA_OVERHEAD + (1 + SLACK) * (state + per_step + batch * per_image)

``state``: the fp32 weights, and for the trainable ones their gradients and Adam's two moments.
``per_image``: the saved activations per image, measured at the run's image size and frozen
stages (resnext101_64x4d, 224 px, layer1 frozen: 236 MiB fp32). Under bf16 autocast the floating
ones are half (what CPU autocast saves: within 0.1%). ``per_step``: autocast's bf16 copy of
every conv and linear weight, saved for backward once per step whatever the batch. Without its
allowance the estimate is, to 1%, the peak of the tensors alive over a real CPU training step
(forward, zero_grad, backward, Adam; tests/test_gpu_memory.py); against CUDA's own peak it is
not checked yet (that test needs a GPU). Plain torch; no Ray.
"""

from __future__ import annotations

import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ensemble.errors import UserError

GIB = 2**30
# Outside the estimate, per process: the CUDA context with cuBLAS and cuDNN loaded (~0.5-0.8 GiB
# on current drivers, outside torch's allocator but inside the GPU's total) and the workspace
# cuDNN's benchmark mode picks for a convolution (up to a few hundred MiB).
CUDA_OVERHEAD = GIB
# Inside it: what CUDA adds to the tensors' own peak (on CPU a whole step's peak, backward's
# transient gradients included, is the estimate's core to 1%): the caching allocator's rounding
# and fragmentation (reserved over allocated, typically 5-10% in a steady training loop) and
# kernels' scratch buffers. Not yet checked on a GPU.
SLACK = 0.10


class GpuMemoryError(UserError):
    """A member whose training step does not fit its share of the GPU's memory (before training,
    by the estimate) or ran out of it (CUDA's OutOfMemoryError); the line names the batch size
    or GPU share that fits. Finished members and committed epochs are kept."""


@dataclass(frozen=True)
class MemberMemory:
    """What one member's training step holds on its GPU, in bytes."""

    state: int       # weights (fp32), + gradients and Adam's exp_avg, exp_avg_sq of the trainable ones
    per_step: int    # saved for backward once per step: autocast's bf16 weight copies (0 in fp32)
    per_image: int   # activations saved for backward, per image of the batch

    def need(self, batch: int) -> int:
        """The estimated peak of a training step at ``batch`` images, with the allowance."""
        return CUDA_OVERHEAD + math.ceil((1 + SLACK) * (self.state + self.per_step + batch * self.per_image))

    def largest_batch(self, available: float) -> int:
        """The largest batch whose ``need`` fits in ``available`` bytes; 0 when not even one does."""
        room = (available - CUDA_OVERHEAD) / (1 + SLACK) - self.state - self.per_step
        batch = max(0, math.floor(room / self.per_image))
        while batch > 0 and self.need(batch) > available:  # the ceil in need, at an exact boundary
            batch -= 1
        return batch


def saved_bytes(model: torch.nn.Module, image_size: int, *, batch: int = 2) -> dict:
    """Bytes of the tensors autograd saves for backward in one training-mode forward of ``batch``
    images of ``image_size`` px, by dtype, each storage once (a view or an in-place result shares
    its input's); the model's own parameters and buffers are left out (they are ``state``).
    Runs on the model's device: ``meta`` measures it without memory or arithmetic.
    ``batch`` 2: batch norm in training refuses one value per channel (a 1x1 map at small sizes)."""
    device = next(model.parameters()).device
    own = {id(t.untyped_storage()) for t in (*model.parameters(), *model.buffers())}
    saved: dict = {}  # id(storage) -> storage (held, so no id is reused during the pass)
    by_dtype: dict = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key not in own and key not in saved:
            saved[key] = storage
            by_dtype[tensor.dtype] = by_dtype.get(tensor.dtype, 0) + storage.nbytes()
        return tensor

    model.train()
    images = torch.zeros(batch, 3, image_size, image_size, device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images)
    return by_dtype


@functools.lru_cache(maxsize=None)
def member_memory(arch: str, num_classes: int, image_size: int, freeze: str, freeze_stem: bool,
                  bf16: bool) -> MemberMemory:
    """The estimate for a member of ``arch`` trained at ``image_size`` px with stages up to
    ``freeze`` frozen, under bf16 autocast or in fp32 (cached: the trainer asks once per member)."""
    from ensemble.models import make_member_model

    with torch.device("meta"):
        model = make_member_model(arch, num_classes, None, freeze, freeze_stem)
    batch = 2
    saved = saved_bytes(model, image_size, batch=batch)
    floating = sum(n for dtype, n in saved.items() if dtype.is_floating_point)
    other = sum(n for dtype, n in saved.items() if not dtype.is_floating_point)  # max-pool indices (int64)
    per_image = ((floating // 2 if bf16 else floating) + other) // batch
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cast = sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               for p in m.parameters(recurse=False))
    return MemberMemory(state=4 * params + 3 * 4 * trainable, per_step=2 * cast if bf16 else 0, per_image=per_image)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def share_bytes(gpu_total: int, gpus_per_member: float) -> float:
    """A member's share of one GPU's memory: its fraction of it (a member trains on one GPU)."""
    return gpu_total * min(float(gpus_per_member), 1.0)


def _fix(memory: MemberMemory, batch: int, share: float, gpu_total: int, gpus_per_member: float) -> str:
    """What fits: a batch size at this share, and/or the whole GPU. Another batch size trains
    other members (it is in the run's fingerprint), so it needs --fresh; a GPU share does not."""
    options = []
    at_share = memory.largest_batch(share)
    if 0 < at_share < batch:
        options.append(f"--batch-size {at_share} or less with --fresh")
    if gpus_per_member < 1:
        whole = memory.largest_batch(gpu_total)
        if whole >= batch:
            options.append("--gpus-per-member 1")
        elif whole > 0 and at_share == 0:
            options.append(f"--gpus-per-member 1 with --batch-size {whole} or less and --fresh")
    return ", or ".join(options) or "a GPU with more memory, or a smaller --image-size or a later --freeze stage with --fresh"


def check_fit(memory: MemberMemory, *, member: int, arch: str, batch: int, image_size: int, precision: str,
              gpu_total: int, gpus_per_member: float) -> None:
    """Raise GpuMemoryError (one line: the member, its setting, the estimate, its share, the GPU
    and the fix) when ``memory.need(batch)`` exceeds the member's share of a ``gpu_total``-byte GPU."""
    need, share = memory.need(batch), share_bytes(gpu_total, gpus_per_member)
    if need <= share:
        return
    raise GpuMemoryError(
        f"member {member}: {arch} at --batch-size {batch}, {image_size} px, {precision} needs about {_gib(need)} "
        f"of GPU memory, more than its share, {_gib(share)} ({gpus_per_member:g} of a {_gib(gpu_total)} GPU); "
        f"use {_fix(memory, batch, share, gpu_total, gpus_per_member)}")


@contextmanager
def out_of_memory_line(memory: Optional[MemberMemory], *, member: int, batch: int, precision: str,
                       gpu_total: int, gpus_per_member: float, output: str) -> Iterator[None]:
    """Inside: torch's OutOfMemoryError becomes one GpuMemoryError line (the member, its batch,
    its share, the GPU and the fix), not a traceback. The estimate fitted, so the fix gives the
    member the whole GPU (the run resumes) or halves the batch (with --fresh)."""
    try:
        yield
    except torch.OutOfMemoryError:
        share = share_bytes(gpu_total, gpus_per_member)
        options = []
        if gpus_per_member < 1:
            options.append(f"rerun the same command with --gpus-per-member 1 to resume (finished members and committed "
                           f"epochs are kept in {output})")
        if batch > 1:
            options.append(f"{'with' if options else 'rerun with'} --batch-size {batch // 2} and --fresh")
        fix = ", or ".join(options) or "it needs a GPU with more memory, or a smaller --image-size with --fresh"
        estimate = f", estimated {_gib(memory.need(batch))}" if memory is not None else ""
        raise GpuMemoryError(
            f"member {member} ran out of GPU memory at --batch-size {batch} ({precision}) in its share, "
            f"{_gib(share)} ({gpus_per_member:g} of a {_gib(gpu_total)} GPU{estimate}); {fix}") from None
