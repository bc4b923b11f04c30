"""One way to reach files: a pyarrow filesystem for any local path or fsspec URI.

Local paths use pyarrow's own LocalFileSystem; every other scheme (s3://,
gs://, abfs://, memory://, …) goes through fsspec, wrapped so pyarrow and Ray
Data read and write it the same way. Credentials come from the environment
(or an instance role), never from the URI: a URI with `user:password@` is
refused without echoing it, since URIs are logged and kept in the manifest.

Object stores differ from folders in ways the job relies on, handled here:
listings are not cached (workers in other processes add files the driver must
then see), "directories" are never created (that would create a missing
bucket), folder markers (`name/` objects) are not files, modification times
come from the listing, and an input file's version is its ETag.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.config import ConfigError

# Stores without real directories: creating one is a no-op (s3fs, gcsfs and
# adlfs would create a missing bucket or container instead).
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "abfs", "abfss", "az"})
_MODIFIED_KEYS = ("mtime", "LastModified", "last_modified", "updated")  # s3fs, adlfs, gcsfs
_VERSION_KEYS = ("ETag", "etag")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*:[^/@]*@")
_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "abfs": "azure",
           "abfss": "azure", "az": "azure"}


def redact(uri: str) -> str:
    """The URI with any `user:password@` replaced, safe for messages and logs."""
    return _USERINFO.sub(r"\1***@", uri)


def _has_scheme(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URI.

    Raises ConfigError (a ValueError) for a URI with credentials in it or a scheme
    whose fsspec package is not installed."""
    if not _has_scheme(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    if _USERINFO.match(uri):
        raise ConfigError(f"'{redact(uri)}' has credentials in it; remove them and provide "
                          "them through the environment (e.g. AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY) or an instance role")
    import fsspec

    scheme = uri.split("://", 1)[0]
    try:
        # No listings cache: Ray workers write files that this process must then list.
        fs, path = fsspec.core.url_to_fs(uri, use_listings_cache=False)
    except (ImportError, ValueError) as exc:
        fix = (f"pip install 'rstar-batch[{_EXTRAS[scheme]}]'" if scheme in _EXTRAS
               else "install the fsspec package for it")
        raise ConfigError(f"cannot open '{redact(uri)}': no filesystem for '{scheme}://' "
                          f"({exc}); {fix}") from None
    return pafs.PyFileSystem(_Handler(fs)), path


def _modified(info: dict) -> Optional[datetime.datetime]:
    for key in _MODIFIED_KEYS:
        value = info.get(key)
        if isinstance(value, datetime.datetime):
            return value
        if isinstance(value, (int, float)):
            return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
        if isinstance(value, str):
            try:
                return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError:
                continue
    return None


class _Handler(pafs.FSSpecHandler):
    """pyarrow's fsspec bridge, with modification times from object-store listings
    (s3fs calls it LastModified, adlfs last_modified) and no directories to create on
    object stores (a missing bucket must fail the write, not be created)."""

    @staticmethod
    def _create_file_info(path: str, info: dict) -> pafs.FileInfo:
        base = pafs.FSSpecHandler._create_file_info(path, info)
        if base.mtime is not None or base.type != pafs.FileType.File:
            return base
        return pafs.FileInfo(path, base.type, size=base.size, mtime=_modified(info))

    def create_dir(self, path: str, recursive: bool) -> None:
        protocol = self.fs.protocol
        if ({protocol} if isinstance(protocol, str) else set(protocol)) & _OBJECT_STORES:
            return
        super().create_dir(path, recursive)


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str, recursive: bool = True) -> list[pafs.FileInfo]:
    """Files under `path` (none if it does not exist); object-store folder markers
    (empty objects named `folder/`) are not files."""
    info = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return [i for i in info if i.type == pafs.FileType.File and not i.path.endswith("/")]


def list_top(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The files and folders right under `path` (one listing: a LIST with a delimiter
    on object stores), without object-store folder markers."""
    info = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    return [i for i in info if i.type != pafs.FileType.NotFound and not i.path.endswith("/")]


def read_range(fs: pafs.FileSystem, path: str, offset: int, length: int) -> bytes:
    """Bytes [offset, offset + length) of a file: one ranged GET on object stores (no
    HEAD first, as opening the file would cost)."""
    handler = getattr(fs, "handler", None)
    if isinstance(handler, pafs.FSSpecHandler):
        return handler.fs.cat_file(path, start=offset, end=offset + length)
    with fs.open_input_file(path) as src:
        return src.read_at(length, offset)


PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def parquet_files(fs: pafs.FileSystem, folder: str) -> list[str]:
    """The Parquet files under `folder`, sorted, leaving out any under a name that
    starts with `_` or `.` (our `_work/`, `_rejected/`, Spark's `_temporary/`)."""
    def is_data(path: str) -> bool:
        parts = path[len(folder):].strip("/").split("/")
        return not any(p.startswith(("_", ".")) for p in parts) and \
            parts[-1].endswith(PARQUET_SUFFIXES)
    return sorted(i.path for i in list_files(fs, folder) if is_data(i.path))


def file_versions(fs: pafs.FileSystem, paths: list[str]) -> list[list]:
    """[path, size, version] of each file, where version changes when the file does:
    the ETag on object stores that give one, else the modification time in ns."""
    handler = getattr(fs, "handler", None)
    if not isinstance(handler, pafs.FSSpecHandler):
        return [[i.path, i.size, i.mtime_ns] for i in fs.get_file_info(paths)]
    with ThreadPoolExecutor(max_workers=min(16, max(1, len(paths)))) as pool:
        infos = list(pool.map(handler.fs.info, paths))
    versions = []
    for path, info in zip(paths, infos):
        tag = next((str(info[k]).strip('"') for k in _VERSION_KEYS if info.get(k)), None)
        modified = _modified(info)
        versions.append([path, info.get("size"), tag or (
            modified and int(modified.timestamp() * 1e9))])
    return versions


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def temp_path(fs: pafs.FileSystem, path: str) -> str:
    """Where to write `path` so that readers never see half of it: a hidden name
    beside it on local disks, to be moved over `path` when complete; `path` itself
    on object stores, where an upload appears only once it is completed."""
    if not is_local(fs):
        return path
    folder, _, name = path.rpartition("/")
    return f"{folder}/.{name}.tmp-{uuid.uuid4().hex}"


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so readers never see half of it."""
    _make_parent(fs, path)
    target = temp_path(fs, path)
    with fs.open_output_stream(target) as out:
        out.write(data)
    if target != path:
        fs.move(target, path)


def write_json(fs: pafs.FileSystem, path: str, value: Any) -> None:
    write_bytes(fs, path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
                .encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as src:
        return json.loads(src.read().decode())


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table,
                row_group_size: Optional[int] = None) -> None:
    """Write one Parquet file so readers never see half of it."""
    _make_parent(fs, path)
    target = temp_path(fs, path)
    pq.write_table(table, target, filesystem=fs, compression="zstd",
                   row_group_size=row_group_size)
    if target != path:
        fs.move(target, path)


def delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
