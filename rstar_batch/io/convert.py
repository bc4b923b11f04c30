"""`rstar-batch convert`: the field's text formats to Parquet, streaming.

One parser for TSV collections, queries, top1000 candidates, TREC runs and
qrels; `evaluate` reads its TREC text through it too. The input is read in
binary, a chunk at a time, and written a row group at a time, so memory stays
bounded whatever the file's size. Lines end at "\\n" (a "\\r" before it is
dropped); nothing else is interpreted: a quote is a character, and the last
field of a tab-separated format keeps any tabs it holds. Invalid UTF-8 is
replaced with U+FFFD and the lines that had it are counted. A line that does not
parse fails the conversion, or, with `max_bad_lines`, goes to a rejected file.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import lzma
import re
import time
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import fs as fsio
from rstar_batch.config import ConfigError

log = logging.getLogger(__name__)

READ_BYTES = 1 << 20
_INT = re.compile(r"-?[0-9]+\Z")
_BOM = b"\xef\xbb\xbf"
_INT_RANGE = {pa.int32(): 2 ** 31, pa.int64(): 2 ** 63}


class BadLineError(ConfigError):
    """A line of a text input that does not parse (or one too many of them)."""


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """A line layout: its separator, field count and the columns it yields."""

    layout: str                          # shown in errors
    sep: Optional[str]                   # "\t" (the last field keeps its tabs) or None: whitespace
    fields: int
    columns: tuple[tuple[str, int, str], ...]  # (column, field index, kind)

    def schema(self, int_ids: bool = False) -> pa.Schema:
        types = {"id": pa.int64() if int_ids else pa.string(), "text": pa.string(),
                 "int32": pa.int32(), "float64": pa.float64()}
        return pa.schema([(name, types[kind]) for name, _, kind in self.columns])


FORMATS = {
    "collection": TextFormat("docid<TAB>text", "\t", 2,
                             (("doc_id", 0, "id"), ("passage", 1, "text"))),
    "queries": TextFormat("qid<TAB>text", "\t", 2,
                          (("query_id", 0, "id"), ("query", 1, "text"))),
    "top1000": TextFormat("qid<TAB>pid<TAB>query<TAB>passage", "\t", 4,
                          (("query_id", 0, "id"), ("doc_id", 1, "id"),
                           ("query", 2, "text"), ("passage", 3, "text"))),
    "trec-run": TextFormat("qid Q0 docid rank score tag", None, 6,
                           (("query_id", 0, "id"), ("doc_id", 2, "id"), ("rank", 3, "int32"),
                            ("score", 4, "float64"), ("tag", 5, "text"))),
    "qrels": TextFormat("qid 0 docid relevance", None, 4,
                        (("query_id", 0, "id"), ("doc_id", 2, "id"),
                         ("relevance", 3, "int32"))),
}
REJECTED_SCHEMA = pa.schema([("line", pa.int64()), ("raw", pa.string()),
                             ("reason", pa.string())])


@dataclasses.dataclass
class ConvertStats:
    """What a read or conversion saw; `line()` is the one-line summary."""

    rows: int = 0
    row_groups: int = 0
    blank_lines: int = 0
    invalid_utf8_lines: int = 0
    bad_lines: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    seconds: float = 0.0
    output: str = ""
    rejected: Optional[str] = None

    def line(self) -> str:
        text = (f"wrote {self.rows:,} rows ({self.row_groups} row group(s)) to {self.output} "
                f"in {self.seconds:.1f} s")
        bad = sum(self.bad_lines.values())
        reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(self.bad_lines.items()))
        text += f"; bad lines: {bad:,}" + (f" ({reasons}) in {self.rejected}" if bad else "")
        text += f"; lines with invalid UTF-8 (replaced): {self.invalid_utf8_lines:,}"
        return text + (f"; blank lines skipped: {self.blank_lines:,}" if self.blank_lines else "")


class _Bad(Exception):
    """One line's parse failure; its message is the reason (counted as is)."""


def _int(value: str, name: str, kind: pa.DataType) -> int:
    if not _INT.match(value) or not -_INT_RANGE[kind] <= int(value) < _INT_RANGE[kind]:
        raise _Bad(f"{name} not an {kind}")
    return int(value)


def _parse(fmt: TextFormat, fields: list[str], int_ids: bool) -> list:
    if len(fields) != fmt.fields:
        raise _Bad("wrong number of fields")
    values: list = []
    for name, index, kind in fmt.columns:
        value = fields[index]
        if kind == "id":
            if not value:
                raise _Bad(f"empty {name}")
            values.append(_int(value, name, pa.int64()) if int_ids else value)
        elif kind == "int32":
            values.append(_int(value, name, pa.int32()))
        elif kind == "float64":
            try:
                values.append(float(value))
            except ValueError:
                raise _Bad(f"{name} not a number") from None
        else:
            values.append(value)
    return values


def _decode(blob: bytes, terminated: bool) -> tuple[list[str], int]:
    """(lines, how many had invalid UTF-8) of newline-separated bytes."""
    try:
        lines, invalid = blob.decode("utf-8").split("\n"), 0
    except UnicodeDecodeError:
        lines, invalid = [], 0
        for raw in blob.split(b"\n"):
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                lines.append(raw.decode("utf-8", errors="replace"))
                invalid += 1
    if terminated and b"\r" in blob:  # each line ended "\n": drop a "\r" before it
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    return lines, invalid


def _chunks(stream, read_bytes: int) -> Iterator[tuple[list[str], int, int]]:
    """(lines, lines with invalid UTF-8, bytes) for each run of whole lines read."""
    rest, first = b"", True
    while True:
        data = stream.read(read_bytes)
        if first and data.startswith(_BOM):
            data = data[len(_BOM):]
        first = False
        if not data:
            break
        data = rest + data
        cut = data.rfind(b"\n")
        if cut < 0:
            rest = data
            continue
        rest = data[cut + 1:]
        yield (*_decode(data[:cut], True), cut + 1)
    if rest:
        yield (*_decode(rest, False), len(rest))


@contextlib.contextmanager
def _open(fs: pafs.FileSystem, path: str) -> Iterator[Any]:
    """A binary stream of a file, unpacked by extension (.gz .bz2 .zst .lz4 .xz)."""
    xz = path.endswith(".xz")
    with fs.open_input_stream(path, compression=None if xz else "detect") as raw:
        with (lzma.open(raw, "rb") if xz else contextlib.nullcontext(raw)) as stream:
            yield stream


def read_text(fs: pafs.FileSystem, path: str, fmt: str, *, uri: Optional[str] = None,
              int_ids: bool = False, max_bad_lines: int = 0, block_rows: int = 65536,
              block_bytes: int = 32 << 20, stats: Optional[ConvertStats] = None
              ) -> Iterator[tuple[pa.Table, pa.Table]]:
    """Blocks of (rows, rejected lines) of a text file in format `fmt`.

    A block holds at most `block_rows` rows, or the rows of about `block_bytes`
    of input. Blank lines are skipped (counted). With `max_bad_lines` 0 the first
    bad line raises BadLineError naming `uri`, the line and the reason; otherwise
    bad lines come back as rejected rows until there are more than `max_bad_lines`.
    """
    spec, uri, stats = FORMATS[fmt], uri or path, stats if stats is not None else ConvertStats()
    schema = spec.schema(int_ids)
    rows: list[list] = []
    rejected: list[tuple[int, str, str]] = []
    number = size = 0

    def block() -> tuple[pa.Table, pa.Table]:
        columns = list(zip(*rows)) if rows else [[] for _ in schema]
        table = pa.Table.from_arrays([pa.array(c, f.type) for c, f in zip(columns, schema)],
                                     schema=schema)
        return table, pa.Table.from_pylist(
            [dict(zip(REJECTED_SCHEMA.names, r)) for r in rejected], REJECTED_SCHEMA)

    with _open(fs, path) as stream:
        for lines, invalid, nbytes in _chunks(stream, min(READ_BYTES, block_bytes)):
            stats.invalid_utf8_lines += invalid
            for line in lines:
                number += 1
                fields = line.split(spec.sep, spec.fields - 1) if spec.sep else line.split()
                if not line or not fields:
                    stats.blank_lines += 1
                    continue
                try:
                    rows.append(_parse(spec, fields, int_ids))
                except _Bad as bad:
                    reason = str(bad)
                    stats.bad_lines[reason] += 1
                    shown = line.replace("\t", "<TAB>")
                    shown = shown if len(shown) <= 80 else shown[:77] + "..."
                    where = f"{uri}, line {number}: expected '{spec.layout}', got " \
                            f"'{shown}' ({reason})"
                    if max_bad_lines == 0:
                        raise BadLineError(where) from None
                    if sum(stats.bad_lines.values()) > max_bad_lines:
                        raise BadLineError(f"more than {max_bad_lines} bad lines (raise "
                                           f"--max-bad-lines to accept more); {where}") from None
                    rejected.append((number, line, reason))
                if len(rows) >= block_rows:
                    yield block()
                    rows, rejected, size = [], [], 0
            size += nbytes
            if size >= block_bytes:
                yield block()
                rows, rejected, size = [], [], 0
    if rows or rejected:
        yield block()
    if stats.invalid_utf8_lines:
        log.warning("%s: %d line(s) held invalid UTF-8, replaced with U+FFFD", uri,
                    stats.invalid_utf8_lines)


def rejected_path(output: str) -> str:
    """Where a conversion's bad lines go: `_<name>.rejected.parquet` beside the output.

    The leading `_` keeps pyarrow, pandas and Ray from reading it as data of the folder.
    """
    folder, slash, name = output.rpartition("/")
    stem = name[:-len(".parquet")] if name.endswith(".parquet") else name
    return f"{folder}{slash}_{stem}.rejected.parquet"


def _check_paths(fmt: str, source: str, target: str, max_bad_lines: int
                 ) -> tuple[pafs.FileSystem, str, pafs.FileSystem, str]:
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if max_bad_lines < 0:
        raise ConfigError(f"--max-bad-lines must be 0 or more, not {max_bad_lines}")
    in_fs, in_path = fsio.resolve(source)
    kind = in_fs.get_file_info(in_path).type
    if kind == pafs.FileType.NotFound:
        raise ConfigError(f"input '{source}' does not exist")
    if kind != pafs.FileType.File:
        raise ConfigError(f"input '{source}' is not a file")
    fs, path = fsio.resolve(target)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        raise ConfigError(f"output '{target}' is a folder; name the Parquet file to write, "
                          f"e.g. {fsio.join(target, fmt + '.parquet')}")
    if fsio.is_local(fs) and fsio.is_local(in_fs) and path == in_path:
        raise ConfigError(f"output '{target}' is the input; name another file")
    return in_fs, in_path, fs, path


def convert(fmt: str, source: str, target: str, *, int_ids: bool = False,
            max_bad_lines: int = 0, block_rows: int = 65536,
            block_bytes: int = 32 << 20) -> ConvertStats:
    """Convert the text file `source` in format `fmt` to the Parquet file `target`.

    Rows are written as they are read, one row group per block (see `read_text`),
    zstd-compressed. Bad lines go to `rejected_path(target)` when `max_bad_lines`
    allows them. A failed conversion leaves neither file behind (a stale rejected
    file of an earlier run is removed when this run has no bad lines).
    """
    start = time.monotonic()
    in_fs, in_path, fs, path = _check_paths(fmt, source, target, max_bad_lines)
    stats = ConvertStats(output=target, rejected=rejected_path(target))
    finals = {"rows": path, "rejected": rejected_path(path)}
    temps = {key: fsio.temp_path(fs, final) for key, final in finals.items()}
    schemas = {"rows": FORMATS[fmt].schema(int_ids), "rejected": REJECTED_SCHEMA}
    writers: dict[str, pq.ParquetWriter] = {}

    def write(key: str, table: pa.Table) -> None:
        if key not in writers:  # the rows' writer opens first: no rows still gives a schema
            writers[key] = pq.ParquetWriter(temps[key], schemas[key], filesystem=fs,
                                            compression="zstd")
        if table.num_rows:
            writers[key].write_table(table, row_group_size=table.num_rows)

    fs.create_dir(path.rpartition("/")[0], recursive=True)
    try:
        write("rows", schemas["rows"].empty_table())
        for rows, rejected in read_text(in_fs, in_path, fmt, uri=source, int_ids=int_ids,
                                        max_bad_lines=max_bad_lines, block_rows=block_rows,
                                        block_bytes=block_bytes, stats=stats):
            if rows.num_rows:
                write("rows", rows)
                stats.rows += rows.num_rows
                stats.row_groups += 1
            if rejected.num_rows:
                write("rejected", rejected)
        for writer in writers.values():
            writer.close()
    except BaseException:
        for key, writer in writers.items():
            try:
                writer.close()
                fs.delete_file(temps[key])
            except Exception:  # cleanup is best effort; the first error is the one to see
                log.debug("could not remove %s", temps[key], exc_info=True)
        raise
    if "rejected" not in writers and fsio.exists(fs, finals["rejected"]):
        fs.delete_file(finals["rejected"])  # from an earlier run: no longer true
    for key in ("rejected", "rows"):  # the output appears last
        if key in writers and temps[key] != finals[key]:
            fs.move(temps[key], finals[key])
    stats.seconds = time.monotonic() - start
    stats.rejected = stats.rejected if "rejected" in writers else None
    return stats
