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
not checked yet (that test needs a GPU).

Inference (the voters, a serve replica, distill's timing pass) holds every member's weights and,
per image, the largest activations alive at once in one member's forward (members run one after
another). It is measured the same way, on ``meta``: ``LiveTensors`` counts the storages alive
through the real ``vote_member_probabilities`` (on CPU, to 0.01% of the same count on real
tensors: resnext101_64x4d at 224 px, 16.5 MiB an image in fp32). A batch larger than a share
fits runs in passes that fit (the same numbers); weights that do not fit are one line. Plain
torch; no Ray.
"""

from __future__ import annotations

import functools
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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
    """What one member's training step (or the members' inference pass) holds on its GPU, in bytes."""

    state: int       # weights (fp32), + gradients and Adam's exp_avg, exp_avg_sq of the trainable ones
    per_step: int    # saved for backward once per step: autocast's bf16 weight copies (0 in fp32)
    per_image: int   # activations saved for backward (inference: alive at once), per image of the batch

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


class LiveTensors(TorchDispatchMode):
    """The bytes of the storages alive at once, at most (``peak``), while it is on: what CUDA's
    caching allocator's ``max_memory_allocated`` counts (without its rounding), on any device,
    ``meta`` included. ``held``: tensors alive before it starts (weights, the input)."""

    def __init__(self, *held: torch.Tensor):
        super().__init__()
        self.sizes: dict = {}
        self.now = self.peak = 0
        for tensor in held:
            self.track(tensor)

    def track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if id(storage) not in self.sizes:
            self.sizes[id(storage)] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, id(storage))

    def _freed(self, key: int) -> None:
        self.now -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.track(value)
        return out


def _cast_weights(model: torch.nn.Module) -> int:
    """How many weights bf16 autocast copies for a pass: those of every conv and linear layer."""
    return sum(p.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               for p in m.parameters(recurse=False))


@functools.lru_cache(maxsize=None)
def inference_memory(archs: tuple, num_classes: int, image_size: int, tta: str, bf16: bool) -> MemberMemory:
    """The estimate for the members ``archs`` (one entry per member) voting on batches of uint8
    ``image_size`` px images (``engine.vote_member_probabilities``, TTA as given). ``state``: every
    member's weights and buffers; ``per_step``: under bf16 autocast, its copy of every member's
    conv and linear weights (one autocast spans the members); ``per_image``: the most bytes alive
    in one member's pass (each distinct architecture measured once, on ``meta``), plus the
    members' outputs. Under bf16 the activations are taken as half (the input stays uint8 and fp32)."""
    from ensemble.engine import vote_member_probabilities
    from ensemble.models import make_member_model

    batch, state, per_step, per_image = 2, 0, 0, 0
    measured: dict = {}
    for arch in archs:
        if arch not in measured:
            with torch.device("meta"):
                model = make_member_model(arch, num_classes, None, "none").eval()
            tensors = (*model.parameters(), *model.buffers())
            weights, cast = sum(t.untyped_storage().nbytes() for t in tensors), _cast_weights(model)
            images = torch.zeros(batch, image_size, image_size, 3, dtype=torch.uint8, device="meta")
            with LiveTensors(*tensors, images) as live:
                vote_member_probabilities([model], images, tta=tta)
            alive = (live.peak - weights) // batch
            if bf16:
                kept = image_size * image_size * 3 * (1 + 4 * (2 if tta == "hflip" else 1))  # uint8 + fp32 input(s)
                alive = kept + max(0, alive - kept) // 2
            measured[arch] = (weights, 2 * cast if bf16 else 0, alive)
        weights, copies, alive = measured[arch]
        state, per_step, per_image = state + weights, per_step + copies, max(per_image, alive)
    per_image += len(archs) * num_classes * 4 * 3  # each member's probabilities (and TTA's sum), held to the end
    return MemberMemory(state=state, per_step=per_step, per_image=per_image)


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
    cast = _cast_weights(model)
    return MemberMemory(state=4 * params + 3 * 4 * trainable, per_step=2 * cast if bf16 else 0, per_image=per_image)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"


def share_bytes(gpu_total: int, gpus_per_member: float) -> float:
    """A member's share of one GPU's memory: its fraction of it (a member trains on one GPU)."""
    return gpu_total * min(float(gpus_per_member), 1.0)


def _fix(memory: MemberMemory, batch: int, share: float, gpu_total: int, gpus_per_member: float,
         share_flag: str = "--gpus-per-member", fresh: str = " with --fresh") -> str:
    """What fits: a batch size at this share, and/or the whole GPU. Another batch size trains
    other members (it is in the run's fingerprint), so it needs --fresh; a GPU share does not."""
    options = []
    at_share = memory.largest_batch(share)
    if 0 < at_share < batch:
        options.append(f"--batch-size {at_share} or less{fresh}")
    if gpus_per_member < 1:
        whole = memory.largest_batch(gpu_total)
        if whole >= batch:
            options.append(f"{share_flag} 1")
        elif whole > 0 and at_share == 0:
            options.append(f"{share_flag} 1 with --batch-size {whole} or less{fresh.replace(' with', ' and')}")
    return (", or ".join(options)
            or f"a GPU with more memory, or a smaller --image-size or a later --freeze stage{fresh}")


def check_fit(memory: MemberMemory, *, member: int, arch: str, batch: int, image_size: int, precision: str,
              gpu_total: int, gpus_per_member: float, who: Optional[str] = None,
              share_flag: str = "--gpus-per-member", fresh: str = " with --fresh") -> None:
    """Raise GpuMemoryError (one line: the member, its setting, the estimate, its share, the GPU
    and the fix) when ``memory.need(batch)`` exceeds the member's share of a ``gpu_total``-byte GPU.
    ``who``, ``share_flag``, ``fresh``: for a Tune trial ("trial ...", --gpus-per-trial, no --fresh)."""
    need, share = memory.need(batch), share_bytes(gpu_total, gpus_per_member)
    if need <= share:
        return
    raise GpuMemoryError(
        f"{who or f'member {member}'}: {arch} at --batch-size {batch}, {image_size} px, {precision} needs about "
        f"{_gib(need)} of GPU memory, more than its share, {_gib(share)} ({gpus_per_member:g} of a "
        f"{_gib(gpu_total)} GPU); use {_fix(memory, batch, share, gpu_total, gpus_per_member, share_flag, fresh)}")


def gpu_total_bytes(device: torch.device) -> int:
    """The memory of the GPU ``device`` (CUDA's count, as nvidia-smi's MiB)."""
    return torch.cuda.get_device_properties(device).total_memory


def inference_batch(device: torch.device, archs: Sequence[str], num_classes: int, image_size: int, tta: str,
                    bf16: bool, *, who: str, batch: int, batch_flag: str, share: float, share_flag: str,
                    log: Optional[Callable[[str], None]] = None) -> Optional[int]:
    """The most images one inference pass of the members ``archs`` may take on ``device`` within
    ``share`` (0-1; 0 or None: all) of its memory: ``batch`` when that fits, fewer when not (the
    caller runs a batch in passes of that many: the same numbers; ``log`` hears one line that
    says so). None on CPU (no limit). GpuMemoryError (one line) when not even one image fits
    beside the weights."""
    if device.type != "cuda":
        return None
    memory = inference_memory(tuple(archs), num_classes, image_size, tta, bf16)
    gpu_total, share = gpu_total_bytes(device), share or 1.0
    available = share_bytes(gpu_total, share)
    fits = memory.largest_batch(available)
    where = f"{_gib(available)} ({share:g} of a {_gib(gpu_total)} GPU)"
    if fits == 0:
        fix = f"{share_flag} 1, or " if share_flag and share < 1 and memory.largest_batch(gpu_total) else ""
        raise GpuMemoryError(f"{who}: the members' weights need about {_gib(memory.need(1))} of GPU memory with one "
                             f"image, more than its share, {where}; use {fix}fewer members (--members selected) "
                             f"or a GPU with more memory")
    if fits < batch:
        if log is not None:
            log(f"{who}: {batch_flag} {batch} needs about {_gib(memory.need(batch))} of GPU memory, more than its "
                f"share, {where}; it runs each batch in passes of {fits} images (the same results)")
        return fits
    return batch


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
