"""The training loop as plain torch functions: a test (or a benchmark) calls them without Ray."""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from typing import Callable, Iterable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ensemble.scores.metrics import nll
from ensemble.scores.vote import accuracy

Batch = tuple[torch.Tensor, torch.Tensor]  # images uint8 (B, S, S, 3) or float32 (B, 3, S, S), labels (B,) int64


def seed_everything(seed: int) -> None:
    """torch, numpy and random from one seed (a member's initial weights come from torch's)."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_threads(cpus: float) -> None:
    """torch's CPU threads = the CPUs Ray reserved for this process (a fractional share gets one)."""
    torch.set_num_threads(max(1, int(cpus)))


def cpu_copy(obj):
    """A detached CPU copy of the tensors in a (nested) state dict; other values as they are."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v) for v in obj)
    return obj


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """Adam over the trainable parameters, fused: one kernel for the whole update instead of a
    loop over ~60 tensors (on CPU a resnet18 step falls from ~80 ms to ~8 ms; also on CUDA)."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, fused=True)


def pick_device(gpu_ids: list) -> torch.device:
    """CUDA when Ray gave this process a GPU and CUDA exists; CPU otherwise (fake GPUs in tests)."""
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype: ``auto`` = bf16 on a CUDA device that supports it, else full fp32."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def prepare_for_device(model: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; on CUDA use channels_last (faster convolutions with tensor cores)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def _to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The model's input on ``device``: uint8 (B, H, W, 3) batches (the pipeline's) are cast and
    normalised there (``pixels.model_input``); float (B, 3, H, W) batches are moved as they are."""
    if images.dtype == torch.uint8:
        from ensemble.pixels import model_input

        return model_input(images, device)
    if device.type == "cuda":
        return images.to(device, non_blocking=True, memory_format=torch.channels_last)
    return images


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A member's loss: cross-entropy on the labels (``logits`` fp32 (B, classes))."""
    return F.cross_entropy(logits, labels)


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor, *,
                      temperature: float, alpha: float) -> torch.Tensor:
    """A student's loss (Hinton et al. 2015): T^2 * KL(teacher_T || student_T) + alpha * CE(labels).

    ``teacher``: (B, classes) probabilities (the ensemble's soft vote). Softened at ``temperature``
    as logits would be: softmax(log(p) / T), so p^(1/T) renormalised; the student's logits / T.
    T^2 keeps the soft term's gradients at the size they have at T = 1 (Hinton's section 2)."""
    soft_teacher = torch.softmax(torch.log(teacher.clamp_min(1e-12)) / temperature, dim=1)
    log_student = torch.log_softmax(logits / temperature, dim=1)
    kl = F.kl_div(log_student, soft_teacher, reduction="batchmean")
    return temperature ** 2 * kl + alpha * F.cross_entropy(logits, labels)


def train_one_epoch(model: nn.Module, batches: Iterable[Batch], optimizer: torch.optim.Optimizer,
                    device: torch.device, autocast_dtype: Optional[torch.dtype] = None,
                    loss_fn: Callable[..., torch.Tensor] = cross_entropy) -> dict:
    """One pass over ``batches``. Returns mean loss, accuracy, images and images/s.

    ``autocast_dtype`` (bf16 on GPUs) runs the forward pass in mixed precision; weights,
    optimizer state and the loss stay fp32. A batch is (images, labels, *targets): the loss is
    ``loss_fn(logits, labels, *targets)`` with the targets on the device (a student's teacher
    probabilities; a member has none).
    """
    model.train()
    # Summed on the device and read once, after the last step: reading a GPU scalar per step waits
    # for that step to finish. float64, multiplied then added: the same roundings as the Python
    # floats this summed before, so CPU results are unchanged to the bit.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    for images, labels, *targets in batches:
        images = _to_device(images, device)
        labels = labels.to(device, non_blocking=True)
        targets = [t.to(device, non_blocking=True) for t in targets]
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(images)
        loss = loss_fn(logits.float(), labels, *targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        loss_sum += loss.detach().double() * n
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += n
    total_loss, total_correct = float(loss_sum), int(correct)  # the epoch's one wait for the device
    seconds = time.perf_counter() - start
    return {"loss": total_loss / max(seen, 1), "acc": total_correct / max(seen, 1), "images": seen,
            "seconds": seconds, "images_per_s": seen / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             device: torch.device, autocast_dtype: Optional[torch.dtype] = None) -> dict:
    """Loss, accuracy and per-row softmax probabilities (sorted by row id) on labelled batches.

    ``batches`` yields (ids, images, labels).
    """
    model.eval()
    ids, probs, labels_all = [], [], []
    for row_ids, images, labels in batches:
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            logits = model(_to_device(images, device)).float()
        probs.append(torch.softmax(logits, dim=1).cpu().numpy())
        ids.append(np.asarray(row_ids))
        labels_all.append(np.asarray(labels))
    if not probs:
        raise ValueError("evaluate got no batches")
    ids_arr = np.concatenate(ids)
    order = np.argsort(ids_arr, kind="stable")
    prob_arr = np.concatenate(probs)[order]
    label_arr = np.concatenate(labels_all)[order]
    return {"loss": nll(prob_arr, label_arr), "acc": accuracy(prob_arr, label_arr), "ids": ids_arr[order],
            "probs": prob_arr, "labels": label_arr}


@torch.no_grad()
def member_probabilities(models: list[nn.Module], images: torch.Tensor,
                         autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Softmax outputs of every member on one batch (already on the members' device): (members, B,
    classes), float32."""
    cast = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with cast:  # (without: also on the meta device, where gpu_memory measures inference)
        return torch.stack([torch.softmax(m(images).float(), dim=1) for m in models])


@torch.no_grad()
def vote_member_probabilities(models: list[nn.Module], images: torch.Tensor,
                              autocast_dtype: Optional[torch.dtype] = None, tta: str = "none",
                              device: Optional[torch.device] = None, max_batch: Optional[int] = None) -> torch.Tensor:
    """``member_probabilities`` under the run's test-time augmentation: with ``tta="hflip"`` each
    member's output is the mean over the image and its mirror. ``images``: uint8 (B, S, S, 3) or
    float (B, 3, S, S), moved to ``device`` (default: where they are). (members, B, classes), float32.
    ``max_batch``: at most this many images at once (``gpu_memory.inference_batch``), the rest in
    further passes; each image's outputs do not depend on the others'."""
    if max_batch is not None and len(images) > max_batch:
        return torch.cat([vote_member_probabilities(models, images[i:i + max_batch], autocast_dtype, tta, device)
                          for i in range(0, len(images), max_batch)], dim=1)
    images = _to_device(images, device or images.device)
    probs = member_probabilities(models, images, autocast_dtype)
    if tta == "hflip":
        probs = (probs + member_probabilities(models, torch.flip(images, dims=[3]), autocast_dtype)) / 2
    return probs


def eval_models(arch, num_classes: int, states: list[dict], device: torch.device) -> list[nn.Module]:
    """The members as eval-mode models on ``device``, from their state dicts. ``arch``: the
    architecture of all of them, or a list with each one's."""
    from ensemble.models import make_member_model

    archs = [arch] * len(states) if isinstance(arch, str) else list(arch)
    models = []
    for arch, state in zip(archs, states, strict=True):
        with torch.device("meta"):  # no random init of weights the state dict replaces (~0.25 s per resnet18)
            model = make_member_model(arch, num_classes, None, "none")
        model.load_state_dict(state, assign=True)
        models.append(prepare_for_device(model, device).eval())
    return models
