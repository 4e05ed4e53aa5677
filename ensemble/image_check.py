"""The image check: every file decoded once, in parallel in Ray Data, before anything trains.

Unreadable files (empty, truncated, not an image despite the extension) are skipped and listed,
or stop the run under --strict; a split (or class) left with no readable image is a ConfigError.
"""

from __future__ import annotations

import hashlib
import io
import logging
from typing import Optional

import numpy as np
import pyarrow as pa

from ensemble import storage
from ensemble.config import ConfigError, cache_side
from ensemble.data import DatasetIndex, to_dataset

log = logging.getLogger("ensemble.data")


def unreadable_reason(path: str, exc: Exception) -> str:
    """Why ``path`` could not be decoded, in a few words: an empty file, or the decoder's own error
    (truncated, not an image despite its extension). The one wording of both image checks."""
    try:
        if not storage.read_bytes(path):
            return "empty file (0 bytes)"
    except Exception:  # the same failure again; report the first one
        pass
    return f"{exc.__class__.__name__}: {exc}"[:200]


def read_hashed(path: str) -> tuple[bytes, str]:
    """A file's bytes and their sha256: every byte is read by the check (or the cache's decode)
    anyway, and a resume compares the digests (run_folder.CONTENTS_KEY)."""
    data = storage.read_bytes(path)
    return data, hashlib.sha256(data).hexdigest()


def check_batch(batch: dict, *, image_size: int, resize: str, side: Optional[int] = None) -> dict:
    """Try to decode each file: ``ok`` and, when not, a short ``reason`` (``unreadable_reason``):
    also a file the eval geometry (``image_size``, ``resize``) would resize past its limit, and
    (with ``side``, the cache side) a train file whose training copy would be too large."""
    from PIL import Image

    from ensemble.pixels import check_eval_size, check_train_size

    ok, reasons, digests = [], [], []
    for path, split in zip(batch["path"], batch["split"]):
        reason, digest = "", ""
        try:
            data, digest = read_hashed(path)
            with Image.open(io.BytesIO(data)) as img:
                check_eval_size(*img.size, image_size=image_size, resize=resize)
                if side is not None and split == "train":
                    check_train_size(*img.size, side=side)
                img.draft("RGB", (64, 64))  # JPEG: decode at a reduced scale; still reads every byte
                img.load()
        except Exception as exc:  # PIL raises many types for bad files; all mean "skip this one"
            reason = unreadable_reason(path, exc)
        ok.append(not reason)
        reasons.append(reason)
        digests.append(digest)
    return {"split": batch["split"], "id": batch["id"], "ok": np.array(ok), "reason": np.array(reasons, dtype=object),
            "sha256": np.array(digests, dtype=object)}


def check_images(index: DatasetIndex, cfg) -> tuple[DatasetIndex, list[dict]]:
    """Decode every file of the three splits once in Ray Data tasks; drop the unreadable ones (or
    stop, if ``cfg.strict``). Returns the index without bad files (ids renumbered 0..n-1 per split)
    and the list of skipped files with reasons."""
    cleaned, skipped = check_files({"train": index.train, "val": index.val, "test": index.test},
                                   flag="--data", root=index.root, strict=cfg.strict, stall_timeout=cfg.stall_timeout,
                                   image_size=cfg.image_size, resize=cfg.eval_resize, side=cache_side(cfg))
    check_classes_readable(index, cleaned["train"])
    return DatasetIndex(root=index.root, classes=index.classes, **cleaned), skipped


def check_classes_readable(index: DatasetIndex, train) -> None:
    """ConfigError when a class folder of ``index`` kept no readable image in ``train`` (the train
    table without its unreadable files)."""
    labels = set(train.column("label").to_pylist())
    empty = [c for k, c in enumerate(index.classes) if k not in labels]
    if empty:
        raise ConfigError(f"--data {index.root}: train/{empty[0]}/ has no readable images")


def check_files(splits: dict, *, flag: str, root: str, strict: bool, stall_timeout: float, image_size: int,
                resize: str, side: Optional[int] = None) -> tuple[dict, list[dict]]:
    """``check_images`` for any named file tables: (tables without unreadable files, skipped);
    ``image_size`` and ``resize``: the eval geometry the files will go through; ``side``: the
    cache side the ``train`` table's files are kept at for training.
    A split left with no readable file, or any bad file under ``strict``, is a ConfigError
    naming ``flag`` and ``root``; so is a check that makes no progress for ``stall_timeout`` s."""
    from ensemble.watch import stall_error, watched

    tables = [t.select(["id", "path"]).append_column("split", pa.array([name] * t.num_rows, pa.string()))
              for name, t in splits.items()]

    def batches():
        return to_dataset(pa.concat_tables(tables), rows_per_block=512).map_batches(
            check_batch, batch_format="numpy", batch_size=512, num_cpus=1,
            fn_kwargs={"image_size": image_size, "resize": resize, "side": side}).iter_batches(
                batch_size=None, batch_format="numpy")

    def stalled(waited: float) -> Exception:
        return stall_error(f"the image check made no progress in {waited:.0f} s", "its tasks need {need} each", 1)

    bad: dict[str, dict[int, str]] = {name: {} for name in splits}
    digests = {name: [""] * t.num_rows for name, t in splits.items()}
    for batch in watched(batches, stall_timeout=stall_timeout, stalled=stalled, name="ensemble-image-check"):
        for split, row_id, ok, reason, digest in zip(batch["split"], batch["id"], batch["ok"], batch["reason"],
                                                     batch["sha256"]):
            if not ok:
                bad[str(split)][int(row_id)] = str(reason)
            digests[str(split)][int(row_id)] = str(digest)
    return clean_splits(with_digests(splits, digests), bad, flag=flag, root=root, strict=strict)


def with_digests(splits: dict, digests: dict) -> dict:
    """Each table with a ``sha256`` column: its files' contents as the check read them (row = id)."""
    return {name: (t.drop_columns(["sha256"]) if "sha256" in t.column_names else t).append_column(
        "sha256", pa.array(digests[name], pa.string())) for name, t in splits.items()}


def clean_splits(splits: dict, bad: dict, *, flag: str, root: str, strict: bool) -> tuple[dict, list[dict]]:
    """The tables without the rows of ``bad`` ({split: {row id: reason}}), ids renumbered 0..n-1,
    and the skipped list; the ConfigErrors of ``check_files``."""
    skipped = [{"split": split, "path": splits[split].column("path")[row_id].as_py(), "reason": reason}
               for split in splits for row_id, reason in sorted(bad[split].items())]
    for entry in skipped if not strict else ():
        log.warning("skipping unreadable %s image %s: %s", entry["split"], entry["path"], entry["reason"])
    if not skipped:
        return dict(splits), []
    if strict:
        first = skipped[0]
        raise ConfigError(f"{flag} {root}: {len(skipped)} unreadable image file(s), e.g. {first['path']} "
                          f"({first['reason']}); remove them, or drop --strict to skip them")
    cleaned = {}
    for split, table in splits.items():
        keep = np.ones(table.num_rows, dtype=bool)
        keep[list(bad[split])] = False
        kept = table.filter(pa.array(keep))
        cleaned[split] = kept.set_column(0, "id", pa.array(np.arange(kept.num_rows, dtype=np.int64)))
        if kept.num_rows == 0:
            where = f"{split}/ has" if flag == "--data" else "it has"
            raise ConfigError(f"{flag} {root}: {where} no readable images")
    return cleaned, skipped
