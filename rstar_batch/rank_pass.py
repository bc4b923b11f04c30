"""Pass 2: each bucket's committed rows read, ranked per query, written.

A bucket holds every row of its queries, so ranking it needs nothing from any
other, and its file's name depends only on the bucket. Ray tasks take consecutive
buckets, a few tasks per CPU: a task reads its buckets' rows with one ranged GET
per pack that holds any (packs keep buckets in order), so the requests are
tasks × packs, not buckets × packs. The commit log says where the rows lie; the
scored rows are never listed.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.pair_keys import KEY_TYPE
from rstar_batch.cache.store import ScoreCache
from rstar_batch.config import RerankConfig
from rstar_batch.faults import FaultHook
from rstar_batch.io.scored import mark_duplicates, once_each, read_buckets
from rstar_batch.io.sinks import ranked_name
from rstar_batch.progress import checkpoint
from rstar_batch.progress.log import Progress, Segment
from rstar_batch.stages.rank import rank_table, rejected_table

# Rank tasks per logical CPU of the cluster: enough to keep every CPU busy while a
# slow task finishes, few enough that each reads few ranged GETs per pack.
TASKS_PER_CPU = 2
# Rows one task holds at most (the buckets' rows, read together): ~100 bytes a row.
TASK_ROWS = 4_000_000
# Rows below which another task costs more than it saves: each is a worker process that
# imports pyarrow and this package (~1 s on a busy core) to rank what one task ranks
# in a fraction of that. A 1,200-pair job ranked in 4 tasks, now in 1.
MIN_TASK_ROWS = 250_000
# Buckets a task ranks and writes at once: on object storage each file is a few requests
# of 20-100 ms, and one after another they were most of the rank pass (50 buckets, 50 ms
# a request: 3.5 s against 0.4 s on local disk).
WRITERS = 8

Reads = list[tuple[str, list[Segment]]]


def plan_tasks(progress: Progress, cpus: float) -> list[tuple[list[int], Reads]]:
    """Consecutive buckets per task, each task with the pack segments it reads."""
    by_bucket = progress.segments_by_bucket()
    if not by_bucket:
        return []
    rows = sum(s.rows for found in by_bucket.values() for _, s in found)
    spread = min(int(cpus * TASKS_PER_CPU), math.ceil(rows / MIN_TASK_ROWS))
    tasks = max(1, min(len(by_bucket), max(spread, math.ceil(rows / TASK_ROWS))))
    buckets = list(by_bucket)
    per = math.ceil(len(buckets) / tasks)
    plan = []
    for i in range(0, len(buckets), per):
        mine = buckets[i:i + per]
        packs: dict[str, list[Segment]] = {}
        for bucket in mine:
            for data, segment in by_bucket[bucket]:
                packs.setdefault(data, []).append(segment)
        plan.append((mine, sorted(packs.items())))
    return plan


def rank_all(fs: Any, root: str, config: RerankConfig, progress: Progress,
             stopping: Callable[[], bool] = lambda: False,
             cache: Optional["CacheAdd"] = None) -> list[dict]:
    """Pass 2: ranked files and rejected rows of every bucket; their counts. Returns
    early (with what is done) once `stopping()`: a rerun ranks again. With `cache`,
    each task also writes its buckets' scored pairs as a pack of score-cache entries
    (in the first of its parts' counts, `cache_pack`)."""
    import ray

    task = ray.remote(num_cpus=1)(rank_buckets)
    cpus = ray.cluster_resources().get("CPU", 1.0)
    refs = [task.remote(fs, root, reads, config.keep_columns, config.top_k, cache)
            for _, reads in plan_tasks(progress, cpus)]
    FaultHook.from_env().at_phase("rank_pass")
    waiting = list(refs)
    while waiting and not stopping():
        _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
    return [] if waiting else [part for parts in ray.get(refs) for part in parts]


@dataclasses.dataclass(frozen=True)
class CacheAdd:
    """Where the rank pass writes score-cache entries: the cache, the job's name for its
    packs, and the time they were used (the job's start)."""

    cache: ScoreCache
    name: str
    used: int


def rank_buckets(fs: pafs.FileSystem, root: str, reads: Reads, keep: list[str],
                 top_k: Optional[int], cache: Optional[CacheAdd] = None) -> list[dict]:
    """Rank some buckets' committed rows into their output files, WRITERS at a time;
    their counts."""
    FaultHook.from_env().before_rank()
    buckets = sorted(read_buckets(fs, root, reads).items())
    with ThreadPoolExecutor(max_workers=max(1, min(WRITERS, len(buckets)))) as pool:
        parts = list(pool.map(lambda item: rank_bucket(fs, root, *item, keep, top_k),
                              buckets))
    entries = [e for e in (part.pop("entries", None) for part in parts) if e is not None]
    if cache is not None and parts:
        table = pa.concat_tables(entries) if entries else pa.table(
            {"key": pa.array([], KEY_TYPE), "score": pa.array([], pa.float32())})
        table = table.append_column("used", pa.array(np.full(table.num_rows, cache.used),
                                                     pa.int64()))
        parts[0]["cache_pack"] = cache.cache.write_pack(
            f"{cache.name}-b{buckets[0][0]:05d}", table)
    return parts


def rank_bucket(fs: pafs.FileSystem, root: str, bucket: int, table: Any, keep: list[str],
                top_k: Optional[int]) -> dict:
    """Rank one bucket's scored rows into its output file; return its counts.

    The file name depends only on the bucket, so running this twice writes the
    same file twice rather than a duplicate.
    """
    table = mark_duplicates(once_each(table)).drop_columns([C.CHUNK, C.ROW])
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
    counts = {
        "rows": table.num_rows, "scored": valid.num_rows, "written": ranked.num_rows,
        "queries": len(pc.unique(valid[C.QUERY_ID])), "rejected": reasons,
    }
    if C.PAIR_KEY in valid.column_names:  # a job with a score cache: its entries
        keyed = valid.filter(pc.is_valid(valid[C.PAIR_KEY]))
        counts["entries"] = pa.table({"key": keyed[C.PAIR_KEY], "score": keyed[C.SCORE]})
    if C.REUSED in valid.column_names:
        counts["reused"] = int(pc.sum(pc.fill_null(valid[C.REUSED], False)).as_py() or 0)
    return counts
