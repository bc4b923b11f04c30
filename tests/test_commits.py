"""The commit layer for object storage: packs, the commit writer, the commit log and the
rank pass's reads, in-process on a local folder (the jobs on S3 are in
test_object_storage.py)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from rstar_batch.base import columns as C
from rstar_batch.io.scored import (CommitWriter, TopKForwarder, encode_pack, decode_segment,
                                  once_each, read_buckets)
from rstar_batch.progress.log import Commit, Progress, Segment, read_commits, read_progress
from rstar_batch.rank_pass import plan_tasks


def _scored(chunk: int, start: int, end: int, buckets: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    n = end - start
    return pa.table({C.CHUNK: pa.array([chunk] * n, pa.int64()),
                     C.ROW: pa.array(np.arange(start, end), pa.int64()),
                     C.QUERY_ID: pa.array(rng.integers(0, 50, n)),
                     C.DOC_ID: pa.array(np.arange(start, end) + 1000 * chunk),
                     C.SCORE: pa.array(rng.random(n), pa.float32()),
                     C.REJECT: pa.nulls(n, pa.string()),
                     C.BUCKET: pa.array(rng.integers(0, buckets, n), pa.int32())})


def test_a_pack_holds_each_buckets_rows_as_a_parquet_file_of_its_own():
    table = _scored(3, 0, 500, buckets=7)
    data, segments = encode_pack(table)
    assert [s.bucket for s in segments] == sorted({s.bucket for s in segments})
    assert sum(s.rows for s in segments) == 500
    assert segments[-1].offset + segments[-1].length == len(data)
    buckets = table[C.BUCKET].to_numpy()
    for s in segments:
        part = decode_segment(data[s.offset:s.offset + s.length])
        want = table.filter(pa.array(buckets == s.bucket)).drop_columns([C.BUCKET])
        assert part.equals(want)  # every row of the bucket, in input order


def _writer(tmp_path, seconds: float = 60.0, max_rows: int = 10**6) -> CommitWriter:
    return CommitWriter(pafs.LocalFileSystem(), str(tmp_path), run=2, commit_seconds=seconds,
                        max_rows=max_rows)


def test_the_writer_commits_everything_handed_in_as_one_pack_and_one_record(tmp_path):
    writer = _writer(tmp_path)
    for i in range(5):
        writer.add(_scored(i, 0, 100, buckets=4, seed=i), [(i, 0, 100)], 100, "n1")
    records = writer.flush()
    assert len(records) == 1 and writer.take() == []
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    name = records[0]["name"]
    assert files == [f"_work/commits/{name}.json", f"_work/scored/{name}.pack"]
    (commit,) = read_commits(pafs.LocalFileSystem(), str(tmp_path))
    assert commit.run == 2 and commit.rows == 500 and commit.scored == 500
    assert commit.nodes == {"n1": 500}
    tables = read_buckets(pafs.LocalFileSystem(), str(tmp_path),
                          [(commit.data, list(commit.segments))])
    assert sum(t.num_rows for t in tables.values()) == 500


def test_the_writer_commits_on_its_clock_without_being_asked(tmp_path):
    writer = _writer(tmp_path, seconds=0.3)
    writer.add(_scored(0, 0, 10, buckets=2), [(0, 0, 10)], 10, "n1")
    deadline = time.monotonic() + 10
    while not (found := writer.take()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(found) == 1 and found[0]["ranges"] == [[0, 0, 10]]


def test_the_writer_holds_back_adds_while_twice_its_commit_size_waits(tmp_path, monkeypatch):
    writer = _writer(tmp_path, max_rows=100)
    gate = threading.Event()
    commit = writer._commit
    monkeypatch.setattr(writer, "_commit", lambda batch: (gate.wait(), commit(batch))[1])
    writer.add(_scored(0, 0, 100, 2), [(0, 0, 100)], 100, "n")  # due: uploading, held
    time.sleep(0.3)
    writer.add(_scored(1, 0, 100, 2), [(1, 0, 100)], 100, "n")
    writer.add(_scored(2, 0, 100, 2), [(2, 0, 100)], 100, "n")  # 200 waiting now
    blocked = threading.Thread(target=writer.add,
                               args=(_scored(3, 0, 100, 2), [(3, 0, 100)], 100, "n"))
    blocked.start()
    time.sleep(0.3)
    assert blocked.is_alive()  # backpressure: the replica waits for the store
    gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    records = writer.flush()
    assert sorted(r for rec in records for r in map(tuple, rec["ranges"])) == [
        (i, 0, 100) for i in range(4)]


def test_a_failed_upload_fails_the_next_add_and_flush_naming_it(tmp_path, monkeypatch):
    writer = _writer(tmp_path, seconds=0.05)
    monkeypatch.setattr("rstar_batch.io.scored.UPLOAD_TRIES", 1)
    monkeypatch.setattr("rstar_batch.base.fs.write_bytes",
                        lambda *a: (_ for _ in ()).throw(OSError("SlowDown: 503")))
    writer.add(_scored(0, 0, 10, 2), [(0, 0, 10)], 10, "n")
    with pytest.raises(RuntimeError, match="committing scored rows failed: SlowDown"):
        writer.flush()
    with pytest.raises(RuntimeError, match="SlowDown"):
        writer.add(_scored(1, 0, 10, 2), [(1, 0, 10)], 10, "n")


def test_progress_from_records_merges_overlapping_commits():
    commits = [Commit("a", 1, ((0, 0, 60),)), Commit("b", 2, ((0, 40, 100), (1, 0, 5)))]
    progress = Progress(commits)
    assert progress.committed_rows() == 105 and progress.rows_by_run == {1: 60, 2: 65}
    assert progress.covered == {0: [(0, 60), (40, 100)], 1: [(0, 5)]}


def _packs(rows_per_segment: int) -> list[Commit]:
    return [Commit(f"c{i}", 1, ((i, 0, 10),), data=f"scored/c{i}.pack",
                   segments=tuple(Segment(b, 100 * b, 100, rows_per_segment)
                                  for b in range(40)))
            for i in range(3)]


def test_rank_tasks_are_as_many_as_the_rows_are_worth():
    assert len(plan_tasks(Progress(_packs(5)), cpus=4)) == 1  # 600 rows: one process
    assert len(plan_tasks(Progress(_packs(5_000)), cpus=4)) == 3  # 600k: 250k a task
    assert len(plan_tasks(Progress(_packs(50_000)), cpus=4)) == 8  # 2 a CPU
    assert len(plan_tasks(Progress(_packs(2_000_000)), cpus=4)) == 40  # a bucket each (6M rows)


def test_rank_tasks_take_consecutive_buckets_and_read_each_pack_once(tmp_path):
    packs = _packs(50_000)
    plan = plan_tasks(Progress(packs), cpus=4)
    assert len(plan) == 8
    assert [b for buckets, _ in plan for b in buckets] == list(range(40))
    for buckets, reads in plan:
        assert [data for data, _ in reads] == [c.data for c in packs]  # one read each
        for _, segments in reads:
            assert [s.bucket for s in segments] == buckets


def test_status_and_resume_read_records_not_the_scored_rows(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    writer = _writer(tmp_path)
    writer.add(_scored(0, 0, 30, 3), [(0, 0, 30)], 30, "n")
    writer.flush()
    (tmp_path / "_work" / "scored" / "orphan.pack").write_bytes(b"no record: not committed")
    progress = read_progress(fs, root)
    assert progress.committed_rows() == 30
    assert {data for data, _ in progress.segments_by_bucket()[0]} == {
        progress.commits[0].data}


def test_a_top_k_writer_commits_one_running_top_k_that_replaces_its_last(tmp_path):
    fs, root = pafs.LocalFileSystem(), str(tmp_path)
    writer = CommitWriter(fs, root, run=1, commit_seconds=60, top_k=3)
    # each block covers 40 input rows, of which a replica handed over its best 25
    blocks = [_scored(c, 0, 40, buckets=2, seed=c).slice(0, 25) for c in range(4)]
    writer.add(blocks[0], [(0, 0, 40)], 40, "n")
    writer.add(blocks[1], [(1, 0, 40)], 40, "n")
    (first,) = writer.flush()
    writer.add(blocks[2], [(2, 0, 40)], 40, "n")
    writer.add(blocks[3], [(3, 0, 40)], 40, "n")
    (second,) = writer.flush()
    assert second["replaces"] == first["name"]
    assert sorted(p.name for p in (tmp_path / "_work").rglob("*") if p.is_file()) == [
        f"{second['name']}.json", f"{second['name']}.pack"]  # the replaced one is gone
    (commit,) = read_commits(fs, root)
    assert sorted(commit.ranges) == [(c, 0, 40) for c in range(4)] and commit.scored == 160
    assert commit.nodes == {"n": 160}  # input rows covered, not the 3 per query kept
    got = pa.concat_tables(read_buckets(fs, root, [(commit.data, list(commit.segments))])
                           .values())
    every = pa.concat_tables(blocks)
    for qid in set(every[C.QUERY_ID].to_pylist()):
        rows = [r for r in every.to_pylist() if r[C.QUERY_ID] == qid]
        want = sorted(rows, key=lambda r: (-r[C.SCORE], r[C.DOC_ID]))[:3]
        mine = [r for r in got.to_pylist() if r[C.QUERY_ID] == qid]
        assert sorted(r[C.DOC_ID] for r in mine) == sorted(r[C.DOC_ID] for r in want)


@pytest.mark.parametrize("chunk_base", [0, 2**62])  # a packed sort key, and too wide for one
def test_once_each_keeps_the_first_copy_of_each_chunk_row_query_in_input_order(chunk_base):
    rows = [(chunk_base + c, r, q) for c, r, q in
            [(2, 1, "a"), (1, 5, "b"), (2, 1, "a"), (1, 5, "a"), (0, 9, "b"), (1, 5, "b")]]
    table = pa.table({C.CHUNK: pa.array([r[0] for r in rows], pa.int64()),
                      C.ROW: pa.array([r[1] for r in rows], pa.int64()),
                      C.QUERY_ID: [r[2] for r in rows], "copy": list(range(len(rows)))})
    got = once_each(table)
    assert got["copy"].to_pylist() == [4, 3, 1, 0]  # by (chunk, row, query); first copies


class _LocalForwarder(TopKForwarder):
    """A forwarder handing to its committer in-process, counting what it forwards."""

    forwarded = 0

    def _forward(self, rows, ranges, scored, nodes):
        _LocalForwarder.forwarded += rows.num_rows
        self.committer.add(rows, ranges, scored, nodes)


def test_forwarders_on_two_nodes_feed_one_committer_the_exact_top_k(tmp_path):
    """score-corpus on two nodes: each node's forwarder passes on only the rows that
    enter its running top K; the one committer's single record holds each query's
    exact top K of all the blocks, a block handed over twice (a retried replica call)
    takes no second place, and the record counts input rows by node."""
    fs, root, k = pafs.LocalFileSystem(), str(tmp_path), 3
    committer = CommitWriter(fs, root, run=1, commit_seconds=60, top_k=k)
    nodes = {n: _LocalForwarder(committer, commit_seconds=60, top_k=k) for n in ("a", "b")}
    _LocalForwarder.forwarded = 0
    blocks = [_scored(c, 0, 200, buckets=2, seed=c) for c in range(8)]
    for c, block in enumerate(blocks):
        forwarder = nodes["ab"[c % 2]]
        forwarder.add(block, [(c, 0, 200)], 200, "ab"[c % 2])
        if c == 4:  # the block of chunk 4 again, after its forwarder passed it on
            forwarder.flush()
            forwarder.add(block, [(c, 0, 200)], 200, "a")
        if c % 3 == 2:
            forwarder.flush()
    for forwarder in nodes.values():
        assert forwarder.flush() == []  # forwarders make no records of their own
    committer.flush()
    (commit,) = read_commits(fs, root)
    assert commit.nodes == {"a": 1000, "b": 800} and commit.scored == 1800
    got = pa.concat_tables(read_buckets(fs, root, [(commit.data, list(commit.segments))])
                           .values()).to_pylist()
    every = pa.concat_tables(blocks).to_pylist()
    assert _LocalForwarder.forwarded < len(every) // 2  # the forwarders' top K, not all
    for qid in {r[C.QUERY_ID] for r in every}:
        want = sorted((r for r in every if r[C.QUERY_ID] == qid),
                      key=lambda r: (-r[C.SCORE], r[C.DOC_ID]))[:k]
        mine = sorted((r for r in got if r[C.QUERY_ID] == qid),
                      key=lambda r: (-r[C.SCORE], r[C.DOC_ID]))
        assert [r[C.DOC_ID] for r in mine] == [r[C.DOC_ID] for r in want]


def test_a_replaced_commit_left_by_a_kill_is_void():
    old = Commit("a", 1, ((0, 0, 10),), data="scored/a.pack",
                 segments=(Segment(0, 0, 5, 3),))
    new = Commit("b", 1, ((0, 0, 10), (1, 0, 10)), data="scored/b.pack",
                 segments=(Segment(0, 0, 5, 3),), replaces="a")
    progress = Progress([old, new])
    assert [c.name for c in progress.commits] == ["b"] and progress.committed_rows() == 20
    assert [d for d, _ in progress.segments_by_bucket()[0]] == ["scored/b.pack"]


class _Writer:
    """A commit writer as a replica's sink sees it: `add.remote` gives a reference
    that `ray.get` answers from `fails` (exceptions raised in turn, then success)."""

    def __init__(self, name: str, fails: list) -> None:
        self.name, self.fails, self.held = name, fails, []
        self.add = self

    def remote(self, *args):
        return (self, args)


def _fake_get(ref):
    writer, args = ref
    if writer.fails:
        raise writer.fails.pop(0)
    writer.held.append(args)


def _hand_over(writers, monkeypatch, node="a"):
    import ray
    from rstar_batch.io.scored import HandToWriter

    monkeypatch.setattr(ray, "get", _fake_get)
    monkeypatch.setattr(time, "sleep", lambda s: None)
    sink = HandToWriter({w.name: w for w in writers})
    args = ("slice", [(0, 0, 10)], 10, node)
    sink._wait((writers[0].add.remote(*args), args, [writers[0].name]), node)
    return args


def test_a_slice_whose_writer_died_goes_to_the_next_one(monkeypatch):
    import ray

    lost, other = _Writer("a", [ray.exceptions.ActorDiedError()]), _Writer("b", [])
    args = _hand_over([lost, other], monkeypatch)
    assert lost.held == [] and other.held == [args]


def test_a_slice_waits_while_every_writer_is_unreachable_then_lands(monkeypatch):
    """Losing a node makes its writer unreachable while it restarts elsewhere, and a
    replica on that node reaches no writer at all until Ray ends it: neither fails
    the slice (a failed slice fails the whole pass)."""
    import ray

    def unavailable():
        return ray.exceptions.ActorUnavailableError("restarting", None)

    a = _Writer("a", [unavailable(), unavailable(), unavailable()])
    b = _Writer("b", [unavailable(), unavailable(), unavailable()])
    args = _hand_over([a, b], monkeypatch)  # a, b, pause, a, b, pause, a, b, pause, a
    assert a.held == [args] and b.held == []


def test_a_slice_no_writer_takes_in_time_fails_the_replicas_call(monkeypatch):
    import ray

    from rstar_batch.io.scored import HandToWriter

    monkeypatch.setattr(HandToWriter, "PATIENCE_S", 0.0)
    a = _Writer("a", [ray.exceptions.ActorUnavailableError("node lost", None)] * 9)
    b = _Writer("b", [ray.exceptions.ActorDiedError()])
    with pytest.raises(ray.exceptions.RayActorError):
        _hand_over([a, b], monkeypatch)
    assert a.held == b.held == []
