"""Give id-only candidates their texts: a join with the corpus and the queries.

A first-stage run holds (query_id, doc_id[, first-stage score or rank]); the
passages live in a corpus of up to tens of millions of rows, the queries in a
table that fits in memory. The corpus is joined as a partitioned hash join:
Ray Data splits the run and the corpus into buckets by a stable hash of doc_id
(streaming, written under `_work/join/`), then one Ray task per bucket joins
its two halves with Arrow's hash join, so no node ever holds more than one
corpus bucket. Queries are looked up directly. A candidate whose text is
missing keeps a null text and the reason `missing_passage` / `missing_query`:
it is never scored with an empty string.

The result is ordinary candidate Parquet under `_work/prepared/`, finished by a
`_DONE` marker; the checkpointed scoring pass reads it like any input, and a
resumed job reuses it. With a tokenized corpus (io/tokenized.py) the join
carries each passage's ids and empty-passage flag instead of its text, and the
passage text column is null (in the rejected rows too).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.columns import PREPARE_REASON
from rstar_batch.base.ids import id_buckets
from rstar_batch.config import Columns
from rstar_batch.io import tokenized as tok
from rstar_batch.io.sources import CandidateFiles
from rstar_batch.progress import checkpoint

CORPUS_BUCKET_BYTES = 256 << 20   # compressed corpus Parquet per join task
RUN_BUCKET_ROWS = 1_000_000       # candidates per join task (held in its memory)
MISSING_PASSAGE = "missing_passage"
MISSING_QUERY = "missing_query"
_BUCKET = "_jb"
_PASSAGE_TYPES = (pa.string(), pa.list_(pa.int32()), pa.bool_())


@dataclass(frozen=True)
class JoinSpec(Columns):
    """The job's columns (the run, the corpus and the queries use the same names), and
    whether the corpus is a tokenized corpus: ids, not texts."""

    tokenized: bool = False

    @classmethod
    def of(cls, columns: Columns, tokenized: bool) -> "JoinSpec":
        return cls(**dataclasses.asdict(columns), tokenized=tokenized)

    @property
    def corpus_columns(self) -> list[str]:
        """The corpus's columns the join reads, as the corpus names them."""
        return list(tok.COLUMNS) if self.tokenized else [self.doc_id, self.passage]

    @property
    def passage_columns(self) -> list[str]:
        """What the joined rows carry of a passage, under the job's names."""
        return ([self.passage, C.PASSAGE_IDS, C.EMPTY_PASSAGE] if self.tokenized
                else [self.passage])


class _Bucketize:
    """`map_batches` function: add the join bucket of each row's doc id."""

    def __init__(self, doc_id: str, buckets: int) -> None:
        self.doc_id, self.buckets = doc_id, buckets

    def __call__(self, batch: pa.Table) -> pa.Table:
        return batch.append_column(
            _BUCKET, pa.array(id_buckets(batch[self.doc_id], self.buckets)))


def _split(source: CandidateFiles, columns: list[str], doc_id: str, buckets: int,
           fs: pafs.FileSystem, target: str) -> None:
    import ray.data

    ds = ray.data.read_parquet(source.paths, filesystem=source.filesystem)
    ds.select_columns(columns).map_batches(_Bucketize(doc_id, buckets), batch_format="pyarrow") \
        .write_parquet(target, filesystem=fs, partition_cols=[_BUCKET])


def _bucket_files(fs: pafs.FileSystem, folder: str) -> dict[int, list[str]]:
    files: dict[int, list[str]] = {}
    for info in fsio.list_files(fs, folder):
        parent = info.path.rsplit("/", 2)[-2]
        if parent.startswith(f"{_BUCKET}=") and info.path.endswith(".parquet"):
            files.setdefault(int(parent.split("=", 1)[1]), []).append(info.path)
    return files


@dataclass(frozen=True)
class Files:
    """Parquet files one join task reads, and the filesystem they are on."""

    filesystem: pafs.FileSystem
    paths: list[str]

    def read(self, columns: list[str]) -> pa.Table:
        return pq.read_table(self.paths, filesystem=self.filesystem, columns=columns)


def join_bucket(fs: pafs.FileSystem, run_part: Files, run_columns: list[str],
                corpus_part: Optional[Files], queries: Optional[pa.Table], spec: JoinSpec,
                target: str) -> int:
    """Join one bucket of the run with its corpus bucket (None: no corpus; no paths: no
    corpus row hashes to this bucket) and the queries; write it to `target` on `fs`."""
    # In (query id, doc id) order, so the file is a pure function of its inputs (the
    # chunks of the scoring pass are cut from it); sorted before the passages are on.
    run = run_part.read(run_columns).sort_by([(spec.query_id, "ascending"),
                                              (spec.doc_id, "ascending")])
    reason = pa.nulls(run.num_rows, pa.string())
    if corpus_part is not None and not corpus_part.paths:
        for name, kind in zip(spec.passage_columns, _PASSAGE_TYPES):
            run = run.append_column(name, pa.nulls(run.num_rows, kind))
        reason = pa.array([MISSING_PASSAGE] * run.num_rows, pa.string())
    elif corpus_part is not None:
        # the corpus's columns under the run's names: texts, or ids and empty flags
        carried = [C.PASSAGE_IDS, C.EMPTY_PASSAGE] if spec.tokenized else [spec.passage]
        corpus = corpus_part.read(spec.corpus_columns)
        corpus = _first_per_id(corpus.rename_columns([spec.doc_id, *carried]), spec.doc_id)
        # a lookup, not Arrow's join: it keeps the run's order and carries list columns
        at = pc.index_in(run[spec.doc_id], value_set=corpus[spec.doc_id])
        if spec.tokenized:
            run = run.append_column(spec.passage, pa.nulls(run.num_rows, pa.string()))
        for name in carried:
            run = run.append_column(name, corpus[name].take(at))
        reason = pc.if_else(pc.is_null(run[carried[0]]), pa.scalar(MISSING_PASSAGE), reason)
    if queries is not None:
        at = pc.index_in(run[spec.query_id], value_set=queries[spec.query_id])
        run = run.append_column(spec.query, queries[spec.query].take(at))
        reason = pc.if_else(pc.is_null(at), pa.scalar(MISSING_QUERY), reason)
    run = run.append_column(PREPARE_REASON, reason)
    columns = [spec.query_id, spec.query, spec.doc_id, *spec.passage_columns,
               *[k for k in spec.keep if k not in (spec.query, spec.passage)], PREPARE_REASON]
    fsio.write_table(fs, target, run.select(columns))
    return run.num_rows


def _first_per_id(corpus: pa.Table, doc_id: str) -> pa.Table:
    """One row per doc id (the first), so a repeated corpus id cannot repeat candidates.
    Rows without an id are dropped: they match no candidate (and numpy cannot order
    None among strings)."""
    if corpus[doc_id].null_count:
        corpus = corpus.filter(pc.is_valid(corpus[doc_id]))
    _, first = np.unique(corpus[doc_id].to_numpy(zero_copy_only=False), return_index=True)
    return corpus.take(pa.array(np.sort(first))) if len(first) != corpus.num_rows else corpus


def join_buckets(run: CandidateFiles, corpus: Optional[CandidateFiles]) -> int:
    """Join tasks: enough that none holds more than a bucket's worth of the corpus or of
    the run (a large run against a small corpus is split too, and joined in parallel)."""
    by_corpus = math.ceil(corpus.total_bytes / CORPUS_BUCKET_BYTES) if corpus else 1
    return max(1, by_corpus, math.ceil(run.num_rows / RUN_BUCKET_ROWS))


def prepare_joined(run: CandidateFiles, corpus: Optional[CandidateFiles],
                   queries: Optional[CandidateFiles], spec: JoinSpec, fs: pafs.FileSystem,
                   root: str) -> str:
    """Write the run with its texts under `_work/prepared/` (once per job); return it."""
    import ray

    out = checkpoint.prepared_dir(root)
    done = fsio.join(out, "_DONE")
    if fsio.exists(fs, done):
        return out
    query_texts = _query_texts(queries, spec) if queries is not None else None
    work = fsio.join(checkpoint.work_dir(root), "join")
    for folder in (work, out):
        fsio.delete(fs, folder)
    buckets = join_buckets(run, corpus)
    run_columns = list(dict.fromkeys(
        c for c in (spec.query_id, spec.doc_id, *spec.keep, spec.query, spec.passage)
        if c in run.schema.names))
    if buckets == 1:  # one task joins the files as they are: nothing to split
        parts = {0: (Files(run.filesystem, run.paths),
                     None if corpus is None else Files(corpus.filesystem, corpus.paths))}
    else:
        _split(run, run_columns, spec.doc_id, buckets, fs, fsio.join(work, "run"))
        corpus_parts: dict[int, list[str]] = {}
        if corpus is not None:
            _split(corpus, spec.corpus_columns, spec.corpus_columns[0], buckets, fs,
                   fsio.join(work, "corpus"))
            corpus_parts = _bucket_files(fs, fsio.join(work, "corpus"))
        parts = {b: (Files(fs, files),
                     None if corpus is None else Files(fs, corpus_parts.get(b, [])))
                 for b, files in _bucket_files(fs, fsio.join(work, "run")).items()}
    queries_ref = ray.put(query_texts) if query_texts is not None else None
    task = ray.remote(num_cpus=1)(join_bucket)
    refs = [task.remote(fs, run_part, run_columns, corpus_part, queries_ref, spec,
                        fsio.join(out, f"part-{b:05d}.parquet"))
            for b, (run_part, corpus_part) in sorted(parts.items())]
    rows = sum(ray.get(refs))
    if rows != run.num_rows:
        raise RuntimeError(f"the join wrote {rows} rows for {run.num_rows} candidates")
    fsio.write_json(fs, done, {"rows": rows, "buckets": buckets})
    fsio.delete(fs, work)
    return out


def _query_texts(queries: CandidateFiles, spec: JoinSpec) -> pa.Table:
    """Every query with a text: small enough for the object store, put there once."""
    table = pq.read_table(queries.paths, filesystem=queries.filesystem,
                          columns=[spec.query_id, spec.query])
    return table.filter(pc.is_valid(table[spec.query]))


def run_roles(spec: JoinSpec, corpus: bool, queries: bool) -> dict[str, Any]:
    """The roles the run itself must have when texts come from the corpus/queries."""
    roles = spec.roles()
    if corpus:
        roles.pop("passage")
    if queries:
        roles.pop("query")
    return roles
