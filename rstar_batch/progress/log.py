"""The commit log: what a job has committed, one small record per commit.

A commit makes one upload of scored rows part of the job. Its record names the
input rows it covers and, where the rows went into a pack (io/scored.py), where
each bucket's rows lie in it:

    _work/commits/r0002-5f3a9c1e-000017.json
        {"run": 2, "ranges": [[12, 0, 4096], [13, 0, 1200]], "scored": 5290,
         "data": "scored/r0002-5f3a9c1e-000017.pack",
         "segments": [[0, 0, 2811, 97], [1, 2811, 2790, 95], ...],   # bucket, offset,
         "nodes": {"node-a": 5296}, "time": 1765000000.0}             # length, rows

The record is the commit point: it is written after its data, so a pack without a
record is never read, and a kill at any moment leaves each commit whole or absent.
A record may name one it `replaces` (score-corpus's writers commit a running top K,
each commit covering all the rows of the ones before): the replaced one is void from
the moment the new record exists, and deleted after it.
Record names are unique (run, writer, sequence), never derived from the rows, so a
retried batch adds a commit rather than replacing one; readers keep each (chunk,
row) once. Resume, `status` and the rank pass read the records found by one
listing of commits/ (a thousand names to a LIST page): their cost grows with the
number of commits, not with pairs, buckets or files of scored rows, which are
never listed.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional

import pyarrow.fs as pafs

from rstar_batch.base import fs as fsio

COMMITS = "commits"
_SUFFIX = ".json"
# parallel GETs of records: object stores answer each in tens of ms
_READERS = 32


@dataclasses.dataclass(frozen=True)
class Segment:
    """One bucket's rows in a pack: a whole Parquet file at [offset, offset + length)."""

    bucket: int
    offset: int
    length: int
    rows: int


@dataclasses.dataclass(frozen=True)
class Commit:
    """One commit record (see the module's docstring)."""

    name: str
    run: int
    ranges: tuple[tuple[int, int, int], ...]  # (chunk, start, end): input rows covered
    scored: int = 0                           # rows among them that were scored
    data: str = ""                            # the pack, relative to _work/ ('' for none)
    segments: tuple[Segment, ...] = ()
    nodes: dict[str, int] = dataclasses.field(default_factory=dict)  # rows by Ray node
    time: float = 0.0
    replaces: str = ""  # a commit this one makes void (a writer's running top K)
    reused: int = 0     # rows among them whose score came from the score cache

    @property
    def rows(self) -> int:
        return sum(end - start for _, start, end in self.ranges)

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "ranges": [list(r) for r in self.ranges],
                "scored": self.scored, "data": self.data,
                "segments": [[s.bucket, s.offset, s.length, s.rows] for s in self.segments],
                "nodes": self.nodes, "time": self.time, "replaces": self.replaces,
                **({"reused": self.reused} if self.reused else {})}

    @classmethod
    def from_json(cls, name: str, value: dict[str, Any]) -> "Commit":
        return cls(name, int(value["run"]), tuple(tuple(r) for r in value["ranges"]),
                   int(value.get("scored", 0)), value.get("data", ""),
                   tuple(Segment(*s) for s in value.get("segments", ())),
                   dict(value.get("nodes", {})), float(value.get("time", 0.0)),
                   value.get("replaces", ""), int(value.get("reused", 0)))


def commit_name(run: int, writer: str, seq: int) -> str:
    """A commit's unique name: run, writer (a fresh id per writer process), sequence."""
    return f"r{run:04d}-{writer}-{seq:06d}"


def commits_dir(root: str) -> str:
    return fsio.join(root, "_work", COMMITS)


def write_commit(fs: pafs.FileSystem, root: str, commit: Commit) -> None:
    """Write `commit`'s record: the moment its rows become part of the job."""
    fsio.write_json(fs, fsio.join(commits_dir(root), commit.name + _SUFFIX), commit.to_json())


def delete_commits(fs: pafs.FileSystem, root: str, commits: Iterable[Commit]) -> None:
    for commit in commits:
        fs.delete_file(fsio.join(commits_dir(root), commit.name + _SUFFIX))


def read_commits(fs: pafs.FileSystem, root: str) -> list[Commit]:
    """Every committed record, from a listing of commits/ and a GET of each record.

    A record listed but gone when read was replaced meanwhile (a writer's running top
    K): the listing is taken again for the record that replaced it."""
    found: dict[str, Commit] = {}
    for _ in range(5):
        paths = [i.path for i in fsio.list_files(fs, commits_dir(root), recursive=False)
                 if i.path.endswith(_SUFFIX) and _name(i.path) not in found]
        if not paths:
            break
        with ThreadPoolExecutor(max_workers=min(_READERS, len(paths))) as pool:
            values = list(pool.map(lambda p: _read_or_none(fs, p), paths))
        found.update({_name(p): Commit.from_json(_name(p), v)
                      for p, v in zip(paths, values) if v is not None})
        if all(v is not None for v in values):
            break
    return sorted(found.values(), key=lambda c: (c.time, c.name))


def _name(path: str) -> str:
    return path.rsplit("/", 1)[-1][:-len(_SUFFIX)]


def _read_or_none(fs: pafs.FileSystem, path: str) -> Optional[dict]:
    try:
        return fsio.read_json(fs, path)
    except FileNotFoundError:
        return None


@dataclasses.dataclass
class Progress:
    """What the commits cover: the rows of each chunk, the rows each run committed."""

    commits: list[Commit] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        void = {c.replaces for c in self.commits if c.replaces}
        self.commits = [c for c in self.commits if c.name not in void]
        self.covered: dict[int, list[tuple[int, int]]] = {}  # chunk → [start, end) ranges
        self.rows_by_run: dict[int, int] = {}
        self.reused_by_run: dict[int, int] = {}  # of those, scores from the score cache
        self.last_commit: Optional[float] = None
        for commit in self.commits:
            for chunk, start, end in commit.ranges:
                self.covered.setdefault(chunk, []).append((start, end))
            self.rows_by_run[commit.run] = self.rows_by_run.get(commit.run, 0) + commit.rows
            if commit.reused:
                self.reused_by_run[commit.run] = (self.reused_by_run.get(commit.run, 0)
                                                  + commit.reused)
            if commit.time:
                self.last_commit = max(self.last_commit or commit.time, commit.time)

    def done_chunks(self, chunks: list) -> set[int]:
        return {c.id for c in chunks
                if merge_ranges(self.covered.get(c.id, []), c.rows) == ((0, c.rows),)}

    def pending(self, chunks: list, within: bool = True) -> list:
        """The chunks not done; `within`: each with the ranges committed runs cover as
        its `skip`, so that a resumed run scores only rows no run has committed."""
        done = self.done_chunks(chunks)
        return [dataclasses.replace(c, skip=merge_ranges(self.covered.get(c.id, []), c.rows)
                                    if within else ())
                for c in chunks if c.id not in done]

    def committed_rows(self) -> int:
        """Rows covered by commits (overlaps counted once)."""
        return sum(end - start for ranges in self.covered.values()
                   for start, end in merge_ranges(ranges, max(e for _, e in ranges)))

    def segments_by_bucket(self) -> dict[int, list[tuple[str, Segment]]]:
        """bucket → (pack, segment) of every commit that holds rows of it."""
        found: dict[int, list[tuple[str, Segment]]] = {}
        for commit in self.commits:
            for segment in commit.segments:
                found.setdefault(segment.bucket, []).append((commit.data, segment))
        return dict(sorted(found.items()))


def read_progress(fs: pafs.FileSystem, root: str) -> Progress:
    return Progress(read_commits(fs, root))


def merge_ranges(ranges: list[tuple[int, int]], rows: int) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint [start, end) ranges covering what `ranges` cover, within rows."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        start, end = max(0, start), min(rows, end)
        if start >= end:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return tuple(merged)
