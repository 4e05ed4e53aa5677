"""Decode each image once per run: the image check and the pixel cache in one pass.

Ray tasks (one CPU each, spread over the cluster) read and decode chunks of files before any
member starts, so they never wait for CPUs the members hold. Each task returns its chunk's check
results (small; to the driver) and its pixels as uint8 blocks that stay in the object store (the
driver holds their refs, never pixels):

- ``eval`` (n, S, S, 3): the eval transform's exact pixels, for every split (per-epoch val, the
  vote, out-of-bag scores, ``--augment none``);
- ``train`` (train split only): each image with its short side shrunk to the cache side (aspect
  kept), the source of every member's augmentation in every epoch.

Members and voters on a node read the blocks from that node's object store without copying them.
When the pixels would take more than ``--cache-share`` of the object store, the files are only
checked, and members and voters decode them where they are used (the streaming path).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ensemble.config import EnsembleConfig, cache_side
from ensemble.errors import StallError

log = logging.getLogger("ensemble.data")

CHUNK = 128           # images per decode task
ASSUMED_ASPECT = 4 / 3  # for the size estimate made before decoding (camera photos); the exact size is printed after


@dataclass(frozen=True)
class ImageCache:
    """Where a run's decoded pixels live. ``eval_blocks[k]`` / ``train_blocks[k]`` are ObjectRefs
    (``train_blocks[k]`` None for val and test chunks); split tables carry ``block`` and ``row``."""

    eval_blocks: list
    train_blocks: list
    image_size: int
    side: int
    resize: str
    nbytes: int = 0
    fetch_timeout: float = 600.0  # --stall-timeout: a block that cannot be fetched in this long is an error


def estimate_bytes(index, cfg: EnsembleConfig) -> int:
    """The cache's size before decoding: exact for the eval pixels, train images assumed 4:3 at the
    cache side (their short side is at most that)."""
    s, side = cfg.image_size, cache_side(cfg)
    n_all = index.train.num_rows + index.val.num_rows + index.test.num_rows
    return n_all * s * s * 3 + index.train.num_rows * side * math.ceil(side * ASSUMED_ASPECT) * 3


def decode_chunk(paths: list, *, image_size: int, resize: str, side: int, keep_train: bool):
    """Decode a chunk of files -> (check, eval block, train block or None).

    check: ``ok`` and ``reason`` per file (empty, truncated, not an image) and the blocks' bytes.
    A file that fails gets zero pixels and ok=False; the driver drops its row.
    """
    from ensemble.data import read_image
    from ensemble.image_check import unreadable_reason
    from ensemble.pixels import eval_pixels, shrink

    n = len(paths)
    evals = np.zeros((n, image_size, image_size, 3), np.uint8)
    trains, ok, reasons = [], np.zeros(n, bool), []
    for k, path in enumerate(paths):
        reason, train = "", np.zeros((0, 0, 3), np.uint8)
        try:
            img = read_image(path, min_size=side)
            evals[k] = eval_pixels(img, image_size=image_size, resize=resize)
            if keep_train:
                train = shrink(img, side)
        except Exception as exc:  # PIL raises many types for bad files; all mean "skip this one"
            reason = unreadable_reason(path, exc)
        ok[k] = not reason
        reasons.append(reason)
        trains.append(train)
    check = {"ok": ok, "reason": reasons, "bytes": evals.nbytes}
    if not keep_train:
        return check, evals, None
    shapes = np.array([t.shape[:2] for t in trains], np.int32).reshape(n, 2)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([t.size for t in trains])
    pixels = np.concatenate([t.reshape(-1) for t in trains]) if n else np.zeros(0, np.uint8)
    check["bytes"] += pixels.nbytes
    return check, evals, {"pixels": pixels, "offsets": offsets, "shapes": shapes}


def cache_images(index, cfg: EnsembleConfig, *, max_bytes: float):
    """The image check, and the cache when it fits in ``max_bytes``.

    Returns (index without unreadable files, with ``block``/``row`` columns when cached; skipped
    files with reasons; ImageCache or None). Unreadable files are skipped (or stop the run under
    ``--strict``), as ``image_check.check_images`` does.
    """
    from ensemble.data import DatasetIndex
    from ensemble.image_check import check_classes_readable, check_images, clean_splits

    need = estimate_bytes(index, cfg)
    if need > max_bytes:
        log.info("image cache: off (about %s of pixels, over --cache-share %g of the smallest node's object store "
                 "= %s); members and voters decode the files where they use them", _size(need), cfg.cache_share,
                 _size(max_bytes))
        index, skipped = check_images(index, cfg)
        return index, skipped, None
    started = time.time()
    splits = {"train": index.train, "val": index.val, "test": index.test}
    side = cache_side(cfg)
    chunks, checks, evals, trains = _run_chunks(splits, cfg, side)
    bad = {name: {} for name in splits}
    for (name, lo, _), check in zip(chunks, checks):
        for k in np.flatnonzero(~check["ok"]):
            bad[name][lo + int(k)] = check["reason"][k]
    cleaned, skipped = clean_splits(splits, bad, flag="--data", root=index.root, strict=cfg.strict)
    located = {}
    for name, table in splits.items():
        block, row = np.zeros(table.num_rows, np.int32), np.zeros(table.num_rows, np.int32)
        for b, (split, lo, hi) in enumerate(chunks):
            if split == name:
                block[lo:hi], row[lo:hi] = b, np.arange(hi - lo)
        keep = np.ones(table.num_rows, bool)
        keep[list(bad[name])] = False
        located[name] = cleaned[name].append_column("block", pa.array(block[keep])).append_column(
            "row", pa.array(row[keep]))
    nbytes = int(sum(c["bytes"] for c in checks))
    cache = ImageCache(eval_blocks=evals, train_blocks=trains, image_size=cfg.image_size, side=side,
                       resize=cfg.eval_resize, nbytes=nbytes, fetch_timeout=cfg.stall_timeout)
    n = sum(t.num_rows for t in splits.values())
    log.info("image cache: %d images decoded once in %.1f s, %s in the object store (eval %d px, train short side "
             "%d px)", n, time.time() - started, _size(nbytes), cfg.image_size, side)
    check_classes_readable(index, located["train"])
    return DatasetIndex(root=index.root, classes=index.classes, **located), skipped, cache


def _run_chunks(splits: dict, cfg: EnsembleConfig, side: int):
    """Submit every chunk's task; wait (never silently: a stage that cannot start is reported)."""
    import ray

    task = ray.remote(decode_chunk).options(num_cpus=1, num_returns=3, name="ensemble-image-cache",
                                            scheduling_strategy="SPREAD")
    chunks, checks, evals, trains = [], [], [], []
    for name, table in splits.items():
        paths = table.column("path").to_pylist()
        for lo in range(0, len(paths), CHUNK):
            hi = min(lo + CHUNK, len(paths))
            check, ev, tr = task.remote(paths[lo:hi], image_size=cfg.image_size, resize=cfg.eval_resize, side=side,
                                        keep_train=name == "train")
            chunks.append((name, lo, hi))
            checks.append(check)
            evals.append(ev)
            trains.append(tr if name == "train" else None)
    return chunks, _wait_all(checks, cfg.stall_timeout), evals, trains


def _wait_all(refs: list, stall_timeout: float) -> list:
    """ray.get of ``refs``, watched as every stage is (``watch.watched``): when none of the tasks
    finishes for ``stall_timeout`` seconds, they are cancelled and the stage stops with one line
    naming the CPUs it waits for."""
    import ray

    from ensemble.watch import stall_error, watched

    def finished():
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield done[0]

    def stalled(waited: float) -> Exception:
        for ref in refs:  # queued decode tasks would otherwise still run once CPUs free up
            ray.cancel(ref)
        return stall_error(f"image decoding made no progress in {stall_timeout:g} s", "its tasks need {need} each", 1)

    watched(finished, stall_timeout=stall_timeout, stalled=stalled, name="ensemble-image-cache")
    return ray.get(refs)


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


class BlockReader:
    """The cache's blocks in this process: each fetched from the object store once, on first use,
    and read in place (zero-copy views of the node's object store). Safe across threads."""

    def __init__(self, cache: ImageCache):
        self.cache, self._blocks, self._lock = cache, {}, threading.Lock()

    def eval(self, block: int, row: int) -> np.ndarray:
        """(S, S, 3) uint8: the eval transform's pixels."""
        return self._get("eval", block)[row]

    def train(self, block: int, row: int) -> np.ndarray:
        """(H, W, 3) uint8 with the short side at most the cache side: the augmentation source."""
        data = self._get("train", block)
        lo, hi = data["offsets"][row], data["offsets"][row + 1]
        return data["pixels"][lo:hi].reshape(*data["shapes"][row], 3)

    def _get(self, kind: str, block: int):
        key = (kind, block)
        if key not in self._blocks:
            import ray

            ref = (self.cache.eval_blocks if kind == "eval" else self.cache.train_blocks)[block]
            try:
                value = ray.get(ref, timeout=self.cache.fetch_timeout)
            except ray.exceptions.GetTimeoutError:
                # A block lost with its node is decoded again by Ray (lineage), on a free CPU: on a
                # cluster whose CPUs the members hold, that never comes. Say so instead of waiting.
                raise StallError(f"image cache block {block} could not be fetched in {self.cache.fetch_timeout:g} s "
                                 f"(lost with its node, and no CPU free to decode it again); finished members and "
                                 f"epochs are kept: rerun the same command to resume") from None
            with self._lock:
                self._blocks.setdefault(key, value)
        return self._blocks[key]
