"""The rerank job: stages wired into a Ray Data plan, top to bottom as data flows.

    pass 1 (Ray Data, streaming, checkpointed):
      read pending chunks → normalize → tokenize (CPU actors) → score (model
      replicas) → write runs of scored rows, one piece per bucket, and commit them
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
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from rstar_batch import checkpoint
from rstar_batch.cluster import live_nodes, ray_session
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io import fs as fsio
from rstar_batch.io.join import JoinSpec, prepare_joined, run_roles
from rstar_batch.io.nested import Flatten, check_nested, find_nested_column, prepare_nested
from rstar_batch.io.read import ReadChunks, plan_read_tasks
from rstar_batch.io.scored import WriteRuns
from rstar_batch.io.sources import CandidateFiles, expand, inspect_candidates
from rstar_batch.io.tokenized import inspect_tokenized, open_tokenized
from rstar_batch.job import (JobSummary, Phases, ProgressLog, bucket_count,
                             check_all_committed, check_rejected, finish_job, job_plan,
                             on_replicas, on_tokenizers, passage_policy, rank_all,
                             run_scoring, scorer_kwargs)
from rstar_batch.model import ModelInfo, describe_model
from rstar_batch.replicas import (ReplicaPlan, describe_plan, plan_replicas, reserved,
                                  tokenizer_batch_rows)
from rstar_batch.stages import columns as C
from rstar_batch.stages.columns import PREPARE_REASON
from rstar_batch.stages.normalize import Normalize
from rstar_batch.stages.pairs import PairAssembler
from rstar_batch.stages.score import Score, resolve_activation
from rstar_batch.stages.tokenize import Tokenize

log = logging.getLogger(__name__)


def _roles(config: RerankConfig) -> dict[str, str]:
    return {"query_id": config.query_id_column, "query": config.query_column,
            "doc_id": config.doc_id_column, "passage": config.passage_column}


def _check_keep(config: RerankConfig) -> None:
    clash = {"query_id", "doc_id", config.query_id_column, config.doc_id_column} & set(
        config.keep_columns)
    if clash:
        raise ConfigError(f"keep_columns {sorted(clash)}: ids are always in the output "
                          "as query_id and doc_id")


def check_tokenizer(config: RerankConfig, model: ModelInfo) -> Optional[PairAssembler]:
    """The tokenizer checked on the driver, before Ray starts: the pair assembler the
    tokenizer actors will use (None: they tokenize each pair whole). Fails if the
    tokenizer cannot cut passages as asked."""
    return Tokenize(model, config.max_length, config.trust_remote_code,
                    passages=passage_policy(config)).assembler


def build_scoring_plan(config: RerankConfig, source: CandidateFiles, model: ModelInfo,
                       replicas: ReplicaPlan, buckets: int, chunks: list[checkpoint.Chunk],
                       out_fs: Any, root: str, run: int,
                       assembler: Optional[PairAssembler] = None) -> Any:
    """Pass 1 as a lazy Ray Data dataset: read → normalize → tokenize → score → commit."""
    import ray.data

    roles = _roles(config)
    tasks = plan_read_tasks(chunks, source.paths, source.row_groups)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(ReadChunks(source.filesystem, source.schema.names),
                        batch_size=1, batch_format="pyarrow")
    ds = ds.map_batches(
        Normalize(roles["query_id"], roles["query"], roles["doc_id"], roles["passage"],
                  config.keep_columns, buckets),
        batch_format="pyarrow", batch_size=None)
    # Blocks of one tokenizer call each: otherwise Ray Data bundles many small
    # blocks into one task, whose output (and so every commit) lands only at its end.
    rows = tokenizer_batch_rows(replicas, C.PASSAGE_IDS in source.schema.names)
    ds = ds.repartition(target_num_rows_per_block=rows)
    ds = on_tokenizers(ds, Tokenize, config, model, replicas, rows, assembler)
    ds = on_replicas(ds, Score, scorer_kwargs(config, model, replicas), replicas,
                     replicas.batch_rows)
    return ds.map_batches(WriteRuns(out_fs, root, run), batch_size=None,
                          batch_format="pyarrow")


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
        corpus = inspect_candidates([config.corpus], {"doc_id": spec.doc_id,
                                                      "passage": spec.passage}, [])
    if config.queries:
        queries = inspect_candidates([config.queries], {"query_id": spec.query_id,
                                                        "query": spec.query}, [])
    nested = _nested_column(config, spec)
    if nested:
        if corpus or queries:
            raise ConfigError("nested candidates carry their own texts; drop --corpus and "
                              "--queries")
        candidates = inspect_candidates(
            config.candidates, {"query_id": spec.query_id, "query": spec.query}, [],
            on_bad_file=config.on_bad_file, optional=(nested, *config.keep_columns))
        check_nested(candidates.paths[0], candidates.schema, nested, spec.doc_id,
                     spec.passage, config.keep_columns)
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
        prepare_nested(inputs.candidates, Flatten(inputs.nested, spec.query_id, spec.query,
                                                  spec.doc_id, spec.passage, spec.keep),
                       fs, root)
        return inspect_candidates([checkpoint.prepared_dir(config.output)], _roles(config),
                                  config.keep_columns)
    return _joined_candidates(inputs, spec, config, fs, root)


def _joined_candidates(inputs: Inputs, spec: JoinSpec, config: RerankConfig, fs: Any,
                       root: str) -> CandidateFiles:
    """Candidates with their texts joined on (under _work/prepared/, once per job)."""
    prepare_joined(inputs.candidates, inputs.corpus, inputs.queries, spec, fs, root)
    # read back by URI (the output's scheme), not by the filesystem's own path
    return inspect_candidates([checkpoint.prepared_dir(config.output)], _roles(config),
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
    config = (config or RerankConfig()).replace(**fields)
    config.validate_required()
    _check_keep(config)
    started, phases = time.time(), Phases()
    model = describe_model(config.model, config.revision, config.trust_remote_code)
    activation = resolve_activation(config.score_activation, model.num_labels)
    assembler = check_tokenizer(config, model)
    # A tokenized corpus (tokenize-corpus's output) gives passages as ids: checked here.
    tokenized = open_tokenized(config.corpus, model, config.max_length,
                               config.trust_remote_code) is not None
    spec = JoinSpec(config.query_id_column, config.query_column, config.doc_id_column,
                    config.passage_column, config.keep_columns, tokenized)
    inputs = check_inputs(config, spec)
    out_fs, root = fsio.resolve(config.output)
    plan = job_plan(config, [s for s in (inputs.candidates, inputs.corpus, inputs.queries)
                             if s is not None], model)
    opened = checkpoint.open_job(out_fs, root, config.output, plan,
                                 overwrite=config.overwrite, restart=config.restart)
    if opened.finished:
        summary = JobSummary.from_dict(opened.finished["summary"])
        log.info("output '%s' already holds this finished job; nothing to do", config.output)
        return dataclasses.replace(summary, already_done=True)

    with ray_session(config.address):
        source = inputs.candidates
        if inputs.joined or inputs.nested:
            source = _prepared_candidates(inputs, spec, config, out_fs, root)
            plan = _plan_for_prepared(plan, config, source, out_fs, root)
        chunks = checkpoint.plan_chunks(source.file_rows, config.checkpoint_rows)
        done = checkpoint.read_progress(out_fs, root).done_chunks(chunks)
        pending = [c for c in chunks if c.id not in done]
        progress_log = ProgressLog(source.num_rows, sum(c.rows for c in chunks if c.id in done))
        if done:
            log.info("resuming run %d: %d of %d chunks already done, %d pairs left",
                     opened.run, len(done), len(chunks), source.num_rows - progress_log.done)
        replicas = plan_replicas(config, live_nodes())
        phases.mark("startup")
        if pending:
            log.info("scoring %d pairs with %s on %s", sum(c.rows for c in pending),
                     model.source, describe_plan(replicas))
            with reserved(replicas) as replicas:
                run_scoring(build_scoring_plan(config, source, model, replicas, plan["buckets"],
                                               pending, out_fs, root, opened.run, assembler),
                            progress_log)
        phases.mark("scoring")
        progress = checkpoint.read_progress(out_fs, root)
        check_all_committed(progress, chunks)
        parts = rank_all(out_fs, root, config, progress)
        phases.mark("rank")

    runs = progress.rows_by_run
    summary = _summarise(config.output, source.num_rows, parts, runs.get(opened.run, 0),
                         time.time() - started)
    check_rejected(summary, config)
    finish_job(out_fs, root, config, summary, plan, {
        "pairs_scored_per_run": {str(k): v for k, v in sorted(runs.items())},
        "model": dataclasses.asdict(model), "activation": activation,
        "input": {"files": len(inputs.candidates.paths), "rows": source.num_rows,
                  "bytes": inputs.candidates.total_bytes,
                  "fingerprint": plan["input"]["digest"],
                  "skipped_files": inputs.candidates.skipped},
        "replicas": dataclasses.asdict(replicas), "pairs_by_node": progress_log.by_node,
        "seconds_by_phase": phases.seconds})
    return summary


def _summarise(output: str, pairs: int, parts: list[dict], this_run: int,
               seconds: float) -> JobSummary:
    rows = sum(p["rows"] for p in parts)
    if rows != pairs:
        raise RuntimeError(f"exactly-once check failed: the input has {pairs} rows but "
                           f"{rows} came out of scoring; the output is incomplete")
    rejected: dict[str, int] = {}
    for part in parts:
        for reason, count in part["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + count
    return JobSummary(output=output, pairs=pairs,
                      scored=sum(p["scored"] for p in parts),
                      written=sum(p["written"] for p in parts), pairs_this_run=this_run,
                      queries=sum(p["queries"] for p in parts), rejected=rejected,
                      seconds=round(seconds, 3))
