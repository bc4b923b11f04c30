"""Rank: order each query's scored passages and number them 1..n.

Ties are broken by doc_id ascending, so two runs rank identically, and scores
are never changed. Rows arrive whole per query (one bucket holds every row of
its queries), so ranking a bucket needs nothing from any other.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.stages import columns as C

OUTPUT_HEAD = ["query_id", "doc_id", "score", "rank"]


def rank_table(scored: pa.Table, keep: list[str], top_k: Optional[int] = None) -> pa.Table:
    """Ranked output rows: query_id, doc_id, score, rank, then the kept columns.

    Queries appear in ascending id order; within a query rank 1 is the best.
    """
    if scored.num_rows == 0:
        return _empty_output(scored, keep)
    order = pc.sort_indices(scored, sort_keys=[(C.QUERY_ID, "ascending"),
                                               (C.SCORE, "descending"),
                                               (C.DOC_ID, "ascending")])
    ordered = scored.take(order)
    qids = ordered[C.QUERY_ID].combine_chunks()
    starts = np.ones(len(qids), dtype=bool)
    if len(qids) > 1:
        starts[1:] = pc.not_equal(qids[1:], qids[:-1]).to_numpy(zero_copy_only=False)
    position = np.arange(len(qids))
    group_start = np.maximum.accumulate(np.where(starts, position, 0))
    rank = (position - group_start + 1).astype(np.int32)
    table = pa.table({
        "query_id": ordered[C.QUERY_ID], "doc_id": ordered[C.DOC_ID],
        "score": ordered[C.SCORE].cast(pa.float32()), "rank": pa.array(rank, pa.int32()),
        **{k: ordered[k] for k in keep},
    })
    if top_k is not None:
        table = table.filter(pc.less_equal(table["rank"], top_k))
    return table


def _empty_output(scored: pa.Table, keep: list[str]) -> pa.Table:
    schema = pa.schema([
        ("query_id", scored.schema.field(C.QUERY_ID).type),
        ("doc_id", scored.schema.field(C.DOC_ID).type),
        ("score", pa.float32()), ("rank", pa.int32()),
        *[scored.schema.field(k) for k in keep],
    ])
    return schema.empty_table()


def rejected_table(rows: pa.Table, keep: list[str]) -> pa.Table:
    """Rows that were not scored, with their reason, under the output's column names."""
    return pa.table({
        "query_id": rows[C.QUERY_ID], "doc_id": rows[C.DOC_ID],
        "query": rows[C.QUERY], "passage": rows[C.PASSAGE], "reason": rows[C.REJECT],
        **{k: rows[k] for k in keep if k not in ("query", "passage", "reason")},
    })
