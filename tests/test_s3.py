"""s3:// for --data and --output, against a real S3 API on loopback (moto's standalone server).

The server runs as a subprocess on a free 127.0.0.1 port; this process and the Ray workers it
starts reach it through the standard AWS variables (AWS_ENDPOINT_URL, keys, region), exactly as
a run on EC2 reaches S3, so the URIs stay plain ``s3://bucket/prefix``. Without the test extra's
moto[server] (or pyarrow's S3 support) the module skips; with it, a server that does not start
fails the module: a slow machine must not turn the S3 tests into skips.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pafs = pytest.importorskip("pyarrow.fs")
ray = pytest.importorskip("ray")

from ensemble import storage  # noqa: E402
from ensemble.config import CPU_PRESET, ConfigError, build_config  # noqa: E402
from ensemble.data import scan_layout  # noqa: E402

from tests.helpers import write_digits_tree  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]

BUCKET = "ensemble-test"
N_TEST = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """End the server we started, by its pid."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


#: moto's server answers here within a second or two; a slow machine gets far longer before the
#: module fails (once: the fixture's failure is kept for every test that asks for it).
MOTO_START_S = 120.0


def _missing_s3_support() -> str:
    """What this module needs and this environment lacks ("" when nothing): pyarrow's S3 support, or
    the test extra's moto[server] (moto, boto3, its Flask app). Only a missing install skips: a
    server that is installed and does not start fails the module."""
    if not hasattr(pafs, "S3FileSystem"):
        return "pyarrow was built without S3 support (no pyarrow.fs.S3FileSystem)"
    missing = [name for name in ("moto", "boto3", "flask", "flask_cors") if importlib.util.find_spec(name) is None]
    if missing:
        return f"moto[server] is not installed (no {', '.join(missing)}): pip install -e '.[test]'"
    return ""


def _last_line(log) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1][:300] if lines else "no output"


def _start_moto(url: str, log, *, command: list, timeout_s: float = MOTO_START_S) -> subprocess.Popen:
    """Run ``command`` (moto's server, its output into ``log``) until ``url`` answers. One that exits
    first, or does not answer within ``timeout_s``, fails the test in one line naming why, and is
    not left running."""
    # Its request log goes to a file: a pipe nobody reads fills up and blocks the server.
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"moto server ({' '.join(command[1:])}) exited with code {proc.returncode} before it "
                            f"answered on {url}: {_last_line(log)}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                    return proc
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"moto server did not answer on {url} within {timeout_s:.0f} s, though moto is "
                                f"installed (its log {log}: {_last_line(log)})", pytrace=False)
                time.sleep(0.2)
    except BaseException:
        _stop(proc)
        raise


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 and the AWS variables pointing at it. Skips where moto[server]
    or pyarrow's S3 is not installed; fails where it is and the server does not start."""
    missing = _missing_s3_support()
    if missing:
        pytest.skip(missing)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_moto(url, tmp_path_factory.mktemp("moto") / "server.log",
                       command=[sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                         "AWS_SHARED_CREDENTIALS_FILE"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", url)
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
            storage._fs_for.cache_clear()
            # Only the test creates buckets (the package never does); S3FileSystem() itself
            # ignores AWS_ENDPOINT_URL, hence the explicit endpoint_override here.
            admin = pafs.S3FileSystem(endpoint_override=url, region="us-east-1", access_key="testing",
                                      secret_key="testing", allow_bucket_creation=True)
            admin.create_dir(BUCKET)
            yield admin
            storage._fs_for.cache_clear()
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def s3_data(s3_endpoint, tmp_path_factory):
    """The local digits tree and its copy uploaded to s3://BUCKET/data."""
    local = write_digits_tree(tmp_path_factory.mktemp("digits"), per_class_train=6, per_class_val=3,
                              n_test=N_TEST, classes=3)
    pafs.copy_files(local, f"{BUCKET}/data", source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=s3_endpoint)
    return local, f"s3://{BUCKET}/data"


def _keys(admin, prefix: str) -> list[str]:
    infos = admin.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(BUCKET) + 1:] for i in infos if i.type == pafs.FileType.File)


def _outcome(call):
    """What ``call()`` raised (pytest's skip and fail included), or None."""
    try:
        call()
    except BaseException as exc:  # noqa: BLE001 (Skipped and Failed are BaseExceptions)
        return exc
    return None


def test_a_moto_server_that_does_not_start_fails_instead_of_skipping(tmp_path, monkeypatch):
    """Where moto[server] is installed (else this skips, as the module does), a server that exits
    (here: a wrong port) or never answers within the deadline fails the module in one line naming
    why, instead of turning its S3 tests into skips; neither is left running."""
    missing = _missing_s3_support()
    if missing:
        pytest.skip(missing)
    started, real_popen = [], subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    url = f"http://127.0.0.1:{_free_port()}"

    exited = _outcome(lambda: _start_moto(url, tmp_path / "exits.log",
                                          command=[sys.executable, "-m", "moto.server", "-p", "not-a-port"]))
    assert isinstance(exited, pytest.fail.Exception), f"a server that exited gave {type(exited).__name__}: {exited}"
    assert str(exited).startswith(f"moto server (-m moto.server -p not-a-port) exited with code 2 before it "
                                  f"answered on {url}: ") and "invalid int value: 'not-a-port'" in str(exited)

    silent = _outcome(lambda: _start_moto(url, tmp_path / "silent.log", timeout_s=1,
                                          command=[sys.executable, "-c", "import time; time.sleep(60)"]))
    assert isinstance(silent, pytest.fail.Exception), f"a silent server gave {type(silent).__name__}: {silent}"
    assert str(silent).startswith(f"moto server did not answer on {url} within 1 s, though moto is installed")
    assert len(started) == 2 and [proc.poll() is None for proc in started] == [False, False]


# ---------------------------------------------------------------- storage on S3 (no Ray)

def test_storage_folders_are_prefixes(s3_endpoint):
    base = f"s3://{BUCKET}/st/a"
    assert storage.join(f"s3://{BUCKET}/st/", "a", "b.txt") == f"s3://{BUCKET}/st/a/b.txt"
    assert not storage.exists(base) and not storage.is_dir(base)
    storage.write_text(storage.join(base, "deep", "x.txt"), "x")  # no makedirs needed
    assert storage.is_dir(base) and storage.is_dir(storage.join(base, "deep"))
    assert storage.exists(storage.join(base, "deep", "x.txt"))
    assert not storage.is_dir(storage.join(base, "deep", "x.txt"))
    storage.makedirs(storage.join(base, "empty"))  # an empty folder exists once made
    assert storage.is_dir(storage.join(base, "empty"))
    assert storage.list_dir(base) == [("deep", True), ("empty", True)]
    assert storage.list_dir(f"s3://{BUCKET}/st") == [("a", True)]
    with pytest.raises(FileNotFoundError):
        storage.list_dir(f"s3://{BUCKET}/st/nothing")


def test_storage_write_read_replace_remove(s3_endpoint):
    path = f"s3://{BUCKET}/rw/f.bin"
    storage.write_bytes(path, b"one")
    storage.write_bytes(path, b"two")  # replaces
    assert storage.read_bytes(path) == b"two"
    assert _keys(s3_endpoint, "rw") == ["rw/f.bin"]  # the temporary object is gone
    storage.remove(path)
    assert not storage.exists(path)
    with pytest.raises(OSError):
        storage.read_bytes(path)


def test_storage_names_round_trip_raw(s3_endpoint):
    """Keys are raw: spaces, '#', '?', '%' and non-ASCII survive list_dir -> join -> read."""
    folder = f"s3://{BUCKET}/names"
    names = ["a b.png", "c#1.png", "d?.png", "e%20f.png", "ü.png"]
    for name in names:
        storage.write_bytes(storage.join(folder, name), name.encode())
    listed = storage.list_dir(folder)
    assert listed == sorted((n, False) for n in names)
    assert [storage.read_bytes(storage.join(folder, n)).decode() for n, _ in listed] == [n for n, _ in listed]


def test_storage_remove_tree(s3_endpoint):
    folder = f"s3://{BUCKET}/tree"
    for rel in ("x", "sub/y", "sub/deeper/z"):
        storage.write_text(storage.join(folder, rel), rel)
    storage.write_text(f"s3://{BUCKET}/tree-sibling", "keep")  # same prefix text, not under tree/
    storage.remove_tree(folder)
    assert not storage.exists(folder)
    assert storage.read_bytes(f"s3://{BUCKET}/tree-sibling") == b"keep"
    storage.remove_tree(folder)  # already gone: nothing to do
    with pytest.raises(ValueError, match="whole bucket"):
        storage.remove_tree(f"s3://{BUCKET}")


def test_file_stats_from_one_listing(s3_endpoint):
    folder = f"s3://{BUCKET}/stats"
    storage.write_bytes(storage.join(folder, "a", "x.png"), b"12345")
    storage.write_bytes(storage.join(folder, "b", "y.png"), b"1")
    stats = storage.file_stats([storage.join(folder, "a", "x.png"), storage.join(folder, "b", "y.png"),
                                storage.join(folder, "b", "gone.png")])
    assert [size for size, _ in stats] == [5, 1, -1] and all(mtime > 0 for _, mtime in stats[:2])


def test_run_lock_on_s3(s3_endpoint):
    """A lock object, read back after a pause (no conditional create through pyarrow): a second
    driver gets the one line naming the holder; the lock goes when the run ends."""
    import os

    from ensemble.run_lock import RunFolderBusy, RunLock

    out = f"s3://{BUCKET}/runs/locked"
    with RunLock(out) as lock:
        assert json.loads(storage.read_bytes(f"{out}/run.lock"))["token"] == lock.token
        with pytest.raises(RunFolderBusy, match=rf"^--output {out} is in use by another process \(pid {os.getpid()} "):
            RunLock(out).acquire()
    assert not storage.exists(f"{out}/run.lock")


def test_of_drivers_started_together_on_s3_one_gets_the_folder(s3_endpoint):
    """Six drivers released by one barrier onto the same s3:// output, where no create is exclusive
    (each writes the lock object and reads it back after SETTLE_S): exactly one holds the folder,
    its token is the object's and its check() passes; the other five get the one busy line; the
    racing writes leave no temporary objects, and the holder's release removes the lock."""
    import os
    import threading

    from ensemble.run_lock import RunFolderBusy, RunLock

    out, drivers = f"s3://{BUCKET}/runs/raced", 6
    start = threading.Barrier(drivers)
    held, busy, failed = [], [], []

    def driver() -> None:
        start.wait()
        try:
            held.append(RunLock(out).acquire())
        except RunFolderBusy as exc:
            busy.append(str(exc))
        except Exception as exc:  # noqa: BLE001 (reported below, not lost in a thread)
            failed.append(repr(exc))

    threads = [threading.Thread(target=driver) for _ in range(drivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    try:
        assert not [t for t in threads if t.is_alive()], "a driver still waits for the lock after 60 s"
        assert not failed
        on_s3 = json.loads(storage.read_bytes(f"{out}/run.lock"))["token"]
        assert len(held) == 1, (f"{len(held)} drivers hold {out} at once (tokens {[h.token for h in held]}; "
                                f"the lock object's: {on_s3})")
        assert on_s3 == held[0].token
        held[0].check()
        assert len(busy) == drivers - 1
        for line in busy:
            assert "\n" not in line and line.startswith(f"--output {out} is in use by another process (pid "
                                                        f"{os.getpid()} "), line
        assert _keys(s3_endpoint, "runs/raced") == ["runs/raced/run.lock"]
    finally:
        for lock in held:
            lock.release()
    assert _keys(s3_endpoint, "runs/raced") == []


def test_a_lock_write_that_lands_late_on_s3_leaves_one_holder_once_each_checks(s3_endpoint, monkeypatch):
    """The window the read-back cannot close: driver B found no lock, but its write lands only after
    driver A has written and read back its own. Both acquire() calls return (an object store has no
    exclusive create through pyarrow); check(), which the driver calls before its first write and
    each stage, leaves exactly one of them holding the folder: the one whose token the object holds."""
    import threading

    from ensemble import run_lock
    from ensemble.run_lock import LockLost, RunFolderBusy, RunLock

    monkeypatch.setattr(run_lock, "SETTLE_S", 0.2)  # the order comes from the events below, not from it
    out = f"s3://{BUCKET}/runs/late"
    b_found_none, a_returned = threading.Event(), threading.Event()
    real_write = storage.write_bytes

    def write(path, data):  # B's lock upload waits until A's acquire() has returned
        if threading.current_thread().name == "B" and path.endswith("/run.lock") and not b_found_none.is_set():
            b_found_none.set()
            assert a_returned.wait(30), "driver A did not return from acquire() within 30 s"
        return real_write(path, data)

    monkeypatch.setattr(storage, "write_bytes", write)
    got: dict = {}

    def driver(name: str) -> None:
        try:
            got[name] = RunLock(out).acquire()
        except RunFolderBusy as exc:
            got[name] = exc

    b = threading.Thread(target=driver, args=("B",), name="B")
    b.start()
    assert b_found_none.wait(30), "driver B did not reach its lock upload within 30 s"
    a = threading.Thread(target=driver, args=("A",), name="A")
    a.start()
    a.join(timeout=30)
    a_returned.set()
    b.join(timeout=30)
    holders = {name: lock for name, lock in got.items() if isinstance(lock, RunLock)}
    try:
        assert sorted(got) == ["A", "B"] and holders, got
        kept, lost = [], []
        for name, lock in sorted(holders.items()):
            try:
                lock.check()
                kept.append(name)
            except LockLost as exc:
                lost.append(str(exc))
        assert len(kept) == 1, f"after check() {kept} hold {out} (acquire() returned for {sorted(holders)})"
        assert json.loads(storage.read_bytes(f"{out}/run.lock"))["token"] == holders[kept[0]].token
        assert lost == [f"{out}: another process took over this run folder's lock; this one stopped before "
                        f"writing again"] * (len(holders) - 1)
    finally:
        for lock in holders.values():
            lock.release()
    assert not storage.exists(f"{out}/run.lock")


def test_scan_layout_s3_matches_local(s3_data):
    local, uri = s3_data
    on_s3, on_disk = scan_layout(uri + "/"), scan_layout(local)
    assert on_s3.root == uri
    assert on_s3.classes == on_disk.classes == ("class_0", "class_1", "class_2")
    for split in ("train", "val", "test"):
        a, b = getattr(on_s3, split), getattr(on_disk, split)
        assert a.column("image_name").to_pylist() == b.column("image_name").to_pylist()
        assert a.column("label").to_pylist() == b.column("label").to_pylist()
        assert all(p.startswith(uri + f"/{split}/") for p in a.column("path").to_pylist())
    assert on_s3.test.num_rows == N_TEST


def test_manifest_on_s3_indexes_what_the_folders_do(s3_data):
    """A CSV manifest in the bucket, its paths relative to it: the same index as the folders."""
    from ensemble import storage

    local, uri = s3_data
    folders = scan_layout(uri)
    rows = ["path,label,split"]
    for split in ("train", "val", "test"):
        table = getattr(folders, split)
        labels = table.column("label").to_pylist()
        for path, label in zip(table.column("path").to_pylist(), labels):
            name = folders.classes[label] if split != "test" else ""
            rows.append(f"{path[len(uri) + 1:]},{name},{split}")
    storage.write_text(f"{uri}/labels.csv", "\n".join(rows) + "\n")
    listed = scan_layout(f"{uri}/labels.csv")
    assert listed.classes == folders.classes
    for split in ("train", "val", "test"):
        a, b = getattr(listed, split), getattr(folders, split)
        for column in ("path", "label", "image_name"):
            assert a.column(column).to_pylist() == b.column(column).to_pylist(), (split, column)


def test_scan_layout_missing_bucket_is_one_line(s3_endpoint):
    with pytest.raises(ConfigError, match=r"^--data s3://no-such-bucket/data: ") as info:
        scan_layout("s3://no-such-bucket/data")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="no such folder"):
        scan_layout(f"s3://{BUCKET}/nothing-here")


# ---------------------------------------------------------------- the pipeline, data and outputs on S3

@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    # Started after the AWS variables are set: its workers inherit them.
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def s3_run(cluster, s3_data):
    from ensemble.driver import run

    _, data = s3_data
    cfg = build_config(flag_values={**CPU_PRESET, "data": data, "output": f"s3://{BUCKET}/runs/r1",
                                    "members": 2, "epochs": 1, "image_size": 16, "batch_size": 16})
    return cfg, run(cfg)


def test_pipeline_writes_every_output_to_s3(s3_run, s3_endpoint):
    cfg, report = s3_run
    keys = set(_keys(s3_endpoint, "runs/r1"))
    for name in ("predictions.csv", "probabilities.parquet", "report.json", "report.md", "config.yaml", "run.json"):
        assert f"runs/r1/{name}" in keys, name
    for i in range(cfg.members):
        for name in ("model.pt", "member.json", "val_probs.npz"):
            assert f"runs/r1/members/member-{i}/{name}" in keys, (i, name)
    assert not [k for k in keys if ".tmp-" in k or "checkpoint" in k]  # no temporaries, no stale checkpoints
    assert "runs/r1/inputs.parquet" in keys and "runs/r1/run.lock" not in keys  # the lock went with the run

    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(f"s3://{BUCKET}/runs/r1/predictions.csv").decode())))
    assert len(rows) == N_TEST == report["data"]["test"]
    test_names = scan_layout(f"s3://{BUCKET}/data").test.column("image_name").to_pylist()
    assert sorted(r["image_name"] for r in rows) == sorted(test_names)
    assert {r["pred_label"] for r in rows} <= {"class_0", "class_1", "class_2"}
    on_s3 = json.loads(storage.read_bytes(f"s3://{BUCKET}/runs/r1/report.json"))
    assert on_s3["data"]["root"] == f"s3://{BUCKET}/data"
    assert [m["member"] for m in on_s3["members"]] == list(range(cfg.members))


def test_rerun_resumes_from_s3(s3_run):
    """The same command again loads both members from the bucket (hashes checked) instead of training."""
    from ensemble.driver import run

    cfg, first = s3_run
    again = run(cfg)
    assert [m["finished"] for m in again["members"]] == [m["finished"] for m in first["members"]]
    assert again["ensemble"]["val_acc"] == first["ensemble"]["val_acc"]


def test_same_predictions_as_local_run(s3_run, s3_data, tmp_path):
    """Where the files live changes nothing: the same images and seed on local disk predict the same."""
    from ensemble.driver import run

    cfg, _ = s3_run
    local, _ = s3_data
    run(cfg.replace(data=local, output=str(tmp_path / "local")))
    on_disk = (tmp_path / "local" / "predictions.csv").read_bytes()
    assert storage.read_bytes(f"s3://{BUCKET}/runs/r1/predictions.csv") == on_disk


def test_file_stats_lists_only_the_folders_it_is_asked_about_and_mixes_local_and_s3(s3_endpoint, tmp_path,
                                                                                     monkeypatch):
    """A manifest over two buckets' folders and a local file: each folder is listed once, not
    recursively, and the bucket's other prefixes are never listed; a local row after an s3:// one
    is a plain stat (it raised "Can't mix absolute and relative paths")."""
    import pyarrow.fs as pafs

    other = f"s3://{BUCKET}/unrelated"
    for k in range(3):
        storage.write_bytes(f"{other}/deep/{k}.png", b"x")
    storage.write_bytes(f"s3://{BUCKET}/m/a/x.png", b"12345")
    storage.write_bytes(f"s3://{BUCKET}/m/a/z.png", b"12")
    (tmp_path / "local.png").write_bytes(b"123")
    listed = []
    real_resolve = storage.resolve

    class Spy:  # the S3 filesystem, recording what is listed
        def __init__(self, fs):
            self.fs = fs

        def __getattr__(self, name):
            return getattr(self.fs, name)

        def get_file_info(self, what):
            if isinstance(what, pafs.FileSelector):
                listed.append((what.base_dir, what.recursive))
            return self.fs.get_file_info(what)

    spies: dict = {}

    def resolve(path):
        fs, inner = real_resolve(path)
        return (fs if isinstance(fs, pafs.LocalFileSystem) else spies.setdefault(id(fs), Spy(fs))), inner

    monkeypatch.setattr(storage, "resolve", resolve)
    stats = storage.file_stats([f"s3://{BUCKET}/m/a/x.png", str(tmp_path / "local.png"), f"s3://{BUCKET}/m/a/z.png",
                                f"s3://{BUCKET}/m/a/gone.png"])
    assert [size for size, _ in stats] == [5, 3, 2, -1]
    assert listed == [(f"{BUCKET}/m/a", False)]
