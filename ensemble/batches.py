"""A member's input: uint8 batches of its epoch's rows, augmented by threads of its own process.

The member's reserved CPUs do its input work (never tasks that would wait for CPUs the members
hold). ``threads`` worker threads each make whole batches, up to ``prefetch`` batches ahead of
the training step; batches come out in order, and every image's draws come from its own seeded
generator (``pixels.image_rng``), so the batches are the same on every run, however many threads.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional

import numpy as np


def batches(images, rows: Optional[np.ndarray] = None, *, batch_size: int, augment: Optional[str] = None,
            seed: int = 0, threads: int = 1, prefetch: Optional[int] = None) -> Iterator[dict]:
    """Batches of ``images``' (an ``image_cache.SplitImages``) ``rows`` (default: all, in order).

    ``augment`` seed | light: the train augmentation, drawn per image from (``seed``, its place in
    the epoch); None or ``none``: the eval pixels. Yields id, label (numpy) and image, uint8
    (B, S, S, 3).
    """
    from ensemble.pixels import Augmenter, image_rng

    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    augmenter = Augmenter(image_size=images.image_size, augment=augment) if augment in ("seed", "light") else None
    size = images.image_size

    def make(start: int) -> dict:
        part = rows[start:start + batch_size]
        out = np.empty((len(part), size, size, 3), np.uint8)
        for k, row in enumerate(part):
            out[k] = images.eval(row) if augmenter is None else augmenter(images.train(row),
                                                                          image_rng(seed, start + k))
        return {"id": images.ids[part], "label": images.labels[part], "image": out}

    threads = max(1, int(threads))
    starts = iter(range(0, len(rows), batch_size))
    ahead = max(1, prefetch if prefetch is not None else threads + 1)
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="input") as pool:
        pending = deque(pool.submit(make, start) for _, start in zip(range(ahead), starts))
        while pending:
            batch = pending.popleft().result()
            following = next(starts, None)
            if following is not None:
                pending.append(pool.submit(make, following))
            yield batch
