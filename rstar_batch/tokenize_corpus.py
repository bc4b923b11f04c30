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
from typing import Any, Callable, Optional

import pyarrow.compute as pc
import pyarrow.parquet as pq

from rstar_batch import driver
from rstar_batch.base import fs as fsio
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io import tokenized as tok
from rstar_batch.io.read import read_chunks
from rstar_batch.io.sources import CandidateFiles, inspect_candidates
from rstar_batch.model import ModelInfo, describe_model, load_tokenizer
from rstar_batch.progress import checkpoint
from rstar_batch.progress.drain import StopSignal
from rstar_batch.progress.log import Progress
from rstar_batch.replicas import TOKENIZER_BATCH_ROWS, ReplicaPlan, on_tokenizers
from rstar_batch.stages.corpus_tokens import TokenizeWhole
from rstar_batch.stages.normalize import NormalizePassages
from rstar_batch.stages.pairs import PassagePolicy
from rstar_batch.stages.tokenize import checked_assembler
from rstar_batch.summary import JobSummary

log = logging.getLogger(__name__)

# The config fields that decide T's contents (with the tokenizer and the corpus files).
_KEY_FIELDS = ("doc_id_column", "passage_column", "checkpoint_rows")


def tokenize_corpus(config: Optional[RerankConfig] = None, **fields: Any) -> JobSummary:
    """Tokenize every passage of `corpus` into a tokenized corpus at `output`.

    Takes the one `RerankConfig` (corpus, output and model set). Rerunning
    resumes; a finished output is a no-op. The summary counts passages as pairs.
    """
    return driver.run(TokenizeCorpusJob((config or RerankConfig()).replace(**fields)))


class TokenizeCorpusJob(driver.Job):
    """tokenize-corpus's parts of the one driver: a pass of CPU tokenizers (no model
    replicas) that writes T's files itself, no rank pass, T's metadata at the end."""

    command = "tokenize-corpus"
    commits_through_writers = False  # its writers write T's files and commit them
    phases = ("startup", "tokenize", "check")

    def __init__(self, config: RerankConfig) -> None:
        _validate(config)
        super().__init__(config)

    def check(self) -> dict:
        config = self.config
        self.model = describe_model(config.model, config.revision, config.trust_remote_code)
        self.fingerprint, self.texts_by = _check_tokenizer(config, self.model)
        self.corpus = inspect_candidates([config.corpus],
                                         config.columns.roles("doc_id", "passage"), [])
        return _plan(config, self.corpus, self.fingerprint)

    def chunks(self) -> list[checkpoint.Chunk]:
        return checkpoint.plan_chunks(self.corpus.file_rows, self.config.checkpoint_rows)

    def replicas(self) -> ReplicaPlan:
        """The tokenizer pool, sized like a replica plan with no replicas."""
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        return ReplicaPlan("cpu", 0.0, 1.0, 1, 1,
                           self.config.tokenize_workers or max(1, cpus - 1),
                           self.config.replica_batch_rows or TOKENIZER_BATCH_ROWS)

    reserve = staticmethod(driver.no_reservation)
    # it writes whole chunks: a chunk not done is deleted and redone whole
    resumes_within_chunks = False

    def describe(self, pending: list[checkpoint.Chunk], pool: ReplicaPlan) -> str:
        return (f"tokenizing {sum(c.rows for c in pending)} passages with "
                f"{self.model.source}'s tokenizer ({len(pending)} chunks, up to "
                f"{pool.tokenizers} tokenizers)")

    def scoring_pass(self, pool: ReplicaPlan, pending: list[checkpoint.Chunk]) -> Any:
        if tok.drop_chunks(self.fs, self.root, {c.id for c in pending}):
            log.info("deleted the partly written chunks of an earlier run")
        return _build_plan(self.config, self.corpus, self.model, pool, pending, self.fs,
                           self.root, self.run, self.stop)

    def second_pass(self, progress: Progress,
                    stopping: Callable[[], bool]) -> list[dict]:
        """No ranking: check that no chunk was written twice in overlapping pieces."""
        overlapping = tok.overlapping_chunks(progress)
        if overlapping:
            tok.drop_chunks(self.fs, self.root, overlapping)
            raise RuntimeError(f"{len(overlapping)} chunk(s) were written twice in pieces "
                               "that overlap (a retried batch); they were deleted: rerun the "
                               "same command to redo them")
        return []

    def summarise(self, parts: list[dict], rows_this_run: int, seconds: float) -> JobSummary:
        return _summarise(self.config, self.corpus, self.fs, self.root, rows_this_run, seconds)

    def before_success(self, summary: JobSummary) -> None:
        config = self.config
        fsio.write_json(self.fs, fsio.join(self.root, tok.METADATA), {
            "format_version": tok.FORMAT_VERSION, "tokenizer": self.fingerprint,
            "model": {"source": self.model.source, "revision": self.model.revision,
                      "fingerprint": self.model.fingerprint},
            "rows": summary.written, "rejected": summary.rejected,
            "columns": {"doc_id": tok.DOC_ID, "passage_ids": tok.PASSAGE_IDS,
                        "empty_passage": tok.EMPTY_PASSAGE},
            "source": {"corpus": config.corpus, "doc_id_column": config.doc_id_column,
                       "passage_column": config.passage_column,
                       "fingerprint": self.plan["input"]["digest"]}})

    def details(self, pool: ReplicaPlan, progress: Progress) -> dict[str, Any]:
        return {"model": dataclasses.asdict(self.model),
                "input": {"files": len(self.corpus.paths), "rows": self.corpus.num_rows,
                          "fingerprint": self.plan["input"]["digest"]}}


def _validate(config: RerankConfig) -> None:
    if config.candidates or config.queries:
        raise ConfigError("tokenize-corpus reads only --corpus: drop --candidates and "
                          "--queries")
    for name in ("corpus", "output"):
        if not getattr(config, name):
            raise ConfigError(f"no {name} given: set --{name} (or `{name}:` in YAML)")


def _check_tokenizer(config: RerankConfig, model: ModelInfo) -> tuple[dict[str, Any], str]:
    """The tokenizer's fingerprint, once it is known that jobs can pair its ids, and
    what will tokenize the passages."""
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    fingerprint = tok.tokenizer_fingerprint(tokenizer)  # before any encoding: see its doc
    assembler, _ = checked_assembler(
        tokenizer, model.source, config.max_length, PassagePolicy(),
        "tokenize-corpus writes passage ids that jobs pair with separately tokenized "
        "queries", config.tokenizer_backend)
    return fingerprint, assembler.encoded_by


def _plan(config: RerankConfig, corpus: CandidateFiles, fingerprint: dict) -> dict:
    """What T is built from; a resume must match it exactly. The tokenizer, not the
    model's weights, decides the ids, so its fingerprint stands for the model."""
    key = {name: getattr(config, name) for name in _KEY_FIELDS}
    key["format_version"] = tok.FORMAT_VERSION
    prints = corpus.fingerprint()
    return {"command": "tokenize-corpus", "config": key, "config_hash": checkpoint.digest(key),
            "model_fingerprint": fingerprint["digest"], "input": prints,
            "total_rows": corpus.num_rows, "buckets": 1}


def _build_plan(config: RerankConfig, corpus: CandidateFiles, model: ModelInfo,
                pool: ReplicaPlan, chunks: list[checkpoint.Chunk], out_fs: Any, root: str,
                run: int, stop: Optional[StopSignal] = None) -> Any:
    """The pass as a lazy Ray Data dataset: read → normalize → tokenize → write, commit."""
    import ray.data

    sources = {c.id: (corpus.paths[c.file], c.start) for c in chunks}
    ds = read_chunks(corpus, chunks, stop, consumers=pool.tokenizers)
    ds = ds.map_batches(NormalizePassages(dataclasses.replace(config.columns, keep=())),
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
               this_run: int, seconds: float) -> JobSummary:
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
                      written=written, pairs_this_run=this_run,
                      queries=0, rejected=rejected, seconds=round(seconds, 3))


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
