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
from rstar_batch.model import ModelInfo
from rstar_batch.replicas import ReplicaPlan, placement
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


def passage_policy(config: RerankConfig) -> PassagePolicy:
    return PassagePolicy(config.long_passages, config.passage_max_tokens, config.window,
                         config.stride)


def scorer_kwargs(config: RerankConfig, model: ModelInfo, replicas: ReplicaPlan
                  ) -> dict[str, Any]:
    """Constructor arguments of a model replica (and its retries)."""
    return dict(model=model, device=replicas.device, dtype=replicas.dtype,
                activation=config.score_activation, batch_tokens=config.batch_tokens,
                max_batch_pairs=config.max_batch_pairs, cpu_threads=replicas.threads,
                trust_remote_code=config.trust_remote_code, retries=config.batch_retries,
                quantize=config.quantize, compile=config.compile)


def on_tokenizers(ds: Any, stage: type, config: RerankConfig, model: ModelInfo,
                  replicas: ReplicaPlan, batch_rows: int, assembler: Any = None,
                  **stage_kwargs: Any) -> Any:
    """`stage` (Tokenize or TokenizePassages) as a pool of CPU tokenizer actors, one
    started and more added, up to the plan's, while blocks queue for them. An
    `assembler` the driver verified travels to them, so they load no model files."""
    import ray.data

    kwargs = dict(model=model, max_length=config.max_length,
                  trust_remote_code=config.trust_remote_code, passages=passage_policy(config),
                  **stage_kwargs)
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
        num_cpus=replicas.num_cpus, num_gpus=replicas.num_gpus or None, **placement(replicas))


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
        self.by_node: dict[str, int] = {}  # pairs each Ray node's replicas scored

    def add(self, rows: int, node: Optional[str] = None) -> None:
        self.done += rows
        if node is not None:
            self.by_node[node] = self.by_node.get(node, 0) + rows
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
        nodes = (batch["node"].to_pylist() if "node" in batch.column_names
                 else [None] * batch.num_rows)
        for start, end, node in zip(batch["start"].to_pylist(), batch["end"].to_pylist(),
                                    nodes):
            rows += end - start
            progress.add((end - start) * pairs_per_row, node)
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
