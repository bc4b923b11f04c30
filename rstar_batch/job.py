"""What every job shares: replicas, the scoring pass's driver loop, the rank pass,
the summary, the checks before success and the manifest.

`pipeline.py` (rerank) and `score_corpus.py` each build their own pass-1 plan
and call these for the rest, so both jobs resume, report and finish alike.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Optional

from rstar_batch import __version__, checkpoint
from rstar_batch.config import RerankConfig
from rstar_batch.io import fs as fsio
from rstar_batch.io import sinks
from rstar_batch.io.scored import bucket_pieces
from rstar_batch.io.sources import CandidateFiles
from rstar_batch.model import ModelInfo, auto_cpu_dtype
from rstar_batch.stages.pairs import PassagePolicy

log = logging.getLogger(__name__)

PAIRS_PER_BUCKET = 2_000_000


PROGRESS_EVERY_S = 30.0


@dataclasses.dataclass(frozen=True)
class JobSummary:
    """What a finished job did; printed as one line and stored in the manifest."""

    output: str
    pairs: int
    scored: int
    written: int
    pairs_this_run: int
    queries: int
    rejected: dict[str, int]
    seconds: float
    already_done: bool = False

    @property
    def pairs_per_second(self) -> float:
        """Pairs this run processed (the rest were done by earlier runs) per second."""
        return self.pairs_this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_done:
            return (f"rstar-batch: already done, nothing to do ({self.pairs} pairs, "
                    f"{self.queries} queries → {self.output})")
        rejected = sum(self.rejected.values())
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items()))
        resumed = (f" ({self.pairs_this_run} in this run)"
                   if self.pairs_this_run != self.pairs else "")
        return (f"rstar-batch: {self.pairs} pairs{resumed}, {self.queries} queries, "
                f"{self.scored} scored, {rejected} rejected"
                f"{f' ({detail})' if detail else ''}, "
                f"{self.seconds:.1f} s, {self.pairs_per_second:.1f} pairs/s → {self.output}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobSummary":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.pop("already_done")
        return {**fields, "pairs_per_second": round(self.pairs_per_second, 2)}


@dataclasses.dataclass(frozen=True)
class ReplicaPlan:
    """Where and how many model replicas run."""

    device: str
    num_gpus: float
    num_cpus: float
    min_size: int
    max_size: int
    tokenizers: int  # the most CPU tokenizer actors that feed them
    batch_rows: int  # rows (pairs) handed to a replica per call
    dtype: str = "auto"  # float32/bfloat16/float16; auto: each GPU replica picks
    dtype_reason: str = ""


# The tokenizer pool autoscales (one actor, more while blocks queue for them) up to
# a cap. A GPU replica aims at 100,000+ pairs/s, which takes a dozen cores of
# tokenizing. A CPU replica scoring R* needs a fraction of one (tokenizing costs
# ~1/40 of scoring on a core), but a small model needs more than one core of
# tokenizing per replica (benchmarks/feed.py): the pool grows to two per replica
# only when the queue says so.
TOKENIZERS_PER_CPU_REPLICA = 2
TOKENIZERS_PER_GPU_REPLICA = 16

# Rows per replica call. Each block costs Ray a roughly fixed few tens of ms across
# the driver, the object store and the actors (benchmarks/feed.py: a job whose model
# costs ~30 µs per pair scored 1M pairs in 86 s with 2048-row blocks, 45 s with
# 32768). A GPU replica scores 32768 pairs in a fraction of a second; a CPU replica
# scoring R* takes ~20 s for 2048, and what a kill loses grows with the block.
CPU_BATCH_ROWS = 2048
GPU_BATCH_ROWS = 32768
# Rows per tokenizer call: small blocks keep the tokenizers' pipeline short (a 32768-row
# block takes a core ~7 s to tokenize); a GPU replica's call bundles many of them.
TOKENIZER_BATCH_ROWS = 2048


def plan_replicas(config: RerankConfig, cluster: dict[str, float]) -> ReplicaPlan:
    """Place replicas on GPUs when asked or when the cluster has any, else on CPUs;
    size the tokenizer pool to feed them (unless tokenize_workers says)."""
    gpus = cluster.get("GPU", 0.0)
    device = config.device if config.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda":
        default_max = max(1, int(gpus // config.gpus_per_replica))
        num_gpus = config.gpus_per_replica
    else:
        default_max, num_gpus = 1, 0.0
    max_size = config.max_replicas or max(default_max, config.min_replicas)
    # the CPUs the replicas leave, but one for reads and writes
    spare = int(cluster.get("CPU", 0.0) - max_size * config.cpus_per_replica) - 1
    if config.tokenize_workers:
        tokenizers = config.tokenize_workers
    elif device == "cuda":
        tokenizers = max(2, min(spare, TOKENIZERS_PER_GPU_REPLICA * max_size))
    else:
        tokenizers = max(1, min(spare, TOKENIZERS_PER_CPU_REPLICA * max_size))
    batch_rows = config.replica_batch_rows or (
        GPU_BATCH_ROWS if device == "cuda" else CPU_BATCH_ROWS)
    return ReplicaPlan(device, num_gpus, config.cpus_per_replica, config.min_replicas, max_size,
                       tokenizers, batch_rows, *replica_dtype(config, device))


def replica_dtype(config: RerankConfig, device: str) -> tuple[str, str]:
    """The replicas' dtype and why. --dtype auto for CPU replicas is decided here, by
    the driver's CPU, so that a job scores in one dtype and the manifest says which;
    a GPU replica picks bfloat16 or float16 by its own GPU."""
    if config.dtype != "auto":
        return config.dtype, "--dtype"
    if device == "cuda":
        return "auto", "bfloat16 on GPUs that support it, else float16"
    if config.quantize != "none":
        return "float32", "int8 quantization starts from float32"
    return auto_cpu_dtype()


def passage_policy(config: RerankConfig) -> PassagePolicy:
    return PassagePolicy(config.long_passages, config.passage_max_tokens, config.window,
                         config.stride)


def scorer_kwargs(config: RerankConfig, model: ModelInfo, replicas: ReplicaPlan
                  ) -> dict[str, Any]:
    """Constructor arguments of a model replica (and its retries)."""
    return dict(model=model, device=replicas.device, dtype=replicas.dtype,
                activation=config.score_activation, batch_tokens=config.batch_tokens,
                max_batch_pairs=config.max_batch_pairs, cpu_threads=config.cpu_threads,
                trust_remote_code=config.trust_remote_code, retries=config.batch_retries,
                quantize=config.quantize, compile=config.compile)


def on_tokenizers(ds: Any, stage: type, config: RerankConfig, model: ModelInfo,
                  replicas: ReplicaPlan, batch_rows: int, assembler: Any = None) -> Any:
    """`stage` (Tokenize or TokenizePassages) as a pool of CPU tokenizer actors, one
    started and more added, up to the plan's, while blocks queue for them. An
    `assembler` the driver verified travels to them, so they load no model files."""
    import ray.data

    kwargs = dict(model=model, max_length=config.max_length,
                  trust_remote_code=config.trust_remote_code, passages=passage_policy(config))
    if assembler is not None:
        kwargs["assembler"] = assembler
    return ds.map_batches(
        stage, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=replicas.tokenizers),
        batch_size=batch_rows, batch_format="pyarrow", num_cpus=1)


def on_replicas(ds: Any, stage: type, kwargs: dict[str, Any], replicas: ReplicaPlan,
                batch_rows: int) -> Any:
    """`stage` as a pool of model replicas, as many as the plan allows."""
    import ray.data

    return ds.map_batches(
        stage, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(
            min_size=replicas.min_size, max_size=replicas.max_size,
            # Two batches per replica keep a GPU fed while bounding what a kill loses.
            max_tasks_in_flight_per_actor=2),
        batch_size=batch_rows, batch_format="pyarrow",
        num_cpus=replicas.num_cpus, num_gpus=replicas.num_gpus or None)


class Phases:
    """Wall seconds of a job's phases (start-up, scoring, rank pass), for the manifest."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last = time.monotonic()

    def mark(self, phase: str) -> None:
        """The phase named ends now; the next one starts."""
        now = time.monotonic()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.last, 3)
        self.last = now


class ProgressLog:
    """A periodic log line: pairs done of total, pairs/s, ETA."""

    def __init__(self, total: int, already: int) -> None:
        self.total, self.done, self.started_with = total, already, already
        self.started = self.last = time.monotonic()

    def add(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = (self.done - self.started_with) / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("progress: %d/%d pairs (%.1f%%), %.1f pairs/s, ETA %.0f s", self.done,
                     self.total, 100.0 * self.done / self.total, rate, eta)


def run_scoring(plan: Any, progress: ProgressLog, pairs_per_row: int = 1) -> int:
    """Execute pass 1, consuming the commits as they land; return rows committed."""
    rows = 0
    for batch in plan.iter_batches(batch_size=None, batch_format="pyarrow"):
        committed = int(sum(e - s for s, e in zip(batch["start"].to_pylist(),
                                                   batch["end"].to_pylist())))
        rows += committed
        progress.add(committed * pairs_per_row)
    return rows


def rank_all(fs: Any, root: str, config: RerankConfig,
             progress: checkpoint.Progress) -> list[dict]:
    """Pass 2: one task per bucket; each writes its ranked file and rejected rows."""
    import ray

    committed = {checkpoint.run_name(chunk, start, end)
                 for chunk, ranges in progress.covered.items() for start, end in ranges}
    task = ray.remote(num_cpus=1)(sinks.rank_bucket)
    refs = [task.remote(fs, root, bucket, files, config.keep_columns, config.top_k)
            for bucket, files in bucket_pieces(fs, root, committed).items()]
    return ray.get(refs)


def _peak_rss_mb() -> float:
    """This (driver) process's peak resident memory.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter carries over the parent's
    resident size at fork, so a job launched from a large process looked large.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {"rstar_batch": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "pyarrow": pyarrow.__version__}


def bucket_count(config: RerankConfig, rows: int, most: int = 4096) -> int:
    """Output files: --rank-partitions, else one per ~2M rows the rank pass reads."""
    return config.rank_partitions or max(1, min(most, math.ceil(rows / PAIRS_PER_BUCKET)))


def job_plan(config: RerankConfig, sources: list[CandidateFiles], model: ModelInfo) -> dict:
    """What the output is built from (the candidates first, then corpus and queries);
    a resume must match it exactly."""
    key = checkpoint.config_key(config)
    rows = sources[0].num_rows
    prints = [checkpoint.fingerprint_inputs(s) for s in sources]
    files = [f for p in prints for f in p["files"]]
    return {"config": key, "config_hash": checkpoint.digest(key),
            "model_fingerprint": model.fingerprint,
            "input": {"files": files, "rows": prints[0]["rows"],
                      "digest": checkpoint.digest(files)},
            "total_rows": rows,
            "buckets": bucket_count(config, rows)}


def finish_job(fs: Any, root: str, config: RerankConfig, summary: JobSummary, plan: dict,
               details: dict[str, Any]) -> None:
    """Write the manifest, then _SUCCESS; drop the work folder."""
    fsio.write_json(fs, fsio.join(root, checkpoint.MANIFEST), {
        "summary": summary.to_dict(), "plan": plan, "config": config.to_dict(),
        "config_hash": plan["config_hash"], **details, "versions": _versions(),
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1), "finished": time.time(),
    })
    fsio.write_bytes(fs, fsio.join(root, checkpoint.SUCCESS), b"")
    fsio.delete(fs, checkpoint.work_dir(root))
    log.info(summary.line())


class TooManyRejectedError(ValueError):
    """More rows were rejected than --max-rejected-fraction allows."""


def check_rejected(summary: JobSummary, config: RerankConfig,
                    rows: Optional[int] = None) -> None:
    """Fail if more than --max-rejected-fraction of the input's `rows` were rejected."""
    rows = summary.pairs if rows is None else rows
    rejected = sum(summary.rejected.values())
    if rejected > config.max_rejected_fraction * rows:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.rejected.items()))
        share = 100.0 * rejected / rows
        raise TooManyRejectedError(
            f"{rejected} of {rows} rows were rejected ({share:.2f}% > "
            f"--max-rejected-fraction {config.max_rejected_fraction}): {reasons}; see "
            f"{fsio.join(config.output, checkpoint.REJECTED)}/ (a wrong column mapping?). "
            "Rerun with a higher --max-rejected-fraction to accept them")


def check_all_committed(progress: checkpoint.Progress, chunks: list[checkpoint.Chunk]) -> None:
    done = progress.done_chunks(chunks)
    missing = [c for c in chunks if c.id not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} chunk(s) were not committed after scoring (first: "
                           f"chunk {missing[0].id}); rerun the same command to finish them")
