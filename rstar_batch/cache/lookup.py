"""Look every pair up in the score cache before scoring; commit the hits at once.

Once per job, after texts are joined on (or nested rows flattened), in three rounds of
Ray tasks, so that neither the candidates nor the cache is ever gathered on one node:

    1. keys:   a task per group of chunks reads their rows, keys each scorable pair
               (base/pair_keys.py) and writes (key, chunk, row) as one pack sorted by cache
               bucket: _work/cache/keys/gNNNNNN.pack
    2. probe:  a task per range of cache buckets reads those buckets of every key pack
               and of the cache (one ranged GET per pack) and finds the hits: (chunk,
               row, key, score) as one pack sorted by group: _work/cache/hits/
    3. split:  a task per group reads its rows again and its hits, and writes
               - the hits as scored rows, committed as the scoring pass commits them
                 (a pack and a commit record, progress/log.py), and
               - the misses, with their texts, as candidates for the scoring pass:
                 _work/cache/misses/part-NNNNNN.parquet

Each input chunk `c` becomes two: its hits are chunk 2c (committed here), its misses
chunk 2c+1 (scored by pass 1), and every row carries its row in chunk c
(`_input_row`), so the rank pass orders rows as a job without the cache does (the
first of a repeated pair kept, rejected rows in input order). `_work/cache/_DONE`
records the split; a job killed before it does the lookup again from the start.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.pair_keys import key_buckets
from rstar_batch.cache.store import (Record, ScoreCache, consecutive, rows_by_bucket,
                                     segments_of)
from rstar_batch.config import Columns
from rstar_batch.io.read import ReadChunks, plan_read_tasks
from rstar_batch.io.scored import encode_pack, read_segments
from rstar_batch.io.sources import CandidateFiles
from rstar_batch.progress import checkpoint
from rstar_batch.progress import log as commit_log
from rstar_batch.stages.normalize import Normalize

log = logging.getLogger(__name__)

GROUP_ROWS = 2_000_000   # input rows per keys/split task at most (a misses file, a commit)
MIN_GROUP_ROWS = 25_000  # a group's rows at least, when there are enough for two per CPU
# Tasks of a round beyond what the rows ask for (two per CPU) at most: each probe task
# reads every group's key pack and each split task every probe task's hit pack, so
# the requests grow as groups × probe tasks (benchmarks/scale.py: 1e8 pairs on 512
# CPUs made 1,500 × 256 of them, 7,745 requests per million pairs, before this bound).
MAX_SPREAD = 32
PROBE_ROWS = 4_000_000   # keys and cache entries one probe task holds at most
MIN_PROBE_ROWS = 250_000  # below this another probe task costs more than it saves
MISSES_ROW_GROUP = 65_536
WRITER = "cache"          # the commit records' writer name: r0001-cache-000003


def hits_chunk(chunk: int) -> int:
    return 2 * chunk


def misses_chunk(chunk: int) -> int:
    return 2 * chunk + 1


@dataclasses.dataclass(frozen=True)
class Looked:
    """The lookup's result: the misses as candidate files, and the job's chunks."""

    misses: Optional[CandidateFiles]        # None: every pair was a hit
    chunks: list[checkpoint.Chunk]          # hits chunks (file -1) and misses chunks
    pairs: int                              # every input row
    keyed: int                              # rows looked up (scorable)
    hits: int
    records: int                            # cache records read
    skipped: list[str]                      # cache files left out as unreadable


def cache_dir(root: str) -> str:
    return fsio.join(checkpoint.work_dir(root), "cache")


def lookup(cache: ScoreCache, source: CandidateFiles, chunks: list[checkpoint.Chunk],
           columns: Columns, buckets: int, run: int, fs: pafs.FileSystem, root: str,
           cpus: float, skip_bad: bool = False,
           check_stop: Callable[[], None] = lambda: None) -> Looked:
    """Split `source`'s chunks into hits (committed) and misses (to score), once per job.
    `check_stop` is called every half second while tasks run (it raises to stop: a rerun
    does the lookup again)."""
    import ray

    def get(refs: list) -> list:
        waiting = list(refs)
        while waiting:
            _, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=0.5)
            check_stop()
        return ray.get(refs)

    work = cache_dir(root)
    done = fsio.join(work, "_DONE")
    if fsio.exists(fs, done):
        return _from_done(fsio.read_json(fs, done), source, fs)
    # Nothing is committed before the lookup is done: what an interrupted lookup
    # committed is redone whole (the cache may have grown since).
    for folder in (work, commit_log.commits_dir(root),
                   fsio.join(checkpoint.work_dir(root), "scored")):
        fsio.delete(fs, folder)
    records = cache.records(skip_bad=skip_bad)
    groups = _groups(plan_read_tasks(chunks, source.paths, source.row_groups), cpus)
    columns_read = source.schema.names

    started = time.monotonic()
    key_task = ray.remote(num_cpus=1)(write_keys)
    keyed = get([key_task.remote(source.filesystem, columns_read, tasks, columns,
                                     buckets, cache.buckets, fs, _keys_path(work, g))
                     for g, tasks in enumerate(groups)])
    key_packs = [(f"keys/g{g:06d}.pack", segments) for g, (segments, _) in enumerate(keyed)]
    rounds = [time.monotonic() - started]

    group_of = np.zeros(max((c.id for c in chunks), default=-1) + 1, dtype=np.int32)
    for g, tasks in enumerate(groups):
        for task in tasks:
            for entry in task["chunks"]:
                group_of[entry[0]] = g
    probe_task = ray.remote(num_cpus=1)(probe)
    ranges = _probe_ranges(key_packs, cache, records, cpus)
    probed = get([probe_task.remote(cache, cache.reads(records, set(bucket_range)),
                                        fs, work, segments_of(key_packs, set(bucket_range)),
                                        group_of, f"hits/p{i:05d}.pack", skip_bad)
                      for i, bucket_range in enumerate(ranges)])
    hit_packs = [(f"hits/p{i:05d}.pack", segments) for i, (segments, _) in enumerate(probed)]
    skipped = sorted({path for _, bad in probed for path in bad})
    rounds.append(time.monotonic() - started - sum(rounds))

    split_task = ray.remote(num_cpus=1)(split)
    splits = get([split_task.remote(
        source.filesystem, columns_read, tasks, columns, buckets, fs, root, run, g,
        segments_of(hit_packs, {g}), fsio.join(work, "misses", f"part-{g:06d}.parquet"))
        for g, tasks in enumerate(groups)])
    rounds.append(time.monotonic() - started - sum(rounds))
    log.info("score cache lookup: %d groups, %d probe tasks; keys %.2f s, probe %.2f s, "
             "split %.2f s", len(groups), len(ranges), *rounds)
    result = {"chunks": [c for s in splits for c in s["chunks"]],
              "files": [s["file"] for s in splits if s["file"]],
              "keyed": sum(k for _, k in keyed), "records": len(records),
              "skipped_cache_files": skipped}
    for folder in ("keys", "hits"):
        fsio.delete(fs, fsio.join(work, folder))
    fsio.write_json(fs, done, result)
    return _from_done(result, source, fs)


def _from_done(done: dict, source: CandidateFiles, fs: pafs.FileSystem) -> Looked:
    files = done["files"]
    index = {f[0]: i for i, f in enumerate(files)}
    chunks: list[checkpoint.Chunk] = []
    offsets: dict[str, int] = {}
    for chunk, hits, misses, path in done["chunks"]:
        if hits:
            chunks.append(checkpoint.Chunk(hits_chunk(chunk), -1, 0, hits))
        if misses:
            start = offsets.get(path, 0)
            chunks.append(checkpoint.Chunk(misses_chunk(chunk), index[path], start, misses))
            offsets[path] = start + misses
    chunks.sort(key=lambda c: c.id)
    misses = None
    if files:
        misses = CandidateFiles(
            fs, [f[0] for f in files], sum(f[1] for f in files),
            source.schema.append(pa.field(C.INPUT_ROW, pa.int32())),
            sum(f[3] for f in files), [f[1] for f in files],
            [f[2] for f in files], [])
    pairs = sum(c.rows for c in chunks)
    return Looked(misses, chunks, pairs, done["keyed"],
                  sum(c.rows for c in chunks if c.file == -1), done["records"],
                  done.get("skipped_cache_files", []))


def _groups(tasks: list[dict], cpus: float) -> list[list[dict]]:
    """Consecutive read tasks: two groups per CPU (each at least MIN_GROUP_ROWS rows,
    at most MAX_SPREAD of them), or more where a group would pass GROUP_ROWS."""
    sizes = [task["rows"] for task in tasks]
    total = sum(sizes)
    wanted = max(1, min(int(cpus * 2), total // MIN_GROUP_ROWS, MAX_SPREAD),
                 math.ceil(total / GROUP_ROWS))
    return [[tasks[i] for i in run] for run in consecutive(sizes, total / wanted * 1.25)]


def _keys_path(work: str, group: int) -> str:
    return fsio.join(work, "keys", f"g{group:06d}.pack")


def _probe_ranges(key_packs: list, cache: ScoreCache, records: list[Record],
                  cpus: float) -> list[list[int]]:
    """Consecutive cache buckets per probe task, by the keys and entries each holds."""
    keys = rows_by_bucket(key_packs, cache.buckets)
    if not keys.sum():
        return []
    rows = keys + rows_by_bucket([p for r in records for p in r.packs], cache.buckets)
    total = int(rows.sum())
    tasks = max(1, min(int(cpus * 2), math.ceil(total / MIN_PROBE_ROWS), MAX_SPREAD),
                math.ceil(total / PROBE_ROWS))
    return consecutive(rows, total / tasks, most=tasks)


def _read_rows(filesystem: pafs.FileSystem, columns: list[str], tasks: list[dict]
               ) -> list[pa.Table]:
    """The rows of a group's chunks, one table per chunk, tagged with chunk and row."""
    reader = ReadChunks(filesystem, columns)
    return [table for task in tasks for table in reader.read(task)]


def write_keys(filesystem: pafs.FileSystem, columns: list[str], tasks: list[dict],
               roles: Columns, buckets: int, cache_buckets: int, fs: pafs.FileSystem,
               target: str) -> tuple[list[commit_log.Segment], int]:
    """Round 1 for one group: (key, chunk, row) of each scorable row, by cache bucket."""
    normalize = Normalize(roles, buckets, keyed=True)
    pieces = []
    for table in _read_rows(filesystem, columns, tasks):
        rows = normalize(table)
        ok = pc.and_(pc.is_null(rows[C.REJECT]), pc.is_valid(rows[C.PAIR_KEY]))
        rows = rows.filter(ok)
        pieces.append(pa.table({
            "key": rows[C.PAIR_KEY], C.CHUNK: rows[C.CHUNK], C.ROW: rows[C.ROW],
            C.BUCKET: pa.array(key_buckets(rows[C.PAIR_KEY], cache_buckets), pa.int32())}))
    keys = pa.concat_tables(pieces) if pieces else None
    if keys is None or not keys.num_rows:
        return [], 0
    data, segments = encode_pack(keys, ipc=True)
    fsio.write_bytes(fs, target, data)
    return segments, keys.num_rows


def probe(cache: ScoreCache, cache_reads: list, fs: pafs.FileSystem, work: str,
          key_reads: list, group_of: np.ndarray, target: str, skip_bad: bool
          ) -> tuple[list[commit_log.Segment], list[str]]:
    """Round 2 for some cache buckets: the hits among their keys, by group; the cache
    files skipped as unreadable."""
    keys = read_segments(fs, work, key_reads)
    entries, skipped = cache.entries(cache_reads, skip_bad)
    hits = []
    for bucket, table in keys.items():
        found = entries.get(bucket)
        if found is None:
            continue
        at = pc.index_in(table["key"], value_set=found["key"])  # the newest entry of a key
        hit = pc.is_valid(at)
        table = table.filter(hit)
        hits.append(table.append_column(C.SCORE, found["score"].take(at.filter(hit))))
    if not hits:
        return [], skipped
    table = pa.concat_tables(hits)
    table = table.append_column(C.BUCKET, pa.array(
        group_of[table[C.CHUNK].to_numpy()], pa.int32()))
    data, segments = encode_pack(table, ipc=True)
    fsio.write_bytes(fs, fsio.join(work, target), data)
    return segments, skipped


def split(filesystem: pafs.FileSystem, columns: list[str], tasks: list[dict],
          roles: Columns, buckets: int, fs: pafs.FileSystem, root: str, run: int,
          group: int, hit_reads: list, target: str) -> dict:
    """Round 3 for one group: commit its hits as scored rows; write its misses."""
    normalize = Normalize(roles, buckets)
    found = read_segments(fs, cache_dir(root), hit_reads).get(group)
    hits_by_chunk: dict[int, pa.Table] = {}
    if found is not None:
        found = found.sort_by([(C.CHUNK, "ascending"), (C.ROW, "ascending")])
        chunk_ids = found[C.CHUNK].to_numpy()
        for chunk in np.unique(chunk_ids):
            lo, hi = np.searchsorted(chunk_ids, [chunk, chunk + 1])
            hits_by_chunk[int(chunk)] = found.slice(int(lo), int(hi - lo))
    scored, misses, counts = [], [], []
    for table in _read_rows(filesystem, columns, tasks):
        chunk = int(table[C.CHUNK][0].as_py())
        hit = np.zeros(table.num_rows, dtype=bool)
        rows = hits_by_chunk.get(chunk)  # in row order, as the filter below keeps them
        if rows is not None:
            hit[rows[C.ROW].to_numpy()] = True
            scored.append(_hit_rows(normalize(table).filter(pa.array(hit)), rows[C.SCORE],
                                    rows["key"], hits_chunk(chunk)))
        miss = table.append_column(C.INPUT_ROW, table[C.ROW]).filter(
            pa.array(~hit)).drop_columns([C.CHUNK, C.ROW])
        if miss.num_rows:
            misses.append(miss)
        counts.append([chunk, int(hit.sum()), miss.num_rows, target if miss.num_rows else ""])
    file = None
    if misses:
        table = pa.concat_tables(misses)
        fsio.write_table(fs, target, table, row_group_size=MISSES_ROW_GROUP)
        groups = [MISSES_ROW_GROUP] * (table.num_rows // MISSES_ROW_GROUP)
        if table.num_rows % MISSES_ROW_GROUP:
            groups.append(table.num_rows % MISSES_ROW_GROUP)
        file = [target, table.num_rows, groups, fs.get_file_info(target).size]
    if scored:
        _commit_hits(fs, root, run, group, pa.concat_tables(scored))
    return {"chunks": counts, "file": file}


def _hit_rows(rows: pa.Table, scores: pa.ChunkedArray, keys: pa.ChunkedArray, chunk: int
              ) -> pa.Table:
    """Hits as the scoring pass hands scored rows to its writers: texts dropped (kept
    for rejected rows only), the score, the key, and that it was reused."""
    n = rows.num_rows
    out = rows.drop_columns([c for c in (C.PASSAGE_IDS, C.EMPTY_PASSAGE, C.PAIR_KEY)
                             if c in rows.column_names])
    for column in (C.QUERY, C.PASSAGE):
        index = out.schema.get_field_index(column)
        out = out.set_column(index, column, pa.nulls(n, out.schema.field(column).type))
    out = out.set_column(out.schema.get_field_index(C.CHUNK), C.CHUNK,
                         pa.array(np.full(n, chunk, np.int64)))
    out = out.append_column(C.INPUT_ROW, out[C.ROW])
    out = out.set_column(out.schema.get_field_index(C.ROW), C.ROW,
                         pa.array(np.arange(n), pa.int32()))
    return (out.append_column(C.PAIR_KEY, keys)
            .append_column(C.SCORE, scores.cast(pa.float32()))
            .append_column(C.REUSED, pa.array(np.ones(n, bool))))


def _commit_hits(fs: pafs.FileSystem, root: str, run: int, group: int,
                 rows: pa.Table) -> None:
    """The hits of a group as one commit: a pack by rank bucket, then its record."""
    name = commit_log.commit_name(run, WRITER, group)
    data, segments = encode_pack(rows, ipc=True)  # read back by the rank pass alone
    relative = f"scored/{name}.pack"
    fsio.write_bytes(fs, fsio.join(checkpoint.work_dir(root), relative), data)
    chunk = rows[C.CHUNK].to_numpy()
    ranges = [(int(c), 0, int(n)) for c, n in zip(*np.unique(chunk, return_counts=True))]
    commit_log.write_commit(fs, root, commit_log.Commit(
        name, run, tuple(ranges), scored=rows.num_rows, data=relative,
        segments=tuple(segments), nodes={}, time=time.time(), reused=rows.num_rows))
