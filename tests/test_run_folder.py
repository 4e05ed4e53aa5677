"""run_folder.py: a rerun resumes only members trained on the same files, weights and package
versions, and says what changed. (Finished runs loaded for predict: test_pipeline_ray.py.)"""

from __future__ import annotations

import os
import re

import pytest
from PIL import Image

from ensemble import run_folder
from ensemble.config import ConfigError
from ensemble.data import scan_layout
from ensemble.run_folder import input_files, open_output, save_run_config, training_fingerprint
from tests.helpers import fail_reads, tiny_run_config, write_digits_tree


@pytest.fixture
def data(tmp_path):
    return write_digits_tree(tmp_path / "data", per_class_train=3, per_class_val=2, n_test=2, classes=4)


def _open(cfg, output):
    """What the driver does with the folder: fingerprint the inputs, open it, record the run."""
    index = scan_layout(cfg.data)
    inputs = input_files(index)
    fingerprint = training_fingerprint(cfg, index, index.train.num_rows, inputs)
    resuming = open_output(output, fingerprint, fresh=False, inputs=inputs)
    save_run_config(output, cfg, [1, 2, 3], fingerprint, inputs)
    return resuming


def test_a_training_image_overwritten_is_named_and_refused(data, tmp_path):
    output = str(tmp_path / "run")
    cfg = tiny_run_config(data, output)
    assert _open(cfg, output) is False and _open(cfg, output) is True  # the same files: resumed
    image = os.path.join(data, "train", "class_3")
    name = sorted(os.listdir(image))[0]
    Image.new("RGB", (16, 16), (255, 0, 0)).save(os.path.join(image, name))  # other pixels, same name
    with pytest.raises(ConfigError,
                       match=rf"another config \(files \(train/class_3/{re.escape(name)} changed\) differ\)"):
        _open(cfg, output)


def test_a_replaced_weights_file_and_another_torch_are_refused(data, tmp_path, monkeypatch):
    import torch

    weights = tmp_path / "init.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    output = str(tmp_path / "run")
    cfg = tiny_run_config(data, output, weights=str(weights))
    _open(cfg, output)
    torch.save({"w": torch.ones(1)}, weights)  # the same path, other weights
    with pytest.raises(ConfigError, match=r"\(weights_sha256 \(the --weights file changed\) differ\)"):
        _open(cfg, output)
    torch.save({"w": torch.zeros(1)}, weights)
    assert _open(cfg, output) is True
    real = run_folder.result_versions()
    monkeypatch.setattr(run_folder, "result_versions", lambda: {**real, "torch": "9.0"})
    with pytest.raises(ConfigError, match=rf"\(versions \(torch {real['torch']} then, 9.0 now\) differ\)"):
        _open(cfg, output)


@pytest.mark.parametrize("run, output", [("s3://b/runs/r1", "S3://b/runs/r1"), ("s3://b/runs/r1", "s3://b/runs/r1/"),
                                         ("s3://b/runs/r1", "S3://b/runs/r1/pred"), ("runs/r1", "./runs/x/../r1/pred")])
def test_an_output_inside_the_run_is_refused_however_it_is_spelled(run, output):
    """Storage resolves S3:// as s3:// and ignores a trailing slash; local paths are normalised."""
    with pytest.raises(ConfigError, match="inside the run folder"):
        run_folder.check_outside(run, output)
    run_folder.check_outside("s3://b/runs/r1", "s3://b/runs/r10")  # a sibling is outside


def test_a_run_folder_that_cannot_be_read_is_one_line_and_nothing_goes(data, tmp_path, monkeypatch):
    """run.json there but not readable (EACCES, as a folder of another user's gives): StorageError in
    one line naming the folder; the earlier run's files stay."""
    import errno

    from ensemble.errors import StorageError

    output = str(tmp_path / "run")
    cfg = tiny_run_config(data, output)
    _open(cfg, output)
    fail_reads(monkeypatch, "run.json", errno.EACCES)
    with pytest.raises(StorageError) as info:
        _open(cfg, output)
    monkeypatch.undo()
    assert "\n" not in str(info.value) and "run.json: Permission denied (EACCES)" in str(info.value)
    assert (tmp_path / "run" / "run.json").exists()


def test_a_resume_on_other_train_pixels_is_refused_naming_the_cache_tier(data, tmp_path):
    """A run trained on exact pixels (raw tier, or no cache: the same pixels, the same fingerprint)
    and the same command where the cache fell back to its compressed tier (less memory): refused in
    one line that names the tier and the flag that trains on the earlier pixels."""
    output = str(tmp_path / "run")
    cfg = tiny_run_config(data, output)
    index = scan_layout(cfg.data)
    inputs = input_files(index)

    def fingerprint(tier):
        return training_fingerprint(cfg, index, index.train.num_rows, inputs, cache_tier=tier)

    assert fingerprint("raw") == fingerprint(None) != fingerprint("compressed")
    assert open_output(output, fingerprint("raw"), fresh=False, inputs=inputs) is False
    save_run_config(output, cfg, [1, 2, 3], fingerprint("raw"), inputs)
    with pytest.raises(ConfigError) as info:
        open_output(output, fingerprint("compressed"), fresh=False, inputs=inputs)
    assert ("train pixels (the files' exact pixels then, the compressed cache's JPEG q90 now: the image cache "
            "picked another tier; --cache-tier raw trains on the earlier ones)") in str(info.value)


def _checked(index):
    """The index as the image check leaves it: each file's sha256 (image_check.with_digests)."""
    import hashlib

    from ensemble.data import DatasetIndex
    from ensemble.image_check import with_digests

    splits = {"train": index.train, "val": index.val, "test": index.test}
    digests = {name: [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in t.column("path").to_pylist()]
               for name, t in splits.items()}
    return DatasetIndex(root=index.root, classes=index.classes, **with_digests(splits, digests))


def test_a_same_size_replacement_with_its_time_kept_is_named_and_refused(data, tmp_path):
    """cp -p / rsync -a / touch -r: other bytes, the same size and modification time. The contents
    the image check read differ: refused, naming the file; a run from before contents were
    fingerprinted still resumes (on sizes and times)."""
    output = str(tmp_path / "run")
    cfg = tiny_run_config(data, output)

    def opened(index):
        inputs = input_files(index)
        fingerprint = run_folder.matching_earlier(output,
                                                  training_fingerprint(cfg, index, index.train.num_rows, inputs))
        resuming = open_output(output, fingerprint, fresh=False, inputs=inputs)
        save_run_config(output, cfg, [1, 2, 3], fingerprint, inputs)
        return resuming, fingerprint

    assert opened(_checked(scan_layout(cfg.data)))[0] is False
    assert opened(_checked(scan_layout(cfg.data)))[0] is True
    image = os.path.join(data, "train", "class_2")
    path = os.path.join(image, sorted(os.listdir(image))[1])
    before, stat = open(path, "rb").read(), os.stat(path)
    other = bytearray(before)
    other[-20] ^= 0xFF  # inside the PNG's data: same size
    with open(path, "wb") as fh:
        fh.write(bytes(other))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(path).st_size == stat.st_size and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ConfigError) as info:
        opened(_checked(scan_layout(cfg.data)))
    assert f"(files (train/class_2/{os.path.basename(path)} changed) differ)" in str(info.value)

    old = str(tmp_path / "old")  # an earlier run's fingerprint, from before contents were read
    index = scan_layout(cfg.data)
    open_output(old, training_fingerprint(cfg, index, index.train.num_rows), fresh=False)
    save_run_config(old, cfg, [1], training_fingerprint(cfg, index, index.train.num_rows), input_files(index))
    checked = _checked(index)
    now = training_fingerprint(cfg, checked, checked.train.num_rows, input_files(checked))
    assert run_folder.CONTENTS_KEY in now
    assert open_output(old, run_folder.matching_earlier(old, now), fresh=False, inputs=input_files(checked)) is True
