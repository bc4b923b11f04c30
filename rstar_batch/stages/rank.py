"""Rank: order each query's scored passages and number them 1..n.

The ranking rule is base/order.py's: score descending, ties broken by doc_id
ascending, so two runs rank identically, and scores are never changed.
Rows arrive whole per query (one bucket holds every row of its queries), so ranking
a bucket needs nothing from any other.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C
from rstar_batch.base.order import group_starts, positions_in_groups, rank_order


def rank_table(scored: pa.Table, keep: list[str], top_k: Optional[int] = None) -> pa.Table:
    """Ranked output rows: query_id, doc_id, score, rank, then the kept columns.

    Queries appear in ascending id order; within a query rank 1 is the best.
    """
    if scored.num_rows == 0:
        return _empty_output(scored, keep)
    ordered = scored.take(rank_order(scored, [C.QUERY_ID]))
    starts = group_starts(ordered[C.QUERY_ID].combine_chunks())
    rank = (positions_in_groups(starts) + 1).astype(np.int32)
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
