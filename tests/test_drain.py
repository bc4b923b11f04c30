"""Spot-friendly: replicas commit on a clock, a resumed run skips committed rows, and
SIGTERM drains the job. The end-to-end SIGTERM runs are in test_resume.py."""

from __future__ import annotations

import os
import pickle
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from rstar_batch.base import columns as C
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.driver import ProgressLog, run_scoring
from rstar_batch.io.read import ReadChunks, plan_read_tasks
from rstar_batch.io.scored import COMMITS
from rstar_batch.progress import checkpoint
from rstar_batch.progress import drain as drain_module
from rstar_batch.progress.drain import Drain, StartInterrupted, Stopped, StopSignal
from rstar_batch.progress.log import Commit, Progress
from rstar_batch.replicas import CommitClock, ReplicaCommits


def test_the_clock_sizes_slices_to_the_interval_from_the_rate_seen():
    clock = CommitClock(seconds=10.0, first_rows=64)
    assert clock.next_rows(2048) == 64            # first: small, to commit soon and measure
    clock.took(64, 2.0)                           # 32 rows/s
    assert clock.next_rows(2048) == 320           # 10 s of it
    assert clock.next_rows(400) == 400            # no stub of 80 rows left at the end
    clock.took(320, 5.0)                          # faster now: 64 rows/s, averaged to 48
    assert clock.next_rows(2048) == 480
    assert clock.next_rows(10) == 10


class _Echo:
    """A stage that records the slices it gets and marks its rows scored."""

    calls: list[int] = []

    def __init__(self, seconds_per_row: float = 0.0) -> None:
        self.seconds_per_row = seconds_per_row

    def __call__(self, batch: pa.Table) -> pa.Table:
        type(self).calls.append(batch.num_rows)
        time.sleep(self.seconds_per_row * batch.num_rows)
        return batch


class _Sink:
    def __init__(self) -> None:
        self.rows: list[int] = []

    def __call__(self, batch: pa.Table, covers: pa.Table) -> pa.Table:
        assert covers[C.ROW].to_pylist() == batch[C.ROW].to_pylist()  # the input slice
        self.rows.extend(batch[C.ROW].to_pylist())
        chunk = batch[C.CHUNK][0].as_py()
        rows = batch[C.ROW].to_pylist()
        return pa.table({"chunk": [chunk], "start": [rows[0]], "end": [rows[-1] + 1],
                         "scored": [len(rows)], "node": [None]}, schema=COMMITS)


class _Flag:
    def __init__(self, after: int) -> None:
        self.after, self.asked = after, 0

    def is_set(self) -> bool:
        self.asked += 1
        return self.asked > self.after


def _batch(rows: int) -> pa.Table:
    return pa.table({C.CHUNK: np.zeros(rows, np.int64), C.ROW: np.arange(rows, dtype=np.int32)})


def test_a_replica_commits_each_slice_in_order_and_returns_only_commits():
    _Echo.calls = []
    sink = _Sink()
    replica = ReplicaCommits(_Echo, {"seconds_per_row": 0.0005}, sink, commit_seconds=0.05)
    out = replica(_batch(300))
    assert sink.rows == list(range(300))                  # every row, once, in order
    assert _Echo.calls[0] == 64 and len(_Echo.calls) > 2  # small first, then by the clock
    assert out.schema == COMMITS
    assert out["start"].to_pylist()[0] == 0 and out["end"].to_pylist()[-1] == 300
    assert sum(out["scored"].to_pylist()) == 300


def test_a_replica_asked_to_stop_takes_no_further_slice():
    _Echo.calls = []
    sink = _Sink()
    replica = ReplicaCommits(_Echo, {}, sink, commit_seconds=1000.0, stop=_Flag(after=1))
    out = replica(_batch(300))
    assert _Echo.calls == [64] and sink.rows == list(range(64))
    assert out.num_rows == 1 and out["end"].to_pylist() == [64]
    replica = ReplicaCommits(_Echo, {}, _Sink(), commit_seconds=1.0, stop=_Flag(after=0))
    assert replica(_batch(300)).num_rows == 0


def test_a_resumed_chunk_skips_the_rows_committed_runs_cover():
    chunks = checkpoint.plan_chunks([100, 50], 40)
    progress = Progress([Commit(f"c{i}", 1, ranges) for i, ranges in enumerate(
        [((0, 0, 40),), ((1, 0, 10), (1, 5, 20)), ((1, 30, 35), (3, 0, 10))])])
    assert progress.done_chunks(chunks) == {0} and progress.committed_rows() == 40 + 25 + 10
    pending = progress.pending(chunks)
    assert [c.id for c in pending] == [1, 2, 3, 4]
    assert pending[0].skip == ((0, 20), (30, 35)) and pending[0].todo == 15
    assert pending[2].skip == ((0, 10),) and pending[2].todo == 30
    assert pending[1].skip == () and pending[1].todo == 20
    assert all(c.skip == () for c in progress.pending(chunks, within=False))


def test_the_reader_leaves_out_skipped_rows_and_keeps_their_positions(tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"x": np.arange(100)}), path, row_group_size=30)
    chunks = [checkpoint.Chunk(0, 0, 0, 40, skip=((0, 10), (20, 25))),
              checkpoint.Chunk(1, 0, 40, 40), checkpoint.Chunk(2, 0, 80, 20, skip=((0, 20),))]
    read = ReadChunks(pafs.LocalFileSystem(), ["x"])
    tables = [t for task in plan_read_tasks(chunks, [path], [[30, 30, 30, 10]])
              for t in read(pa.Table.from_pylist([task]))]
    assert len(tables) == 2                         # chunk 2 has nothing left
    first = tables[0]
    assert first[C.ROW].to_pylist() == list(range(10, 20)) + list(range(25, 40))
    assert first["x"].to_pylist() == first[C.ROW].to_pylist()
    assert tables[1]["x"].to_pylist() == list(range(40, 80))


def test_a_reader_asked_to_stop_emits_no_further_chunk(tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({"x": np.arange(100)}), path)
    chunks = checkpoint.plan_chunks([100], 25)
    read = ReadChunks(pafs.LocalFileSystem(), ["x"], stop=_Flag(after=2))
    tasks = plan_read_tasks(chunks, [path], [[100]])
    assert len([t for task in tasks for t in read(pa.Table.from_pylist([task]))]) == 2


@pytest.mark.slow
def test_the_stop_flag_reaches_the_workers_and_leaves_with_the_job(ray_local):
    """The flag is a key in the cluster's store: a worker reads it unset, then set once
    the driver tells; a job asked to stop before Ray ran starts with it set; the key
    leaves the cluster with the job."""
    import ray

    @ray.remote(num_cpus=0)
    def stopped(flag: StopSignal) -> bool:
        return flag.is_set()

    drain = Drain(seconds=5)
    flag = drain.attach()
    assert not ray.get(stopped.remote(flag))
    drain.tell_workers()
    assert not ray.get(stopped.remote(flag))  # nothing asked yet: nothing told
    drain.requested_at, drain.signal_name = time.monotonic(), "SIGTERM"
    drain.tell_workers()
    assert ray.get(stopped.remote(flag))
    drain.restore()
    assert not StopSignal(flag.key).is_set()  # removed

    early = Drain(seconds=5)
    early.requested_at, early.signal_name = time.monotonic(), "SIGINT"
    flag = early.attach()
    assert ray.get(stopped.remote(flag))
    early.restore()


def test_a_flag_that_cannot_be_read_is_not_a_stop_and_set_stays_set(monkeypatch):
    from ray.experimental import internal_kv

    def unreachable(*_args, **_kwargs):
        raise ConnectionError("GCS busy")

    monkeypatch.setattr(internal_kv, "_internal_kv_exists", unreachable)
    flag = StopSignal("stop-x")
    assert not flag.is_set()
    monkeypatch.setattr(internal_kv, "_internal_kv_exists", lambda *_a, **_k: True)
    assert flag.is_set()
    monkeypatch.setattr(internal_kv, "_internal_kv_exists", unreachable)
    assert flag.is_set()  # once set, set: no further call
    assert pickle.loads(pickle.dumps(flag)).key == "stop-x"


def test_first_signal_drains_its_echo_is_the_same_stop_a_second_exits(caplog, monkeypatch):
    """The same signal at once again is one stop (systemd signals the watched driver
    and its watcher, which passes its copy on); a later one, or another signal, exits."""
    monkeypatch.setattr(drain_module, "ECHO_S", 0.25)
    drain = Drain(seconds=0.2)
    drain.watch()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the watcher's copy: no exit
        assert drain.requested and not drain.overdue
        with pytest.raises(Stopped, match=r"stopped on SIGTERM: 3 of 9 pairs are committed"):
            drain.check(lambda: (3, 9))
        time.sleep(0.3)
        assert drain.overdue
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
        assert exited.value.code == 128 + signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        drain.restore()
    assert signal.getsignal(signal.SIGTERM) is not drain._on_signal
    assert "draining" in caplog.text and "second signal" in caplog.text


def test_a_stop_while_ray_starts_leaves_the_start_at_once():
    """A signal to every process kills the Ray being started: ray.init must not wait
    for it (it waited ~30 s); a stop asked before does not start at all."""
    drain = Drain(seconds=5)
    drain.watch()
    try:
        started = time.monotonic()
        with pytest.raises(StartInterrupted):
            with drain.while_starting():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # ray.init, waiting for a GCS that is gone
        assert time.monotonic() - started < 1 and drain.requested
        with pytest.raises(StartInterrupted):
            with drain.while_starting():
                raise AssertionError("started after a stop")
        with pytest.raises(Stopped, match="stopped on SIGTERM: 0 of 5 pairs"):
            drain.check(lambda: (0, 5))
    finally:
        drain.restore()


class _Silent:
    """A pass whose pipeline produces one commit, then nothing for a long time."""

    def iter_batches(self, **_):
        yield pa.table({"chunk": [0], "start": [0], "end": [5], "scored": [5],
                        "node": ["n"]}, schema=COMMITS)
        time.sleep(30)
        yield pa.table({"chunk": [0], "start": [5], "end": [9]})


def test_a_drain_past_its_deadline_stops_waiting_for_a_silent_pipeline():
    drain = Drain(seconds=0.5)
    drain.requested_at, drain.signal_name = time.monotonic(), "SIGTERM"
    began = time.monotonic()
    assert run_scoring(_Silent(), ProgressLog(9, 0, every=30), 1, drain) == 5
    assert time.monotonic() - began < 5


def test_commit_drain_and_progress_seconds_must_be_positive_and_stay_out_of_the_resume_key():
    with pytest.raises(ConfigError, match="commit_seconds must be a number of seconds"):
        RerankConfig(commit_seconds=0)
    with pytest.raises(ConfigError, match="drain_seconds"):
        RerankConfig(drain_seconds=-1)
    with pytest.raises(ConfigError, match="progress_seconds"):
        RerankConfig(progress_seconds=0)
    key = checkpoint.config_key(RerankConfig(commit_seconds=3, drain_seconds=5,
                                             progress_seconds=1))
    assert key == checkpoint.config_key(RerankConfig())
