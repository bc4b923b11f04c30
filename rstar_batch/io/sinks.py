"""The output folder's layout.

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


def ranked_name(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"
