"""The ranking order, written once: score descending, ties broken by doc_id ascending.

rerank's rank pass, score-corpus's per-block top K and the TREC export all sort by
it, so the two jobs cannot order ties differently; scores are never changed.
"""

from __future__ import annotations

from typing import Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C

# Within a query (or any group of rows), the order of the ranking.
RANK_KEYS = [(C.SCORE, "descending"), (C.DOC_ID, "ascending")]


def rank_order(table: pa.Table, groups: list[str]) -> np.ndarray:
    """Row order of `table`: by the `groups` columns ascending, then RANK_KEYS."""
    keys = [(name, "ascending") for name in groups] + RANK_KEYS
    return pc.sort_indices(table, sort_keys=keys).to_numpy()


def group_starts(*keys: Union[pa.Array, np.ndarray]) -> np.ndarray:
    """True where a row starts a new group: rows sorted by `keys`, a group equal in all."""
    n = len(keys[0])
    starts = np.zeros(n, dtype=bool)
    starts[:1] = True
    if n > 1:
        for key in keys:
            if isinstance(key, np.ndarray):
                starts[1:] |= key[1:] != key[:-1]
            else:
                starts[1:] |= pc.not_equal(key[1:], key[:-1]).to_numpy(zero_copy_only=False)
    return starts


def positions_in_groups(starts: np.ndarray) -> np.ndarray:
    """Each row's 0-based position within its group (`group_starts`)."""
    position = np.arange(len(starts))
    return position - np.maximum.accumulate(np.where(starts, position, 0))
