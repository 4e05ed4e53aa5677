"""storage.py on local files: durable atomic writes, one line for a write that fails, the
exclusive create the run lock uses, file sizes and times. (The same calls on S3: test_s3.py.)"""

from __future__ import annotations

import errno
import os
import threading

import pytest

from ensemble import storage
from ensemble.errors import StorageError


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="reads /proc/self/fd")
def test_a_local_write_is_flushed_before_its_rename_and_its_folder_after(tmp_path, monkeypatch):
    """After a power loss a committed record must not name an empty file: the file's bytes reach
    the disk (fsync) before the rename makes them visible, and the folder's entry after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    target = tmp_path / "member-0" / "model.pt"
    storage.write_bytes(str(target), b"weights")
    assert target.read_bytes() == b"weights"
    (_, synced), (_, tmp, moved), (_, folder) = events
    assert synced == tmp and tmp.startswith(str(target) + ".tmp-") and moved == str(target)
    assert folder == str(target.parent)


def test_a_failed_write_is_one_line_naming_the_file_and_the_reason(tmp_path, monkeypatch):
    """A full disk (a storage stub raising ENOSPC where the kernel reports it: at the flush) is
    a StorageError, also an OSError, that names the file and the errno's words; the file keeps
    its committed content and no temporary file stays behind."""
    target = tmp_path / "checkpoint.json"
    storage.write_bytes(str(target), b"epoch 1")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StorageError) as info:
        storage.write_bytes(str(target), b"epoch 2")
    assert str(info.value) == f"could not write {target}: No space left on device (ENOSPC)"
    assert isinstance(info.value, OSError)
    assert target.read_bytes() == b"epoch 1" and os.listdir(tmp_path) == ["checkpoint.json"]


def test_create_new_lets_exactly_one_of_racing_writers_in(tmp_path):
    path, wins = str(tmp_path / "run" / "run.lock"), []
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        start.wait()
        if storage.create_new(path, f"writer {i}".encode()):
            wins.append(i)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and open(path).read() == f"writer {wins[0]}"
    assert os.listdir(tmp_path / "run") == ["run.lock"]  # no temporaries left


def test_file_stats_are_sizes_and_modification_times(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"12345")
    b.write_bytes(b"1")
    os.utime(b, ns=(1_000_000_000, 2_000_000_000))
    assert storage.file_stats([str(a), str(b), str(tmp_path / "gone.png")]) == [
        (5, a.stat().st_mtime_ns), (1, 2_000_000_000), (-1, -1)]
