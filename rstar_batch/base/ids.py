"""Ids hashed and bucketed the same way in every process and run: a query's bucket
decides its output file, a document's its join partition."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc


def fill_null_ids(ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Null ids as 0 or "" (by type), for hashing and grouping: a row with a null id
    is rejected, yet it still needs a bucket."""
    if not ids.null_count:
        return ids
    return pc.fill_null(ids, pa.scalar(0 if pa.types.is_integer(ids.type) else "", ids.type))


def stable_hash(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A 64-bit hash per id, the same in every process and run; a null hashes as
    0 or "" does."""
    values = fill_null_ids(ids).to_numpy(zero_copy_only=False)
    values = values.astype(np.int64) if values.dtype.kind in "iu" else values.astype(object)
    return pd.util.hash_array(values, categorize=False)


def id_buckets(ids: pa.ChunkedArray | pa.Array, num_buckets: int) -> np.ndarray:
    """A stable bucket per id (of a query: its output file; of a document: its join
    partition), the same in every process and run."""
    if num_buckets == 1:
        return np.zeros(len(ids), dtype=np.int32)
    return (stable_hash(ids) % np.uint64(num_buckets)).astype(np.int32)

