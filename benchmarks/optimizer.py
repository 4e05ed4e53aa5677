"""Adam's step, fused vs not, in a member's training step on CPU (one torch thread, as a member
with 1 CPU): images/s of forward + backward + step, and the step alone, side by side in one run.

    .venv/bin/python benchmarks/optimizer.py
"""

from __future__ import annotations

import time

import torch
import torchvision

STEPS = 10
VARIANTS = {"for-loop (torch's CPU default)": {}, "foreach": {"foreach": True}, "fused (ensemble)": {"fused": True}}


def measure(size: int, batch: int, options: dict) -> tuple[float, float]:
    """(images/s of whole training steps, ms of one optimizer step) for resnet18 at ``size`` px."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, **options)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))

    def step():
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step(), step()  # warm up
    start = time.perf_counter()
    for _ in range(STEPS):
        step()
    images_per_s = STEPS * batch / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(STEPS):
        optimizer.step()
    return images_per_s, (time.perf_counter() - start) / STEPS * 1000


def main() -> None:
    torch.set_num_threads(1)
    for size, batch in ((32, 32), (16, 64)):
        results = {name: measure(size, batch, options) for name, options in VARIANTS.items()}
        base = results["for-loop (torch's CPU default)"][0]
        for name, (images_per_s, step_ms) in results.items():
            print(f"resnet18 {size:>2} px batch {batch:>2}  {name:<32} {images_per_s:6.0f} img/s  "
                  f"step {step_ms:5.1f} ms  ratio {images_per_s / base:4.2f}")


if __name__ == "__main__":
    main()
