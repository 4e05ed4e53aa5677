"""Pure parts of the data path (no Ray started): layout scan, image decoding, bootstrap repeat,
report tables and the bundled digits tree."""

import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ensemble.config import ConfigError
from ensemble.data import decode_batch, read_image, scan_layout, stratified_val_rows
from ensemble.digits import ensure_digits
from ensemble.report import predictions_csv, probabilities_table


# ------------------------------------------------------------------ a tiny ImageFolder

def _rgb(path, size=(20, 16), seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _gray(path, size=(12, 18)):
    Image.fromarray(np.arange(size[0] * size[1], dtype=np.uint8).reshape(size[1], size[0])).save(path)


def _rgba(path, size=(16, 16)):
    arr = np.zeros((size[1], size[0], 4), np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 128
    Image.fromarray(arr).save(path)


def _gray16(path, size=(10, 10)):
    arr = (np.arange(size[0] * size[1], dtype=np.uint16).reshape(size[1], size[0]) * 600)
    Image.fromarray(arr).save(path)  # 16-bit grayscale PNG


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for cls in ("b", "a"):  # created out of order on purpose
            (root / split / cls).mkdir(parents=True)
    _rgb(root / "train" / "a" / "a2.png", seed=1)
    _rgb(root / "train" / "a" / "a1.jpg", seed=2)
    _gray(root / "train" / "a" / "a3_gray.png")
    _rgba(root / "train" / "b" / "b1_rgba.png")
    _gray16(root / "train" / "b" / "b2_16bit.png")
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    _rgb(root / "val" / "a" / "va.jpeg", seed=3)
    _rgb(root / "val" / "b" / "vb.png", seed=4)
    (root / "test").mkdir()
    _rgb(root / "test" / "t2.png", seed=5)
    _rgb(root / "test" / "t1.JPG", seed=6)
    _gray(root / "test" / "t3.png")
    return root


def test_fixture_image_modes(tree):
    with Image.open(tree / "train" / "a" / "a3_gray.png") as im:
        assert im.mode == "L"
    with Image.open(tree / "train" / "b" / "b1_rgba.png") as im:
        assert im.mode == "RGBA"
    with Image.open(tree / "train" / "b" / "b2_16bit.png") as im:
        assert im.mode in ("I;16", "I")


# ------------------------------------------------------------------ scan_layout

def test_scan_layout(tree):
    index = scan_layout(str(tree))
    assert index.root == os.path.abspath(str(tree))
    assert index.classes == ("a", "b")
    assert index.sizes() == {"classes": 2, "train": 5, "val": 2, "test": 3}

    train = index.train.to_pydict()
    assert set(index.train.column_names) == {"id", "path", "image_name", "label"}
    assert train["id"] == [0, 1, 2, 3, 4]
    assert train["image_name"] == ["a1", "a2", "a3_gray", "b1_rgba", "b2_16bit"]
    assert train["label"] == [0, 0, 0, 1, 1]
    assert train["path"] == [str(tree / "train" / "a" / n) for n in ("a1.jpg", "a2.png", "a3_gray.png")] + \
        [str(tree / "train" / "b" / n) for n in ("b1_rgba.png", "b2_16bit.png")]
    assert index.train.schema.field("id").type == pa.int64()
    assert index.train.schema.field("label").type == pa.int64()

    val = index.val.to_pydict()
    assert val["id"] == [0, 1]
    assert val["image_name"] == ["va", "vb"]
    assert val["label"] == [0, 1]

    test = index.test.to_pydict()
    assert test["id"] == [0, 1, 2]
    assert test["image_name"] == ["t1", "t2", "t3"]
    assert test["label"] == [-1, -1, -1]
    assert test["path"] == [str(tree / "test" / n) for n in ("t1.JPG", "t2.png", "t3.png")]


def test_scan_layout_labels_follow_train_classes_when_val_has_a_subset(tree):
    shutil.rmtree(tree / "val" / "a")
    index = scan_layout(str(tree))
    assert index.classes == ("a", "b")
    assert index.val.to_pydict()["label"] == [1]   # "b" keeps its train index


def test_scan_layout_ignores_hidden_folders(tree):
    (tree / "train" / ".cache").mkdir()
    assert scan_layout(str(tree)).classes == ("a", "b")


@pytest.mark.parametrize("breakage,needle", [
    ("missing_root", "no such folder"),
    ("no_train", "no train/"),
    ("no_val", "no val/"),
    ("empty_class", "train/c/ has no images"),
    ("train_no_classes", "train/ has no class folders"),
    ("val_unknown_class", "val/ has classes not in train/: z"),
    ("empty_test", "test/ has no images (.jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, .webp); put the images "
                   "to label there, or remove test/ to train and score on val only"),
    ("class_named_like_a_column", "class folder train/image_name/ has the name of a column of probabilities.parquet"),
    ("test_twins", "t2.jpg and t2.png would both be row 't2' of predictions.csv; rename one of them"),
])
def test_scan_layout_errors(tree, breakage, needle):
    root = tree
    if breakage == "missing_root":
        root = tree.parent / "nowhere"
    elif breakage == "no_train":
        shutil.rmtree(tree / "train")
    elif breakage == "no_val":
        shutil.rmtree(tree / "val")
    elif breakage == "empty_class":
        (tree / "train" / "c").mkdir()
        (tree / "train" / "c" / "readme.txt").write_text("no images here")
    elif breakage == "train_no_classes":
        shutil.rmtree(tree / "train")
        (tree / "train").mkdir()
    elif breakage == "val_unknown_class":
        (tree / "val" / "z").mkdir()
        _rgb(tree / "val" / "z" / "z.png")
    elif breakage == "empty_test":
        shutil.rmtree(tree / "test")
        (tree / "test").mkdir()
        (tree / "test" / "sub").mkdir()
        _rgb(tree / "test" / "sub" / "nested.png")   # not flat: does not count
    elif breakage == "class_named_like_a_column":
        for split in ("train", "val"):
            (tree / split / "image_name").mkdir()
            _rgb(tree / split / "image_name" / "x.png")
    elif breakage == "test_twins":
        _rgb(tree / "test" / "t2.jpg", seed=7)
    with pytest.raises(ConfigError) as info:
        scan_layout(str(root))
    msg = str(info.value)
    assert msg.startswith("--data ")
    assert needle in msg


# ------------------------------------------------------------------ a manifest instead of folders

def _csv_manifest_of(index, root) -> str:
    """The folders' rows as a CSV manifest in ``root`` (their order; paths relative to it)."""
    lines = ["path,label,split"]
    for split in ("train", "val", "test"):
        table = getattr(index, split).to_pydict()
        for path, label in zip(table["path"], table["label"]):
            lines.append(f"{os.path.relpath(path, root)},{index.classes[label] if label >= 0 else ''},{split}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return str(root / "manifest.csv")


def test_a_manifest_of_the_folders_gives_their_index(tree):
    """A CSV (relative paths) or Parquet (absolute) manifest listing the folders' images in their
    order is the same index: the same rows, ids, labels and classes, so a run on it trains and
    predicts what a run on the folders does (the index is all the pipeline reads of --data)."""
    folders = scan_layout(str(tree))
    from_csv = scan_layout(_csv_manifest_of(folders, tree))
    table = pa.Table.from_pylist([
        {"path": path, "label": folders.classes[label] if label >= 0 else None, "split": split}
        for split in ("train", "val", "test")
        for path, label in zip(getattr(folders, split).column("path").to_pylist(),
                               getattr(folders, split).column("label").to_pylist())])
    pq.write_table(table, tree / "manifest.parquet")
    from_parquet = scan_layout(str(tree / "manifest.parquet"))
    for index in (from_csv, from_parquet):
        assert index.classes == folders.classes
        for split in ("train", "val", "test"):
            assert getattr(index, split).equals(getattr(folders, split)), split
    assert from_csv.root == str(tree / "manifest.csv")


def test_one_file_in_two_splits_is_refused_however_it_is_spelled(tree):
    """./a.png, sub/../a.png, an absolute path and a symbolic link name one file: in a manifest, or
    as a link in the folders' val/ or test/ to a train image, it is refused in one line."""
    import os

    (tree / "sub").mkdir()
    os.symlink(tree / "train" / "a" / "a2.png", tree / "link.png")
    spellings = ["./train/a/a2.png", "sub/../train/a/a2.png", str(tree / "train" / "a" / "a2.png"), "link.png"]
    for spelling in spellings:
        (tree / "m.csv").write_text(f"path,label,split\ntrain/a/a2.png,a,train\ntrain/b/b1_rgba.png,b,train\n"
                                    f"{spelling},a,val\ntest/t2.png,,test\n")
        with pytest.raises(ConfigError) as info:
            scan_layout(str(tree / "m.csv"))
        assert str(info.value).startswith(f"--data {tree / 'm.csv'}: line 2 (train) and line 4 (val) "
                                          f"name the same image")
    os.symlink(tree / "train" / "b" / "b1_rgba.png", tree / "test" / "t9.png")
    with pytest.raises(ConfigError) as info:
        scan_layout(str(tree))
    assert str(info.value) == (f"--data {tree}: train/b/b1_rgba.png (train) and test/t9.png (test) are the same file "
                               f"{os.path.realpath(tree / 'train' / 'b' / 'b1_rgba.png')} (a link): the members "
                               f"would be scored on an image they trained on; keep it in one split")


def test_without_test_images_the_index_has_an_empty_test_split(tree):
    """No test/ folder (or a manifest without test rows): train and val as before, and a test
    split of no rows with the same columns, so every stage reads it as it reads a full one."""
    full = scan_layout(str(tree))
    shutil.rmtree(tree / "test")
    for index in (scan_layout(str(tree)), scan_layout(_csv_manifest_of(scan_layout(str(tree)), tree))):
        assert index.test.num_rows == 0 and index.test.schema.equals(full.test.schema)
        assert index.train.equals(full.train) and index.val.equals(full.val) and index.classes == full.classes
        assert index.sizes()["test"] == 0


def test_manifest_labels_that_are_numbers_keep_their_numeric_order(tmp_path):
    for k in range(4):
        _rgb(tmp_path / f"{k}.png", seed=k)
    (tmp_path / "m.csv").write_text("path,label,split\n0.png,10,train\n1.png,2,train\n2.png,10,val\n3.png,,test\n")
    index = scan_layout(str(tmp_path / "m.csv"))
    assert index.classes == ("2", "10")
    assert index.train.column("label").to_pylist() == [1, 0] and index.val.column("label").to_pylist() == [1]


@pytest.mark.parametrize("body,needle", [
    ("path,label\na.png,x\n", "no column split; a manifest has the columns path, label and split"),
    ("path,label,split\na.png,x,trian\n", "line 2: split 'trian' is not train, val or test"),
    ("path,label,split\na.png,,train\n", "line 2: a train row needs a label"),
    ("path,label,split\na.png,x,train\nb.png,x,val\na.png,x,test\n",
     "line 2 (train) and line 4 (test) name the same image 'a.png' / 'a.png': the members would be scored on an image"),
    ("path,label,split\na.png,x,train\nb.png,x,train\n./b.png,x,train\n", "line 3 and line 4 both name ./b.png"),
    ("path,label,split\na.png,x,train\nb.png,y,val\nc.png,,test\n", "line 3: val label 'y' is not the label of any"),
    ("path,label,split\na.png,x,train\nmissing.png,x,val\nc.png,,test\n", "line 3: "),
    ("path,label,split\na.png,x,train,extra\n", "cannot read it as CSV"),
])
def test_manifest_errors_name_the_row(tmp_path, body, needle):
    for name in ("a.png", "b.png", "c.png"):
        _rgb(tmp_path / name)
    (tmp_path / "m.csv").write_text(body)
    with pytest.raises(ConfigError) as info:
        scan_layout(str(tmp_path / "m.csv"))
    msg = str(info.value)
    assert msg.startswith(f"--data {tmp_path / 'm.csv'}: ") and needle in msg and "\n" not in msg
    if "missing" in body:
        assert msg.endswith("missing.png: no such file")
    with pytest.raises(ConfigError, match="no such manifest file"):
        scan_layout(str(tmp_path / "other.csv"))


# ------------------------------------------------------------------ --val-fraction: val drawn from train

@pytest.mark.parametrize("fraction,expected", [
    # class sizes 1, 2, 3, 4, 10, 11: fraction x n rounded half up, a class of one stays whole
    (0.1, [0, 0, 0, 0, 1, 1]),
    (0.25, [0, 1, 1, 1, 3, 3]),   # 2 x 0.25 = 0.5 -> 1; 10 x 0.25 = 2.5 -> 3
    (0.5, [0, 1, 2, 2, 5, 6]),    # every class of >= 2 keeps at least one in train
])
def test_stratified_val_rows_per_class_counts(fraction, expected):
    sizes = [1, 2, 3, 4, 10, 11]
    labels = np.random.default_rng(7).permutation(np.repeat(np.arange(len(sizes)), sizes))  # classes interleaved
    is_val = stratified_val_rows(labels, fraction, seed=3)
    assert is_val.shape == labels.shape and is_val.dtype == bool
    assert np.bincount(labels[is_val], minlength=len(sizes)).tolist() == expected
    assert (np.bincount(labels[~is_val], minlength=len(sizes)) >= 1).all()  # no class leaves train


def test_stratified_val_rows_rounds_a_half_up_despite_floating_point():
    assert 0.29 * 50 < 14.5  # what floating point makes of it
    assert stratified_val_rows(np.zeros(50, np.int64), 0.29, seed=0).sum() == 15


def test_stratified_val_rows_is_a_pure_function_of_labels_fraction_and_seed():
    labels = np.array([0, 1, 0, 2, 1, 0, 2, 2, 1, 0, 3, 2, 0, 1, 2, 0, 2, 0, 1, 0])
    first = stratified_val_rows(labels, 0.25, seed=0)
    assert np.flatnonzero(first).tolist() == [1, 3, 6, 17, 19]  # pinned: a resumed run draws the same rows
    assert np.array_equal(stratified_val_rows(labels.tolist(), 0.25, seed=0), first)  # same seed -> same rows
    assert np.flatnonzero(stratified_val_rows(labels, 0.25, seed=1)).tolist() == [2, 3, 7, 8, 17]
    big = np.arange(1000) % 4
    assert not np.array_equal(stratified_val_rows(big, 0.2, seed=0), stratified_val_rows(big, 0.2, seed=1))
    assert stratified_val_rows(np.array([], np.int64), 0.5, seed=0).shape == (0,)


def _no_val(tree):
    shutil.rmtree(tree / "val")
    return tree


def test_scan_layout_val_fraction_draws_val_from_train_folders(tree):
    """train/a has 3 images, train/b 2: at 0.5, 2 of a and 1 of b become val; each split keeps the
    folders' order, ids count from 0 in each, and the same seed gives the same index."""
    whole = scan_layout(str(tree)).train
    index = scan_layout(str(_no_val(tree)), val_fraction=0.5, seed=0)
    assert index.classes == ("a", "b")
    assert index.sizes() == {"classes": 2, "train": 2, "val": 3, "test": 3}
    train, val = index.train.to_pydict(), index.val.to_pydict()
    assert train["id"] == [0, 1] and val["id"] == [0, 1, 2]
    assert sorted(train["label"]) == [0, 1] and sorted(val["label"]) == [0, 0, 1]
    order = whole.column("path").to_pylist()
    for split in (train, val):
        assert split["path"] == sorted(split["path"], key=order.index)  # file order kept
    assert sorted(train["path"] + val["path"]) == sorted(order)
    rows = dict(zip(whole.column("path").to_pylist(), zip(whole.column("image_name").to_pylist(),
                                                          whole.column("label").to_pylist())))
    for split in (train, val):  # each row keeps its name and label
        assert [rows[p] for p in split["path"]] == list(zip(split["image_name"], split["label"]))
    again = scan_layout(str(tree), val_fraction=0.5, seed=0)
    assert again.train.equals(index.train) and again.val.equals(index.val)
    other = [scan_layout(str(tree), val_fraction=0.5, seed=s).val.column("path").to_pylist() for s in range(8)]
    assert len({tuple(v) for v in other}) > 1  # the seed picks the rows


def test_scan_layout_val_fraction_manifest_gives_the_folders_draw(tree):
    """A manifest with no val rows draws the rows the folders draw: the draw sees only the train
    rows' labels and order."""
    folders = scan_layout(str(tree))
    manifest = _csv_manifest_of(folders, tree)
    lines = (tree / "manifest.csv").read_text().splitlines()
    (tree / "manifest.csv").write_text("\n".join(line for line in lines if not line.endswith(",val")) + "\n")
    from_csv = scan_layout(manifest, val_fraction=0.5, seed=4)
    from_folders = scan_layout(str(_no_val(tree)), val_fraction=0.5, seed=4)
    for split in ("train", "val", "test"):
        assert getattr(from_csv, split).equals(getattr(from_folders, split)), split


def test_val_fraction_errors_are_one_line_naming_the_fix(tree):
    root = str(tree)
    with pytest.raises(ConfigError) as info:
        scan_layout(root, val_fraction=0.2)
    assert str(info.value) == (f"--data {root} has a val/ folder and --val-fraction 0.2 draws val from train/; "
                               f"drop --val-fraction to use val/, or move val/'s images into train/")
    manifest = _csv_manifest_of(scan_layout(root), tree)
    with pytest.raises(ConfigError) as info:
        scan_layout(manifest, val_fraction=0.2)
    assert str(info.value) == (f"--data {manifest} has 2 val rows (line 7 the first) and --val-fraction 0.2 draws "
                               f"val from the train rows; drop --val-fraction to use the manifest's val rows, or "
                               f"mark them train")
    lines = (tree / "manifest.csv").read_text().splitlines()
    (tree / "manifest.csv").write_text("\n".join(line for line in lines if not line.endswith(",val")) + "\n")
    with pytest.raises(ConfigError) as info:
        scan_layout(manifest)
    assert str(info.value) == (f"--data {manifest}: no val rows; the split column says train, val or test for each "
                               f"image, or pass --val-fraction F (e.g. 0.1) to draw a stratified val split from train")
    _no_val(tree)
    with pytest.raises(ConfigError) as info:
        scan_layout(root)
    assert str(info.value) == (f"--data {root}: no val/ folder; expected val/<class>/<images>, or pass "
                               f"--val-fraction F (e.g. 0.1) to draw a stratified val split from train")
    with pytest.raises(ConfigError) as info:
        scan_layout(root, val_fraction=0.1)  # 3 x 0.1 and 2 x 0.1 both round to 0
    assert str(info.value) == (f"--val-fraction 0.1 draws no val images from --data {root}'s 5 train images (each "
                               f"class of n gives fraction x n, rounded; a class of one gives none); use a larger "
                               f"fraction")


def test_val_fraction_is_in_the_fingerprint(tree):
    """Another fraction trains the members on other rows: a rerun with it must not resume. A run
    without the flag has the fingerprint it had before the flag existed (no val_fraction key)."""
    from ensemble.config import EnsembleConfig
    from ensemble.run_folder import training_fingerprint

    plain = training_fingerprint(EnsembleConfig(data=str(tree)), scan_layout(str(tree)), 5)
    assert "val_fraction" not in plain
    _no_val(tree)
    prints = [training_fingerprint(EnsembleConfig(data=str(tree), val_fraction=f),
                                   scan_layout(str(tree), val_fraction=f), 5) for f in (0.4, 0.5)]
    assert [p["val_fraction"] for p in prints] == [0.4, 0.5]
    assert prints[0]["files_sha256"] != prints[1]["files_sha256"]  # 1 of a at 0.4, 2 at 0.5


# ------------------------------------------------------------------ read_image

@pytest.mark.parametrize("rel", ["train/a/a1.jpg", "train/a/a2.png", "train/a/a3_gray.png",
                                 "train/b/b1_rgba.png", "train/b/b2_16bit.png"])
def test_read_image_is_rgb(tree, rel):
    img = read_image(str(tree / rel))
    assert isinstance(img, Image.Image)
    assert img.mode == "RGB"
    with Image.open(tree / rel) as src:
        assert img.size == src.size


def test_read_image_gray_values_kept(tree):
    img = np.asarray(read_image(str(tree / "train" / "a" / "a3_gray.png")))
    expected = np.arange(12 * 18, dtype=np.uint8).reshape(18, 12)
    for c in range(3):
        np.testing.assert_array_equal(img[..., c], expected)


def test_read_image_16bit_scaled_to_8bit(tree):
    img = np.asarray(read_image(str(tree / "train" / "b" / "b2_16bit.png")))
    assert img.dtype == np.uint8
    assert img.min() == 0 and img.max() == 255
    assert img[0, 1, 0] == int(600 / (99 * 600) * 255)  # linear scaling by the image maximum


def test_read_image_palette(tmp_path):
    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8), (10, 200, 30)).convert("P").save(path)
    img = read_image(str(path))
    assert img.mode == "RGB"


# ------------------------------------------------------------------ decode_batch

def _batch(index_table):
    d = index_table.to_pydict()
    return {"id": np.asarray(d["id"], np.int64), "path": np.asarray(d["path"], dtype=object),
            "label": np.asarray(d["label"], np.int64)}


def test_decode_batch_gives_uint8_eval_pixels(tree):
    batch = _batch(scan_layout(str(tree)).train)
    out = decode_batch(batch, image_size=32)
    assert set(out) == {"id", "label", "image"}
    assert out["image"].dtype == np.uint8
    assert out["image"].shape == (5, 32, 32, 3)
    np.testing.assert_array_equal(out["id"], batch["id"])
    np.testing.assert_array_equal(out["label"], batch["label"])
    from ensemble.pixels import eval_pixels

    np.testing.assert_array_equal(out["image"][2], eval_pixels(read_image(batch["path"][2]), image_size=32))


def test_decode_batch_eval_is_deterministic(tree):
    batch = _batch(scan_layout(str(tree)).val)
    a = decode_batch(batch, image_size=32)["image"]
    b = decode_batch(batch, image_size=32)["image"]
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 32, 32, 3)


def test_decode_batch_empty(tree):
    out = decode_batch({"id": np.zeros(0, np.int64), "path": np.zeros(0, dtype=object),
                        "label": np.zeros(0, np.int64)}, image_size=32)
    assert out["image"].shape == (0, 32, 32, 3)
    assert out["image"].dtype == np.uint8


# ------------------------------------------------------------------ epoch order

def test_epoch_rows_holds_each_row_as_often_as_drawn():
    from ensemble.bootstrap import bootstrap_counts, epoch_rows

    n = 50
    counts = bootstrap_counts(3, n, n)
    rows = epoch_rows(counts, seed=7)
    assert rows.dtype == np.int64 and len(rows) == n
    np.testing.assert_array_equal(np.bincount(rows, minlength=n), counts)


def test_epoch_rows_order_depends_on_the_seed_only():
    from ensemble.bootstrap import epoch_rows

    counts = np.array([1, 0, 3, 2, 1, 1, 4], np.int64)
    np.testing.assert_array_equal(epoch_rows(counts, 5), epoch_rows(counts.copy(), 5))
    assert not np.array_equal(epoch_rows(counts, 5), epoch_rows(counts, 6))
    assert sorted(epoch_rows(counts, 5).tolist()) == [0, 2, 2, 2, 3, 3, 4, 5, 6, 6, 6, 6]


# ------------------------------------------------------------------ report tables

PROBS = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
CLASSES = ("cat", "dog", "owl")
NAMES = ["img1", "img2", "img3"]


def test_predictions_csv():
    text = predictions_csv(NAMES, PROBS, CLASSES)
    assert text == "image_name,pred_label\nimg1,dog\nimg2,cat\nimg3,owl\n"


def test_predictions_csv_quotes_awkward_names():
    text = predictions_csv(['a,b', 'say "hi"'], PROBS[:2], ("x,y", "plain", "z"))
    assert text.splitlines() == ["image_name,pred_label", '"a,b",plain', '"say ""hi""","x,y"']


def test_predictions_csv_empty():
    assert predictions_csv([], np.zeros((0, 3)), CLASSES) == "image_name,pred_label\n"


def test_probabilities_table():
    table = probabilities_table(NAMES, PROBS, CLASSES)
    assert table.column_names == ["image_name", "cat", "dog", "owl"]
    assert table.schema.field("image_name").type == pa.string()
    for cls in CLASSES:
        assert table.schema.field(cls).type == pa.float32()
    assert table.column("image_name").to_pylist() == NAMES
    np.testing.assert_allclose(table.column("dog").to_numpy(), [0.7, 0.3, 0.2], rtol=1e-6)
    # round-trips through parquet
    buf = io.BytesIO()
    pq.write_table(table, buf)
    back = pq.read_table(io.BytesIO(buf.getvalue()))
    assert back.equals(table)


def test_probabilities_table_integer_class_names_become_strings():
    table = probabilities_table(["x"], np.array([[0.25, 0.75]]), [0, 1])
    assert table.column_names == ["image_name", "0", "1"]


# ------------------------------------------------------------------ bundled digits

def test_ensure_digits_builds_tree_and_is_idempotent(tmp_path):
    root = tmp_path / "d"
    out = ensure_digits(root)
    assert os.path.samefile(out, root)
    assert (root / "DONE").exists()

    index = scan_layout(str(root))
    assert index.classes == tuple(str(i) for i in range(10))
    sizes = index.sizes()
    assert sizes["train"] + sizes["val"] + sizes["test"] == 1797
    # stratified 60/20/20
    assert abs(sizes["train"] - 0.6 * 1797) <= 10
    assert abs(sizes["val"] - 0.2 * 1797) <= 10
    assert set(index.train.to_pydict()["label"]) == set(range(10))
    assert set(index.val.to_pydict()["label"]) == set(range(10))
    names = (index.train.to_pydict()["image_name"] + index.val.to_pydict()["image_name"]
             + index.test.to_pydict()["image_name"])
    assert len(set(names)) == 1797   # every scan exactly once
    with Image.open(index.test.to_pydict()["path"][0]) as im:
        assert im.size == (8, 8) and im.mode == "L"

    labels_csv = (root / "test_labels.csv").read_text().splitlines()
    assert labels_csv[0] == "image_name,label"
    assert len(labels_csv) - 1 == sizes["test"]
    assert sorted(line.split(",")[0] for line in labels_csv[1:]) == sorted(index.test.to_pydict()["image_name"])

    def snapshot():
        return {os.path.relpath(os.path.join(d, f), root): os.stat(os.path.join(d, f)).st_mtime_ns
                for d, _, files in os.walk(root) for f in files}

    before = snapshot()
    assert len(before) == 1797 + 2   # the PNGs, test_labels.csv and DONE
    assert os.path.samefile(ensure_digits(root), root)
    assert snapshot() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary folders left behind


def test_ensure_digits_respects_cache_env(tmp_path, monkeypatch):
    from ensemble.digits import VERSION, cache_root

    monkeypatch.setenv("ENSEMBLE_CACHE", str(tmp_path / "cache"))
    assert cache_root() == os.path.join(str(tmp_path / "cache"), VERSION)


def test_ray_data_console_filter_drops_only_ray_datas_lines_about_a_user_error():
    """quiet_ray_data's console filter: Ray Data's lines about a UserError go (the error is its own
    one line), while the project's own warnings logged as such an error is handled still pass."""
    import logging

    from ensemble.data import _not_about_a_user_error
    from ensemble.errors import ConfigError

    def record(name):
        return logging.LogRecord(name, logging.WARNING, __file__, 1, "line", None, None)

    assert _not_about_a_user_error(record("ray.data._internal.plan"))  # no error being handled
    try:
        raise ConfigError("bad")
    except ConfigError:
        assert not _not_about_a_user_error(record("ray.data._internal.plan"))
        assert _not_about_a_user_error(record("ensemble.driver"))
