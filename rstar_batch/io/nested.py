"""Nested candidates: one row per query with a list<struct<doc_id, passage, ...>>.

RAG pipelines emit a query row holding its retrieved candidates. The list
column is found from the schema (or named with --nested-column), checked, and
flattened by a Ray Data pass into ordinary candidate Parquet under
`_work/prepared/` (finished by `_DONE`), which the checkpointed scoring pass
reads like any input. Kept columns may be fields of the struct (a first-stage
score or rank) or top-level columns of the query row.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from rstar_batch.base import fs as fsio
from rstar_batch.config import Columns
from rstar_batch.io.sources import CandidateFiles, InputError, is_id_type, is_text_type
from rstar_batch.progress import checkpoint


def _struct_fields(t: pa.DataType) -> Optional[pa.StructType]:
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_struct(t.value_type):
        return t.value_type
    return None


def find_nested_column(schema: pa.Schema, path: str, doc_id: str,
                       declared: Optional[str]) -> Optional[str]:
    """The list<struct> column holding the candidates, or None for flat input."""
    if declared:
        if declared not in schema.names or _struct_fields(schema.field(declared).type) is None:
            raise InputError(f"nested_column '{declared}' in candidates file '{path}' is not a "
                             "list<struct> column")
        return declared
    if doc_id in schema.names:
        return None
    found = [f.name for f in schema if (s := _struct_fields(f.type)) is not None
             and s.get_field_index(doc_id) >= 0]
    if len(found) > 1:
        raise InputError(f"candidates file '{path}' has several list<struct> columns with "
                         f"'{doc_id}' ({', '.join(found)}); name one with --nested-column")
    return found[0] if found else None


def check_nested(path: str, schema: pa.Schema, column: str, columns: Columns) -> None:
    """The struct must hold the doc id and passage; kept columns must exist somewhere."""
    struct = _struct_fields(schema.field(column).type)
    for name, ok, kind in [(columns.doc_id, is_id_type, "an integer or string"),
                           (columns.passage, is_text_type, "a string")]:
        at = struct.get_field_index(name)
        if at < 0:
            raise InputError(f"nested column '{column}' in candidates file '{path}' has no "
                             f"field '{name}' (it has: {', '.join(f.name for f in struct)})")
        if not ok(struct.field(at).type):
            raise InputError(f"field '{name}' of nested column '{column}' in '{path}' is "
                             f"{struct.field(at).type}; it must be {kind}")
    for name in columns.keep:
        if struct.get_field_index(name) < 0 and name not in schema.names:
            raise InputError(f"keep column '{name}' is neither a field of '{column}' nor a "
                             f"column of candidates file '{path}'")


class Flatten:
    """`map_batches` function: one output row per candidate of each query row."""

    def __init__(self, column: str, columns: Columns) -> None:
        self.column, self.query_id, self.query = column, columns.query_id, columns.query
        self.doc_id, self.passage, self.keep = columns.doc_id, columns.passage, columns.keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        lists = batch[self.column].combine_chunks()
        parents = pc.list_parent_indices(lists)
        items = pc.list_flatten(lists)
        out = {self.query_id: batch[self.query_id].take(parents),
               self.query: batch[self.query].take(parents),
               self.doc_id: pc.struct_field(items, self.doc_id),
               self.passage: pc.struct_field(items, self.passage)}
        for name in self.keep:
            if name in out:
                continue
            if items.type.get_field_index(name) >= 0:
                out[name] = pc.struct_field(items, name)
            else:
                out[name] = batch[name].take(parents)
        return pa.table(out)


def prepare_nested(source: CandidateFiles, flatten: Flatten, fs: pafs.FileSystem,
                   root: str) -> None:
    """Write the flattened candidates under `_work/prepared/` once per job."""
    import ray.data

    out = checkpoint.prepared_dir(root)
    done = fsio.join(out, "_DONE")
    if fsio.exists(fs, done):
        return
    fsio.delete(fs, out)
    ds = ray.data.read_parquet(source.paths, filesystem=source.filesystem)
    ds.select_columns(source.schema.names).map_batches(flatten, batch_format="pyarrow") \
        .write_parquet(out, filesystem=fs)
    fsio.write_bytes(fs, done, b"")
