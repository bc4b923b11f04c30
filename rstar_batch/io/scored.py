"""Scored rows between the two passes: the pass-1 sink and the pass-2 source.

Replicas hand each scored slice to a `CommitWriter`, an actor on their node that
the driver starts for the job, and go on scoring: uploads run beside scoring, never
in a replica's way. A writer gathers what it is handed and commits it every
`commit_seconds` (or once it holds `max_rows`): all of it as one object, a *pack*,
then the commit's record (progress/log.py). So a commit costs two PUTs however many
buckets its rows fall in, and the number of objects grows with replicas × time, not
with pairs or buckets.

A pack is the commit's rows sorted by bucket, each bucket's rows a whole Parquet
file of its own, back to back; the record says where each one lies. The rank pass
reads a bucket's rows from every pack that holds any with one ranged GET each, and
never lists the scored rows. (The shape of Spark's sort-based shuffle: one data
file per map task with each reducer's byte range in an index.)

score-corpus keeps only each query's top K: a `TopKForwarder` on each node keeps its
node's running top K and passes on what enters it to the job's one committer, whose
commits each replace the last.
"""

from __future__ import annotations

import io
import logging
import threading
import time
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.ids import fill_null_ids
from rstar_batch.base.order import group_starts, positions_in_groups, rank_order
from rstar_batch.base.runs import split_runs
from rstar_batch.faults import FaultHook
from rstar_batch.progress import log as commit_log
from rstar_batch.progress.checkpoint import work_dir

log = logging.getLogger(__name__)

# What a replica's call returns: one row per run of rows it handed to a writer.
COMMITS = pa.schema([("chunk", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),
                     ("scored", pa.int64()), ("node", pa.string())])

# A writer commits at least this often by rows, whatever the clock says: a pack of
# about 20 bytes a row compressed, tens of MB.
MAX_COMMIT_ROWS = 2_000_000
# Packs one task reads at once (ranged GETs in parallel: the rank pass, the score cache).
READERS = 16
# Tries of one upload before the writer fails the job (object stores throttle).
UPLOAD_TRIES = 4
# A writer's first commit comes this soon after its first rows (at most its interval),
# so a run killed early still commits work: a resumed run on a busy cluster may live
# little longer than its own start-up.
FIRST_COMMIT_S = 1.0


# -- packs ----------------------------------------------------------------------------

def encode_pack(table: pa.Table, ipc: bool = False) -> tuple[bytes, list[commit_log.Segment]]:
    """`table`'s rows by bucket (input order kept within one), each bucket's as one
    Parquet file (`ipc`: one Arrow IPC stream, zstd-compressed: a fraction of Parquet's
    cost per segment, for packs of many small buckets: the score cache's); the bytes
    and where each bucket's file lies in them."""
    buckets = table[C.BUCKET].to_numpy()
    order = np.argsort(buckets, kind="stable")
    rows = table.drop_columns([C.BUCKET]).take(pa.array(order))
    ordered = buckets[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], len(ordered)]
    out, segments = io.BytesIO(), []
    for start, end in zip(starts, ends):
        offset = out.tell()
        part = rows.slice(int(start), int(end - start))
        if ipc:
            with pa.ipc.new_stream(out, part.schema, options=_IPC_OPTIONS) as writer:
                writer.write_table(part)
        else:
            pq.write_table(part, out, compression="zstd")
        segments.append(commit_log.Segment(int(ordered[start]), offset, out.tell() - offset,
                                           int(end - start)))
    return out.getvalue(), segments


_IPC_OPTIONS = pa.ipc.IpcWriteOptions(compression="zstd")


def decode_segment(data: bytes) -> pa.Table:
    """A segment of a pack: a Parquet file, or an Arrow IPC stream (`encode_pack`)."""
    if data[:4] == b"PAR1":
        return pq.read_table(pa.BufferReader(data))
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all()


def pack_path(root: str, data: str) -> str:
    """A pack's path from its record's `data` (relative to _work/)."""
    return fsio.join(work_dir(root), data)


def read_buckets(fs: pafs.FileSystem, root: str,
                 reads: list[tuple[str, list[commit_log.Segment]]]) -> dict[int, pa.Table]:
    """The rows of some buckets: `reads` gives, per pack, the segments wanted. Each pack
    is read with one ranged GET spanning its wanted segments (a pack holds its
    buckets in order, so a task's buckets are one span when they are consecutive)."""
    return read_segments(fs, work_dir(root), reads)


def read_segments(fs: pafs.FileSystem, base: str,
                  reads: list[tuple[str, list[commit_log.Segment]]]) -> dict[int, pa.Table]:
    """`read_buckets` for packs under any folder (`base`: what their names are relative
    to): the score cache's packs and the lookup's are packs too. Up to READERS packs
    are read at once (each a ranged GET of 20-100 ms on object stores; a task may read
    hundreds); each bucket's tables keep the order of `reads`."""
    def span(read: tuple[str, list[commit_log.Segment]]) -> list[tuple[int, pa.Table]]:
        data, segments = read
        first = min(s.offset for s in segments)
        last = max(s.offset + s.length for s in segments)
        got = fsio.read_range(fs, fsio.join(base, data), first, last - first)
        return [(s.bucket, decode_segment(got[s.offset - first:s.offset - first + s.length]))
                for s in segments]

    if len(reads) > 1:
        with ThreadPoolExecutor(max_workers=min(READERS, len(reads))) as pool:
            spans = list(pool.map(span, reads))
    else:
        spans = [span(read) for read in reads]
    found: dict[int, list[pa.Table]] = {}
    for pieces in spans:
        for bucket, table in pieces:
            found.setdefault(bucket, []).append(table)
    return {b: pa.concat_tables(t, promote_options="permissive") for b, t in found.items()}


def packed_key(*columns: np.ndarray) -> Optional[np.ndarray]:
    """One uint64 per row ordered as the non-negative integer `columns` are, first
    column first; None when their ranges do not fit in 64 bits together."""
    if not len(columns[0]):
        return np.zeros(0, dtype=np.uint64)
    bits = [int(c.max()).bit_length() for c in columns]
    if min(int(c.min()) for c in columns) < 0 or sum(bits) > 64:
        return None
    key = np.zeros(len(columns[0]), dtype=np.uint64)
    for column, width in zip(columns, bits):
        key = (key << np.uint64(width)) | column.astype(np.uint64)
    return key


def once_each(table: pa.Table) -> pa.Table:
    """A bucket's scored rows in input order, each (chunk, row, query) once even if
    two commits overlapped (a retried batch; score-corpus has a row per query for each
    corpus row)."""
    order, repeat = _input_order(table)
    return table.take(pa.array(order[~repeat]))


def repeated_rows(table: pa.Table) -> np.ndarray:
    """True for each row whose (chunk, row, query) an earlier row of `table` has."""
    order, repeat = _input_order(table)
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[order[repeat]] = True
    return mask


def _input_order(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Rows by (chunk, row, query), ties in table order; and, in that order, whether a
    row repeats the one before it. Rows split by the score cache's lookup into hits
    (chunk 2c) and misses (2c + 1) are ordered by input chunk c and their row in it."""
    qids = fill_null_ids(table[C.QUERY_ID])
    query = pc.dictionary_encode(qids.combine_chunks()).indices.to_numpy()
    chunk, row = table[C.CHUNK].to_numpy(), table[C.ROW].to_numpy()
    if C.INPUT_ROW in table.column_names:
        chunk, row = chunk >> 1, table[C.INPUT_ROW].to_numpy()
    key = packed_key(chunk, row, query)
    same = np.zeros(table.num_rows, dtype=bool)
    if key is not None:  # one sort of a packed key is ~6× a three-key lexsort
        order = np.argsort(key, kind="stable")
        ordered = key[order]
        same[1:] = ordered[1:] == ordered[:-1]
        return order, same
    order = np.lexsort((query, row, chunk))
    same[1:] = ((chunk[order][1:] == chunk[order][:-1]) & (row[order][1:] == row[order][:-1])
                & (query[order][1:] == query[order][:-1]))
    return order, same


def mark_duplicates(table: pa.Table) -> pa.Table:
    """Give every repeat of a (query_id, doc_id) pair the reason `duplicate_pair`.

    The first occurrence in input order stays; `table` must be in input order.
    """
    valid = pc.is_null(table[C.REJECT])
    keyed = table.select([C.QUERY_ID, C.DOC_ID]).append_column(
        "_pos", pa.array(np.arange(table.num_rows))).filter(valid)
    firsts = keyed.group_by([C.QUERY_ID, C.DOC_ID]).aggregate([("_pos", "min")])
    if firsts.num_rows == keyed.num_rows:
        return table
    repeat = valid.to_numpy(zero_copy_only=False).copy()
    repeat[firsts["_pos_min"].to_numpy()] = False
    reason = pc.if_else(pa.array(repeat), pa.scalar(C.DUPLICATE_PAIR), table[C.REJECT])
    return table.set_column(table.schema.get_field_index(C.REJECT), C.REJECT, reason)


# -- the writer -------------------------------------------------------------------------

class CommitWriter:
    """A Ray actor (threaded: `add` and `flush` run beside its upload thread) that
    commits scored rows handed to it by the replicas of its node.

    `add` only queues; it blocks while `2 × max_rows` rows wait, so a store slower than
    scoring slows the replicas instead of filling memory. The upload thread commits
    what has waited `commit_seconds`, what reached `max_rows`, or everything once
    `flush` asks. What a writer holds when it dies is lost; the driver scores it again
    (driver.py), so a kill of the whole job loses about one commit interval.
    """

    def __init__(self, filesystem: pafs.FileSystem, root: str, run: int,
                 commit_seconds: float, max_rows: int = MAX_COMMIT_ROWS,
                 top_k: Optional[int] = None) -> None:
        self.filesystem, self.root, self.run = filesystem, root, run
        self.seconds, self.max_rows = commit_seconds, max_rows
        self.top_k = top_k
        self.last: Optional[commit_log.Commit] = None  # with top_k: it covers all before
        self.best: Optional[pa.Table] = None  # with top_k: the last commit's rows
        self.fault = FaultHook.from_env()
        self.id = uuid.uuid4().hex[:8]  # a restarted writer's names never clash
        self.seq = 0
        self.cond = threading.Condition()
        self.waiting: list[tuple[pa.Table, list, int, str]] = []
        self.rows, self.since = 0, 0.0
        self.busy = False          # an upload is under way
        self.flushes = 0           # flushes asked for and not yet done
        self.committed: list[dict] = []  # records not yet taken by the driver
        self.error: Optional[BaseException] = None
        threading.Thread(target=self._loop, name="rstar-batch-commits", daemon=True).start()

    def add(self, rows: pa.Table, ranges: list[tuple[int, int, int]], scored: int,
            node: Any) -> None:
        """Queue `rows`, the output for input `ranges` ((chunk, start, end)) of which
        `scored` pairs were scored on `node` (its name; a forwarder: input rows by node)."""
        with self.cond:
            self.cond.wait_for(lambda: self.rows < 2 * self.max_rows or self.error)
            self._raise()
            if not self.waiting:
                self.since = time.monotonic()
            self.waiting.append((rows, ranges, scored, node))
            self.rows += rows.num_rows
            self.cond.notify_all()

    def flush(self) -> list[dict]:
        """Commit everything handed in so far; return the records not yet taken."""
        with self.cond:
            self.flushes += 1
            self.cond.notify_all()
            self.cond.wait_for(lambda: (not self.waiting and not self.busy) or self.error)
            self.flushes -= 1
            self._raise()
        return self.take()

    def take(self) -> list[dict]:
        """(name, record) of the commits made since the last take."""
        with self.cond:
            self._raise()
            done, self.committed = self.committed, []
            return done

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"committing scored rows failed: {self.error}") from self.error

    def _due(self) -> bool:
        interval = self.seconds if self.seq else min(self.seconds, FIRST_COMMIT_S)
        return bool(self.waiting) and (
            self.flushes > 0 or self.rows >= self.max_rows
            or time.monotonic() - self.since >= interval)

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._due():
                    self.cond.wait(timeout=0.1)
                batch, self.waiting, self.rows, self.busy = self.waiting, [], 0, True
                self.cond.notify_all()
            try:
                record = self._commit(batch)
            except BaseException as exc:  # noqa: BLE001 - raised in add/flush/take
                with self.cond:
                    self.error, self.busy = exc, False
                    self.cond.notify_all()
                return
            with self.cond:
                if record is not None:  # a TopKForwarder's step makes none
                    self.committed.append(record)
                self.busy = False
                self.cond.notify_all()

    def _commit(self, batch: list[tuple[pa.Table, list, int, Any]]) -> Optional[dict]:
        self.seq += 1
        self.fault.before_commit(self.seq)
        name = commit_log.commit_name(self.run, self.id, self.seq)
        rows, ranges, scored, nodes = gathered(batch)
        replaces = None
        if self.top_k is not None:  # one running top K: this commit replaces the last
            replaces = self.last
            if replaces is not None:
                rows = pa.concat_tables([self.best, rows], promote_options="permissive")
                ranges = list(replaces.ranges) + ranges
                scored += replaces.scored
                for node, count in replaces.nodes.items():
                    nodes[node] = nodes.get(node, 0) + count
            rows = self.best = top_k_rows(rows, self.top_k)
        data, segments = encode_pack(rows)
        commit = commit_log.Commit(
            name, self.run, tuple(ranges), scored=scored, data=f"scored/{name}.pack",
            segments=tuple(segments), nodes=nodes, time=time.time(),
            replaces=replaces.name if replaces else "")
        self._upload(commit, data)
        if replaces is not None:  # after the new record: never a moment without one
            commit_log.delete_commits(self.filesystem, self.root, [replaces])
            self.filesystem.delete_file(pack_path(self.root, replaces.data))
        self.last = commit
        return {"name": name, **commit.to_json()}

    def _upload(self, commit: commit_log.Commit, data: bytes) -> None:
        for attempt in range(UPLOAD_TRIES):
            try:
                fsio.write_bytes(self.filesystem, pack_path(self.root, commit.data), data)
                commit_log.write_commit(self.filesystem, self.root, commit)
                return
            except OSError as exc:
                if attempt + 1 == UPLOAD_TRIES:
                    raise
                log.warning("commit %s failed (%s); trying again", commit.name, exc)
                time.sleep(0.5 * 2 ** attempt)


def gathered(batch: list[tuple[pa.Table, list, int, Any]]
             ) -> tuple[pa.Table, list[tuple[int, int, int]], int, dict[str, int]]:
    """What a writer was handed, as one: (rows, input ranges, pairs scored, input rows
    by node). A hand-over's node is a name (a replica's) or counts by name (a
    forwarder's)."""
    rows = pa.concat_tables([b[0] for b in batch], promote_options="permissive")
    ranges = [tuple(r) for b in batch for r in b[1]]
    nodes: dict[str, int] = {}
    for _, covers, _, node in batch:  # input rows, not the rows kept of them
        counts = node if isinstance(node, dict) else {
            node: sum(end - start for _, start, end in covers)}
        for name, count in counts.items():
            nodes[name] = nodes.get(name, 0) + count
    return rows, ranges, sum(b[2] for b in batch), nodes


SENT = "_sent"  # a forwarder's running top K: whether a row went to the committer


class TopKForwarder(CommitWriter):
    """score-corpus's writer on a node (a Ray actor, as CommitWriter): it commits nothing
    itself. It keeps its node's running top K per query in memory and every interval
    forwards to the job's one committer (a CommitWriter with top_k) the rows that
    entered that top K since its last forward, with the input ranges they cover and
    every rejected row.

    A row of a query's global top K is in the top K of everything its node had seen
    when it arrived, so it is forwarded and the committer's top K is exact. Over n
    passages in random order a query's running top K takes in about K·(1 + ln(n/K))
    rows, not n: what crosses the network is small, and _work/ holds the committer's
    one running top K however many nodes score (a writer per node committing its own
    top K held nodes × queries × K). What a forwarder holds and has not forwarded when
    it dies is lost, as a writer's is; its ranges are then not covered and are scored
    again."""

    def __init__(self, committer: Any, commit_seconds: float, top_k: int,
                 max_rows: int = MAX_COMMIT_ROWS) -> None:
        super().__init__(None, "", 0, commit_seconds, max_rows, top_k=top_k)
        self.committer = committer

    def _commit(self, batch: list[tuple[pa.Table, list, int, Any]]) -> Optional[dict]:
        self.seq += 1
        rows, ranges, scored, nodes = gathered(batch)
        rejected = pc.is_null(rows[C.QUERY_ID])
        new = rows.filter(pc.invert(rejected))
        new = new.append_column(SENT, pa.array(np.zeros(new.num_rows, dtype=bool)))
        merged = top_k_rows(new if self.best is None else pa.concat_tables(
            [self.best, new], promote_options="permissive"), self.top_k)
        entered = merged.filter(pc.invert(merged[SENT])).drop_columns([SENT])
        self._forward(pa.concat_tables([entered, rows.filter(rejected)],
                                       promote_options="permissive"), ranges, scored, nodes)
        self.best = merged.set_column(merged.schema.get_field_index(SENT), SENT,
                                      pa.array(np.ones(merged.num_rows, dtype=bool)))
        return None

    def _forward(self, rows: pa.Table, ranges: list, scored: int, nodes: dict) -> None:
        """Hand to the committer; back once it holds them (it blocks while it is full)."""
        import ray

        ray.get(self.committer.add.remote(rows, ranges, scored, nodes))


def top_k_rows(table: pa.Table, k: int) -> pa.Table:
    """Each query's first k rows in the ranking's order (score desc, doc_id asc), and
    every rejected row (no query): the rows a score-corpus commit keeps. A (corpus row,
    query) that is there twice counts once."""
    rejected = pc.is_null(table[C.QUERY_ID])
    # a row scored twice (a replica's block retried after it had handed some slices
    # over) would take two of its query's k places: the first copy stays
    ranked = table.filter(pc.invert(rejected))
    repeat = repeated_rows(ranked)
    if repeat.any():
        ranked = ranked.filter(pa.array(~repeat))
    order = rank_order(ranked, [C.QUERY_ID])
    keep = order[positions_in_groups(group_starts(ranked[C.QUERY_ID].take(
        pa.array(order)).combine_chunks())) < k]
    return pa.concat_tables([ranked.take(pa.array(np.sort(keep))), table.filter(rejected)])


class HandToWriter:
    """A replica's sink: hands each scored slice to the commit writer of its node (or,
    on a node that has none, one picked by the node's id) and returns at once with
    the input rows it covers. Up to `in_flight` hand-overs wait at a time; a replica's
    call waits for its own at its end (`settle`), so rows are the writer's once the
    call returns. A writer that is gone (its node lost) gets no more: the slice goes to
    the next one (what the lost one held is scored again after the pass)."""

    PATIENCE_S = 120.0  # how long a slice waits for some writer to be reachable

    def __init__(self, writers: dict[str, Any], in_flight: int = 4) -> None:
        self.writers, self.in_flight = writers, in_flight
        self.pending: list[tuple[Any, tuple, list[str]]] = []  # (ref, args, writers tried)

    def _order(self, node: str) -> list[str]:
        """The writers to try, this node's first."""
        names = sorted(self.writers)
        first = node if node in self.writers else names[zlib.crc32(node.encode()) % len(names)]
        return [first] + [n for n in names if n != first]

    def __call__(self, scored: pa.Table, covers: pa.Table) -> pa.Table:
        """`scored`: the stage's output for the input rows `covers` (for score-corpus,
        only each query's best rows of them)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        label = (scored[C.NODE][0].as_py() if C.NODE in scored.column_names
                 and scored.num_rows else None) or node
        unscored = pc.is_valid(covers[C.REJECT]).to_numpy(zero_copy_only=False)
        done: dict[str, list] = {"chunk": [], "start": [], "end": [], "scored": [], "node": []}
        for chunk, start, end, index in split_runs(covers[C.CHUNK].to_numpy(),
                                                   covers[C.ROW].to_numpy()):
            for key, value in zip(done, (chunk, start, end, int(
                    len(index) - np.count_nonzero(unscored[index])), label)):
                done[key].append(value)
        ranges = list(zip(done["chunk"], done["start"], done["end"]))
        data = scored.drop_columns([c for c in (C.NODE,) if c in scored.column_names])
        args = (data, ranges, sum(done["scored"]), label)
        order = self._order(node)
        self.pending.append((self.writers[order[0]].add.remote(*args), args, order[:1]))
        if len(self.pending) > self.in_flight:
            self._wait(self.pending.pop(0), node)
        return pa.table(done, schema=COMMITS)

    def _wait(self, item: tuple[Any, tuple, list[str]], node: str) -> None:
        """Wait until a writer holds the slice. A writer that died for good is passed
        over; one that is only unreachable (restarting elsewhere after its node was
        lost, or this replica's own node going down) is tried again after a pause, in
        turn with the others, for up to `PATIENCE_S`. A replica on a lost node is
        ended by Ray meanwhile and Ray Data gives its block to another replica."""
        import ray

        ref, args, tried = item
        order, dead, pause = self._order(node), set(), 0.25
        deadline = time.monotonic() + self.PATIENCE_S
        while True:
            try:
                ray.get(ref)
                return
            except ray.exceptions.RayActorError as exc:
                if isinstance(exc, ray.exceptions.ActorDiedError):
                    dead.add(tried[-1])
                left = [n for n in order if n not in dead]
                if not left or time.monotonic() > deadline:
                    raise
                following = [n for n in left if n not in tried]
                if not following:  # each one failed once: pause, then a new round
                    time.sleep(pause)
                    pause = min(pause * 2, 8.0)
                    tried.clear()
                    following = left
                tried.append(following[0])
                ref = self.writers[following[0]].add.remote(*args)

    def settle(self) -> None:
        """Wait until the writers hold every slice handed over (not until committed)."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        pending, self.pending = self.pending, []
        for item in pending:
            self._wait(item, node)


class Writers:
    """The job's commit writers, as the driver holds them: one per node that can run
    replicas (a CPU or GPU to offer), placed there so that a slice goes to its writer
    through the node's shared memory; one anywhere while the cluster has no such node
    (an autoscaler's, scaling from zero). A writer reserves no CPU: it encodes and
    uploads, about a core's hundredth per million rows.

    With `top_k` (score-corpus) the writer on each node is a `TopKForwarder` and one
    committer, on the driver's node, commits the job's running top K."""

    POLL_TIMEOUT_S = 10.0

    def __init__(self, filesystem: pafs.FileSystem, root: str, run: int,
                 commit_seconds: float, top_k: Optional[int] = None) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        def on(node: str) -> dict[str, Any]:
            return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}

        options = dict(num_cpus=0, max_concurrency=4, max_restarts=2, max_task_retries=2)
        writer = ray.remote(**options)(CommitWriter)
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and (
            n.get("Resources", {}).get("CPU", 0) > 0 or n.get("Resources", {}).get("GPU", 0) > 0)]
        self.committer = None
        if top_k is None:
            def start(node: Optional[str]) -> Any:
                return writer.options(**(on(node) if node else {})).remote(
                    filesystem, root, run, commit_seconds)
        else:
            here = ray.get_runtime_context().get_node_id()
            self.committer = writer.options(**on(here)).remote(
                filesystem, root, run, commit_seconds, top_k=top_k)
            forwarder = ray.remote(**options)(TopKForwarder)

            def start(node: Optional[str]) -> Any:
                # forwarding each half interval: a commit lands within 1.5 of them
                return forwarder.options(**(on(node) if node else {})).remote(
                    self.committer, commit_seconds / 2, top_k)
        self.handles = {node: start(node) for node in nodes} or {"any": start(None)}

    def sink(self) -> HandToWriter:
        return HandToWriter(self.handles)

    def _all(self) -> dict[str, Any]:
        return {**self.handles, **({"committer": self.committer} if self.committer else {})}

    def take(self) -> list[commit_log.Commit]:
        """The commits made since the last call; a writer that is gone (its node lost)
        gives none: what it held is scored again after the pass."""
        return self._gather("take", self.POLL_TIMEOUT_S, self._all())

    def flush(self, timeout: float) -> list[commit_log.Commit]:
        """Commit what every writer holds (forwarders first, then their committer);
        wait at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        found = self._gather("flush", timeout, self.handles)
        if self.committer is not None:
            found += self._gather("flush", max(1.0, deadline - time.monotonic()),
                                  {"committer": self.committer})
        return found

    def _gather(self, method: str, timeout: float, handles: dict[str, Any]
                ) -> list[commit_log.Commit]:
        import ray

        refs = {getattr(h, method).remote(): node for node, h in handles.items()}
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if late:
            log.warning("%d commit writer(s) did not answer %s within %g s", len(late),
                        method, timeout)
        found = []
        for ref in ready:
            try:
                records = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                log.warning("commit writer on node %s is gone: %s", refs[ref], exc)
                continue
            found += [commit_log.Commit.from_json(r.pop("name"), r) for r in records]
        return found

    def close(self) -> None:
        import ray

        for handle in self._all().values():
            ray.kill(handle)
