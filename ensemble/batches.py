"""A member's input: a split's pixels (``SplitImages``, from the image cache or the files) and
uint8 batches of its epoch's rows, augmented by threads of its own process.

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
import pyarrow as pa

from ensemble.image_cache import BlockReader, ImageCache


class SplitImages:
    """One split's images in a member's or voter's process: uint8 pixels by the table's row, from
    the run's cache when the table has ``block``/``row`` columns and a cache is given, else decoded
    from the file (the streaming path; the same pixels either way)."""

    def __init__(self, table: pa.Table, cache: Optional[ImageCache], *, image_size: int, resize: str, side: int):
        self.image_size, self.resize, self.side = image_size, resize, side
        self.reader = BlockReader(cache) if cache is not None and "block" in table.column_names else None
        if self.reader is not None:
            self.blocks, self.rows = table.column("block").to_numpy(), table.column("row").to_numpy()
        else:
            self.paths = table.column("path").to_pylist()
        self.ids, self.labels = table.column("id").to_numpy(), table.column("label").to_numpy()

    def __len__(self) -> int:
        return len(self.ids)

    def eval(self, i: int) -> np.ndarray:
        """(S, S, 3) uint8: the eval transform's pixels of row ``i``."""
        if self.reader is not None:
            return self.reader.eval(int(self.blocks[i]), int(self.rows[i]))
        from ensemble.pixels import eval_pixels

        return eval_pixels(self._decode(i), image_size=self.image_size, resize=self.resize)

    def train(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8, short side at most the cache side: row ``i``'s augmentation source."""
        if self.reader is not None:
            return self.reader.train(int(self.blocks[i]), int(self.rows[i]))
        from ensemble.pixels import shrink

        return shrink(self._decode(i), self.side)

    def _decode(self, i: int):
        from ensemble.data import read_image

        return read_image(self.paths[i], min_size=self.side)


def batches(images, rows: Optional[np.ndarray] = None, *, batch_size: int, augment: Optional[str] = None,
            seed: int = 0, threads: int = 1, prefetch: Optional[int] = None) -> Iterator[dict]:
    """Batches of ``images``' (a ``SplitImages``) ``rows`` (default: all, in order).

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
