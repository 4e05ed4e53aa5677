"""Bytes of one epoch checkpoint as members write it, side by side: the model's weights as their own
copy (an epoch that is not the best so far) vs the same tensors as the best state (an epoch that is).

    python benchmarks/checkpoint_size.py                       # resnet18, 10 classes
    python benchmarks/checkpoint_size.py --arch resnext101_64x4d --classes 100

Builds the member model and fused Adam, takes one optimizer step (so Adam's moments exist), and
serializes the snapshot dict exactly as ``MemberTrainer.fit`` builds it (torch.save into memory).
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

    import torch

    from ensemble.checkpoint import torch_bytes
    from ensemble.engine import cpu_copy, make_optimizer
    from ensemble.models import make_member_model

    model = make_member_model(args.arch, args.classes, None, "none", False)
    optimizer = make_optimizer(model, 1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    best = {"epoch": 1, "val_acc": 0.5, "state": cpu_copy(model.state_dict())}

    def snapshot_bytes(weights) -> int:
        return len(torch_bytes({"epoch": 1, "model": weights, "optimizer": cpu_copy(optimizer.state_dict()),
                                "best": best, "history": [], "resumed": []}))

    separate = snapshot_bytes(cpu_copy(model.state_dict()))
    shared = snapshot_bytes(best["state"])
    mib = 2 ** 20
    print(f"{args.arch}, {args.classes} classes, fused Adam")
    print(f"checkpoint, weights copied apart from the best state  {separate / mib:9.1f} MiB")
    print(f"checkpoint, weights = the best state's tensors         {shared / mib:9.1f} MiB")
    print(f"ratio shared/separate {shared / separate:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
