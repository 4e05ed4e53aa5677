"""The epoch loop (ensemble/epochs.py) without Ray: epochs, the best epoch, checkpoints, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble.checkpoint import load_torch_bytes, torch_bytes
from ensemble.config import CPU_PRESET, build_config
from ensemble.engine import seed_everything
from ensemble.epochs import EpochStats, build_trainee, fit

CLASSES, SIZE = 3, 16


def _data(seed: int, n_batches: int = 3, batch: int = 8):
    """(images float (B, 3, S, S), labels) batches; class k brightens its own corner."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        labels = torch.randint(0, CLASSES, (batch,), generator=g)
        images = torch.randn(batch, 3, SIZE, SIZE, generator=g) * 0.1
        for i, k in enumerate(labels.tolist()):
            images[i, :, (k // 2) * 8:(k // 2 + 1) * 8, (k % 2) * 8:(k % 2 + 1) * 8] += 2.0
        out.append((images, labels))
    return out


VAL = [(np.arange(8 * b, 8 * (b + 1)), x, y.numpy()) for b, (x, y) in enumerate(_data(99, n_batches=2))]


def _trainee():
    cfg = build_config(preset=CPU_PRESET, flag_values={"image_size": SIZE, "lr": 1e-2})
    seed_everything(3)
    return build_trainee(cfg, CLASSES, None, torch.device("cpu"))


def _fit(trainee, epochs: int, **kwargs):
    return fit(trainee, epochs=epochs, train=lambda epoch: _data(epoch), val=lambda: VAL, **kwargs)


@pytest.fixture(scope="module")
def whole():
    """One uninterrupted 3-epoch fit: (result, [(stats, best epoch)] as on_epoch saw them, snapshots)."""
    seen, snapshots = [], []
    result = _fit(_trainee(), 3, on_epoch=lambda stats, best: seen.append((stats, best.epoch)),
                  commit=snapshots.append)
    return result, seen, snapshots


def test_fit_reports_each_epoch_keeps_the_best_and_commits_all_but_the_last(whole):
    result, seen, snapshots = whole
    assert [s.epoch for s, _ in seen] == [1, 2, 3] and all(isinstance(s, EpochStats) for s, _ in seen)
    assert result.history == [s for s, _ in seen] and result.resumed == []
    assert all(s.images == 24 for s in result.history)
    best = max(result.history, key=lambda s: (s.val_acc, -s.epoch))  # the first epoch of the highest val acc
    assert result.best.epoch == best.epoch and result.best.val_acc == best.val_acc
    assert [b for _, b in seen] == [max(seen[:k + 1], key=lambda x: (x[0].val_acc, -x[0].epoch))[0].epoch
                                    for k in range(3)]
    assert result.best.val_ids.tolist() == list(range(16)) and result.best.val_probs.shape == (16, CLASSES)
    np.testing.assert_allclose(result.best.val_probs.sum(1), 1, rtol=1e-5)
    assert [s["epoch"] for s in snapshots] == [1, 2]
    assert snapshots[1]["history"] == [h.to_dict() for h in result.history[:2]]


def test_resumed_fit_ends_exactly_where_an_uninterrupted_one_does(whole):
    result, _, snapshots = whole
    # a process that stopped after epoch 1: a new one resumes from the checkpoint as loaded from disk
    resumed = _fit(_trainee(), 3, saved=load_torch_bytes(torch_bytes(snapshots[0])))
    assert resumed.resumed == [1]
    timing = ("seconds", "images_per_s")
    assert [{k: v for k, v in h.to_dict().items() if k not in timing} for h in resumed.history] == \
        [{k: v for k, v in h.to_dict().items() if k not in timing} for h in result.history]
    assert resumed.best.epoch == result.best.epoch
    for key, value in result.best.state.items():
        assert torch.equal(value, resumed.best.state[key]), key
