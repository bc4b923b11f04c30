"""The rerank job: stages wired into a Ray Data plan, top to bottom as data flows.

    pass 1 (Ray Data, streaming, checkpointed):
      read pending chunks → normalize → tokenize (CPU actors) → score (model
      replicas, which write runs of scored rows, one piece per bucket, and commit
      them, on a clock: replicas.ReplicaCommits); for replicas that take large calls
      (GPUs) the tokenizer actors read and normalize too (ReadTokenize)
    pass 2 (one Ray task per bucket):
      read the bucket's committed rows → rank per query → part-NNNNN.parquet, _rejected/

Scoring needs no grouping and streams; ranking needs all of a query's rows,
which the bucket guarantees, so pass 2 is a cheap, idempotent sort per file.
Rerunning the same command resumes: see checkpoint.py for the rules.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from rstar_batch import driver
from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.columns import PREPARE_REASON
from rstar_batch.cache.lookup import Looked, lookup
from rstar_batch.cache.store import Record, ScoreCache, open_cache
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io.join import JoinSpec, prepare_joined, run_roles
from rstar_batch.io.nested import Flatten, check_nested, find_nested_column, prepare_nested
from rstar_batch.io.read import READ_TASK_ROWS, ReadChunks, read_chunks, read_tasks
from rstar_batch.io.sources import CandidateFiles, expand, inspect_candidates
from rstar_batch.io.tokenized import inspect_tokenized
from rstar_batch.manifest import bucket_count, job_plan
from rstar_batch.model import ModelInfo
from rstar_batch.progress import checkpoint
from rstar_batch.progress.drain import StopSignal
from rstar_batch.progress.log import Progress
from rstar_batch.rank_pass import CacheAdd, rank_all
from rstar_batch.replicas import (ReplicaPlan, committing_replicas, describe_plan, on_tokenizers,
                                  scorer_kwargs, tokenizer_batch_rows)
from rstar_batch.stages.normalize import Normalize
from rstar_batch.stages.pairs import PairAssembler
from rstar_batch.stages.score import Score
from rstar_batch.stages.tokenize import Tokenize
from rstar_batch.summary import JobSummary, merge_rejected

log = logging.getLogger(__name__)


def build_scoring_plan(config: RerankConfig, source: CandidateFiles, model: ModelInfo,
                       replicas: ReplicaPlan, buckets: int, chunks: list[checkpoint.Chunk],
                       sink: Any, assembler: Optional[PairAssembler] = None,
                       stop: Optional[StopSignal] = None) -> Any:
    """Pass 1 as a lazy Ray Data dataset: read → normalize → tokenize → score → commit
    (the replicas hand what they score to `sink`, the job's commit writers). With a
    score cache the rows carry their pair keys, which the rank pass adds to it."""
    normalize = Normalize(config.columns, buckets, keyed=bool(config.score_cache))
    rows = tokenizer_batch_rows(replicas, C.PASSAGE_IDS in source.schema.names)
    if host_in_tokenizers(replicas.batch_rows):
        # each tokenizer actor reads its read task's chunks: only token ids cross the
        # object store; a read task at a time per actor, so the pool shares them
        tasks, _ = read_tasks(source, chunks)
        ds = on_tokenizers(tasks, ReadTokenize, config, model, replicas, 1, assembler,
                           tasks_per_actor=1, normalize=normalize, rows=rows, read=ReadChunks(
                               source.filesystem, source.schema.names, stop))
    else:
        ds = read_chunks(source, chunks, stop, consumers=replicas.max_size)
        ds = ds.map_batches(normalize, batch_format="pyarrow", batch_size=None)
        # Blocks of one tokenizer call each: otherwise Ray Data bundles many small
        # blocks into one task, whose output (and so every commit) lands only at its end.
        ds = ds.repartition(target_num_rows_per_block=rows)
        ds = on_tokenizers(ds, Tokenize, config, model, replicas, rows, assembler)
    return committing_replicas(ds, Score, scorer_kwargs(config, model, replicas), replicas,
                               replicas.batch_rows, sink, config, stop)


def host_in_tokenizers(replica_batch_rows: int) -> bool:
    """Whether reading and normalizing run in the tokenizer actors: when a replica's
    call holds at least half a read task's rows, so that handing replicas whole read
    tasks makes their calls no coarser than they are. Smaller calls (a CPU replica's
    2048) keep the separate read tasks, whose blocks are cut to the tokenizer's rows,
    so that slow replicas share the last blocks of a job evenly."""
    return replica_batch_rows >= READ_TASK_ROWS // 2


class ReadTokenize:
    """`map_batches` class on the tokenizer pool: read tasks in (io/read.plan_read_tasks),
    tokenized rows out, as Normalize then Tokenize would give them.

    In the plan for small replica calls each stage runs in a process of its own and
    hands its block to the next through Ray's object store, so every candidate's texts
    are written and read there twice (read task → normalize task → tokenizer actor)
    before they become ids. Here a tokenizer actor reads its read task's chunks itself:
    only token ids leave it. The stages are the same objects with the same contracts,
    called one after another on each chunk in slices of the tokenizer's rows; Ray Data
    joins a task's slices into blocks of up to its target block size, so a replica's
    input comes a read task at a time (docs/design.md, "Feeding the replicas")."""

    def __init__(self, read: ReadChunks, normalize: Normalize, rows: int,
                 **tokenize: Any) -> None:
        self.read, self.normalize, self.rows = read, normalize, rows
        self.tokenize = Tokenize(**tokenize)

    def __call__(self, tasks: pa.Table) -> Iterator[pa.Table]:
        for chunk in self.read(tasks):
            for start in range(0, chunk.num_rows, self.rows):
                yield self.tokenize(self.normalize(chunk.slice(start, self.rows)))


@dataclasses.dataclass(frozen=True)
class Inputs:
    """The checked inputs: candidates, and the corpus and queries when texts are joined."""

    candidates: CandidateFiles
    corpus: Optional[CandidateFiles] = None
    queries: Optional[CandidateFiles] = None
    nested: Optional[str] = None   # the list<struct> column of nested candidates

    @property
    def joined(self) -> bool:
        return self.corpus is not None or self.queries is not None


def check_inputs(config: RerankConfig, spec: JoinSpec) -> Inputs:
    """Find and check every input file before anything runs."""
    corpus = queries = None
    if config.corpus and spec.tokenized:
        corpus = inspect_tokenized(config.corpus)
    elif config.corpus:
        corpus = inspect_candidates([config.corpus], spec.roles("doc_id", "passage"), [])
    if config.queries:
        queries = inspect_candidates([config.queries], spec.roles("query_id", "query"), [])
    nested = _nested_column(config, spec)
    if nested:
        if corpus or queries:
            raise ConfigError("nested candidates carry their own texts; drop --corpus and "
                              "--queries")
        candidates = inspect_candidates(
            config.candidates, spec.roles("query_id", "query"), [],
            on_bad_file=config.on_bad_file, optional=(nested, *config.keep_columns))
        check_nested(candidates.paths[0], candidates.schema, nested, spec)
        return Inputs(candidates, nested=nested)
    roles = run_roles(spec, corpus is not None, queries is not None)
    candidates = inspect_candidates(config.candidates, roles, config.keep_columns,
                                    on_bad_file=config.on_bad_file)
    return Inputs(candidates, corpus, queries)


def _nested_column(config: RerankConfig, spec: JoinSpec) -> Optional[str]:
    fs, paths = expand(config.candidates)
    with fs.open_input_file(paths[0]) as fh:
        try:
            schema = pq.ParquetFile(fh).schema_arrow
        except (pa.ArrowInvalid, OSError):
            return None  # inspect_candidates reports the unreadable file
    return find_nested_column(schema, paths[0], spec.doc_id, config.nested_column)


def _prepared_candidates(inputs: Inputs, spec: JoinSpec, config: RerankConfig, fs: Any,
                         root: str) -> CandidateFiles:
    """Flatten nested candidates or join texts on, once per job, under _work/prepared/."""
    if inputs.nested:
        prepare_nested(inputs.candidates, Flatten(inputs.nested, spec), fs, root)
        return inspect_candidates([checkpoint.prepared_dir(config.output)], spec.roles(),
                                  config.keep_columns)
    return _joined_candidates(inputs, spec, config, fs, root)


def _joined_candidates(inputs: Inputs, spec: JoinSpec, config: RerankConfig, fs: Any,
                       root: str) -> CandidateFiles:
    """Candidates with their texts joined on (under _work/prepared/, once per job)."""
    prepare_joined(inputs.candidates, inputs.corpus, inputs.queries, spec, fs, root)
    # read back by URI (the output's scheme), not by the filesystem's own path
    return inspect_candidates([checkpoint.prepared_dir(config.output)], spec.roles(),
                              config.keep_columns,
                              optional=(PREPARE_REASON, C.PASSAGE_IDS, C.EMPTY_PASSAGE))


def _plan_for_prepared(plan: dict, config: RerankConfig, source: CandidateFiles, fs: Any,
                       root: str) -> dict:
    """Pairs and buckets follow the prepared candidates (a nested row holds many pairs)."""
    rows = source.num_rows
    buckets = bucket_count(config, rows)
    if (plan["total_rows"], plan["buckets"]) != (rows, buckets):
        plan = {**plan, "total_rows": rows, "buckets": buckets}
        fsio.write_json(fs, fsio.join(checkpoint.work_dir(root), checkpoint.PLAN), plan)
    return plan


def rerank(config: Optional[RerankConfig] = None, **fields: Any) -> JobSummary:
    """Score and rank every candidate; return the job's summary.

    Pass a `RerankConfig`, its fields as keywords, or both (keywords win).
    Works inside an already-initialised Ray program or starts its own.
    Rerunning the same job resumes it; a finished job is a no-op.
    """
    return driver.run(RerankJob((config or RerankConfig()).replace(**fields)))


class RerankJob(driver.Job):
    """rerank's parts of the one driver: candidate files (texts joined on or nested
    rows flattened first), pass 1 read → normalize → tokenize → score → commit."""

    command = "rerank"

    def __init__(self, config: RerankConfig) -> None:
        config.validate_required()
        super().__init__(config)
        self.cache: Optional[ScoreCache] = None
        self.adding: Optional[CacheAdd] = None  # the rank pass's entries, once it runs
        self.looked: Optional[Looked] = None
        self.parts: list[dict] = []
        self.cache_added = 0

    def check(self) -> dict:
        config = self.config
        # A tokenized corpus (tokenize-corpus's output) gives passages as ids: checked here.
        checked = driver.check_scoring_model(config, config.corpus)
        self.model, self.activation = checked.model, checked.activation
        # The assembler the tokenizer actors use; None: they tokenize each pair whole.
        self.assembler = None if checked.why_not else checked.assembler
        self.texts_by = checked.texts_by
        self.spec = JoinSpec.of(config.columns, checked.tokenized)
        self.inputs = check_inputs(config, self.spec)
        self.source = self.inputs.candidates
        sources = [s for s in (self.inputs.candidates, self.inputs.corpus,
                               self.inputs.queries) if s is not None]
        return job_plan(config, sources, self.model.fingerprint)

    def chunks(self) -> list[checkpoint.Chunk]:
        if self.inputs.joined or self.inputs.nested:
            self.source = _prepared_candidates(self.inputs, self.spec, self.config, self.fs,
                                               self.root)
            self.plan = _plan_for_prepared(self.plan, self.config, self.source, self.fs,
                                           self.root)
        self.pairs = self.source.num_rows
        chunks = checkpoint.plan_chunks(self.source.file_rows, self.config.checkpoint_rows)
        if not self.config.score_cache:
            return chunks
        self.cache = open_cache(self.config, self.model, self.activation, self.replicas(),
                                self.spec.tokenized)
        import ray

        self.looked = lookup(self.cache, self.source, chunks, self.config.columns,
                             self.plan["buckets"], self.run, self.fs, self.root,
                             ray.cluster_resources().get("CPU", 1.0),
                             skip_bad=self.config.on_bad_file == "skip",
                             check_stop=self.check_stop)
        log.info("score cache: %d of %d pairs found (%d looked up, %d cache records read)",
                 self.looked.hits, self.pairs, self.looked.keyed, self.looked.records)
        self.source = self.looked.misses
        return self.looked.chunks

    def describe(self, pending: list[checkpoint.Chunk], replicas: ReplicaPlan) -> str:
        reading = ("; the tokenizer actors read the candidates" if host_in_tokenizers(
            replicas.batch_rows) else "")
        return (f"scoring {sum(c.todo for c in pending)} pairs with {self.model.source} on "
                f"{describe_plan(replicas)}{reading}")

    def scoring_pass(self, replicas: ReplicaPlan, pending: list[checkpoint.Chunk]) -> Any:
        unread = [c.id for c in pending if c.file < 0]
        if unread:  # hits are committed by the lookup, before _work/cache/_DONE
            raise RuntimeError(f"chunks {unread[:5]} of score-cache hits are not committed; "
                               "rerun with --restart")
        return build_scoring_plan(self.config, self.source, self.model, replicas,
                                  self.plan["buckets"], pending, self.sink, self.assembler,
                                  self.stop)

    def second_pass(self, progress: Progress, stopping: Any) -> list[dict]:
        if self.cache is not None:  # named by the job: a rerun rewrites its own record
            name = checkpoint.digest([self.config.output, self.plan["input"]["digest"]])
            self.adding = CacheAdd(self.cache, name.split(":")[1][:16], int(time.time()))
        return rank_all(self.fs, self.root, self.config, progress, stopping, self.adding)

    def summarise(self, parts: list[dict], rows_this_run: int, seconds: float) -> JobSummary:
        pairs, self.parts = self.pairs, parts
        rows = sum(p["rows"] for p in parts)
        if rows != pairs:
            raise RuntimeError(f"exactly-once check failed: the input has {pairs} rows but "
                               f"{rows} came out of scoring; the output is incomplete")
        return JobSummary(output=self.config.output, pairs=pairs,
                          scored=sum(p["scored"] for p in parts),
                          written=sum(p["written"] for p in parts),
                          pairs_this_run=rows_this_run,
                          queries=sum(p["queries"] for p in parts),
                          rejected=merge_rejected(p["rejected"] for p in parts),
                          seconds=round(seconds, 3),
                          reused=sum(p.get("reused", 0) for p in parts))

    def before_success(self, summary: JobSummary) -> None:
        """The pairs this job scored or reused become cache entries (one record)."""
        if self.adding is None:
            return
        packs = tuple(p["cache_pack"] for p in self.parts if "cache_pack" in p)
        entries = sum(s.rows for _, segments in packs for s in segments)
        if packs:
            self.cache.write_record(Record(self.adding.name, packs, entries, time.time(),
                                           fsio.redact(self.config.output)))
        self.cache_added = entries

    def details(self, replicas: ReplicaPlan, progress: Progress) -> dict[str, Any]:
        candidates = self.inputs.candidates
        reused = progress.reused_by_run
        cache = {} if self.cache is None else {"score_cache": {
            "uri": fsio.redact(self.config.score_cache), "key": self.cache.key,
            "scoring": self.cache.scoring, "looked_up": self.looked.keyed,
            "found": self.looked.hits, "records_read": self.looked.records,
            "skipped_files": self.looked.skipped,
            "reused": sum(p.get("reused", 0) for p in self.parts),
            "added": self.cache_added}}
        return {
            **cache,
            "pairs_scored_per_run": {str(k): v - reused.get(k, 0)
                                     for k, v in sorted(progress.rows_by_run.items())},
            "model": dataclasses.asdict(self.model), "activation": self.activation,
            "input": {"files": len(candidates.paths), "rows": self.pairs,
                      "bytes": candidates.total_bytes,
                      "fingerprint": self.plan["input"]["digest"],
                      "skipped_files": candidates.skipped},
            "replicas": dataclasses.asdict(replicas)}
