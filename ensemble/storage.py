"""Paths and URIs through pyarrow.fs: local folders, s3://, gs:// and whatever pyarrow resolves.

Everything a member writes and the driver reads goes through here, so outputs can live on
shared storage when members run on other nodes.

Object stores (s3://bucket/key, gs://bucket/key):

- A URI names its object by the raw key, as S3 listings return it and as ``aws s3`` takes it:
  ``s3://bucket/train/cat/a b.jpg`` is the key ``train/cat/a b.jpg``. Nothing is percent-decoded
  and no query string is read, so names with spaces, ``#``, ``?`` or non-ASCII letters round-trip
  through ``list_dir`` and ``join``.
- Endpoint, region and credentials come from the environment, never from the URI. For S3:
  credentials from the SDK's chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_SESSION_TOKEN``, ``~/.aws`` files, an EC2 instance profile); ``AWS_ENDPOINT_URL_S3`` or
  ``AWS_ENDPOINT_URL`` for an S3-compatible server (then ``AWS_REGION`` / ``AWS_DEFAULT_REGION``);
  on AWS itself the bucket's own region. Ray workers inherit the environment of the process that
  started the cluster (``ray start`` / ``ray.init``).
- There are no folders: a prefix that has objects under it is a folder (``is_dir``), and writing
  ``a/b/c`` needs no ``a/b`` first. ``makedirs`` still leaves an empty marker object so that an
  output folder exists before its first file.
- One filesystem object per bucket and process, made on first use (so the variables must be set
  before the first s3:// access in a process).
"""

from __future__ import annotations

import errno
import os
import posixpath
import time
import uuid
from functools import lru_cache
from typing import Optional

import pyarrow.fs as pafs

from ensemble.errors import StorageError

# Schemes whose URIs are scheme://bucket/key and whose filesystem paths are "bucket/key".
_BUCKET_SCHEMES = ("s3", "gs", "gcs")


def is_uri(path: str) -> bool:
    return "://" in path


def _split_bucket_uri(path: str) -> tuple[str, str, str] | None:
    """(scheme, bucket, key) of an object-store URI, else None. The key keeps its raw spelling."""
    scheme, sep, rest = path.partition("://")
    if not sep or scheme.lower() not in _BUCKET_SCHEMES:
        return None
    bucket, _, key = rest.partition("/")
    return scheme.lower(), bucket, key.strip("/")


# S3 client settings. The SDK's defaults (1 s to connect, 3 s without progress, 3 attempts) can
# fail a member's checkpoint write on a busy node or a slow S3-compatible server; these ride out
# such stalls, yet a wrong endpoint still fails within about a minute.
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 5


def _s3_filesystem(bucket: str) -> pafs.S3FileSystem:
    """S3 as ``FileSystem.from_uri("s3://bucket")`` makes it, with the client settings above.

    pyarrow 26 reads the endpoint variables only in from_uri, not in ``S3FileSystem()``, so they
    are read here in the same order: AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL. Without an
    endpoint the region is the bucket's own (asked of S3 once); with one, AWS_REGION /
    AWS_DEFAULT_REGION or us-east-1. Credentials: the SDK's default chain (variables, ~/.aws,
    instance profile).
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if endpoint:
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    else:
        region = pafs.resolve_s3_region(bucket)
    return pafs.S3FileSystem(region=region, endpoint_override=endpoint,
                             connect_timeout=S3_CONNECT_TIMEOUT_S, request_timeout=S3_REQUEST_TIMEOUT_S,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS))


@lru_cache(maxsize=16)
def _fs_for(scheme: str, bucket: str) -> pafs.FileSystem:
    if scheme == "s3":
        return _s3_filesystem(bucket)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


def canonical(path: str) -> str:
    """One spelling per file or folder, with nothing asked of storage: a local path resolved
    (``..``, ``.``, symbolic links); a bucket URI with its scheme in lower case and its key
    normalised, without a trailing slash (``S3://b/k/`` is ``s3://b/k``); another URI as it is,
    without a trailing slash."""
    parts = _split_bucket_uri(path)
    if parts is not None:
        scheme, bucket, key = parts
        return f"{scheme}://{bucket}" + (f"/{posixpath.normpath(key)}" if key else "")
    return path.rstrip("/") if is_uri(path) else os.path.realpath(path)


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it). Local paths become absolute; "s3://b/k" -> (S3, "b/k")."""
    parts = _split_bucket_uri(path)
    if parts is not None:
        scheme, bucket, key = parts
        if not bucket:
            raise ValueError(f"{path}: no bucket name; expected {scheme}://BUCKET/PREFIX")
        return _fs_for(scheme, bucket), f"{bucket}/{key}" if key else bucket
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _is_object_store(fs: pafs.FileSystem) -> bool:
    return fs.type_name in ("s3", "gcs")


def is_local(path: str) -> bool:
    """Whether ``path`` is on this machine's filesystem (not an object store or another remote one)."""
    return isinstance(resolve(path)[0], pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base.rstrip("/"), *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    """A file, a folder, or (object stores) a prefix with objects under it."""
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    """Create the folder and its parents. Object stores: an empty marker object; the bucket must exist."""
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def list_dir(path: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the entries directly under ``path``, sorted by name.

    Object stores: the sub-prefixes (as folders) and the objects right under ``path``.
    """
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted((info.base_name, info.type == pafs.FileType.Directory) for info in infos
                  if info.base_name)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as fh:
        return fh.readall()


#: Pauses between the tries of a read that failed (three tries in all): long enough for a
#: throttled object store or a re-mounting NFS server, short enough not to look like a hang.
READ_RETRY_S = (0.5, 2.0)


def read_stored(path: str) -> Optional[bytes]:
    """The bytes of ``path``; None when storage says it is not there.

    A read that fails for another reason (a timeout, a throttle, ``ESTALE``, ``EMFILE``) is tried
    again (``READ_RETRY_S``), then raises StorageError in one line: the file may be whole, so a
    caller must not treat it as damaged, free or missing, nor delete anything.
    """
    for attempt in range(len(READ_RETRY_S) + 1):
        try:
            return read_bytes(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            failure = exc
            try:
                if not exists(path):
                    return None
            except OSError:
                pass
        if attempt < len(READ_RETRY_S):
            time.sleep(READ_RETRY_S[attempt])
    raise StorageError(f"could not read {path}: {_reason(failure)} (tried {len(READ_RETRY_S) + 1} times); "
                       f"nothing was deleted: rerun the same command once storage answers") from failure


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically and durably: a temporary name in the same folder, then a move onto ``path``.

    A reader sees the old file or the whole new one, never a part. A local file is flushed to
    disk (fsync) before it is renamed, and its folder after, so a file a record names survives a
    power loss as written. On an object store the temporary object appears only once its upload
    completed, and the move is a server-side copy plus a delete (not a rename): it costs a second
    write of the object, and a process killed between the two leaves a ``*.tmp-*`` object behind,
    but never a partial ``path``. A write that fails (a full disk, an object store failing after
    its retries) raises StorageError: one line naming ``path`` and the reason.
    """
    fs, inner = resolve(path)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            _write_local(inner, data)
        else:
            _write_via(fs, inner, data, make_parent=not _is_object_store(fs))
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"could not write {path}: {_reason(exc)}") from exc


def _write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # the bytes are on disk before a name points at them
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_local(folder)  # and the rename itself


def fsync_local(path: str) -> None:
    """A local file's bytes, or a folder's entries (a rename in it), on disk before the caller goes on."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems (network, FUSE) cannot sync a folder: nothing more to do
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _write_via(fs: pafs.FileSystem, inner: str, data: bytes, *, make_parent: bool) -> None:
    if make_parent:  # object stores need no parent folders
        fs.create_dir(posixpath.dirname(inner), recursive=True)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(tmp) as fh:
            fh.write(data)
        fs.move(tmp, inner)
    except BaseException:
        # An interrupted upload may still have been completed by close(): never leave it around.
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def _reason(exc: OSError) -> str:
    """The system's words for a failed write: "No space left on device (ENOSPC)", or the first
    line of pyarrow's message when it carries no errno (an S3 error after its retries)."""
    if exc.errno:
        return f"{os.strerror(exc.errno)} ({errno.errorcode.get(exc.errno, exc.errno)})"
    text = str(exc).strip().splitlines()
    return text[0][:240] if text else exc.__class__.__name__


def create_new(path: str, data: bytes) -> bool:
    """Write ``path`` only if nothing is there yet; False when something is.

    Local files: an atomic exclusive create (the content is written under a temporary name and
    hard-linked to ``path``, which fails if ``path`` exists), so of two racing writers exactly
    one gets True. Object stores offer no conditional create through pyarrow: there a writer
    that checks between another's check and its upload also gets True; callers that need one
    winner read the object back after a pause (``run_lock`` does).
    """
    fs, inner = resolve(path)
    if not isinstance(fs, pafs.LocalFileSystem):
        if fs.get_file_info(inner).type != pafs.FileType.NotFound:
            return False
        write_bytes(path, data)
        return True
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        _write_local(tmp, data)
        try:
            os.link(tmp, inner)
        except FileExistsError:
            return False
        fsync_local(os.path.dirname(inner))
        return True
    except OSError as exc:
        raise StorageError(f"could not write {path}: {_reason(exc)}") from exc
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def file_stats(paths: list[str]) -> list[tuple[int, int]]:
    """(size in bytes, modification time in ns) of each of ``paths``, (-1, -1) where none is.

    Local files: one stat each. On an object store, each folder that holds some of the paths is
    listed once (not recursively), which gives its objects' sizes and LastModified instead of a
    request per object; nothing outside those folders is listed. Paths may mix local files and
    buckets (each is resolved on its own).
    """
    resolved = [resolve(p) for p in paths]
    out: list = [(-1, -1)] * len(paths)
    groups: dict = {}
    for k, (fs, inner) in enumerate(resolved):
        key = (id(fs), posixpath.dirname(inner)) if _is_object_store(fs) else \
            ("local", None) if isinstance(fs, pafs.LocalFileSystem) else (id(fs), None)
        groups.setdefault(key, (fs, []))[1].append(k)
    for (_, folder), (fs, members) in groups.items():
        inner = [resolved[k][1] for k in members]
        if folder is not None and len(members) > 1:
            listed = {info.path: info for info in fs.get_file_info(pafs.FileSelector(folder, recursive=False,
                                                                                     allow_not_found=True))}
            infos = [listed.get(p) or fs.get_file_info(p) for p in inner]
        else:
            infos = fs.get_file_info(inner)
        for k, info in zip(members, infos):
            if info.type == pafs.FileType.File:
                out[k] = (info.size, info.mtime_ns)
    return out


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    """Delete one file; StorageError (one line) when storage refuses or fails."""
    fs, inner = resolve(path)
    try:
        fs.delete_file(inner)
    except OSError as exc:
        raise StorageError(f"could not remove {path}: {_reason(exc)}") from exc


def remove_tree(path: str) -> None:
    """Delete a folder and everything under it (object stores: every object under the prefix).

    Nothing to do when it does not exist. A whole bucket is never deleted.
    """
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type != pafs.FileType.Directory:
        return
    if _is_object_store(fs) and "/" not in inner:
        raise ValueError(f"{path}: refusing to delete a whole bucket; name a prefix inside it")
    fs.delete_dir(inner)
