"""Scheduled jobs: one day's input in, that day's output out.

`jobs/nightly_rerank.py` (rerank) and `jobs/score_corpus.py` (score-corpus) are
the entrypoints under `ray job submit`. The YAML's `output` holds a `{date}`
placeholder that `--date YYYY-MM-DD` fills in (default: today, UTC), so every
run writes its own folder and a rerun of the same date resumes it, or is a
no-op once it finished. rerank's candidates must name `{date}` too; for
score-corpus the queries and corpus may (a fixed collection need not). Any
option given after `--config` overrides the file. The run ends with one JSON
record (`run` returns it) that a scheduler reads from the job's last line.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import re
import time
from typing import Any, Optional, Sequence

from rstar_batch import cli, supervise
from rstar_batch.base import fs as fsio
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.progress.drain import EXIT_STOPPED, Stopped, watch_from_the_start

log = logging.getLogger(__name__)

DATE_PLACEHOLDER = "{date}"
_DATE_SHAPE = re.compile(r"\d{4}-\d{2}-\d{2}")


def run_date(text: Optional[str] = None) -> datetime.date:
    """The day to process: `text` as YYYY-MM-DD, or today in UTC when None."""
    if text is None:
        return datetime.datetime.now(datetime.timezone.utc).date()
    if not _DATE_SHAPE.fullmatch(text):
        raise ConfigError(f"--date must look like YYYY-MM-DD, got {text!r}")
    try:
        return datetime.date.fromisoformat(text)
    except ValueError as exc:
        raise ConfigError(f"--date {text!r} is not a calendar date: {exc}") from None


JOBS = {"rerank": "nightly_rerank.py", "score-corpus": "score_corpus.py"}


def for_date(config: RerankConfig, day: datetime.date, job: str = "rerank") -> RerankConfig:
    """Fill `{date}` in the output and inputs with `day` (YYYY-MM-DD).

    The output must name the placeholder, and so must rerank's candidates:
    without it every night would read the same input, or write into one folder
    that the first night already finished.
    """
    if DATE_PLACEHOLDER not in config.output:
        raise ConfigError(f"output '{config.output}' has no {DATE_PLACEHOLDER} placeholder; "
                          "a scheduled job writes one folder per day, e.g. "
                          "s3://bucket/reranked/date={date}/")
    if job == "rerank" and not any(DATE_PLACEHOLDER in c for c in config.candidates):
        raise ConfigError(f"candidates {config.candidates} have no {DATE_PLACEHOLDER} "
                          "placeholder; a nightly job reads one day's candidates, e.g. "
                          "s3://bucket/candidates/date={date}/")
    stamp = day.isoformat()

    def fill(uri: Optional[str]) -> Optional[str]:
        return uri.replace(DATE_PLACEHOLDER, stamp) if uri else uri

    return config.replace(candidates=[fill(c) for c in config.candidates],
                          output=fill(config.output), queries=fill(config.queries),
                          corpus=fill(config.corpus))


def build_parser(job: str = "rerank") -> argparse.ArgumentParser:
    """`--config`, `--date`, `--log-level`, then every `rstar-batch` job option."""
    parser = argparse.ArgumentParser(
        prog=JOBS[job],
        description=f"Run `rstar-batch {job}` for one day. {DATE_PLACEHOLDER} in the "
                    "config's output and inputs is replaced by --date; options given here "
                    "override the config file.")
    parser.add_argument("--config", required=True, metavar="FILE",
                        help=f"YAML file of {job} options (required)")
    parser.add_argument("--date", metavar="YYYY-MM-DD",
                        help="Day to process (default: today, UTC)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="Logging detail (default: INFO)")
    cli.add_config_options(parser, leave_out=cli.CANDIDATE_ONLY if job == "score-corpus" else ())
    return parser


def config_from_args(args: argparse.Namespace, job: str = "rerank"
                     ) -> tuple[RerankConfig, datetime.date]:
    """The day's config: the YAML, the command-line overrides, then the date filled in."""
    day = run_date(args.date)
    return for_date(cli.config_from_args(args), day, job), day


def run(argv: Sequence[str], job: str = "rerank") -> tuple[int, dict[str, Any]]:
    """Run the scheduled `job` (rerank or score-corpus); return its exit code and the
    record for schedulers.

    Exit 0 only when the output is complete (this run or an earlier one);
    2 for a problem the user must fix (config, input, output folder, model);
    75 (status STOPPED) when SIGTERM or SIGINT drained it (a rerun resumes);
    1 for anything else. `seconds` is this invocation's wall time.
    """
    started = time.monotonic()
    record: dict[str, Any] = {"status": "FAILED", "date": None, "output": None,
                              "pairs": None, "queries": None, "already_done": False}
    try:
        args = build_parser(job).parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            raise
        return 2, {**record, "seconds": 0.0, "error": "invalid arguments (usage above)"}
    cli.setup_process(args.log_level)
    code, error = 0, None
    try:
        config, day = config_from_args(args, job)
        record.update(date=day.isoformat(), output=fsio.redact(config.output))
        from rstar_batch.pipeline import rerank
        from rstar_batch.score_corpus import score_corpus

        summary = (rerank if job == "rerank" else score_corpus)(config)
        record.update(status="SUCCEEDED", pairs=summary.pairs, queries=summary.queries,
                      already_done=summary.already_done)
    except cli.user_errors() as exc:
        code, error = 2, exc
        log.error("%s", exc)
    except Stopped as exc:  # SIGTERM or SIGINT (ray job stop, a spot notice) drained it
        code, error = EXIT_STOPPED, exc
        record.update(status="STOPPED", pairs=exc.total, committed=exc.committed)
        log.warning("%s", exc)
    except Exception as exc:  # any failure: the scheduler still gets its record
        code, error = 1, exc
        log.exception("scheduled %s failed", job)
    record["seconds"] = round(time.monotonic() - started, 3)
    if error is not None:
        record["error"] = _describe(error)
    return code, record


def entrypoint(argv: Sequence[str], job: str = "rerank") -> int:
    """jobs/nightly_rerank.py and jobs/score_corpus.py: run the job, print its record as
    the last line on stdout, return its exit code. A job that starts a Ray of its own
    runs in a watched child (rstar_batch/supervise.py); the watcher prints the record
    itself only where the child died without one after a stop."""
    started = time.monotonic()
    try:
        args: Optional[argparse.Namespace] = build_parser(job).parse_args(argv)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help
            raise
        args = None  # run() says what is wrong
    if args is not None and supervise.wanted(getattr(args, "address", None)):
        return supervise.watch(lambda name: _stopped(args, job, name, started),
                               drain_s=lambda: config_from_args(args, job)[0].drain_seconds)
    watch_from_the_start()
    code, record = run(argv, job)
    print(json.dumps(record), flush=True)
    return code


def _stopped(args: argparse.Namespace, job: str, signal_name: str, started: float) -> int:
    """The record of a job whose driver died after a stop was asked, from its output."""
    from rstar_batch.status import job_status

    record: dict[str, Any] = {"status": "STOPPED", "date": None, "output": None,
                              "pairs": None, "queries": None, "already_done": False}
    code = EXIT_STOPPED
    try:
        config, day = config_from_args(args, job)
        record.update(date=day.isoformat(), output=fsio.redact(config.output))
        status = job_status(config.output)
        if status.state == "DONE":
            code = 0
            record.update(status="SUCCEEDED", pairs=status.total)
        else:
            stop = Stopped.on(signal_name, status.done, status.total)
            record.update(pairs=stop.total, committed=stop.committed,
                          error=_describe(stop))
            log.warning("%s", stop)
    except Exception as exc:  # the scheduler still gets its record
        record["error"] = _describe(exc)
    record["seconds"] = round(time.monotonic() - started, 3)
    print(json.dumps(record), flush=True)
    return code


def _describe(error: BaseException) -> str:
    """`Type: first line of the message` (at most 300 characters), for the record."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__
