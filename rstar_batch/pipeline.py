"""The rerank job: stages wired into a Ray Data plan, top to bottom as data flows.

    pass 1 (Ray Data, streaming):
      read Parquet → normalize → tokenize (CPU actors) → score (model replicas)
      → write scored rows, hive-partitioned by the bucket of their query
    pass 2 (one Ray task per bucket):
      read the bucket → rank per query → write part-NNNNN.parquet and _rejected/

Scoring needs no grouping and streams; ranking needs all of a query's rows,
which the bucket guarantees, so pass 2 is a cheap, idempotent sort per file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Optional

from rstar_batch import __version__
from rstar_batch.cluster import ray_session
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.io import fs as fsio
from rstar_batch.io import sinks
from rstar_batch.io.sources import CandidateFiles, inspect_candidates
from rstar_batch.model import ModelInfo, describe_model
from rstar_batch.stages import columns as C
from rstar_batch.stages.normalize import Normalize
from rstar_batch.stages.score import Score, resolve_activation
from rstar_batch.stages.tokenize import Tokenize

log = logging.getLogger(__name__)

PAIRS_PER_BUCKET = 2_000_000
TOKENIZE_BATCH_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class JobSummary:
    """What a finished job did; printed as one line and stored in the manifest."""

    output: str
    pairs: int
    scored: int
    written: int
    queries: int
    rejected: dict[str, int]
    seconds: float

    @property
    def pairs_per_second(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        rejected = sum(self.rejected.values())
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items()))
        return (f"rstar-batch: {self.pairs} pairs, {self.queries} queries, "
                f"{self.scored} scored, {rejected} rejected{f' ({detail})' if detail else ''}, "
                f"{self.seconds:.1f} s, {self.pairs_per_second:.1f} pairs/s → {self.output}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "pairs_per_second": round(self.pairs_per_second, 2)}


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    """Where and how many model replicas run."""

    device: str
    num_gpus: float
    num_cpus: float
    min_size: int
    max_size: int


def plan_replicas(config: RerankConfig, cluster: dict[str, float]) -> ReplicaPlan:
    """Place replicas on GPUs when asked or when the cluster has any, else on CPUs."""
    gpus = cluster.get("GPU", 0.0)
    device = config.device if config.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda":
        default_max = max(1, int(gpus // config.gpus_per_replica))
        num_gpus = config.gpus_per_replica
    else:
        default_max, num_gpus = 1, 0.0
    max_size = config.max_replicas or max(default_max, config.min_replicas)
    return ReplicaPlan(device, num_gpus, config.cpus_per_replica, config.min_replicas, max_size)


def _roles(config: RerankConfig) -> dict[str, str]:
    return {"query_id": config.query_id_column, "query": config.query_column,
            "doc_id": config.doc_id_column, "passage": config.passage_column}


def _check_keep(config: RerankConfig) -> None:
    clash = {"query_id", "doc_id", config.query_id_column, config.doc_id_column} & set(
        config.keep_columns)
    if clash:
        raise ConfigError(f"keep_columns {sorted(clash)}: ids are always in the output "
                          "as query_id and doc_id")


def build_scoring_plan(config: RerankConfig, source: CandidateFiles, model: ModelInfo,
                       replicas: ReplicaPlan, buckets: int) -> Any:
    """Pass 1 as a lazy Ray Data dataset: read → normalize → tokenize → score."""
    import ray.data

    roles = _roles(config)
    ds = ray.data.read_parquet(source.paths, filesystem=source.filesystem).select_columns(
        source.schema.names)
    ds = ds.map_batches(
        Normalize(roles["query_id"], roles["query"], roles["doc_id"], roles["passage"],
                  config.keep_columns, buckets),
        batch_format="pyarrow", batch_size=None)
    ds = ds.map_batches(
        Tokenize, fn_constructor_kwargs=dict(model=model, max_length=config.max_length,
                                             trust_remote_code=config.trust_remote_code),
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=config.tokenize_workers),
        batch_size=TOKENIZE_BATCH_ROWS, batch_format="pyarrow", num_cpus=1)
    return ds.map_batches(
        Score, fn_constructor_kwargs=dict(
            model=model, device=replicas.device, dtype=config.dtype,
            activation=config.score_activation, batch_tokens=config.batch_tokens,
            max_batch_pairs=config.max_batch_pairs, cpu_threads=config.cpu_threads,
            trust_remote_code=config.trust_remote_code),
        compute=ray.data.ActorPoolStrategy(min_size=replicas.min_size,
                                           max_size=replicas.max_size),
        batch_size=config.replica_batch_rows, batch_format="pyarrow",
        num_cpus=replicas.num_cpus, num_gpus=replicas.num_gpus or None)


def rank_all(fs: Any, root: str, config: RerankConfig) -> list[dict]:
    """Pass 2: one task per bucket; each writes its ranked file and rejected rows."""
    import ray

    task = ray.remote(num_cpus=1)(sinks.rank_bucket)
    refs = [task.remote(fs, root, bucket, files, config.keep_columns, config.top_k)
            for bucket, files in sinks.scored_buckets(fs, root).items()]
    return ray.get(refs)


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {"rstar_batch": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def rerank(config: Optional[RerankConfig] = None, **fields: Any) -> JobSummary:
    """Score and rank every candidate; return the job's summary.

    Pass a `RerankConfig`, its fields as keywords, or both (keywords win).
    Works inside an already-initialised Ray program or starts its own.
    """
    config = (config or RerankConfig()).replace(**fields)
    config.validate_required()
    _check_keep(config)
    started = time.time()
    model = describe_model(config.model, config.revision, config.trust_remote_code)
    resolve_activation(config.score_activation, model.num_labels)
    source = inspect_candidates(config.candidates, _roles(config), config.keep_columns)
    out_fs, root = fsio.resolve(config.output)
    buckets = config.rank_partitions or min(4096, math.ceil(source.num_rows / PAIRS_PER_BUCKET))

    sinks.prepare_output(out_fs, root, config.output, config.overwrite, marker={
        "tool": "rstar-batch", "version": __version__, "started": started})

    with ray_session(config.address):
        import ray

        replicas = plan_replicas(config, ray.cluster_resources())
        log.info("scoring %d pairs with %s replica(s) on %s (%d..%d)", source.num_rows,
                 model.source, replicas.device, replicas.min_size, replicas.max_size)
        plan = build_scoring_plan(config, source, model, replicas, buckets)
        plan.write_parquet(sinks.scored_dir(root), filesystem=out_fs,
                           partition_cols=[C.BUCKET])
        parts = rank_all(out_fs, root, config)

    summary = _summarise(config.output, source.num_rows, parts, time.time() - started)
    fsio.write_json(out_fs, fsio.join(root, sinks.MANIFEST), {
        "summary": summary.to_dict(), "config": config.to_dict(),
        "model": dataclasses.asdict(model), "activation": resolve_activation(
            config.score_activation, model.num_labels),
        "input": {"files": len(source.paths), "rows": source.num_rows,
                  "bytes": source.total_bytes},
        "rank_partitions": buckets, "replicas": dataclasses.asdict(replicas),
        "versions": _versions(),
    })
    fsio.delete(out_fs, fsio.join(root, sinks.WORK))
    fsio.write_bytes(out_fs, fsio.join(root, sinks.SUCCESS), b"")
    log.info(summary.line())
    return summary


def _summarise(output: str, pairs: int, parts: list[dict], seconds: float) -> JobSummary:
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
                      written=sum(p["written"] for p in parts),
                      queries=sum(p["queries"] for p in parts), rejected=rejected,
                      seconds=round(seconds, 3))
