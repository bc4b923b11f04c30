"""Read the pending chunks of the candidate files, streaming, one row group at a time.

Chunks that start in the same row group are read by one task, so each row
group is decoded once per run however large it is. Every emitted table is one
chunk, tagged with its id (`_chunk`) and each row's position in it (`_row`):
together they name a physical input row, even when ids repeat. Rows of a chunk
that an earlier run committed (its `skip`) are left out. Once the job is asked to
stop (drain.py), no further chunk is emitted.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import columns as C
from rstar_batch.progress.checkpoint import Chunk
from rstar_batch.progress.drain import StopSignal, stop_requested

READ_TASK_ROWS = 65536
STREAM_BATCH_ROWS = 8192
# Past one reader per consumer of its chunks (a model replica, a tokenizer), a job gets
# one more reader for each READER_ROWS rows it reads.
READER_ROWS = 1_000_000


def read_chunks(files: Any, chunks: list[Chunk], stop: Optional[StopSignal],
                consumers: int) -> Any:
    """The pending `chunks` of `files` (io/sources.CandidateFiles) as a lazy Ray Data
    dataset of chunk tables.

    At most one read task per consumer runs at once (one more per READER_ROWS rows):
    each is a worker process of its own, and a small job's readers all started at once
    took the cores its replicas were starting on (1,200 pairs on 2 cores, 3 input
    files, a job joining a running Ray: 9.8-12.1 s a job with a reader per file,
    9.0-11.3 s with one).
    """
    import ray.data

    ds, tasks = read_tasks(files, chunks)
    rows = sum(task["rows"] for task in tasks)
    readers = max(1, min(len(tasks), max(consumers, math.ceil(rows / READER_ROWS))))
    return ds.map_batches(ReadChunks(files.filesystem, files.schema.names, stop),
                          batch_size=1, batch_format="pyarrow",
                          compute=ray.data.TaskPoolStrategy(size=readers))


def read_tasks(files: Any, chunks: list[Chunk]) -> tuple[Any, list[dict]]:
    """The read tasks of the pending `chunks` (plan_read_tasks), as a Ray dataset of one
    row and one block per task, and as the list itself."""
    import ray.data

    tasks = plan_read_tasks(chunks, files.paths, files.row_groups)
    return ray.data.from_items(tasks, override_num_blocks=len(tasks)), tasks


def plan_read_tasks(chunks: list[Chunk], paths: list[str],
                    row_groups: list[list[int]]) -> list[dict]:
    """Group pending chunks into read tasks: one file, whole row groups, ~64k rows."""
    tasks: list[dict] = []
    current: dict = {}
    for chunk in sorted(chunks, key=lambda c: (c.file, c.start)):
        starts = np.concatenate([[0], np.cumsum(row_groups[chunk.file])])
        first_group = int(np.searchsorted(starts, chunk.start, side="right") - 1)
        last_group = int(np.searchsorted(starts, chunk.start + chunk.rows, side="left") - 1)
        same_group = current and current["groups"][-1] == first_group
        if (current and current["file"] == chunk.file
                and (same_group or current["rows"] < READ_TASK_ROWS)):
            current["chunks"].append(_entry(chunk))
            current["groups"] = sorted(set(current["groups"]) | set(
                range(first_group, last_group + 1)))
            current["rows"] += chunk.rows
            continue
        current = {"file": chunk.file, "path": paths[chunk.file], "rows": chunk.rows,
                   "groups": list(range(first_group, last_group + 1)),
                   "first_row": int(starts[first_group]),
                   "chunks": [_entry(chunk)]}
        tasks.append(current)
    return tasks


def _entry(chunk: Chunk) -> list[int]:
    """A chunk in a read task: id, start, rows, then its skipped ranges' bounds."""
    return [chunk.id, chunk.start, chunk.rows, *(b for r in chunk.skip for b in r)]


def _unskipped(rows: int, skip: list) -> pa.Array:
    """A mask of the chunk's rows outside its skipped [start, end) ranges."""
    keep = np.ones(rows, dtype=bool)
    for start, end in skip:
        keep[start:end] = False
    return pa.array(keep)


def _slice(pieces: list[tuple[int, pa.RecordBatch]], start: int, end: int) -> pa.Table:
    keep = [(pos, b) for pos, b in pieces if pos < end and pos + b.num_rows > start]
    table = pa.Table.from_batches([b for _, b in keep])
    return table.slice(start - keep[0][0], end - start)


class ReadChunks:
    """`map_batches` function: one read task in, one table per chunk out."""

    def __init__(self, filesystem: pafs.FileSystem, columns: list[str],
                 stop: Optional[StopSignal] = None) -> None:
        self.filesystem = filesystem
        self.columns = columns
        self.stop = stop

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for task in batch.to_pylist():
            for table in self.read(task):
                if stop_requested(self.stop):
                    return
                yield table

    def read(self, task: dict) -> Iterator[pa.Table]:
        skips = {cid: list(zip(bounds[::2], bounds[1::2]))
                 for cid, _, _, *bounds in task["chunks"]}
        wanted = sorted((start, start + rows, cid) for cid, start, rows, *_ in task["chunks"])
        with self.filesystem.open_input_file(task["path"]) as fh:
            parquet = pq.ParquetFile(fh)
            pieces: list[tuple[int, pa.RecordBatch]] = []
            position, i = task["first_row"], 0
            batches = parquet.iter_batches(batch_size=STREAM_BATCH_ROWS,
                                           row_groups=task["groups"], columns=self.columns,
                                           use_threads=False)
            for record_batch in batches:
                pieces.append((position, record_batch))
                position += record_batch.num_rows
                while i < len(wanted) and wanted[i][1] <= position:
                    start, end, cid = wanted[i]
                    table = _slice(pieces, start, end)
                    table = table.append_column(
                        C.CHUNK, pa.array(np.full(end - start, cid), pa.int64())).append_column(
                        C.ROW, pa.array(np.arange(end - start), pa.int32()))
                    if skips[cid]:
                        table = table.filter(_unskipped(end - start, skips[cid]))
                    if table.num_rows:
                        yield table
                    i += 1
                if i == len(wanted):
                    break
                nxt = wanted[i][0] if i < len(wanted) else position
                pieces = [(p, b) for p, b in pieces if p + b.num_rows > nxt]
        if i != len(wanted):
            raise IOError(f"candidates file '{task['path']}' ended before row {wanted[i][1]}; "
                          "was it changed while the job ran?")
