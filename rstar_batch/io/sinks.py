"""The output folder's layout and the rank pass's files.

    OUTPUT/
      part-00000.parquet …   ranked rows; every row of a query in exactly one file
      _rejected/part-….parquet   rows that were not scored, with a `reason`
      _manifest.json          config, model, input, counts, timings, versions (written last)
      _SUCCESS                written after the manifest; downstream jobs wait for it
      _rstar_batch.json       marks the folder as this tool's (written first)
      _work/                  plan, scored rows and commits between passes (see checkpoint.py)

Bookkeeping names start with '_' so pyarrow, pandas and Spark readers of the
folder skip them and see only the ranked Parquet.
"""

from __future__ import annotations

from typing import Optional

import pyarrow.compute as pc
import pyarrow.fs as pafs

from rstar_batch.io import fs as fsio
from rstar_batch.io.scored import mark_duplicates, read_bucket
from rstar_batch.stages import columns as C
from rstar_batch.stages.rank import rank_table, rejected_table

REJECTED = "_rejected"


def ranked_name(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"


def rank_bucket(fs: pafs.FileSystem, root: str, bucket: int, files: list[str],
                keep: list[str], top_k: Optional[int]) -> dict:
    """Rank one bucket's scored rows into its output file; return its counts.

    The file name depends only on the bucket, so running this twice writes the
    same file twice rather than a duplicate.
    """
    table = mark_duplicates(read_bucket(fs, files)).drop_columns([C.CHUNK, C.ROW])
    rejected = pc.is_valid(table[C.REJECT])
    valid = table.filter(pc.invert(rejected))
    ranked = rank_table(valid, keep, top_k)
    fsio.write_table(fs, fsio.join(root, ranked_name(bucket)), ranked)
    bad = table.filter(rejected)
    reasons: dict[str, int] = {}
    if bad.num_rows:
        fsio.write_table(fs, fsio.join(root, REJECTED, ranked_name(bucket)),
                         rejected_table(bad, keep))
        for row in pc.value_counts(bad[C.REJECT]).to_pylist():
            reasons[row["values"]] = row["counts"]
    return {
        "rows": table.num_rows, "scored": valid.num_rows, "written": ranked.num_rows,
        "queries": len(pc.unique(valid[C.QUERY_ID])), "rejected": reasons,
    }
