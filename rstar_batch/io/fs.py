"""One way to reach files: a pyarrow filesystem for any local path or fsspec URI.

Local paths use pyarrow's own LocalFileSystem; every other scheme (s3://,
gs://, abfs://, memory://, …) goes through fsspec, wrapped so pyarrow and Ray
Data read and write it the same way.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def _has_scheme(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an fsspec URI."""
    if not _has_scheme(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as exc:
        scheme = uri.split("://", 1)[0]
        raise ValueError(f"cannot open '{uri}': no filesystem for '{scheme}://' ({exc}); "
                         "install its fsspec package, e.g. pip install 'rstar-batch[s3]'"
                         ) from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, path: str, recursive: bool = True) -> list[pafs.FileInfo]:
    info = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return [i for i in info if i.type == pafs.FileType.File]


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole file so readers never see half of it."""
    _make_parent(fs, path)
    if is_local(fs):
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    else:  # one object-store PUT is already all or nothing
        with fs.open_output_stream(path) as out:
            out.write(data)


def write_json(fs: pafs.FileSystem, path: str, value: Any) -> None:
    write_bytes(fs, path, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
                .encode())


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as src:
        return json.loads(src.read().decode())


def write_table(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Write one Parquet file so readers never see half of it."""
    _make_parent(fs, path)
    target = f"{path}.tmp-{uuid.uuid4().hex}" if is_local(fs) else path
    pq.write_table(table, target, filesystem=fs, compression="zstd")
    if target != path:
        fs.move(target, path)


def delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
