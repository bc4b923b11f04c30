"""The score-corpus job: every query against every corpus passage, top K per query.

    driver: check the inputs and that corpus doc ids are unique; tokenize the
      queries once
    pass 1 (Ray Data, streaming, checkpointed per corpus chunk):
      read pending corpus chunks → normalize → tokenize passages (CPU actors) →
      score all queries × each block, keep the block's top K per query
      (replicas) → the node's forwarder merges blocks into its running top K per
      query and passes on what enters it → the job's one committer merges those
      into the job's running top K and commits it every --commit-seconds, each
      commit replacing its last (io/scored.py)
    pass 2 (rerank's rank pass): per bucket, the writers' top K merged into the
      exact top K of each query

The |queries| × |corpus| pairs never exist outside a replica's block, and _work/
holds at most about 2 × |queries| × K rows (the committer's last commit and the
one replacing it), however large the corpus and the cluster.
A tokenized corpus (tokenize-corpus's output) skips tokenizing passages: its
ids are cut as TokenizePassages cuts, and its rejected rows stayed in T.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rstar_batch import driver
from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.ids import id_buckets, stable_hash
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io.read import read_chunks
from rstar_batch.io.sources import CandidateFiles, InputError, inspect_candidates
from rstar_batch.io.tokenized import DOC_ID, inspect_tokenized
from rstar_batch.manifest import bucket_count, job_plan
from rstar_batch.progress import checkpoint
from rstar_batch.progress.drain import StopSignal
from rstar_batch.progress.log import Progress
from rstar_batch.replicas import (ReplicaPlan, committing_replicas, describe_plan, on_tokenizers,
                                  scorer_kwargs)
from rstar_batch.stages.all_pairs import QuerySet, ScoreAllPairs
from rstar_batch.stages.corpus_tokens import PassagesFromTokens
from rstar_batch.stages.normalize import NormalizePassages
from rstar_batch.stages.pairs import PassagePolicy
from rstar_batch.stages.tokenize import TokenizePassages
from rstar_batch.summary import JobSummary, merge_rejected

log = logging.getLogger(__name__)

QUERIES_REJECTED = "queries.parquet"   # under _rejected/: queries that were not scored


def score_corpus(config: Optional[RerankConfig] = None, **fields: Any) -> JobSummary:
    """Score every query against every corpus passage; keep each query's top K.

    Takes the same config as `rerank` (queries, corpus, output and top_k set;
    no candidates). Rerunning resumes; a finished job is a no-op.
    """
    return driver.run(ScoreCorpusJob((config or RerankConfig()).replace(**fields)))


class ScoreCorpusJob(driver.Job):
    """score-corpus's parts of the one driver: queries read and tokenized on the driver,
    pass 1 over corpus chunks scoring all queries × each block, keeping top K."""

    command = "score-corpus"

    def __init__(self, config: RerankConfig) -> None:
        config.validate_for_corpus()
        super().__init__(config)
        self.writer_top_k = config.top_k

    def check(self) -> dict:
        config = self.config
        if config.score_cache:
            # Each night scores every query against every passage: a lookup per pair
            # would cost what scoring the few changed passages costs. Score the changed
            # passages' rows with rerank and its cache instead (docs/operations.md).
            raise ConfigError("score-corpus does not use a score cache (it looks up no "
                              "pairs: each query meets every passage); drop score_cache")
        checked = driver.check_scoring_model(config, config.corpus)
        model = self.model = checked.model
        self.activation = checked.activation
        self.tokenized, self.assembler = checked.tokenized, checked.assembler
        self.texts_by = checked.texts_by
        # whole: no pair template; the replicas tokenize each pair from the texts
        self.whole = checked.why_not is not None
        self.corpus, doc_id = _corpus_files(config, self.tokenized)
        self.query_files = inspect_candidates(
            [config.queries], config.columns.roles("query_id", "query"), [])
        check_unique_doc_ids(self.corpus, doc_id)
        self.valid, self.rejected = read_queries(self.query_files, config,
                                                 self.corpus.schema.field(doc_id).type)
        rows_per_chunk = corpus_chunk_rows(config.checkpoint_rows, self.valid.num_rows,
                                           self.corpus.num_rows)
        self.all_chunks = checkpoint.plan_chunks(self.corpus.file_rows, rows_per_chunk)
        return corpus_plan(config, self.corpus, self.query_files, model, self.valid.num_rows)

    @property
    def pairs_per_row(self) -> int:
        return self.valid.num_rows

    @property
    def rejectable_rows(self) -> int:
        return self.corpus.num_rows + self.query_files.num_rows

    def chunks(self) -> list[checkpoint.Chunk]:
        valid = self.valid
        self.queries = QuerySet(
            valid["query_id"].combine_chunks(),
            self.assembler.tokenize(valid["query"].to_pylist()),
            id_buckets(valid["query_id"], self.plan["buckets"]),
            texts=valid["query"].combine_chunks() if self.whole else None)
        return self.all_chunks

    def describe(self, pending: list[checkpoint.Chunk], replicas: ReplicaPlan) -> str:
        return (f"scoring {len(self.queries)} queries × {sum(c.todo for c in pending)} "
                f"passages with {self.model.source} on {describe_plan(replicas)}")

    def scoring_pass(self, replicas: ReplicaPlan, pending: list[checkpoint.Chunk]) -> Any:
        return build_corpus_plan(self.config, self.corpus, self.model, self.queries, replicas,
                                 pending, self.sink, self.tokenized,
                                 None if self.whole else self.assembler, self.stop)

    def second_pass(self, progress: Progress,
                    stopping: Callable[[], bool]) -> list[dict]:
        if self.rejected.num_rows:
            fsio.write_table(self.fs, fsio.join(self.root, checkpoint.REJECTED, QUERIES_REJECTED),
                             self.rejected)
        return super().second_pass(progress, stopping)

    def summarise(self, parts: list[dict], rows_this_run: int, seconds: float) -> JobSummary:
        return summarise(self.config, self.corpus.num_rows, len(self.queries), parts,
                         self.rejected, rows_this_run * len(self.queries), seconds)

    def details(self, replicas: ReplicaPlan, progress: Progress) -> dict[str, Any]:
        return {
            "passages_scored_per_run": {str(k): v
                                        for k, v in sorted(progress.rows_by_run.items())},
            "model": dataclasses.asdict(self.model), "activation": self.activation,
            "input": {"corpus_files": len(self.corpus.paths),
                      "corpus_rows": self.corpus.num_rows,
                      "queries": self.query_files.num_rows,
                      "fingerprint": self.plan["input"]["digest"]},
            "replicas": dataclasses.asdict(replicas)}


def _corpus_files(config: RerankConfig, tokenized: bool) -> tuple[CandidateFiles, str]:
    """The corpus's files and its doc id column (a tokenized corpus's is its own)."""
    if not tokenized:
        return inspect_candidates([config.corpus], config.columns.roles("doc_id", "passage"),
                                  config.keep_columns), config.doc_id_column
    if config.keep_columns:
        raise ConfigError(f"tokenized corpus '{config.corpus}' holds only doc ids and "
                          f"passage ids: keep_columns {config.keep_columns} need the text "
                          "corpus")
    return inspect_tokenized(config.corpus), DOC_ID


def build_corpus_plan(config: RerankConfig, corpus: CandidateFiles, model: Any,
                      queries: QuerySet, replicas: Any, chunks: list[checkpoint.Chunk],
                      sink: Any, tokenized: bool = False,
                      assembler: Any = None, stop: Optional[StopSignal] = None) -> Any:
    """Pass 1 as a lazy Ray Data dataset: read → normalize → tokenize → score → commit
    (a tokenized corpus: read → fit its ids → score → commit; no `assembler`, for a
    tokenizer without a learnable pair template: read → normalize → score → commit).
    The replicas commit what they score (replicas.ReplicaCommits)."""
    ds = read_chunks(corpus, chunks, stop, consumers=replicas.max_size)
    if not tokenized:
        ds = ds.map_batches(NormalizePassages(config.columns),
                            batch_format="pyarrow", batch_size=None)
    # A replica call scores about the plan's batch rows of pairs: that many / |queries|
    # passages.
    passages = max(1, replicas.batch_rows // len(queries))
    ds = ds.repartition(target_num_rows_per_block=passages)
    if tokenized:
        ds = ds.map_batches(PassagesFromTokens(PassagePolicy.of(config),
                                               queries.passage_tokens_needed(assembler)),
                            batch_format="pyarrow", batch_size=None)
    elif assembler is not None:
        ds = on_tokenizers(ds, TokenizePassages, config, model, replicas, passages,
                           assembler, limit=queries.passage_tokens_needed(assembler))
    # else: no pair template; the replicas tokenize each pair whole from the texts
    return committing_replicas(ds, ScoreAllPairs, dict(
        queries=queries, top_k=config.top_k, passages=PassagePolicy.of(config),
        assembler=assembler, max_length=config.max_length,
        **scorer_kwargs(config, model, replicas)),
        replicas, passages, sink, config, stop)


# The most chunks a corpus is cut into. A chunk is checkpoint_rows pairs (MS MARCO's
# 6,980 dev queries: one passage), but what a resume redoes is what no commit covers,
# not whole chunks, so larger chunks cost a resume nothing; 8.8M one-passage chunks
# cost the driver gigabytes of plan and each writer's record megabytes of ranges.
MAX_CORPUS_CHUNKS = 20_000


def corpus_chunk_rows(checkpoint_rows: int, queries: int, corpus_rows: int) -> int:
    """Passages per chunk: checkpoint_rows pairs' worth, or more for a corpus that
    would otherwise be cut into more than MAX_CORPUS_CHUNKS chunks."""
    return max(1, math.ceil(checkpoint_rows / queries),
               math.ceil(corpus_rows / MAX_CORPUS_CHUNKS))


def corpus_plan(config: RerankConfig, corpus: CandidateFiles, query_files: CandidateFiles,
                model: Any, queries: int) -> dict:
    """rerank's plan over the corpus and queries, with score-corpus's own sizes.

    Buckets are sized by the rows the rank pass merges: each commit writer's running
    top K, up to K rows per query each (sized for two writers' worth).
    """
    plan = job_plan(config, [corpus, query_files], model.fingerprint)
    merged = queries * min(config.top_k, corpus.num_rows) * 2
    buckets = bucket_count(config, merged, most=min(queries, 4096))
    return {**plan, "command": "score-corpus", "pairs_per_row": queries,
            "total_rows": corpus.num_rows, "buckets": buckets}


def read_queries(files: CandidateFiles, config: RerankConfig, doc_id_type: pa.DataType
                 ) -> tuple[pa.Table, pa.Table]:
    """(valid queries, rejected ones with their reason), ids unique in the first."""
    table = pq.read_table(files.paths, filesystem=files.filesystem,
                          columns=[config.query_id_column, config.query_column])
    table = table.rename_columns(["query_id", "query"])
    reason = pa.nulls(table.num_rows, pa.string())
    reason = pc.if_else(pc.is_null(table["query"]), pa.scalar(C.NULL_QUERY), reason)
    reason = pc.if_else(pc.is_null(table["query_id"]), pa.scalar(C.NULL_QUERY_ID), reason)
    position = pa.array(np.arange(table.num_rows))
    first = (table.append_column("_pos", position).filter(pc.is_valid(table["query_id"]))
             .group_by("query_id", use_threads=False).aggregate([("_pos", "min")]))
    repeat = pc.and_(pc.is_valid(table["query_id"]),
                     pc.invert(pc.is_in(position, value_set=first["_pos_min"])))
    reason = pc.if_else(pc.and_(repeat, pc.is_null(reason)), pa.scalar(C.DUPLICATE_QUERY_ID),
                        reason)
    valid = table.filter(pc.is_null(reason))
    if valid.num_rows == 0:
        raise InputError(f"queries '{config.queries}': no query has both an id and a text")
    bad = table.filter(pc.is_valid(reason))
    rejected = pa.table({"query_id": bad["query_id"], "doc_id": pa.nulls(bad.num_rows, doc_id_type),
                         "query": bad["query"], "passage": pa.nulls(bad.num_rows, pa.string()),
                         "reason": reason.filter(pc.is_valid(reason))})
    return valid.combine_chunks(), rejected


def check_unique_doc_ids(corpus: CandidateFiles, column: str) -> None:
    """A corpus must hold one passage per doc id: a query's top K is of ids.

    Hashes every id (8 bytes per passage, on the driver), then checks the ids
    behind repeated hashes exactly, so a hash collision is not a repeat.
    """
    hashes = [_hashes(corpus, path, column)[1] for path in corpus.paths]
    values, counts = np.unique(np.concatenate(hashes), return_counts=True)
    suspects = values[counts > 1]
    if not len(suspects):
        return
    where: dict[Any, list[str]] = {}
    for path in corpus.paths:
        ids, h = _hashes(corpus, path, column)
        for row in np.flatnonzero(np.isin(h, suspects)):
            where.setdefault(ids[int(row)].as_py(), []).append(f"{path} row {row}")
    repeats = {k: v for k, v in where.items() if len(v) > 1}
    if repeats:
        doc, places = next(iter(repeats.items()))
        raise InputError(
            f"corpus column '{column}' repeats {len(repeats)} doc id(s), e.g. {doc!r} at "
            f"{'; '.join(places[:3])}: score-corpus needs one passage per id; deduplicate "
            "the corpus")


def _hashes(corpus: CandidateFiles, path: str, column: str) -> tuple[pa.Array, np.ndarray]:
    ids = pq.read_table(path, filesystem=corpus.filesystem, columns=[column])[column]
    ids = ids.combine_chunks().drop_null()
    return ids, stable_hash(ids)


def summarise(config: RerankConfig, corpus_rows: int, queries: int, parts: list[dict],
              rejected_queries: pa.Table, this_run: int, seconds: float) -> JobSummary:
    """The job's counts, after checking every query got exactly its top K."""
    by_reason = ({r["values"]: r["counts"]}
                 for r in pc.value_counts(rejected_queries["reason"]).to_pylist())
    rejected = merge_rejected((p["rejected"] for p in parts), by_reason)
    passages = corpus_rows - sum(p["rows"] - p["scored"] for p in parts)
    written = sum(p["written"] for p in parts)
    expected = queries * min(config.top_k, passages)
    if written != expected:
        raise RuntimeError(f"exactly-once check failed: {queries} queries × top {config.top_k} "
                           f"of {passages} passages should give {expected} rows, got {written}")
    return JobSummary(output=config.output, pairs=queries * passages,
                      scored=queries * passages, written=written, pairs_this_run=this_run,
                      queries=queries, rejected=rejected, seconds=round(seconds, 3))

