"""From a folder of images to decoded batches: layout scan, decoding, the recipe's transforms.

Layout (as in the study): ROOT/train/<class>/*, ROOT/val/<class>/*, ROOT/test/* (flat); or a
manifest, a CSV or Parquet file with columns ``path``, ``label`` and ``split`` (``scan_manifest``).
With ``--val-fraction`` the data has no val split and val is drawn from train (``stratified_val_rows``).
The driver only lists file names; images are read, decoded and transformed where they are used
(a member's own process, a voter, a Ray Data task), never in the driver. Rows carry a stable ``id``
(position in sorted order), ``path``, ``image_name`` (file name without extension) and ``label``
(index of the class folder in sorted order; -1 for test).
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa

from ensemble import storage
from ensemble.config import ConfigError
from ensemble.pixels import ImageTooLarge
from ensemble.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# The columns of probabilities.parquet beside one per class (report.py): no class may take their name.
RESULT_COLUMNS = ("image_name", "predictive_entropy", "member_disagreement")


@dataclass(frozen=True)
class DatasetIndex:
    """File lists of the three splits; holds names, never pixels."""

    root: str
    classes: tuple[str, ...]
    train: pa.Table
    val: pa.Table
    test: pa.Table

    def sizes(self) -> dict:
        return {"classes": len(self.classes), "train": self.train.num_rows,
                "val": self.val.num_rows, "test": self.test.num_rows}


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _image_files(folder: str) -> list[str]:
    return [name for name, is_dir in storage.list_dir(folder) if not is_dir and _is_image(name)]


def _class_dirs(split_dir: str) -> list[str]:
    return [name for name, is_dir in storage.list_dir(split_dir) if is_dir and not name.startswith(".")]


def _table(paths: list[str], labels: list[int], names: Optional[list[str]] = None) -> pa.Table:
    """File rows; ``image_name`` is the file name without its extension unless ``names`` says.
    Local paths are made absolute: the Ray workers that read them run in other folders (a notebook's
    cluster, a job's working directory), where a relative path names another file or none."""
    paths = [p if storage.is_uri(p) else os.path.abspath(p) for p in paths]
    names = names or [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return pa.table({
        "id": pa.array(np.arange(len(paths), dtype=np.int64)),
        "path": pa.array(paths, pa.string()),
        "image_name": pa.array(names, pa.string()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
    })


def _labelled_split(root: str, split: str, classes: Optional[list[str]]) -> tuple[list[str], pa.Table]:
    split_dir = storage.join(root, split)
    if not storage.is_dir(split_dir):
        instead = f", or pass --val-fraction F (e.g. 0.1) to draw {VAL_FROM_TRAIN}" if split == "val" else ""
        raise ConfigError(f"--data {root}: no {split}/ folder; expected {split}/<class>/<images>{instead}")
    found = _class_dirs(split_dir)
    if not found:
        raise ConfigError(f"--data {root}: {split}/ has no class folders; expected {split}/<class>/<images>")
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ConfigError(f"--data {root}: val/ has classes not in train/: {', '.join(unknown[:5])}")
    return classes, _class_folder_rows(split_dir, found, classes, empty=f"--data {root}: {split}/{{cls}}/")


def _class_folder_rows(folder: str, found: list[str], classes, *, empty: Optional[str] = None,
                       named_by_class: bool = False) -> pa.Table:
    """File rows of ``folder``'s class folders ``found``, labelled by position in ``classes``.
    With ``empty`` (a message prefix with ``{cls}``), a class folder without images is a ConfigError.
    ``named_by_class``: ``image_name`` is ``<class>/<file name without extension>``, so files of
    the same name in two class folders stay two rows of predictions.csv."""
    paths, labels, names = [], [], []
    for cls in found:
        files = _image_files(storage.join(folder, cls))
        if not files and empty is not None:
            raise ConfigError(empty.format(cls=cls) + f" has no images ({', '.join(IMG_EXTENSIONS)})")
        paths += [storage.join(folder, cls, f) for f in files]
        labels += [list(classes).index(cls)] * len(files)
        names += [f"{cls}/{os.path.splitext(f)[0]}" for f in files]
    return _table(paths, labels, names if named_by_class else None)


def check_unique_names(table: pa.Table, what: str) -> None:
    """ConfigError when two files of ``table`` would give the same row of predictions.csv (its
    ``image_name``: ``a.jpg`` and ``a.png``); ``what`` names the folder in the message."""
    seen: dict = {}
    for name, path in zip(table.column("image_name").to_pylist(), table.column("path").to_pylist()):
        if name in seen:
            raise ConfigError(f"{what}: {os.path.basename(seen[name])} and {os.path.basename(path)} would both be row "
                              f"'{name}' of predictions.csv; rename one of them")
        seen[name] = path


MANIFEST_EXTENSIONS = (".csv", ".parquet")
SPLITS = ("train", "val", "test")
VAL_FROM_TRAIN = "a stratified val split from train"
# The val draw's own random stream, apart from the members' (bootstrap.member_seeds spawns from the
# bare seed): the draw's entropy is [seed, VAL_DRAW_STREAM].
VAL_DRAW_STREAM = 0x76616C  # "val"


def stratified_val_rows(labels, fraction: float, seed: int) -> np.ndarray:
    """Which train rows become val: a bool mask, shape (n,), a pure function of (labels, fraction, seed).

    Per class, of its n_c rows: none when n_c is 1 (the class stays in train), otherwise
    floor(fraction * n_c + 1/2) (``fraction * n_c`` rounded half up: at least 1 once
    fraction * n_c >= 0.5), never more than n_c - 1, so no class leaves train (with fraction <= 0.5,
    config's bound, the cap only matters for n_c = 1). Which rows: the first of the class in one
    seeded permutation of all rows. The caller keeps each split in file order (the mask's order).
    """
    labels = np.asarray(labels, dtype=np.int64)  # (n,)
    n = len(labels)
    shuffled = np.random.default_rng([seed, VAL_DRAW_STREAM]).permutation(n)
    grouped = shuffled[np.argsort(labels[shuffled], kind="stable")]  # rows by class, each class in seeded order
    _, starts, counts = np.unique(labels[grouped], return_index=True, return_counts=True)  # per class
    # 1e-9: a half that floating point puts just below (0.29 * 50 = 14.499999999999998) still rounds up
    take = np.minimum(counts - 1, np.floor(fraction * counts + 0.5 + 1e-9).astype(np.int64))
    rank = np.arange(n) - np.repeat(starts, counts)  # position of each grouped row within its class
    is_val = np.zeros(n, dtype=bool)
    is_val[grouped[rank < np.repeat(take, counts)]] = True
    return is_val


def _split_off_val(train: pa.Table, fraction: float, seed: int, where: str) -> tuple[pa.Table, pa.Table]:
    """(train, val) file rows: ``stratified_val_rows`` of ``train``, each split in file order with
    ids numbered from 0 again, as every split's are. ``where`` names the data in the one-line error
    for a fraction that draws no image at all."""
    is_val = stratified_val_rows(train.column("label").to_numpy(), fraction, seed)
    if not is_val.any():
        raise ConfigError(f"--val-fraction {fraction:g} draws no val images from {where}'s {train.num_rows} train "
                          f"images (each class of n gives fraction x n, rounded; a class of one gives none); "
                          f"use a larger fraction")

    def renumbered(table: pa.Table) -> pa.Table:
        ids = pa.array(np.arange(table.num_rows, dtype=np.int64))
        return table.set_column(table.schema.get_field_index("id"), "id", ids)

    return renumbered(train.filter(pa.array(~is_val))), renumbered(train.filter(pa.array(is_val)))


def scan_layout(root: str, *, val_fraction: Optional[float] = None, seed: int = 0) -> DatasetIndex:
    """List the three splits; ConfigError with one clear line for a layout we cannot use.

    ``root`` is a local folder or a URI (``s3://bucket/prefix``), or a manifest file there
    (``scan_manifest``); storage errors there (no such bucket, no credentials, endpoint
    unreachable) also become one line. With ``val_fraction`` (``--val-fraction``) the data must
    have no val split (no val/ folder, no val rows) and val is drawn from train,
    ``stratified_val_rows(labels, val_fraction, seed)`` with the run's ``seed``: the same data,
    fraction and seed give the same index, so a resumed run trains on the same rows.
    """
    if storage.is_uri(root):
        root = root.rstrip("/")  # one spelling, so file paths (and the resume fingerprint) match
    try:
        if root.lower().endswith(MANIFEST_EXTENSIONS):
            return scan_manifest(root, val_fraction=val_fraction, seed=seed)
        return _scan_layout(root, val_fraction, seed)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:  # ValueError: a URI storage cannot resolve
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else exc.__class__.__name__
        raise ConfigError(f"--data {root}: cannot read it ({reason})") from None


def check_splits_apart(root: str, tables: dict) -> None:
    """ConfigError (one line) when one local file is in two splits (a link in val/ or test/ to a
    train image, or two links to one file): it would be scored on what trained on it."""
    if storage.is_uri(root):
        return
    seen: dict = {}
    for split, table in tables.items():
        for path in table.column("path").to_pylist():
            key = storage.canonical(path)
            other = seen.setdefault(key, (split, path))
            if other[0] != split:
                raise ConfigError(f"--data {root}: {os.path.relpath(other[1], root)} ({other[0]}) and "
                                  f"{os.path.relpath(path, root)} ({split}) are the same file {key} (a link): the "
                                  f"members would be scored on an image they trained on; keep it in one split")


def _scan_layout(root: str, val_fraction: Optional[float], seed: int) -> DatasetIndex:
    if not storage.is_dir(root):
        raise ConfigError(f"--data {root}: no such folder")
    classes, train = _labelled_split(root, "train", None)
    taken = [c for c in classes if c in RESULT_COLUMNS]
    if taken:
        raise ConfigError(f"--data {root}: class folder train/{taken[0]}/ has the name of a column of "
                          f"probabilities.parquet ({', '.join(RESULT_COLUMNS)}); rename the folder")
    if val_fraction is None:
        _, val = _labelled_split(root, "val", classes)
    elif storage.is_dir(storage.join(root, "val")):
        raise ConfigError(f"--data {root} has a val/ folder and --val-fraction {val_fraction:g} draws val from "
                          f"train/; drop --val-fraction to use val/, or move val/'s images into train/")
    else:
        train, val = _split_off_val(train, val_fraction, seed, f"--data {root}")
    test_dir = storage.join(root, "test")
    test_files = _image_files(test_dir) if storage.is_dir(test_dir) else []  # no test/: the run scores val only
    if storage.is_dir(test_dir) and not test_files:
        raise ConfigError(f"--data {root}: test/ has no images ({', '.join(IMG_EXTENSIONS)}); put the images to "
                          f"label there, or remove test/ to train and score on val only")
    test = _table([storage.join(test_dir, f) for f in test_files], [-1] * len(test_files))
    check_unique_names(test, f"--data {root}: test/")
    check_splits_apart(root, {"train": train, "val": val, "test": test})
    if not storage.is_uri(root):
        root = os.path.abspath(root)
    return DatasetIndex(root=root, classes=tuple(classes), train=train, val=val, test=test)


def scan_manifest(manifest: str, *, val_fraction: Optional[float] = None, seed: int = 0) -> DatasetIndex:
    """The three splits from a CSV or Parquet file (local or a URI) with columns ``path`` (relative
    to the manifest's folder, absolute, or a URI), ``label`` (the class; ignored for test rows) and
    ``split`` (train, val or test). Rows keep the file's order within each split. Classes are the
    train rows' labels, in numeric order when every one is a whole number, else in text order.
    Each problem is one ConfigError naming its row (a CSV's line, counting the header as line 1):
    a missing column, an unknown split, a train or val row without a label, a val label no train
    row has, a path named twice, a file that does not exist, no train or val rows (test rows are
    optional: without them the run scores val and writes no predictions). With
    ``val_fraction`` the manifest has no val rows (one is an error) and val is drawn from the
    train rows (``scan_layout``)."""
    from pyarrow import csv, parquet

    flag = f"--data {manifest}"
    if not storage.exists(manifest):
        raise ConfigError(f"{flag}: no such manifest file")
    data = io.BytesIO(storage.read_bytes(manifest))
    is_csv = manifest.lower().endswith(".csv")
    try:
        if is_csv:  # as text: labels 1, 2, 10 stay the names they are, empty cells ""
            table = csv.read_csv(data, convert_options=csv.ConvertOptions(
                column_types={n: pa.string() for n in ("path", "label", "split")}, strings_can_be_null=False))
        else:
            table = parquet.read_table(data)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"{flag}: cannot read it as {'CSV' if is_csv else 'Parquet'} "
                          f"({str(exc).strip().splitlines()[0][:160]})") from None
    missing = [c for c in ("path", "label", "split") if c not in table.column_names]
    if missing:
        raise ConfigError(f"{flag}: no column {', '.join(missing)}; a manifest has the columns path, label and "
                          f"split (train, val or test)")

    def row(k: int) -> str:
        return f"line {k + 2}" if is_csv else f"row {k + 1}"

    def text(column: str) -> list[str]:
        return ["" if v is None else str(v).strip() for v in table.column(column).to_pylist()]

    paths, labels, splits = text("path"), text("label"), text("split")
    base = manifest.rsplit("/", 1)[0] if storage.is_uri(manifest) else os.path.dirname(os.path.abspath(manifest))
    rows = {split: [] for split in SPLITS}
    seen: dict = {}
    for k, (path, label, split) in enumerate(zip(paths, labels, splits)):
        if split not in SPLITS:
            raise ConfigError(f"{flag}: {row(k)}: split {split!r} is not train, val or test")
        if not path:
            raise ConfigError(f"{flag}: {row(k)}: no path")
        if split != "test" and not label:
            raise ConfigError(f"{flag}: {row(k)}: a {split} row needs a label")
        full = path if storage.is_uri(path) or os.path.isabs(path) else storage.join(base, path)
        key = storage.canonical(full)  # a.jpg, ./a.jpg, sub/../a.jpg and a link to it are one image
        if key in seen:
            first = seen[key]
            if splits[first] != split:
                raise ConfigError(f"{flag}: {row(first)} ({splits[first]}) and {row(k)} ({split}) name the same image "
                                  f"{paths[first]!r} / {path!r}: the members would be scored on an image "
                                  f"they trained on; keep it in one split")
            raise ConfigError(f"{flag}: {row(first)} and {row(k)} both name {path}; list each image once")
        seen[key] = k
        rows[split].append((k, full, label))
    if val_fraction is not None and rows["val"]:
        raise ConfigError(f"{flag} has {len(rows['val'])} val rows ({row(rows['val'][0][0])} the first) and "
                          f"--val-fraction {val_fraction:g} draws val from the train rows; drop --val-fraction to "
                          f"use the manifest's val rows, or mark them train")
    for split in ("train", "val"):  # no test rows: the run scores val only
        if not rows[split] and not (split == "val" and val_fraction is not None):
            instead = (f", or pass --val-fraction F (e.g. 0.1) to draw {VAL_FROM_TRAIN}" if split == "val"
                       else "")
            raise ConfigError(f"{flag}: no {split} rows; the split column says train, val or test for each "
                              f"image{instead}")
    found = sorted({label for _, _, label in rows["train"]})
    if all(label.lstrip("-").isdigit() for label in found):
        found = sorted(found, key=int)
    classes = tuple(found)
    taken = [c for c in classes if c in RESULT_COLUMNS]
    if taken:
        raise ConfigError(f"{flag}: label {taken[0]!r} has the name of a column of probabilities.parquet "
                          f"({', '.join(RESULT_COLUMNS)}); rename it")
    unknown = [(k, label) for k, _, label in rows["val"] if label not in classes]
    if unknown:
        raise ConfigError(f"{flag}: {row(unknown[0][0])}: val label {unknown[0][1]!r} is not the label of any "
                          f"train row")
    everything = [(k, full) for split in SPLITS for k, full, _ in rows[split]]
    for remote in (True, False):
        group = [(k, full) for k, full in everything if storage.is_uri(full) == remote]
        stats = storage.file_stats([full for _, full in group])
        absent = [(k, full) for (k, full), (size, _) in zip(group, stats) if size < 0]
        if absent:
            more = f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""
            raise ConfigError(f"{flag}: {row(absent[0][0])}: {absent[0][1]}: no such file{more}")
    index = {c: i for i, c in enumerate(classes)}
    tables = {split: _table([full for _, full, _ in rows[split]],
                            [index[label] if split != "test" else -1 for _, _, label in rows[split]])
              for split in SPLITS}
    check_unique_names(tables["test"], f"{flag}: test rows")
    if val_fraction is not None:
        tables["train"], tables["val"] = _split_off_val(tables["train"], val_fraction, seed, flag)
    root = manifest if storage.is_uri(manifest) else os.path.abspath(manifest)
    return DatasetIndex(root=root, classes=classes, **tables)


def scan_images(folder: str, classes) -> tuple[pa.Table, bool]:
    """The images to label with a finished run: (file rows, labelled).

    A flat folder of images (labels -1), or class folders named like the run's ``classes``
    (labels are then known, and predictions can be scored; rows are named ``<class>/<name>``).
    ConfigError, one line, otherwise, and for two files that would share a row name.
    """
    if storage.is_uri(folder):
        folder = folder.rstrip("/")
    try:
        if not storage.is_dir(folder):
            raise ConfigError(f"--images {folder}: no such folder")
        flat = _image_files(folder)
        if flat:
            table = _table([storage.join(folder, f) for f in flat], [-1] * len(flat))
            check_unique_names(table, f"--images {folder}")
            return table, False
        found = _class_dirs(folder)
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise ConfigError(f"--images {folder}: class folders the run was not trained on: {', '.join(unknown[:5])}")
        table = _class_folder_rows(folder, found, classes, named_by_class=True)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"--images {folder}: cannot read it ({str(exc).splitlines()[0][:200]})") from None
    if not table.num_rows:
        raise ConfigError(f"--images {folder}: no images ({', '.join(IMG_EXTENSIONS)}), flat or in class folders")
    check_unique_names(table, f"--images {folder}")
    return table, True


def image_rows(paths: Sequence[str]) -> pa.Table:
    """The rows of a list of image files to label (unlabelled, named by file name as a flat
    folder's are). ConfigError, one line, for a path that is not an image file or not there, a
    list that mixes object-store and local paths, and two files that would share a row name."""
    paths = [str(p).rstrip("/") if storage.is_uri(str(p)) else str(p) for p in paths]
    if not paths:
        raise ConfigError("--images: no image files given; pass a folder or at least one image file")
    if len({storage.is_uri(p) for p in paths}) > 1:
        raise ConfigError("--images: the list mixes object-store URIs and local paths; label each kind in its own call")
    for path in paths:
        if not _is_image(path):
            raise ConfigError(f"--images {path}: not an image file ({', '.join(IMG_EXTENSIONS)})")
    try:
        stats = storage.file_stats(paths)
    except OSError as exc:
        raise ConfigError(f"--images {paths[0]}: cannot read it ({str(exc).splitlines()[0][:200]})") from None
    missing = [p for p, (size, _) in zip(paths, stats) if size < 0]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConfigError(f"--images {missing[0]}: no such file{more}")
    table = _table(paths, [-1] * len(paths))
    check_unique_names(table, "--images")
    return table


# ---------------------------------------------------------------- Ray Data stages

def quiet_ray_data() -> None:
    """Ray Data settings for this process (driver and members alike).

    Blocks reach consumers in a fixed order, so the same seed gives the same batches (repeatable
    runs, and a resumed member continues exactly). No per-dataset progress bars or start banners:
    members log one line per epoch instead. A stage function's error reaches the driver as its
    own class (``raise_original_map_exception``; by default Ray Data wraps it in a
    UserCodeException that keeps only its traceback text), so a UserError raised in a worker is
    its one line (``errors.worker_error``), without Ray Data's console lines about it (its
    traceback, logged before it is raised; ray-data.log keeps them).
    """
    import logging

    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    ctx.raise_original_map_exception = True
    ray_data_log = logging.getLogger("ray.data")
    ray_data_log.setLevel(logging.ERROR)
    for handler in ray_data_log.handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.addFilter(_not_about_a_user_error)  # the console; added once however often this runs


def _not_about_a_user_error(record) -> bool:
    """False for a Ray Data log record about a UserError: logged with it, or while it is being
    handled. Records of other loggers pass (a handler may be shared with the root logger)."""
    if not record.name.startswith("ray.data"):
        return True
    exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
    return not isinstance(exc, UserError)


def to_dataset(table: pa.Table, *, rows_per_block: int = 256):
    """A Ray Dataset of file rows (no pixels yet)."""
    import ray.data

    blocks = max(1, min(64, -(-table.num_rows // rows_per_block)))
    return ray.data.from_arrow(table, override_num_blocks=blocks)


def read_image(path: str, *, min_size: Optional[int] = None):
    """Decode one file to an RGB PIL image (grayscale, palette, RGBA, CMYK and 16-bit are converted).

    ``min_size``: a JPEG much larger than needed is decoded at a reduced scale (never below
    ``min_size`` on its short side), which keeps huge photos cheap.
    """
    return open_image(storage.read_bytes(path), min_size=min_size)


def open_image(data: bytes, *, min_size: Optional[int] = None, max_pixels: Optional[int] = None):
    """``read_image`` of bytes in memory. With ``max_pixels``, an image that would decode to more
    pixels than that (its header's size, after the JPEG reduction) raises ImageTooLarge before a
    pixel is decoded, so a small file claiming a huge image (a decompression bomb) costs nothing."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # PIL's own, far larger limit, checked in open()
        raise ImageTooLarge(f"{exc}".rstrip(".")) from None
    with img:
        if min_size and img.format == "JPEG" and min(img.size) > 4 * min_size:
            img.draft("RGB", (2 * min_size, 2 * min_size))
        if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
            raise ImageTooLarge(f"image is {img.size[0]} x {img.size[1]} pixels "
                                f"({img.size[0] * img.size[1] / 1e6:.1f} megapixels); "
                                f"the limit is {max_pixels / 1e6:g} megapixels")
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: scale to 8 bits
            arr = np.asarray(img, dtype=np.float32)
            img = Image.fromarray((arr / max(arr.max(), 1.0) * 255).astype(np.uint8), mode="L")
        return img.convert("RGB")


def decode_batch(batch: dict, *, image_size: int, resize: str = "squash", side: Optional[int] = None) -> dict:
    """Read and decode a batch of file rows -> the eval transform's uint8 ``image`` (B, S, S, 3).

    ``side``: the run's cache side (``config.cache_side``), the least a huge JPEG is decoded
    at: the same pixels the run's image cache holds for these files.
    """
    from ensemble.pixels import eval_pixels

    images = np.zeros((len(batch["path"]), image_size, image_size, 3), np.uint8)
    for k, path in enumerate(batch["path"]):
        images[k] = eval_pixels(read_image(path, min_size=side or image_size), image_size=image_size, resize=resize)
    return {"id": batch["id"], "label": batch["label"], "image": images}


def decode_image(data: bytes, *, image_size: int, resize: str = "squash", side: Optional[int] = None,
                 max_pixels: Optional[int] = None) -> np.ndarray:
    """One image's bytes -> (S, S, 3) uint8 through the eval transform: the pixels ``decode_batch``
    gives the same image as a file. ImageTooLarge past ``max_pixels``; PIL's errors (not an image,
    truncated) as they are."""
    from ensemble.pixels import eval_pixels

    return eval_pixels(open_image(data, min_size=side or image_size, max_pixels=max_pixels),
                       image_size=image_size, resize=resize)
