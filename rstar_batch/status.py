"""`rstar-batch status OUTPUT`: how far a job got, from the output folder alone.

Reads only the small JSON files the job writes (its plan, runs and commit
records), so it works from any machine that can read the output, while the job
runs and after it died.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from rstar_batch.base import fs as fsio
from rstar_batch.progress import checkpoint
from rstar_batch.progress.log import read_progress


@dataclasses.dataclass(frozen=True)
class JobStatus:
    state: str                   # DONE, RUNNING_OR_STOPPED, NOT_STARTED, NOT_OURS
    output: str
    total: int = 0
    done: int = 0
    run: int = 0
    rate: Optional[float] = None  # pairs/s of the current run
    idle_s: Optional[float] = None  # seconds since the last commit
    summary: Optional[str] = None

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.total if self.total else 0.0

    @property
    def eta_s(self) -> Optional[float]:
        return (self.total - self.done) / self.rate if self.rate else None

    def text(self) -> str:
        if self.state == "NOT_OURS":
            return f"{self.output}: not an rstar-batch output"
        if self.state == "DONE":
            return f"DONE {self.summary}"
        if self.state == "NOT_STARTED":
            return f"{self.output}: no progress recorded yet"
        line = (f"{self.output}: {self.done}/{self.total} pairs scored ({self.percent:.1f}%), "
                f"{self.total - self.done} left, run {self.run}")
        if self.rate:
            line += f", {self.rate:.1f} pairs/s, ETA {self.eta_s:.0f} s"
        if self.idle_s is not None:
            line += (f"; last commit {self.idle_s:.0f} s ago (if no job is running, rerun "
                     "the same command to resume)")
        if self.done == self.total:
            line += "; scoring done, ranking pending"
        return line


def job_status(uri: str) -> JobStatus:
    fs, root = fsio.resolve(uri)
    if not fsio.exists(fs, fsio.join(root, checkpoint.MARKER)):
        return JobStatus("NOT_OURS", uri)
    if fsio.exists(fs, fsio.join(root, checkpoint.SUCCESS)):
        manifest = fsio.read_json(fs, fsio.join(root, checkpoint.MANIFEST))
        s = manifest["summary"]
        text = (f"{s['pairs']} pairs, {s['queries']} queries, {s['scored']} scored, "
                f"{sum(s['rejected'].values())} rejected, {s['seconds']:.1f} s → {uri}")
        return JobStatus("DONE", uri, s["pairs"], s["pairs"], summary=text)
    plan_path = fsio.join(checkpoint.work_dir(root), checkpoint.PLAN)
    if not fsio.exists(fs, plan_path):
        return JobStatus("NOT_STARTED", uri)
    plan = fsio.read_json(fs, plan_path)
    progress = read_progress(fs, root)
    runs = checkpoint.list_runs(fs, root)
    run = max(runs, default=0)
    rate = idle = None
    now = checkpoint.now()
    if progress.last_commit is not None:
        idle = max(0.0, now - progress.last_commit)
    if run in progress.rows_by_run and progress.last_commit is not None:
        span = progress.last_commit - runs[run]
        rate = progress.rows_by_run[run] / span if span > 0 else None
    per_row = plan.get("pairs_per_row", 1)  # score-corpus: a corpus row is a pair per query
    return JobStatus("RUNNING_OR_STOPPED", uri, plan["total_rows"] * per_row,
                     progress.committed_rows() * per_row, run,
                     rate * per_row if rate else None, idle)
