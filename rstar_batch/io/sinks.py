"""Where results go: the output folder's layout, its guard, the rank pass's files.

    OUTPUT/
      part-00000.parquet …   ranked rows; every row of a query in exactly one file
      _rejected/part-….parquet   rows that were not scored, with a `reason`
      _manifest.json          config, model, counts, timings, versions (written last)
      _SUCCESS                written after the manifest; downstream jobs wait for it
      _rstar_batch.json       marks the folder as this tool's (written first)
      _work/                  scored rows between the two passes (removed on success)

Bookkeeping names start with '_' so pyarrow, pandas and Spark readers of the
folder skip them and see only the ranked Parquet.
"""

from __future__ import annotations

import logging
from typing import Optional

import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.io import fs as fsio
from rstar_batch.stages import columns as C
from rstar_batch.stages.rank import rank_table, rejected_table

log = logging.getLogger(__name__)

MARKER = "_rstar_batch.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
WORK = "_work"
REJECTED = "_rejected"


class OutputError(ValueError):
    """The output location cannot be used as asked."""


def ranked_name(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"


def prepare_output(fs: pafs.FileSystem, root: str, uri: str, overwrite: bool,
                   marker: dict) -> None:
    """Make `root` ready for a new run, refusing to clobber files we did not write."""
    existing = fsio.list_files(fs, root)
    if existing:
        ours = fsio.exists(fs, fsio.join(root, MARKER))
        if not ours and not overwrite:
            sample = ", ".join(i.path.rsplit("/", 1)[-1] for i in existing[:3])
            raise OutputError(
                f"output '{uri}' already holds {len(existing)} file(s) this tool did not "
                f"write (e.g. {sample}); choose an empty folder or pass --overwrite to "
                "delete them")
        log.warning("output '%s': removing %s", uri,
                    "an earlier rstar-batch run" if ours else f"{len(existing)} file(s) "
                    "(--overwrite)")
        fs.delete_dir_contents(root, missing_dir_ok=True)
    fs.create_dir(root, recursive=True)
    fsio.write_json(fs, fsio.join(root, MARKER), marker)


def scored_dir(root: str) -> str:
    return fsio.join(root, WORK, "scored")


def scored_buckets(fs: pafs.FileSystem, root: str) -> dict[int, list[str]]:
    """The scored files of each bucket, from the hive folders `_bucket=N`."""
    buckets: dict[int, list[str]] = {}
    for info in fsio.list_files(fs, scored_dir(root)):
        folder, name = info.path.rsplit("/", 2)[-2:]
        if folder.startswith(f"{C.BUCKET}=") and name.endswith(".parquet"):
            buckets.setdefault(int(folder.split("=", 1)[1]), []).append(info.path)
    return {b: sorted(files) for b, files in sorted(buckets.items())}


def rank_bucket(fs: pafs.FileSystem, root: str, bucket: int, files: list[str],
                keep: list[str], top_k: Optional[int]) -> dict:
    """Rank one bucket's scored rows into its output file; return its counts.

    The file name depends only on the bucket, so running this twice writes the
    same file twice rather than a duplicate.
    """
    table = pq.read_table(files, filesystem=fs)
    table = table.drop_columns([c for c in table.column_names if c == C.BUCKET])
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
