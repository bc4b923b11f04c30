"""The one driver every job runs through: open or resume the output, start Ray, run
the job's streaming pass over its pending chunks, check every chunk committed, run
its second pass, summarise, check, write the manifest. SIGTERM or SIGINT drains
the job instead (drain.py): it stops with what it committed, and a rerun resumes.

A job (rerank in pipeline.py, score_corpus.py, tokenize_corpus.py) subclasses `Job`
and supplies only what differs: its checks and plan, its chunks, its pass-1 plan,
its second pass and its summary.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import logging
import queue
import signal
import threading
import time
from typing import Any, Callable, ContextManager, Optional

from rstar_batch.base import fs as fsio
from rstar_batch.cluster import live_nodes, ray_session, wait_at_most
from rstar_batch.config import RerankConfig, resolve_activation
from rstar_batch.faults import FaultHook
from rstar_batch.io.scored import Writers
from rstar_batch.io.tokenized import open_tokenized, pairing_clause
from rstar_batch.manifest import finish_job
from rstar_batch.model import ModelInfo, describe_model, load_tokenizer
from rstar_batch.progress import checkpoint
from rstar_batch.progress.drain import Drain, StartInterrupted, StopSignal
from rstar_batch.progress.log import Progress, read_progress
from rstar_batch.rank_pass import rank_all
from rstar_batch.replicas import ReplicaPlan, plan_replicas, reserved
from rstar_batch.stages.pairs import PairAssembler, PassagePolicy
from rstar_batch.stages.tokenize import checked_assembler
from rstar_batch.summary import JobSummary, check_all_committed, check_rejected

log = logging.getLogger(__name__)

# How often the driver asks the commit writers what they committed (an actor call each)
WRITER_POLL_S = 2.0


class Job(abc.ABC):
    """One job's own parts. `run(job)` calls them in order:

    before Ray: `check()` (the config and inputs; returns the plan a resume must match);
    in Ray: `chunks()`, `replicas()`, `scoring_pass()` over the pending chunks,
    `second_pass()` (rerank's rank pass unless overridden); after: `summarise()`,
    `before_success()`, `details()` for the manifest.
    """

    command = ""
    # the manifest's phase names: start-up, the streaming pass, the second pass
    phases = ("startup", "scoring", "rank")
    # A resumed run skips the rows committed runs cover in the chunks it redoes;
    # False: it redoes those chunks whole (a job that writes whole chunks).
    resumes_within_chunks = True
    # Pass 1's replicas hand scored rows to commit writers (io/scored.py), which the
    # driver starts for each pass as `sink`; False: the pass commits what it writes.
    commits_through_writers = True
    # Each query's best rows a writer keeps of all it is handed (score-corpus's top K),
    # committing them as one running top K; None: it keeps every row.
    writer_top_k: Optional[int] = None

    def __init__(self, config: RerankConfig) -> None:
        self.config = config
        self.fs, self.root = fsio.resolve(config.output)
        self.plan: dict = {}
        self.run = 0  # this run's number, once the output is opened
        self.stop: Optional[StopSignal] = None  # the workers' view of a stop, in Ray
        self.sink: Any = None  # where pass 1's replicas hand scored rows (the writers)
        self.texts_by = ""  # what tokenizes texts (stages/fast_tokens.py), for the manifest
        # Raises `Stopped` once SIGTERM or SIGINT asked the job to stop: for long steps
        # of `chunks()` (the score cache's lookup) to call while they wait.
        self.check_stop: Callable[[], None] = lambda: None

    @property
    def pairs_per_row(self) -> int:
        """Pairs one row of the pass stands for (score-corpus: one per query)."""
        return 1

    @property
    def rejectable_rows(self) -> Optional[int]:
        """Rows --max-rejected-fraction is a fraction of (None: the summary's pairs)."""
        return None

    @abc.abstractmethod
    def check(self) -> dict:
        """Check the config and the inputs; return the plan a resume must match."""

    @abc.abstractmethod
    def chunks(self) -> list[checkpoint.Chunk]:
        """Pass 1's chunks (in Ray: rerank prepares joined or nested inputs first)."""

    def replicas(self) -> ReplicaPlan:
        return plan_replicas(self.config, live_nodes())

    def reserve(self, plan: ReplicaPlan) -> ContextManager[ReplicaPlan]:
        return reserved(plan)

    @abc.abstractmethod
    def describe(self, pending: list[checkpoint.Chunk], plan: ReplicaPlan) -> str:
        """The log line that starts the pass."""

    @abc.abstractmethod
    def scoring_pass(self, plan: ReplicaPlan, pending: list[checkpoint.Chunk]) -> Any:
        """Pass 1 over the pending chunks as a lazy Ray Data dataset of commits."""

    def second_pass(self, progress: Progress,
                    stopping: Callable[[], bool]) -> list[dict]:
        return rank_all(self.fs, self.root, self.config, progress, stopping)

    @abc.abstractmethod
    def summarise(self, parts: list[dict], rows_this_run: int, seconds: float) -> JobSummary:
        """The job's counts, after checking it wrote every row exactly once."""

    def before_success(self, summary: JobSummary) -> None:
        """What the job writes once its summary checks out, before the manifest."""

    def details(self, plan: ReplicaPlan, progress: Progress) -> dict[str, Any]:
        """The manifest's job-specific fields."""
        return {}


@dataclasses.dataclass(frozen=True)
class ScoringModel:
    """A scoring job's model, checked on the driver before Ray starts."""

    model: ModelInfo
    activation: str
    tokenized: bool                  # the corpus is a tokenized corpus (passage ids)
    assembler: PairAssembler
    why_not: Optional[str]           # why pairs cannot be assembled (None: they can)

    @property
    def texts_by(self) -> str:
        """What tokenizes the texts, and why (the manifest's `texts_tokenized_by`)."""
        if self.why_not is None:
            return self.assembler.encoded_by
        return "hf (each pair tokenized whole: no pair template)"


def check_scoring_model(config: RerankConfig, corpus: Optional[str]) -> ScoringModel:
    """The model, its score activation, whether `corpus` is a tokenized corpus (checked
    against the model's tokenizer) and the pair assembler, or why pairs must be
    tokenized whole (refused where a tokenized corpus or the passage policy needs ids)."""
    model = describe_model(config.model, config.revision, config.trust_remote_code)
    activation = resolve_activation(config.score_activation, model.num_labels)
    tokenizer = load_tokenizer(model, config.trust_remote_code)
    tokenized = open_tokenized(corpus, model, tokenizer) is not None
    assembler, why_not = checked_assembler(
        tokenizer, model.source, config.max_length, PassagePolicy.of(config),
        pairing_clause(corpus) if tokenized else None, config.tokenizer_backend)
    return ScoringModel(model, activation, tokenized, assembler, why_not)


def run(job: Job) -> JobSummary:
    """Run `job` to the end, resuming what an earlier run of it committed; raise
    `Stopped` if SIGTERM or SIGINT drained it first."""
    drain = Drain(job.config.drain_seconds)
    drain.watch()
    try:
        return _run(job, drain)
    finally:
        drain.restore()


def _run(job: Job, drain: Drain) -> JobSummary:
    config = job.config
    started, phases = time.time(), Phases(job.phases)
    job.plan = job.check()
    committed = functools.partial(committed_pairs, job)  # a stop's message
    drain.check(committed)
    opened = checkpoint.open_job(job.fs, job.root, config.output, job.plan,
                                 overwrite=config.overwrite, restart=config.restart)
    if opened.finished:
        log.info("output '%s' already holds this finished job; nothing to do", config.output)
        return dataclasses.replace(JobSummary.from_dict(opened.finished["summary"]),
                                   already_done=True)
    job.run = opened.run
    drain.check(committed)

    try:
        with ray_session(config.address, drain.while_starting):
            drain.watch()  # again: ray.init installs a SIGTERM handler of its own
            job.stop = drain.attach()
            job.check_stop = lambda: drain.check(committed)
            chunks = job.chunks()
            progress = read_progress(job.fs, job.root)
            pending = progress.pending(chunks, within=job.resumes_within_chunks)
            per_row = job.pairs_per_row
            total = sum(c.rows for c in chunks) * per_row
            progress_log = ProgressLog(total, total - sum(c.todo for c in pending) * per_row,
                                       every=config.progress_seconds)
            if progress_log.done:
                log.info("resuming run %d: %d of %d chunks already done, %d pairs left",
                         opened.run, len(chunks) - len(pending), len(chunks),
                         progress_log.total - progress_log.done)
            replicas = job.replicas()
            phases.mark()
            drain.check(committed)
            if pending:
                log.info(job.describe(pending, replicas))
                # the manifest records the plan as held (its placement group's name)
                with job.reserve(replicas) as replicas:
                    progress = score_until_committed(job, replicas, chunks, pending,
                                                     progress_log, drain)
            FaultHook.from_env().at_phase("between_passes")
            drain.check(committed)
            phases.mark()
            check_all_committed(progress, chunks)
            parts = job.second_pass(progress, lambda: drain.requested)
            drain.check(committed)
            phases.mark()
    except StartInterrupted:  # a stop while Ray started: ray.init was left at once
        drain.check(committed)
        raise
    except SystemExit as exc:
        # SIGTERM while ray.init ran: Ray's own handler (sys.exit) was in place
        if exc.code != signal.SIGTERM or drain.requested:
            raise
        drain.requested_at, drain.signal_name = time.monotonic(), "SIGTERM"
        drain.check(committed)

    summary = job.summarise(parts, progress.rows_by_run.get(opened.run, 0),
                            time.time() - started)
    check_rejected(summary, config, rows=job.rejectable_rows)
    job.before_success(summary)
    FaultHook.from_env().at_phase("manifest")
    finish_job(job.fs, job.root, config, summary, job.plan, {
        "command": job.command, "texts_tokenized_by": job.texts_by,
        **job.details(replicas, progress),
        "pairs_by_node": progress_log.by_node, "seconds_by_phase": phases.seconds})
    return summary


# Passes over what is still pending after a pass whose rows a lost commit writer held
SCORING_PASSES = 3
# How long the end of a pass waits for the writers' last commits (beside a drain's own)
FLUSH_TIMEOUT_S = 300.0
WRITERS_CLOSE_S = 5.0


def score_until_committed(job: Job, replicas: ReplicaPlan, chunks: list[checkpoint.Chunk],
                          pending: list[checkpoint.Chunk], progress_log: "ProgressLog",
                          drain: Drain) -> Progress:
    """Pass 1 over `pending`, then over what no commit covers yet, until every chunk is
    committed: a commit writer lost with its node takes the rows it held with it,
    after the replicas' calls that scored them had returned. Returns the progress
    read back from the commit log (what a rerun would see)."""
    for _ in range(SCORING_PASSES):
        writers = Writers(job.fs, job.root, job.run, job.config.commit_seconds,
                          job.writer_top_k) if job.commits_through_writers else None
        job.sink = writers.sink() if writers else None
        try:
            run_scoring(job.scoring_pass(replicas, pending), progress_log, job.pairs_per_row,
                        drain, writers)
        finally:
            if writers is not None:
                close_writers(writers, progress_log, job.pairs_per_row, drain)
        progress = read_progress(job.fs, job.root)
        pending = progress.pending(chunks, within=job.resumes_within_chunks)
        if not pending or drain.requested:
            return progress
        log.warning("%d rows were scored but not committed (a commit writer was lost); "
                    "scoring them again", sum(c.todo for c in pending))
    return progress


def close_writers(writers: Writers, progress_log: "ProgressLog", pairs_per_row: int,
                  drain: Drain) -> None:
    """Have the writers commit what they hold, then end them. On a drain this waits at
    most the drain's time left, and a Ray that is gone (a SIGTERM to every process of
    the job ends the embedded Ray with the driver) only means nothing more is committed:
    calls into it go through `wait_at_most`, which never blocks the stop."""
    timeout = drain.left() if drain.requested else FLUSH_TIMEOUT_S
    flushed: list = []
    try:
        wait_at_most(timeout + 1, "committing what the writers hold",
                     lambda: flushed.extend(writers.flush(timeout)))
        wait_at_most(WRITERS_CLOSE_S, "ending the commit writers", writers.close)
    except Exception as exc:  # noqa: BLE001 - only while draining, below
        if not drain.requested:
            raise
        log.warning("the commit writers did not answer while stopping (%s); stopping "
                    "with what is committed", exc)
    progress_log.committed(flushed, pairs_per_row)


def committed_pairs(job: Job) -> tuple[int, int]:
    """(pairs committed, pairs in all), from the output and the plan: a stop's report."""
    per_row = job.plan.get("pairs_per_row", 1)
    rows = read_progress(job.fs, job.root).committed_rows()
    return rows * per_row, job.plan.get("total_rows", 0) * per_row


def no_reservation(plan: ReplicaPlan) -> ContextManager[ReplicaPlan]:
    """For jobs whose pass holds no model replicas."""
    return contextlib.nullcontext(plan)


class Phases:
    """Wall seconds of a job's phases, in the order named, for the manifest."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names, self.seconds = list(names), {}
        self.last = time.monotonic()

    def mark(self) -> None:
        """The current phase ends now; the next one starts."""
        now = time.monotonic()
        self.seconds[self.names[len(self.seconds)]] = round(now - self.last, 3)
        self.last = now


class ProgressLog:
    """A log line, at most every `every` seconds as commits land: pairs committed of
    total, pairs/s, ETA."""

    def __init__(self, total: int, already: int, every: float) -> None:
        self.total, self.done, self.started_with, self.every = total, already, already, every
        self.started = self.last = time.monotonic()
        self.by_node: dict[str, int] = {}  # pairs each Ray node's replicas scored
        self.counted: dict[str, dict] = {}  # rows by node of each commit counted

    def committed(self, commits: list, pairs_per_row: int = 1) -> None:
        """Count commits as they land (from the commit writers); a commit that replaces
        another (a running top K) counts only what it adds to it."""
        for commit in commits:
            before = self.counted.pop(commit.replaces, {})
            now = commit.nodes or {None: commit.rows}
            self.counted[commit.name] = now
            for node in now:
                self.add((now[node] - before.get(node, 0)) * pairs_per_row, node)

    def add(self, rows: int, node: Optional[str] = None) -> None:
        self.done += rows
        if node is not None:
            self.by_node[node] = self.by_node.get(node, 0) + rows
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            rate = (self.done - self.started_with) / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("progress: %d/%d pairs (%.1f%%), %.1f pairs/s, ETA %.0f s", self.done,
                     self.total, 100.0 * self.done / self.total, rate, eta)


def run_scoring(plan: Any, progress: ProgressLog, pairs_per_row: int = 1,
                drain: Optional[Drain] = None, writers: Optional[Writers] = None) -> int:
    """Execute pass 1; count its commits as they land; return rows handed over.

    A thread consumes the plan, so that this (main) thread only waits on a queue and
    sees a drain's deadline even while the pipeline is silent. With commit writers,
    progress counts what they committed (polled every few seconds); without, the
    plan's rows are commits already (tokenize-corpus writes its own). Once a stop is
    asked the readers and replicas end the plan early; past the deadline it is left
    behind.
    """
    commits: queue.Queue = queue.Queue()

    def consume() -> None:
        try:
            for batch in plan.iter_batches(batch_size=None, batch_format="pyarrow"):
                commits.put(batch)
            commits.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            commits.put(exc)

    threading.Thread(target=consume, name="rstar-batch-commits", daemon=True).start()
    rows, polled, told = 0, time.monotonic(), False
    while True:
        stopping = drain is not None and drain.requested
        if stopping and not told:  # within half a second of the signal
            wait_at_most(1.0, "telling the workers to stop", drain.tell_workers)
            told = True
        if time.monotonic() - polled >= WRITER_POLL_S:
            # the writers are asked once the pass ends after a stop (close_writers), not
            # while Ray may be going away under it
            if writers is not None and not stopping:
                progress.committed(writers.take(), pairs_per_row)
            polled = time.monotonic()
        try:
            batch = commits.get(timeout=0.5)
        except queue.Empty:
            if drain is not None and drain.overdue:
                log.warning("draining took longer than %g s; stopping with what is "
                            "committed", drain.seconds)
                return rows
            continue
        if batch is None:
            return rows
        if isinstance(batch, BaseException):
            raise batch
        nodes = (batch["node"].to_pylist() if "node" in batch.column_names
                 else [None] * batch.num_rows)
        for start, end, node in zip(batch["start"].to_pylist(), batch["end"].to_pylist(),
                                    nodes):
            rows += end - start
            if writers is None:
                progress.add((end - start) * pairs_per_row, node)
