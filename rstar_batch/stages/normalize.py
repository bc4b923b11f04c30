"""Normalize: map the user's column names to internal ones, flag unscorable rows.

Rows with a null id or text are never scored and never dropped: they get a
reason in the `_reject` column and travel on to the rejected-rows table.
Each row also gets the bucket (output file) its query belongs to.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C
from rstar_batch.base.columns import PREPARE_REASON
from rstar_batch.base.ids import id_buckets
from rstar_batch.base.pair_keys import id_keys, text_keys
from rstar_batch.config import Columns
from rstar_batch.stages.contract import Stage


class Normalize(Stage):
    """Rename the four input columns, keep the listed ones, add reason and bucket (and,
    `keyed`, each scorable pair's score-cache key: base/pair_keys.py)."""

    writes = (C.QUERY_ID, C.QUERY, C.DOC_ID, C.PASSAGE, C.REJECT, C.BUCKET)

    def __init__(self, columns: Columns, num_buckets: int, keyed: bool = False) -> None:
        self.mapping = {columns.query_id: C.QUERY_ID, columns.query: C.QUERY,
                        columns.doc_id: C.DOC_ID, columns.passage: C.PASSAGE}
        self.keep = list(columns.keep)
        self.reads = (*self.mapping, *self.keep)
        self.num_buckets = num_buckets
        self.keyed = keyed
        if keyed:
            self.writes = (*Normalize.writes, C.PAIR_KEY)

    def process(self, batch: pa.Table) -> pa.Table:
        cols = {new: batch[old] for old, new in self.mapping.items()}
        # Joined with a tokenized corpus: the passage is its ids, and its text is null.
        ids = {k: batch[k] for k in (C.PASSAGE_IDS, C.EMPTY_PASSAGE) if k in batch.column_names}
        given = {**cols, C.PASSAGE: ids.get(C.PASSAGE_IDS, cols[C.PASSAGE])}
        # A reason found before (a text missing from the corpus or queries) stands.
        reason = batch[PREPARE_REASON] if PREPARE_REASON in batch.column_names else pa.nulls(
            batch.num_rows, pa.string())
        # Later checks win, so the first missing field (ids before texts) is named.
        for column, why in [(C.PASSAGE, C.NULL_PASSAGE), (C.QUERY, C.NULL_QUERY),
                            (C.DOC_ID, C.NULL_DOC_ID), (C.QUERY_ID, C.NULL_QUERY_ID)]:
            found = pc.is_null(given[column])
            if PREPARE_REASON in batch.column_names:
                found = pc.and_(found, pc.is_null(batch[PREPARE_REASON]))
            reason = pc.if_else(found, pa.scalar(why), reason)
        buckets = id_buckets(cols[C.QUERY_ID], self.num_buckets)
        tags = {k: batch[k] for k in (C.CHUNK, C.ROW, C.INPUT_ROW) if k in batch.column_names}
        out = {**tags, **cols, **ids, **{k: batch[k] for k in self.keep},
               C.REJECT: reason, C.BUCKET: pa.array(buckets, pa.int32())}
        if self.keyed:
            out[C.PAIR_KEY] = _keys(cols[C.QUERY], cols[C.PASSAGE], ids, reason)
        return pa.table(out)


def _keys(queries: pa.ChunkedArray, passages: pa.ChunkedArray, ids: dict,
          reason: pa.Array) -> pa.Array:
    """Each scorable row's pair key (null for rows with a reason)."""
    scorable = pc.is_null(reason)
    keys = (id_keys(queries, ids[C.PASSAGE_IDS], ids.get(C.EMPTY_PASSAGE))
            if C.PASSAGE_IDS in ids else text_keys(queries, passages))
    return pc.if_else(scorable, keys, pa.scalar(None, keys.type))


class NormalizePassages(Stage):
    """score-corpus: rename a corpus's id and passage columns, flag unscorable rows."""

    writes = (C.CHUNK, C.ROW, C.DOC_ID, C.PASSAGE, C.REJECT)

    def __init__(self, columns: Columns) -> None:
        self.mapping = {columns.doc_id: C.DOC_ID, columns.passage: C.PASSAGE}
        self.keep = list(columns.keep)
        self.reads = (C.CHUNK, C.ROW, *self.mapping, *self.keep)

    def process(self, batch: pa.Table) -> pa.Table:
        reason = pa.nulls(batch.num_rows, pa.string())
        for old, why in [(self._old(C.PASSAGE), C.NULL_PASSAGE),
                         (self._old(C.DOC_ID), C.NULL_DOC_ID)]:
            reason = pc.if_else(pc.is_null(batch[old]), pa.scalar(why), reason)
        return pa.table({C.CHUNK: batch[C.CHUNK], C.ROW: batch[C.ROW],
                         **{new: batch[old] for old, new in self.mapping.items()},
                         **{k: batch[k] for k in self.keep}, C.REJECT: reason})

    def _old(self, new: str) -> str:
        return next(old for old, n in self.mapping.items() if n == new)
