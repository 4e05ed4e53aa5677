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

import os
import posixpath
import uuid
from functools import lru_cache

import pyarrow.fs as pafs

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


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: a temporary name in the same folder, then a move onto ``path``.

    A reader sees the old file or the whole new one, never a part. On an object store the
    temporary object appears only once its upload completed, and the move is a server-side copy
    plus a delete (not a rename): it costs a second write of the object, and a process killed
    between the two leaves a ``*.tmp-*`` object behind, but never a partial ``path``.
    """
    fs, inner = resolve(path)
    if not _is_object_store(fs):  # object stores need no parent folders
        fs.create_dir(posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner), recursive=True)
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


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


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
