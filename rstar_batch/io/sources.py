"""Find and check the candidate Parquet files before anything is scored.

Every problem is reported here, on the driver, naming the file and column:
a path that does not exist, a file that is not Parquet, a missing column, a
column of the wrong type, ids whose type differs between files, no rows.
"""

from __future__ import annotations

import glob as globlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import fs as fsio
from rstar_batch.progress import checkpoint

log = logging.getLogger(__name__)


class InputError(ValueError):
    """Candidate input the user must fix."""


@dataclass(frozen=True)
class CandidateFiles:
    """The resolved candidate files with what their footers say."""

    filesystem: pafs.FileSystem
    paths: list[str]
    num_rows: int
    schema: pa.Schema           # the columns the job reads, as the first file has them
    total_bytes: int
    file_rows: list[int]        # rows of each file, in `paths` order
    row_groups: list[list[int]]  # rows of each row group of each file
    skipped: list[dict]         # unreadable files left out (--on-bad-file skip)

    def fingerprint(self) -> dict[str, Any]:
        """Paths, sizes and versions (ETag or modification time) of the files: changes
        when the input does."""
        files = fsio.file_versions(self.filesystem, self.paths)
        return {"files": files, "rows": self.file_rows, "digest": checkpoint.digest(files)}


def _expand_one(fs: pafs.FileSystem, uri: str, path: str) -> list[str]:
    if any(ch in path for ch in "*?["):
        if fsio.is_local(fs):
            matches = sorted(globlib.glob(path, recursive=True))
        else:
            import fsspec

            matches = sorted(fsspec.core.url_to_fs(uri)[0].glob(path))
        files = [m for m in matches if fs.get_file_info(m).type == pafs.FileType.File]
        if not files:
            raise InputError(f"candidates pattern '{uri}' matches no files")
        return files
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"candidates path '{uri}' does not exist")
    if info.type == pafs.FileType.File:
        return [path]
    files = fsio.parquet_files(fs, path)
    if not files:
        raise InputError(f"candidates folder '{uri}' holds no .parquet files")
    return files


def expand(uris: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """All candidate files named by files, folders and globs (one filesystem)."""
    filesystem, paths = None, []
    for uri in uris:
        fs, path = fsio.resolve(uri)
        if filesystem is not None and type(fs) is not type(filesystem):
            raise InputError(f"all candidates must live on one filesystem; '{uri}' does not")
        filesystem = filesystem or fs
        paths.extend(_expand_one(fs, uri, path))
    if not paths:
        raise InputError("no candidates given")
    return filesystem, list(dict.fromkeys(paths))


def _footer(fs: pafs.FileSystem, path: str) -> tuple[str, pa.Schema, int, int, list[int]]:
    try:
        with fs.open_input_file(path) as fh:
            meta = pq.ParquetFile(fh).metadata
            groups = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
            return path, meta.schema.to_arrow_schema(), meta.num_rows, fh.size(), groups
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"candidates file '{path}' is not a readable Parquet file: {exc}"
                         ) from None


def is_text_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))


def is_id_type(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or is_text_type(t)


def check_schema(path: str, schema: pa.Schema, roles: dict[str, str], keep: list[str]) -> None:
    """Raise naming the file and column if a needed column is missing or mistyped."""
    for role, column in roles.items():
        if column not in schema.names:
            raise InputError(
                f"candidates file '{path}' has no {role} column '{column}' (it has: "
                f"{', '.join(schema.names)}); map yours with --{role.replace('_', '-')}-column")
        kind, ok = ("an integer or string", is_id_type) if role.endswith("_id") else (
            "a string", is_text_type)
        column_type = schema.field(column).type
        if not ok(column_type):
            raise InputError(f"column '{column}' ({role}) in candidates file '{path}' is "
                             f"{column_type}; it must be {kind}")
    for column in keep:
        if column not in schema.names:
            raise InputError(f"candidates file '{path}' has no column '{column}' named in "
                             f"keep_columns (it has: {', '.join(schema.names)})")


def _try_footer(fs: pafs.FileSystem, path: str) -> tuple | InputError:
    try:
        return _footer(fs, path)
    except InputError as exc:
        return exc


def inspect_candidates(uris: list[str], roles: dict[str, str], keep: list[str],
                       threads: int = 16, on_bad_file: str = "fail",
                       optional: tuple[str, ...] = ()) -> CandidateFiles:
    """Resolve, open and check every candidate file; count its rows from the footers.

    A file that is not readable Parquet (corrupt, truncated) fails the job, or with
    `on_bad_file="skip"` is left out and reported in `skipped`.
    """
    fs, paths = expand(uris)
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        results = list(pool.map(lambda p: _try_footer(fs, p), paths))
    skipped = [{"path": p, "error": str(r)} for p, r in zip(paths, results)
               if isinstance(r, InputError)]
    if skipped and on_bad_file != "skip":
        raise InputError(f"{skipped[0]['error']} (pass --on-bad-file skip to leave out "
                         f"unreadable files; {len(skipped)} found)")
    for bad in skipped:
        log.warning("skipping %s", bad["error"])
    footers = [r for r in results if not isinstance(r, InputError)]
    if not footers:
        raise InputError(f"no readable candidates file among {len(paths)} under "
                         f"{', '.join(uris)}")
    paths = [f[0] for f in footers]
    needed = list(dict.fromkeys([*roles.values(), *keep]))
    first_path, first_schema = footers[0][0], footers[0][1]
    for path, schema, *_ in footers:
        check_schema(path, schema, roles, keep)
        for column in needed:
            if not schema.field(column).type.equals(first_schema.field(column).type):
                raise InputError(
                    f"column '{column}' is {schema.field(column).type} in '{path}' but "
                    f"{first_schema.field(column).type} in '{first_path}'; make them match")
    num_rows = sum(f[2] for f in footers)
    if num_rows == 0:
        raise InputError(f"candidates {', '.join(uris)} hold no rows "
                         f"({len(paths)} file(s), 0 rows)")
    log.info("candidates: %d file(s), %d rows", len(paths), num_rows)
    needed += [c for c in optional if c in first_schema.names and c not in needed]
    schema = pa.schema([first_schema.field(c) for c in needed])
    return CandidateFiles(fs, paths, num_rows, schema, sum(f[3] for f in footers),
                          [f[2] for f in footers], [f[4] for f in footers], skipped)
