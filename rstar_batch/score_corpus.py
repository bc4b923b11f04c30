"""The score-corpus job: every query against every corpus passage, top K per query.

    driver: check the inputs and that corpus doc ids are unique; tokenize the
      queries once
    pass 1 (Ray Data, streaming, checkpointed per corpus chunk):
      read pending corpus chunks → normalize → tokenize passages (CPU actors) →
      score all queries × each block, keep every run's top K per query
      (replicas) → write each run's top-K rows by bucket, commit the run
    pass 2 (rerank's rank pass): per bucket, the runs' top K merged into the
      exact top K of each query

The |queries| × |corpus| pairs never exist outside a replica's block, so the
object store and the output hold O(queries × K × chunks) rows, not the product.
A tokenized corpus (tokenize-corpus's output) skips tokenizing passages: its
ids are cut as TokenizePassages cuts, and its rejected rows stayed in T.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rstar_batch import checkpoint
from rstar_batch.cluster import live_nodes, ray_session
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io import fs as fsio
from rstar_batch.io import sinks
from rstar_batch.io.read import ReadChunks, plan_read_tasks
from rstar_batch.io.scored import WriteRuns
from rstar_batch.io.sources import CandidateFiles, InputError, inspect_candidates
from rstar_batch.io.tokenized import DOC_ID, inspect_tokenized, open_tokenized
from rstar_batch.job import (JobSummary, ProgressLog, bucket_count, check_all_committed,
                             check_rejected, finish_job, job_plan, on_replicas,
                             on_tokenizers, passage_policy, rank_all, run_scoring,
                             scorer_kwargs)
from rstar_batch.model import ModelInfo, describe_model, load_tokenizer
from rstar_batch.replicas import describe_plan, plan_replicas, reserved
from rstar_batch.stages import columns as C
from rstar_batch.stages.all_pairs import QuerySet, ScoreAllPairs
from rstar_batch.stages.corpus_tokens import PassagesFromTokens
from rstar_batch.stages.normalize import NormalizePassages, query_buckets, stable_hash
from rstar_batch.stages.score import resolve_activation
from rstar_batch.stages.pairs import PairAssembler
from rstar_batch.stages.tokenize import TokenizePassages, fall_back_to_whole_pairs

log = logging.getLogger(__name__)

QUERIES_REJECTED = "queries.parquet"   # under _rejected/: queries that were not scored


def score_corpus(config: Optional[RerankConfig] = None, **fields: Any) -> JobSummary:
    """Score every query against every corpus passage; keep each query's top K.

    Takes the same config as `rerank` (queries, corpus, output and top_k set;
    no candidates). Rerunning resumes; a finished job is a no-op.
    """
    config = (config or RerankConfig()).replace(**fields)
    config.validate_for_corpus()
    started = time.time()
    model = describe_model(config.model, config.revision, config.trust_remote_code)
    activation = resolve_activation(config.score_activation, model.num_labels)
    tokenized = open_tokenized(config.corpus, model, config.max_length,
                               config.trust_remote_code) is not None
    assembler, whole = _pair_assembler(config, model)   # checks the tokenizer here
    corpus, doc_id = _corpus_files(config, tokenized)
    query_files = inspect_candidates([config.queries], {"query_id": config.query_id_column,
                                                        "query": config.query_column}, [])
    check_unique_doc_ids(corpus, doc_id)
    valid, rejected = read_queries(query_files, config, corpus.schema.field(doc_id).type)
    out_fs, root = fsio.resolve(config.output)
    rows_per_chunk = max(1, math.ceil(config.checkpoint_rows / valid.num_rows))
    chunks = checkpoint.plan_chunks(corpus.file_rows, rows_per_chunk)
    plan = corpus_plan(config, corpus, query_files, model, valid.num_rows, len(chunks),
                       rows_per_chunk)
    opened = checkpoint.open_job(out_fs, root, config.output, plan,
                                 overwrite=config.overwrite, restart=config.restart)
    if opened.finished:
        log.info("output '%s' already holds this finished job; nothing to do", config.output)
        return dataclasses.replace(JobSummary.from_dict(opened.finished["summary"]),
                                   already_done=True)
    queries = QuerySet(valid["query_id"].combine_chunks(), assembler.tokenize(
        valid["query"].to_pylist()), query_buckets(valid["query_id"], plan["buckets"]),
        texts=valid["query"].combine_chunks() if whole else None)
    nq = len(queries)

    with ray_session(config.address):
        done = checkpoint.read_progress(out_fs, root).done_chunks(chunks)
        pending = [c for c in chunks if c.id not in done]
        already = sum(c.rows for c in chunks if c.id in done)
        progress_log = ProgressLog(corpus.num_rows * nq, already * nq)
        replicas = plan_replicas(config, live_nodes())
        if pending:
            log.info("scoring %d queries × %d passages with %s on %s", nq,
                     corpus.num_rows - already, model.source, describe_plan(replicas))
            with reserved(replicas) as replicas:
                run_scoring(build_corpus_plan(config, corpus, model, queries, replicas, pending,
                                              out_fs, root, opened.run, tokenized,
                                              None if whole else assembler),
                            progress_log, nq)
        progress = checkpoint.read_progress(out_fs, root)
        check_all_committed(progress, chunks)
        if rejected.num_rows:
            fsio.write_table(out_fs, fsio.join(root, sinks.REJECTED, QUERIES_REJECTED),
                             rejected)
        parts = rank_all(out_fs, root, config, progress)

    runs = progress.rows_by_run
    summary = summarise(config, corpus.num_rows, nq, parts, rejected,
                        runs.get(opened.run, 0) * nq, time.time() - started)
    check_rejected(summary, config, rows=corpus.num_rows + query_files.num_rows)
    finish_job(out_fs, root, config, summary, plan, {
        "command": "score-corpus",
        "passages_scored_per_run": {str(k): v for k, v in sorted(runs.items())},
        "model": dataclasses.asdict(model), "activation": activation,
        "input": {"corpus_files": len(corpus.paths), "corpus_rows": corpus.num_rows,
                  "queries": query_files.num_rows, "fingerprint": plan["input"]["digest"]},
        "replicas": dataclasses.asdict(replicas), "pairs_by_node": progress_log.by_node})
    return summary


def _pair_assembler(config: RerankConfig, model: ModelInfo) -> tuple[PairAssembler, bool]:
    """The assembler of the job's tokenizer, and whether pairs must be tokenized whole
    instead: its pair template could not be learned or did not check out (slower;
    then passages cannot be cut, nor windowed, before pairing)."""
    assembler = PairAssembler(load_tokenizer(model, config.trust_remote_code),
                              config.max_length)
    why_not = assembler.verify()
    if why_not:
        fall_back_to_whole_pairs(passage_policy(config), f"for model '{model.source}' {why_not}")
    return assembler, why_not is not None


def _corpus_files(config: RerankConfig, tokenized: bool) -> tuple[CandidateFiles, str]:
    """The corpus's files and its doc id column (a tokenized corpus's is its own)."""
    if not tokenized:
        return inspect_candidates([config.corpus], {"doc_id": config.doc_id_column,
                                                    "passage": config.passage_column},
                                  config.keep_columns), config.doc_id_column
    if config.keep_columns:
        raise ConfigError(f"tokenized corpus '{config.corpus}' holds only doc ids and "
                          f"passage ids: keep_columns {config.keep_columns} need the text "
                          "corpus")
    return inspect_tokenized(config.corpus), DOC_ID


def build_corpus_plan(config: RerankConfig, corpus: CandidateFiles, model: Any,
                      queries: QuerySet, replicas: Any, chunks: list[checkpoint.Chunk],
                      out_fs: Any, root: str, run: int, tokenized: bool = False,
                      assembler: Any = None) -> Any:
    """Pass 1 as a lazy Ray Data dataset: read → normalize → tokenize → score → commit
    (a tokenized corpus: read → fit its ids → score → commit; no `assembler`, for a
    tokenizer without a learnable pair template: read → normalize → score → commit)."""
    import ray.data

    tasks = plan_read_tasks(chunks, corpus.paths, corpus.row_groups)
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(ReadChunks(corpus.filesystem, corpus.schema.names),
                        batch_size=1, batch_format="pyarrow")
    if not tokenized:
        ds = ds.map_batches(NormalizePassages(config.doc_id_column, config.passage_column,
                                              config.keep_columns),
                            batch_format="pyarrow", batch_size=None)
    # A replica call scores about the plan's batch rows of pairs: that many / |queries|
    # passages.
    passages = max(1, replicas.batch_rows // len(queries))
    ds = ds.repartition(target_num_rows_per_block=passages)
    if tokenized:
        ds = ds.map_batches(PassagesFromTokens(passage_policy(config),
                                               queries.passage_tokens_needed(assembler)),
                            batch_format="pyarrow", batch_size=None)
    elif assembler is not None:
        ds = on_tokenizers(ds, TokenizePassages, config, model, replicas, passages,
                           assembler, limit=queries.passage_tokens_needed(assembler))
    # else: no pair template; the replicas tokenize each pair whole from the texts
    ds = on_replicas(ds, ScoreAllPairs, dict(
        queries=queries, top_k=config.top_k, passages=passage_policy(config),
        assembler=assembler, max_length=config.max_length,
        **scorer_kwargs(config, model, replicas)),
        replicas, passages)
    return ds.map_batches(WriteRuns(out_fs, root, run), batch_size=None,
                          batch_format="pyarrow")


def corpus_plan(config: RerankConfig, corpus: CandidateFiles, query_files: CandidateFiles,
                model: Any, queries: int, chunks: int, rows_per_chunk: int) -> dict:
    """rerank's plan over the corpus and queries, with score-corpus's own sizes.

    Buckets are sized by the rows the rank pass merges: each chunk gives up to
    K rows per query.
    """
    plan = job_plan(config, [corpus, query_files], model)
    merged = queries * min(config.top_k, rows_per_chunk) * chunks
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
    rejected: dict[str, int] = {}
    for part in parts:
        for reason, count in part["rejected"].items():
            rejected[reason] = rejected.get(reason, 0) + count
    if rejected_queries.num_rows:
        for row in pc.value_counts(rejected_queries["reason"]).to_pylist():
            rejected[row["values"]] = rejected.get(row["values"], 0) + row["counts"]
    passages = corpus_rows - sum(p["rows"] - p["scored"] for p in parts)
    written = sum(p["written"] for p in parts)
    expected = queries * min(config.top_k, passages)
    if written != expected:
        raise RuntimeError(f"exactly-once check failed: {queries} queries × top {config.top_k} "
                           f"of {passages} passages should give {expected} rows, got {written}")
    return JobSummary(output=config.output, pairs=queries * passages,
                      scored=queries * passages, written=written, pairs_this_run=this_run,
                      queries=queries, rejected=rejected, seconds=round(seconds, 3))

