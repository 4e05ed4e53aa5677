"""Paths and URIs through pyarrow.fs: local folders, s3://, and whatever pyarrow resolves.

Everything a member writes and the driver reads goes through here, so outputs can live on
shared storage when members run on other nodes.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from functools import lru_cache

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


@lru_cache(maxsize=16)
def _fs_for(scheme_and_authority: str) -> pafs.FileSystem:
    fs, _ = pafs.FileSystem.from_uri(scheme_and_authority)
    return fs


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it). Local paths become absolute."""
    if is_uri(path):
        fs, inner = pafs.FileSystem.from_uri(path)
        return fs, inner
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def exists(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def is_dir(path: str) -> bool:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory


def makedirs(path: str) -> None:
    fs, inner = resolve(path)
    fs.create_dir(inner, recursive=True)


def list_dir(path: str) -> list[tuple[str, bool]]:
    """(name, is_dir) of the entries directly under ``path``, sorted by name."""
    fs, inner = resolve(path)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False))
    return sorted((info.base_name, info.type == pafs.FileType.Directory) for info in infos)


def read_bytes(path: str) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as fh:
        return fh.readall()


def write_bytes(path: str, data: bytes) -> None:
    """Write atomically: a temporary name in the same folder, then a rename."""
    fs, inner = resolve(path)
    parent = posixpath.dirname(inner) if is_uri(path) else os.path.dirname(inner)
    fs.create_dir(parent, recursive=True)
    tmp = f"{inner}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as fh:
        fh.write(data)
    fs.move(tmp, inner)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
    fs, inner = resolve(path)
    fs.delete_file(inner)


def remove_tree(path: str) -> None:
    fs, inner = resolve(path)
    if fs.get_file_info(inner).type == pafs.FileType.Directory:
        fs.delete_dir(inner)
