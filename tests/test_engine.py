"""The plain torch loop, without Ray: it learns, and the GPU fast path matches the CPU semantics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble.engine import (evaluate, member_probabilities, pick_device, prepare_for_device, resolve_precision,
                             train_one_epoch)
from ensemble.models import make_member_model


def _batches(n_batches=6, batch=16, size=16, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n_batches, batch), generator=g)
    # Class k: a bright square in a class-specific corner: learnable in a few steps.
    images = torch.randn(n_batches, batch, 3, size, size, generator=g) * 0.1
    for b in range(n_batches):
        for i, k in enumerate(labels[b]):
            r, c = divmod(int(k), 2)
            images[b, i, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 2.0
    return [(images[b], labels[b]) for b in range(n_batches)]


def test_cpu_precision_and_device_fallbacks():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) is None and resolve_precision("bf16", cpu) is None
    assert pick_device(["0"]).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device([]).type == "cpu"


def test_train_one_epoch_learns_and_evaluate_reports_sorted_probs():
    torch.manual_seed(0)
    model = make_member_model("resnet18", 3, None, "none")
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    data = _batches()
    first = train_one_epoch(model, data, opt, torch.device("cpu"))
    for _ in range(3):
        last = train_one_epoch(model, data, opt, torch.device("cpu"))
    assert first["images"] == last["images"] == 96
    assert last["loss"] < first["loss"]
    ids = np.arange(96)[::-1].copy()  # out of order on purpose
    ev = evaluate(model, [(ids[i * 16:(i + 1) * 16], x, y) for i, (x, y) in enumerate(data)], torch.device("cpu"))
    assert ev["ids"].tolist() == list(range(96))
    np.testing.assert_allclose(ev["probs"].sum(1), 1.0, atol=1e-5)
    assert ev["acc"] == pytest.approx(float((ev["probs"].argmax(1) == ev["labels"]).mean()))


@pytest.mark.gpu
def test_gpu_bf16_channels_last_step_matches_fp32_closely():
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = prepare_for_device(make_member_model("resnet18", 3, None, "none"), device)
    amp = resolve_precision("auto", device)
    assert amp == torch.bfloat16 or not torch.cuda.is_bf16_supported()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    stats = [train_one_epoch(model, _batches(), opt, device, amp) for _ in range(4)]
    assert np.isfinite(stats[-1]["loss"]) and stats[-1]["loss"] < stats[0]["loss"]
    x = _batches(1)[0][0].to(device)
    p_amp = member_probabilities([model.eval()], x, amp)
    p_fp32 = member_probabilities([model], x, None)
    assert torch.allclose(p_amp, p_fp32, atol=0.05)
