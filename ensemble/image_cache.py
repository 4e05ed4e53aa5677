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

Three tiers, the first whose size fits ``--cache-share`` of the smallest object store of a node that
decodes, trains or votes (``cluster.Capacity.smallest_store``), unless ``--cache-tier`` names one:

- ``raw``: the two blocks above, uint8;
- ``compressed``: val and test keep their exact eval pixels (uint8); each train image is kept once,
  as a JPEG (quality ``JPEG_QUALITY``) of its cache-side pixels, decoded by the members' input
  threads and the voters where they use it; its eval pixels (out-of-bag scores, ``--augment
  none``) are the eval geometry applied to that image. About a ninth of the raw bytes for photos;
  decoding a 256-px JPEG takes well under a millisecond (BENCHMARKS.md);
- neither fits: the files are only checked, and members and voters decode them where they are
  used (the streaming path; the same pixels as ``raw``).
"""

from __future__ import annotations

import io
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
TIERS = ("raw", "compressed")
JPEG_QUALITY = 90     # the compressed tier's train images (PIL's default 4:2:0 chroma at this quality)
JPEG_BYTES_PER_PIXEL = 0.4  # its size estimate: photos at a 256-px short side measured 0.34 (BENCHMARKS.md)
JPEG_HEADER_BYTES = 640     # and per image: the headers and tables of PIL's JPEG (631 bytes for a 1x1 image)


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
    tier: str = "raw"             # raw | compressed (see the module's docstring)


def estimate_bytes(index, cfg: EnsembleConfig, tier: str = "raw") -> int:
    """The cache's size in ``tier`` before decoding: exact for the eval pixels, train images assumed
    4:3 at the cache side (their short side is at most that), JPEG at JPEG_BYTES_PER_PIXEL plus
    its headers."""
    s, side, n_train = cfg.image_size, cache_side(cfg), index.train.num_rows
    n_eval = index.val.num_rows + index.test.num_rows + (n_train if tier == "raw" else 0)
    train_pixels = n_train * side * math.ceil(side * ASSUMED_ASPECT)
    if tier == "raw":
        return n_eval * s * s * 3 + train_pixels * 3
    return n_eval * s * s * 3 + int(train_pixels * JPEG_BYTES_PER_PIXEL) + n_train * JPEG_HEADER_BYTES


def choose_tier(sizes: dict, max_bytes: float, wanted: str = "auto", budget: str = "the budget") -> tuple:
    """(tier or None for no cache, why): the first of TIERS (or only ``wanted``) whose estimated
    size in ``sizes`` fits ``max_bytes``; ``why`` (for the log) names the sizes and ``budget``."""
    within = f"{budget} = {_size(max_bytes)}"
    options = TIERS if wanted == "auto" else (wanted,)
    for tier in options:
        if sizes[tier] <= max_bytes:
            if tier == "raw":
                return tier, f"raw pixels about {_size(sizes['raw'])}, within {within}"
            over = f"raw pixels about {_size(sizes['raw'])} are over {within}; " if wanted == "auto" else (
                f"--cache-tier {tier}; within {within}: ")
            return tier, f"{over}compressed about {_size(sizes[tier])}"
    return None, ", ".join(f"{t} pixels about {_size(sizes[t])}" for t in options) + f", over {within}"


def decode_chunk(paths: list, *, image_size: int, resize: str, side: int, keep_train: bool, tier: str = "raw"):
    """Decode a chunk of files -> (check, eval block or None, train block or None).

    check: ``ok`` and ``reason`` per file (empty, truncated, not an image) and the blocks' bytes.
    A file that fails gets zero pixels (an empty JPEG) and ok=False; the driver drops its row.
    In the compressed tier a train chunk has no eval block (its eval pixels come from its JPEGs)
    and its train block holds JPEG bytes; val and test chunks are the same in both tiers.
    """
    from ensemble.data import open_image
    from ensemble.image_check import read_hashed, unreadable_reason
    from ensemble.pixels import check_eval_size, check_train_size, eval_pixels, shrink

    n = len(paths)
    compressed = keep_train and tier == "compressed"
    evals = None if compressed else np.zeros((n, image_size, image_size, 3), np.uint8)
    trains, ok, reasons, digests = [], np.zeros(n, bool), [], []
    for k, path in enumerate(paths):
        reason, train, digest = "", np.zeros((0, 0, 3), np.uint8), ""
        try:
            data, digest = read_hashed(path)
            img = open_image(data, min_size=side)
            if keep_train:  # its training copy's size is bounded like its eval resize
                check_train_size(*img.size, side=side)
            if compressed:
                check_eval_size(*img.size, image_size=image_size, resize=resize)
                train = encode_jpeg(shrink(img, side))
            else:
                evals[k] = eval_pixels(img, image_size=image_size, resize=resize)
                if keep_train:
                    train = shrink(img, side)
        except Exception as exc:  # PIL raises many types for bad files; all mean "skip this one"
            reason = unreadable_reason(path, exc)
            train = np.zeros(0, np.uint8) if compressed else np.zeros((0, 0, 3), np.uint8)
        ok[k] = not reason
        reasons.append(reason)
        trains.append(train)
        digests.append(digest)
    check = {"ok": ok, "reason": reasons, "sha256": digests, "bytes": 0 if evals is None else evals.nbytes}
    if not keep_train:
        return check, evals, None
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([t.size for t in trains])
    pixels = np.concatenate([t.reshape(-1) for t in trains]) if n else np.zeros(0, np.uint8)
    check["bytes"] += pixels.nbytes
    if compressed:
        return check, None, {"jpeg": pixels, "offsets": offsets}
    shapes = np.array([t.shape[:2] for t in trains], np.int32).reshape(n, 2)
    return check, evals, {"pixels": pixels, "offsets": offsets, "shapes": shapes}


def encode_jpeg(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> the JPEG's bytes as a uint8 array (quality JPEG_QUALITY, PIL/libjpeg-turbo)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=JPEG_QUALITY)
    return np.frombuffer(out.getbuffer(), np.uint8).copy()


def decode_jpeg(data: np.ndarray) -> np.ndarray:
    """``encode_jpeg``'s bytes -> (H, W, 3) uint8 (PIL with libjpeg-turbo: BENCHMARKS.md compares decoders)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def cache_images(index, cfg: EnsembleConfig, *, max_bytes: float, budget_from: str = "the smallest node's"):
    """The image check, and the cache in the first tier that fits ``max_bytes`` (``choose_tier``).

    Returns (index without unreadable files, with ``block``/``row`` columns when cached; skipped
    files with reasons; ImageCache or None). Unreadable files are skipped (or stop the run under
    ``--strict``), as ``image_check.check_images`` does. ``budget_from``: whose object store
    ``max_bytes`` is a share of, for the log line.
    """
    from ensemble.data import DatasetIndex
    from ensemble.image_check import check_classes_readable, check_images, clean_splits, with_digests

    sizes = {tier: estimate_bytes(index, cfg, tier) for tier in TIERS}
    tier, why = choose_tier(sizes, max_bytes, cfg.cache_tier,
                            budget=f"--cache-share {cfg.cache_share:g} of {budget_from} object store")
    if tier is None:
        log.info("image cache: off (%s); members and voters decode the files where they use them", why)
        index, skipped = check_images(index, cfg)
        return index, skipped, None
    started = time.time()
    splits = {"train": index.train, "val": index.val, "test": index.test}
    side = cache_side(cfg)
    chunks, checks, evals, trains = _run_chunks(splits, cfg, side, tier)
    bad = {name: {} for name in splits}
    digests = {name: [""] * table.num_rows for name, table in splits.items()}
    for (name, lo, hi), check in zip(chunks, checks):
        for k in np.flatnonzero(~check["ok"]):
            bad[name][lo + int(k)] = check["reason"][k]
        digests[name][lo:hi] = check["sha256"]
    splits = with_digests(splits, digests)
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
    if nbytes > max_bytes:  # the estimate assumes 4:3 images; the real bytes decide
        del evals, trains  # the blocks leave the object store with their last reference
        log.info("image cache: off (its %s tier took %s, over the budget of %s: the images are larger than the "
                 "estimate of 4:3 images); members and voters decode the files where they use them",
                 tier, _size(nbytes), _size(max_bytes))
        check_classes_readable(index, cleaned["train"])
        return DatasetIndex(root=index.root, classes=index.classes, **cleaned), skipped, None
    cache = ImageCache(eval_blocks=evals, train_blocks=trains, image_size=cfg.image_size, side=side,
                       resize=cfg.eval_resize, nbytes=nbytes, fetch_timeout=cfg.stall_timeout, tier=tier)
    n = sum(t.num_rows for t in splits.values())
    kept = (f"eval {cfg.image_size} px, train short side {side} px" if tier == "raw" else
            f"val/test eval pixels exact at {cfg.image_size} px, train images JPEG quality {JPEG_QUALITY} at short "
            f"side {side} px")
    log.info("image cache: %s tier (%s): %d images decoded once in %.1f s, %s in the object store (%s)",
             tier, why, n, time.time() - started, _size(nbytes), kept)
    check_classes_readable(index, located["train"])
    return DatasetIndex(root=index.root, classes=index.classes, **located), skipped, cache


def _run_chunks(splits: dict, cfg: EnsembleConfig, side: int, tier: str):
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
                                        keep_train=name == "train", tier=tier)
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
        """(S, S, 3) uint8: the eval transform's pixels (of the train image's JPEG, for a train row
        in the compressed tier)."""
        cache = self.cache
        if cache.tier == "compressed" and cache.train_blocks[block] is not None:
            from PIL import Image

            from ensemble.pixels import eval_pixels

            img = Image.fromarray(self.train(block, row))
            return eval_pixels(img, image_size=cache.image_size, resize=cache.resize)
        return self._get("eval", block)[row]

    def train(self, block: int, row: int) -> np.ndarray:
        """(H, W, 3) uint8 with the short side at most the cache side: the augmentation source."""
        data = self._get("train", block)
        lo, hi = data["offsets"][row], data["offsets"][row + 1]
        if "jpeg" in data:
            return decode_jpeg(data["jpeg"][lo:hi])
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
