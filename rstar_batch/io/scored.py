"""Scored rows between the two passes: the pass-1 sink and the pass-2 source.

`WriteRuns` ends pass 1: it splits a batch into runs (contiguous rows of one
chunk, or, for score-corpus's top-K rows, the run each row names), writes each
run's rows as one piece per bucket, then commits the run.
Piece and commit names depend only on the rows they hold, so a retried batch
overwrites its own files. `bucket_pieces` and `read_bucket` give pass 2 the
committed rows of one bucket, each physical input row once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch import checkpoint
from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.ids import fill_null_ids
from rstar_batch.base.runs import named_runs, split_runs

# One row per committed run: what WriteRuns returns and the driver counts.
COMMITS = pa.schema([("chunk", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),
                     ("scored", pa.int64()), ("node", pa.string())])


def bucket_dir(root: str, bucket: int) -> str:
    return fsio.join(checkpoint.scored_dir(root), f"b{bucket:05d}")


class WriteRuns:
    """`map_batches` function ending pass 1; returns one row per committed run."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, run: int) -> None:
        self.filesystem = filesystem
        self.root = root
        self.run = run

    def __call__(self, batch: pa.Table) -> pa.Table:
        chunks = batch[C.CHUNK].to_numpy()
        rows = batch[C.ROW].to_numpy()
        buckets = batch[C.BUCKET].to_numpy()
        named = C.RUN_END in batch.column_names
        runs = (named_runs(chunks, batch[C.RUN_START].to_numpy(), batch[C.RUN_END].to_numpy())
                if named else split_runs(chunks, rows))
        data = batch.drop_columns([c for c in (C.BUCKET, C.RUN_START, C.RUN_END, C.NODE)
                                   if c in batch.column_names])
        nodes = batch[C.NODE] if C.NODE in batch.column_names else None
        unscored = pc.is_valid(batch[C.REJECT]).to_numpy(zero_copy_only=False)
        done = {"chunk": [], "start": [], "end": [], "scored": [], "node": []}
        for chunk, start, end, index in runs:
            name = checkpoint.run_name(chunk, start, end)
            for bucket in np.unique(buckets[index]):
                part = index[buckets[index] == bucket]
                fsio.write_table(self.filesystem,
                                 fsio.join(bucket_dir(self.root, int(bucket)), name + ".parquet"),
                                 data.take(pa.array(part)))
            checkpoint.write_commit(self.filesystem, self.root, chunk, start, end, self.run)
            done["chunk"].append(chunk)
            done["start"].append(start)
            done["end"].append(end)
            done["scored"].append(int(len(index) - np.count_nonzero(unscored[index])))
            done["node"].append(None if nodes is None else nodes[int(index[0])].as_py())
        return pa.table(done, schema=COMMITS)


def bucket_pieces(fs: pafs.FileSystem, root: str, committed: set[str]) -> dict[int, list[str]]:
    """Committed piece files of every bucket, from one listing of the scored folder."""
    buckets: dict[int, list[str]] = {}
    for info in fsio.list_files(fs, checkpoint.scored_dir(root)):
        folder, name = info.path.rsplit("/", 2)[-2:]
        if folder.startswith("b") and name.removesuffix(".parquet") in committed:
            buckets.setdefault(int(folder[1:]), []).append(info.path)
    return {b: sorted(files) for b, files in sorted(buckets.items())}


def read_bucket(fs: pafs.FileSystem, files: list[str]) -> pa.Table:
    """A bucket's scored rows in input order, each (chunk, row, query) once even if
    two runs overlapped (score-corpus has a row per query for each corpus row)."""
    table = pq.read_table(files, filesystem=fs)
    qids = fill_null_ids(table[C.QUERY_ID])
    query = pc.dictionary_encode(qids.combine_chunks()).indices.to_numpy()
    chunk, row = table[C.CHUNK].to_numpy(), table[C.ROW].to_numpy()
    order = np.lexsort((query, row, chunk))  # input order
    same = np.zeros(len(order), dtype=bool)
    same[1:] = ((chunk[order][1:] == chunk[order][:-1]) & (row[order][1:] == row[order][:-1])
                & (query[order][1:] == query[order][:-1]))
    return table.take(pa.array(order[~same]))


def mark_duplicates(table: pa.Table) -> pa.Table:
    """Give every repeat of a (query_id, doc_id) pair the reason `duplicate_pair`.

    The first occurrence in input order stays; `table` must be in input order.
    """
    valid = pc.is_null(table[C.REJECT])
    keyed = table.select([C.QUERY_ID, C.DOC_ID]).append_column(
        "_pos", pa.array(np.arange(table.num_rows))).filter(valid)
    firsts = keyed.group_by([C.QUERY_ID, C.DOC_ID]).aggregate([("_pos", "min")])
    if firsts.num_rows == keyed.num_rows:
        return table
    repeat = valid.to_numpy(zero_copy_only=False).copy()
    repeat[firsts["_pos_min"].to_numpy()] = False
    reason = pc.if_else(pa.array(repeat), pa.scalar(C.DUPLICATE_PAIR), table[C.REJECT])
    return table.set_column(table.schema.get_field_index(C.REJECT), C.REJECT, reason)
