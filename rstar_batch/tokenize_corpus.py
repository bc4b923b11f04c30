"""The tokenize-corpus job: a corpus's passages tokenized once, for every run that uses it.

    driver: check the corpus and that the model's tokenizer can be used with
      separately tokenized texts; fingerprint the tokenizer
    pass (Ray Data, streaming, checkpointed per corpus chunk):
      read pending chunks → normalize → tokenize passages whole (CPU actors) →
      write each run of a chunk's rows as T's file (rejected rows under
      T/_rejected/), commit the run
    finish: T/_tokenized_corpus.json (format, tokenizer fingerprint, model, rows),
      the manifest, then _SUCCESS

Rerunning resumes: committed chunks are skipped, a chunk left half written is
deleted and redone; a finished T is a no-op. The format is in io/tokenized.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Optional

import pyarrow.compute as pc
import pyarrow.parquet as pq

from rstar_batch import checkpoint
from rstar_batch.cluster import ray_session
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io import fs as fsio
from rstar_batch.io import tokenized as tok
from rstar_batch.io.read import ReadChunks, plan_read_tasks
from rstar_batch.io.sources import CandidateFiles, inspect_candidates
from rstar_batch.job import (JobSummary, ProgressLog, check_all_committed, check_rejected,
                             finish_job, on_tokenizers, run_scoring)
from rstar_batch.model import ModelInfo, describe_model, load_tokenizer
from rstar_batch.replicas import TOKENIZER_BATCH_ROWS, ReplicaPlan
from rstar_batch.stages.corpus_tokens import TokenizeWhole
from rstar_batch.stages.normalize import NormalizePassages
from rstar_batch.stages.pairs import PairAssembler

log = logging.getLogger(__name__)

# The config fields that decide T's contents (with the tokenizer and the corpus files).
_KEY_FIELDS = ("doc_id_column", "passage_column", "checkpoint_rows")


def tokenize_corpus(config: Optional[RerankConfig] = None, **fields: Any) -> JobSummary:
    """Tokenize every passage of `corpus` into a tokenized corpus at `output`.

    Takes the one `RerankConfig` (corpus, output and model set). Rerunning
    resumes; a finished output is a no-op. The summary counts passages as pairs.
    """
    config = (config or RerankConfig()).replace(**fields)
    _validate(config)
    started = time.time()
    model = describe_model(config.model, config.revision, config.trust_remote_code)
    fingerprint = _check_tokenizer(config, model)
    corpus = inspect_candidates([config.corpus], {"doc_id": config.doc_id_column,
                                                  "passage": config.passage_column}, [])
    out_fs, root = fsio.resolve(config.output)
    chunks = checkpoint.plan_chunks(corpus.file_rows, config.checkpoint_rows)
    plan = _plan(config, corpus, fingerprint)
    opened = checkpoint.open_job(out_fs, root, config.output, plan,
                                 overwrite=config.overwrite, restart=config.restart)
    if opened.finished:
        log.info("output '%s' already holds this tokenized corpus; nothing to do",
                 config.output)
        return dataclasses.replace(JobSummary.from_dict(opened.finished["summary"]),
                                   already_done=True)

    with ray_session(config.address):
        import ray

        done = checkpoint.read_progress(out_fs, root).done_chunks(chunks)
        pending = [c for c in chunks if c.id not in done]
        if tok.drop_chunks(out_fs, root, {c.id for c in pending}):
            log.info("deleted the partly written chunks of an earlier run")
        progress_log = ProgressLog(corpus.num_rows, sum(c.rows for c in chunks if c.id in done))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        pool = ReplicaPlan("cpu", 0.0, 1.0, 1, 1, config.tokenize_workers or max(1, cpus - 1),
                           config.replica_batch_rows or TOKENIZER_BATCH_ROWS)
        if pending:
            log.info("tokenizing %d passages with %s's tokenizer (%d chunks, up to %d "
                     "tokenizers)", sum(c.rows for c in pending), model.source, len(pending),
                     pool.tokenizers)
            run_scoring(_build_plan(config, corpus, model, pool, pending, out_fs, root,
                                    opened.run), progress_log)
        progress = checkpoint.read_progress(out_fs, root)
        check_all_committed(progress, chunks)
        overlapping = tok.overlapping_chunks(progress)
        if overlapping:
            tok.drop_chunks(out_fs, root, overlapping)
            raise RuntimeError(f"{len(overlapping)} chunk(s) were written twice in pieces "
                               "that overlap (a retried batch); they were deleted: rerun the "
                               "same command to redo them")

    summary = _summarise(config, corpus, out_fs, root, progress, opened.run, started)
    check_rejected(summary, config)
    fsio.write_json(out_fs, fsio.join(root, tok.METADATA), {
        "format_version": tok.FORMAT_VERSION, "tokenizer": fingerprint,
        "model": {"source": model.source, "revision": model.revision,
                  "fingerprint": model.fingerprint},
        "rows": summary.written, "rejected": summary.rejected,
        "columns": {"doc_id": tok.DOC_ID, "passage_ids": tok.PASSAGE_IDS,
                    "empty_passage": tok.EMPTY_PASSAGE},
        "source": {"corpus": config.corpus, "doc_id_column": config.doc_id_column,
                   "passage_column": config.passage_column,
                   "fingerprint": plan["input"]["digest"]}})
    finish_job(out_fs, root, config, summary, plan, {
        "command": "tokenize-corpus", "model": dataclasses.asdict(model),
        "input": {"files": len(corpus.paths), "rows": corpus.num_rows,
                  "fingerprint": plan["input"]["digest"]}})
    return summary


def _validate(config: RerankConfig) -> None:
    if config.candidates or config.queries:
        raise ConfigError("tokenize-corpus reads only --corpus: drop --candidates and "
                          "--queries")
    for name in ("corpus", "output"):
        if not getattr(config, name):
            raise ConfigError(f"no {name} given: set --{name} (or `{name}:` in YAML)")


def _check_tokenizer(config: RerankConfig, model: ModelInfo) -> dict[str, Any]:
    """The tokenizer's fingerprint, once it is known that jobs can pair its ids."""
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    fingerprint = tok.tokenizer_fingerprint(tokenizer)  # before any encoding: see its doc
    why_not = PairAssembler(tokenizer, config.max_length).verify()
    if why_not:
        raise ConfigError(f"model '{model.source}': jobs pair a tokenized corpus's ids with "
                          f"separately tokenized queries, but {why_not}; use the text corpus")
    return fingerprint


def _plan(config: RerankConfig, corpus: CandidateFiles, fingerprint: dict) -> dict:
    """What T is built from; a resume must match it exactly. The tokenizer, not the
    model's weights, decides the ids, so its fingerprint stands for the model."""
    key = {name: getattr(config, name) for name in _KEY_FIELDS}
    key["format_version"] = tok.FORMAT_VERSION
    prints = checkpoint.fingerprint_inputs(corpus)
    return {"command": "tokenize-corpus", "config": key, "config_hash": checkpoint.digest(key),
            "model_fingerprint": fingerprint["digest"], "input": prints,
            "total_rows": corpus.num_rows, "buckets": 1}


def _build_plan(config: RerankConfig, corpus: CandidateFiles, model: ModelInfo,
                pool: ReplicaPlan, chunks: list[checkpoint.Chunk], out_fs: Any, root: str,
                run: int) -> Any:
    """The pass as a lazy Ray Data dataset: read → normalize → tokenize → write, commit."""
    import ray.data

    tasks = plan_read_tasks(chunks, corpus.paths, corpus.row_groups)
    sources = {c.id: (corpus.paths[c.file], c.start) for c in chunks}
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds = ds.map_batches(ReadChunks(corpus.filesystem, corpus.schema.names),
                        batch_size=1, batch_format="pyarrow")
    ds = ds.map_batches(NormalizePassages(config.doc_id_column, config.passage_column, []),
                        batch_format="pyarrow", batch_size=None)
    ds = on_tokenizers(ds, TokenizeWhole, config, model, pool, pool.batch_rows)
    # Writers are actors (as many as tokenizers, half a CPU each): a writer's batches
    # are then counted in one process, which the test fault hook relies on.
    return ds.map_batches(tok.WriteTokenized, fn_constructor_args=(out_fs, root, run, sources),
                          compute=ray.data.ActorPoolStrategy(min_size=1,
                                                             max_size=pool.tokenizers),
                          num_cpus=0.5, batch_size=pool.batch_rows,
                          batch_format="pyarrow")


def _summarise(config: RerankConfig, corpus: CandidateFiles, fs: Any, root: str,
               progress: checkpoint.Progress, run: int, started: float) -> JobSummary:
    """Counts from T's files: what every run together wrote."""
    written = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows
                  for p in fsio.parquet_files(fs, root))
    rejected: dict[str, int] = {}
    bad = fsio.parquet_files(fs, fsio.join(root, tok.REJECTED))
    if bad:
        reasons = pq.read_table(bad, filesystem=fs, columns=["reason"])["reason"]
        rejected = {r["values"]: r["counts"] for r in pc.value_counts(reasons).to_pylist()}
    if written + sum(rejected.values()) != corpus.num_rows:
        raise RuntimeError(f"exactly-once check failed: the corpus has {corpus.num_rows} rows "
                           f"but {written} were written and {sum(rejected.values())} rejected")
    return JobSummary(output=config.output, pairs=corpus.num_rows, scored=written,
                      written=written, pairs_this_run=progress.rows_by_run.get(run, 0),
                      queries=0, rejected=rejected, seconds=round(time.time() - started, 3))


def summary_line(summary: JobSummary) -> str:
    """The CLI's one line for a tokenize-corpus summary."""
    if summary.already_done:
        return f"rstar-batch: already done, nothing to do ({summary.written} passages → " \
               f"{summary.output})"
    detail = ", ".join(f"{k}={v}" for k, v in sorted(summary.rejected.items()))
    return (f"rstar-batch: {summary.written} passages tokenized "
            f"({summary.pairs_this_run} in this run), {sum(summary.rejected.values())} "
            f"rejected{f' ({detail})' if detail else ''}, {summary.seconds:.1f} s → "
            f"{summary.output}")
