"""Bytes of one epoch checkpoint as members write it, side by side: the model's weights as their own
copy (an epoch that is not the best so far) vs the same tensors as the best state (an epoch that is).

    python benchmarks/checkpoint_size.py                       # resnet18, 10 classes
    python benchmarks/checkpoint_size.py --arch resnext101_64x4d --classes 100

Builds the member model and fused Adam, takes one optimizer step (so Adam's moments exist), and
serializes the snapshot the epoch loop commits (``epochs.snapshot``; torch.save into memory).
"""

from __future__ import annotations

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from ensemble.checkpoint import torch_bytes
    from ensemble.config import build_config
    from ensemble.engine import cpu_copy
    from ensemble.epochs import Best, build_trainee, snapshot

    cfg = build_config(flag_values={"arch": args.arch, "weights": "none", "freeze": "none", "lr": 1e-3})
    trainee = build_trainee(cfg, args.classes, None, torch.device("cpu"))
    trainee.model(torch.randn(2, 3, 32, 32)).sum().backward()
    trainee.optimizer.step()
    best = Best(epoch=1, val_acc=0.5, val_loss=1.0, val_ids=np.arange(2), val_probs=np.zeros((2, args.classes)),
                state=cpu_copy(trainee.model.state_dict()))
    separate = len(torch_bytes(snapshot(2, trainee, [], best, [])))  # epoch 2, not the best: its own copy
    shared = len(torch_bytes(snapshot(1, trainee, [], best, [])))    # epoch 1 is the best: the same tensors
    mib = 2 ** 20
    print(f"{args.arch}, {args.classes} classes, fused Adam")
    print(f"checkpoint, weights copied apart from the best state  {separate / mib:9.1f} MiB")
    print(f"checkpoint, weights = the best state's tensors         {shared / mib:9.1f} MiB")
    print(f"ratio shared/separate {shared / separate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
