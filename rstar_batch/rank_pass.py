"""Pass 2: per bucket, the committed scored rows read, ranked per query, written.

One Ray task per bucket: a bucket holds every row of its queries, so ranking it
needs nothing from any other, and its file's name depends only on the bucket.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pyarrow.compute as pc
import pyarrow.fs as pafs

from rstar_batch import checkpoint
from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.config import RerankConfig
from rstar_batch.faults import FaultHook
from rstar_batch.io.scored import bucket_pieces, mark_duplicates, read_bucket
from rstar_batch.io.sinks import ranked_name
from rstar_batch.stages.rank import rank_table, rejected_table


def rank_all(fs: Any, root: str, config: RerankConfig, progress: checkpoint.Progress,
             stopping: Callable[[], bool] = lambda: False) -> list[dict]:
    """Pass 2: one task per bucket; each writes its ranked file and rejected rows.
    Returns early (with what is done) once `stopping()`: a rerun ranks again."""
    import ray

    committed = {checkpoint.run_name(chunk, start, end)
                 for chunk, ranges in progress.covered.items() for start, end in ranges}
    task = ray.remote(num_cpus=1)(rank_bucket)
    refs = [task.remote(fs, root, bucket, files, config.keep_columns, config.top_k)
            for bucket, files in bucket_pieces(fs, root, committed).items()]
    waiting = list(refs)
    while waiting and not stopping():
        _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
    return [] if waiting else ray.get(refs)


def rank_bucket(fs: pafs.FileSystem, root: str, bucket: int, files: list[str],
                keep: list[str], top_k: Optional[int]) -> dict:
    """Rank one bucket's scored rows into its output file; return its counts.

    The file name depends only on the bucket, so running this twice writes the
    same file twice rather than a duplicate.
    """
    FaultHook.from_env().before_rank()
    table = mark_duplicates(read_bucket(fs, files)).drop_columns([C.CHUNK, C.ROW])
    rejected = pc.is_valid(table[C.REJECT])
    valid = table.filter(pc.invert(rejected))
    ranked = rank_table(valid, keep, top_k)
    fsio.write_table(fs, fsio.join(root, ranked_name(bucket)), ranked)
    bad = table.filter(rejected)
    reasons: dict[str, int] = {}
    if bad.num_rows:
        fsio.write_table(fs, fsio.join(root, checkpoint.REJECTED, ranked_name(bucket)),
                         rejected_table(bad, keep))
        for row in pc.value_counts(bad[C.REJECT]).to_pylist():
            reasons[row["values"]] = row["counts"]
    return {
        "rows": table.num_rows, "scored": valid.num_rows, "written": ranked.num_rows,
        "queries": len(pc.unique(valid[C.QUERY_ID])), "rejected": reasons,
    }
