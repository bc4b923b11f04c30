"""The nightly job's date templating, overrides and exit codes (no Ray needed)."""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rstar_batch import nightly
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.faults import FAULT_ENV
from tests.infra_files import REPO
from tests.jobs import Job, catches, children, committed_rows, paced, run
from tests.test_rerank_job import _assert_matches_reference


def _parse(*argv: str) -> tuple[RerankConfig, datetime.date]:
    return nightly.config_from_args(nightly.build_parser().parse_args(list(argv)))


@pytest.fixture
def config_file(tmp_path) -> str:
    path = tmp_path / "nightly.yaml"
    path.write_text("candidates: ['s3://b/cands/date={date}/', 's3://b/extra/']\n"
                    "output: s3://b/ranked/date={date}/\ntop_k: 10\n")
    return str(path)


def test_date_fills_candidates_and_output_and_flags_override_the_file(config_file):
    config, day = _parse("--config", config_file, "--date", "2026-11-26", "--top-k", "3")
    assert day == datetime.date(2026, 11, 26)
    assert config.candidates == ["s3://b/cands/date=2026-11-26/", "s3://b/extra/"]
    assert config.output == "s3://b/ranked/date=2026-11-26/"
    assert config.top_k == 3


def test_without_date_the_job_takes_today_in_utc(config_file):
    before = datetime.datetime.now(datetime.timezone.utc).date()
    config, day = _parse("--config", config_file)
    assert day in {before, datetime.datetime.now(datetime.timezone.utc).date()}
    assert config.output == f"s3://b/ranked/date={day.isoformat()}/"


@pytest.mark.parametrize("text,message", [
    ("2026-1-5", "must look like YYYY-MM-DD"),
    ("20261126", "must look like YYYY-MM-DD"),
    ("2026-02-30", "is not a calendar date"),
])
def test_a_malformed_date_is_refused(text, message):
    with pytest.raises(ConfigError, match=message):
        nightly.run_date(text)


@pytest.mark.parametrize("field,value,message", [
    ("output", "s3://b/ranked/", "output 's3://b/ranked/' has no {date}"),
    ("candidates", ["s3://b/cands/"], "have no {date}"),
])
def test_a_config_without_the_date_placeholder_is_refused(field, value, message):
    config = RerankConfig(candidates=["s3://b/c/date={date}/"], output="s3://b/o/date={date}/")
    with pytest.raises(ConfigError, match=message):
        nightly.for_date(config.replace(**{field: value}), datetime.date(2026, 11, 26))


def test_a_failed_run_exits_2_and_still_reports_for_the_scheduler(config_file):
    code, record = nightly.run(["--config", config_file, "--date", "2026-13-01"])
    assert code == 2
    assert record["status"] == "FAILED" and "ConfigError: --date" in record["error"]


def test_a_drained_run_exits_75_and_reports_stopped_with_what_is_committed(
        config_file, monkeypatch):
    from rstar_batch import pipeline
    from rstar_batch.progress.drain import Stopped

    def drained(config):
        raise Stopped("stopped on SIGTERM: 640 of 1200 pairs are committed; rerun the same "
                      "command to resume", 640, 1200)

    monkeypatch.setattr(pipeline, "rerank", drained)
    code, record = nightly.run(["--config", config_file, "--date", "2026-11-26"])
    assert code == 75
    assert (record["status"], record["committed"], record["pairs"]) == ("STOPPED", 640, 1200)
    assert record["error"].startswith("Stopped: stopped on SIGTERM: 640 of 1200")


def test_an_unexpected_failure_exits_1_and_still_reports_for_the_scheduler(
        config_file, monkeypatch):
    from rstar_batch import pipeline

    def broken(config):
        raise RuntimeError("exactly-once check failed: the input has 3 rows but 2 came out")

    monkeypatch.setattr(pipeline, "rerank", broken)
    code, record = nightly.run(["--config", config_file, "--date", "2026-11-26"])
    assert code == 1 and record["status"] == "FAILED"
    assert record["error"] == ("RuntimeError: exactly-once check failed: the input has 3 rows "
                               "but 2 came out")


def _record(text: str) -> dict:
    """The entrypoint's JSON record: its last stdout line (stderr may follow it here)."""
    lines = [line for line in text.splitlines() if line.startswith('{"status"')]
    assert lines, text[-3000:]
    return json.loads(lines[-1])


def _assert_stopped(job: Job, seconds: float, committed: int) -> dict:
    """Exit 75 within the bound; the record and the summary line say what is committed."""
    text = job.output()
    assert job.proc.returncode == 75 and seconds < 30, (seconds, text[-3000:])
    record = _record(text)
    assert record["status"] == "STOPPED" and record["committed"] == committed, record
    line = f"stopped on SIGTERM: {committed} of 1000 pairs are committed"
    assert record["error"].startswith(f"Stopped: {line}") and line in text
    return record


@pytest.mark.slow
def test_sigterms_to_every_process_stop_a_nightly_job_in_each_phase_then_the_night_completes(
        micro_model, sample_dir, sample_reference, tmp_path):
    """systemd and Slurm signal every process of the job. The real entrypoint, each run
    on its own embedded Ray (the driver runs watched: supervise.py), one output: SIGTERM
    to every process of the job before Ray starts, then while Ray starts; to its process
    group (the watcher, which passes it on) part way through scoring; then from the
    driver itself to every process (the fault hook: moments no outside timing hits) once
    every pair is committed and nothing ranked, and in the rank pass. Each run stops
    within the bound with exit 75, its summary line and its STOPPED record of what is
    committed, Ray's processes dying with the driver or not. The last run gets the
    signal as it is about to write the manifest and finishes first: exit 0, output equal
    to the one-pair reference, each pair scored by exactly one run."""
    shutil.copytree(sample_dir, tmp_path / "candidates" / "date=2026-11-26")
    config = tmp_path / "nightly.yaml"
    config.write_text(f"candidates: ['{tmp_path}/candidates/date={{date}}/']\n"
                      f"output: '{tmp_path}/out/date={{date}}/'\n"
                      f"model: '{micro_model}'\ndtype: float32\ncheckpoint_rows: 50\n"
                      "replica_batch_rows: 50\ncommit_seconds: 1\ndrain_seconds: 5\n")
    args = ["--config", str(config), "--date", "2026-11-26"]
    script = str(REPO / "jobs" / "nightly_rerank.py")
    out = str(tmp_path / "out" / "date=2026-11-26")

    job = Job(args, str(tmp_path / "run1.log"), script=script)
    job.wait_until(lambda: any(catches(pid, signal.SIGTERM) for pid in children(job.proc.pid)),
                   timeout=60)
    _assert_stopped(job, job.terminate(every=True), 0)
    assert "Started a local Ray" not in job.output()

    job = Job(args, str(tmp_path / "run2.log"), paced(0.5), script=script)
    job.wait_until(lambda: "starting a local Ray" in job.output())
    seconds = job.terminate(every=True)
    _assert_stopped(job, seconds, committed_rows(out))

    job = Job(args, str(tmp_path / "run3.log"), paced(0.5), script=script)
    job.wait_until(lambda: committed_rows(out) >= 100)
    seconds = job.terminate(group=True)
    done_at_stop = committed_rows(out)
    assert done_at_stop < 1000
    _assert_stopped(job, seconds, done_at_stop)

    for n, fault in [(4, "sigtermgroup:between_passes"),
                     (5, "sigtermgroup:rank_pass,slowrank:3")]:
        job = run(args, str(tmp_path / f"run{n}.log"), {FAULT_ENV: fault}, script=script)
        _assert_stopped(job, 0, 1000)
        assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    job = run(args, str(tmp_path / "run6.log"), {FAULT_ENV: "sigtermgroup:manifest"},
              script=script)
    assert job.proc.returncode == 0, job.output()[-3000:]
    assert _record(job.output())["status"] == "SUCCEEDED"
    _assert_matches_reference(pq.read_table(out).to_pylist(), sample_reference)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    per_run = {int(k): v for k, v in manifest["pairs_scored_per_run"].items() if v}
    fourth = int(re.search(r"resuming run (\d+)", open(tmp_path / "run4.log").read())[1])
    assert max(per_run) == fourth  # runs 5 and 6 only ranked
    assert per_run[fourth] == 1000 - done_at_stop and sum(per_run.values()) == 1000


def test_the_entrypoint_prints_the_record_as_its_last_stdout_line(tmp_path):
    config = tmp_path / "nightly.yaml"
    config.write_text(f"candidates: ['{tmp_path}/none/date={{date}}/']\n"
                      f"output: '{tmp_path}/out/date={{date}}/'\n")
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "nightly_rerank.py"),
                           "--config", str(config), "--date", "2026-11-26",
                           "--model", str(tmp_path / "no-model")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["status"] == "FAILED" and record["date"] == "2026-11-26"
    assert record["output"] == f"{tmp_path}/out/date=2026-11-26/"
    assert set(record) >= {"pairs", "queries", "seconds", "already_done", "error"}


def test_score_corpus_fills_the_date_in_its_output_and_inputs_that_name_it():
    config = RerankConfig(queries="s3://b/topics/date={date}/", corpus="s3://b/collection/",
                          output="s3://b/scores/date={date}/", top_k=10)
    day = datetime.date(2026, 11, 26)
    filled = nightly.for_date(config, day, "score-corpus")
    assert (filled.queries, filled.corpus, filled.output) == (
        "s3://b/topics/date=2026-11-26/", "s3://b/collection/", "s3://b/scores/date=2026-11-26/")
    with pytest.raises(ConfigError, match="has no {date}"):
        nightly.for_date(config.replace(output="s3://b/scores/"), day, "score-corpus")


@pytest.mark.slow
def test_the_score_corpus_entrypoint_succeeds_then_is_a_no_op(micro_model, cluster, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(12)],
                             "passage": [f"passage number {i} about comets" for i in range(12)]}),
                   tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"query_id": [1, 2], "query": ["comets", "number 7"]}),
                   tmp_path / "topics-2026-11-26.parquet")
    config = tmp_path / "score_corpus.yaml"
    config.write_text(f"queries: '{tmp_path}/topics-{{date}}.parquet'\n"
                      f"corpus: '{tmp_path}/corpus.parquet'\n"
                      f"output: '{tmp_path}/out/date={{date}}/'\ntop_k: 3\n"
                      f"model: '{micro_model}'\nmax_length: 64\n")
    command = [sys.executable, str(REPO / "jobs" / "score_corpus.py"), "--config", str(config),
               "--date", "2026-11-26"]
    records = []
    for _ in range(2):
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, **cluster.job_env,
                                   "RAY_ADDRESS": cluster.address})  # as `ray job submit`
        assert proc.returncode == 0, proc.stderr[-3000:]
        records.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert [r["status"] for r in records] == ["SUCCEEDED", "SUCCEEDED"]
    assert [r["already_done"] for r in records] == [False, True]
    assert records[0]["pairs"] == 24 and records[0]["queries"] == 2
    ranked = pq.read_table(tmp_path / "out" / "date=2026-11-26")
    assert ranked.num_rows == 6 and sorted(set(ranked["rank"].to_pylist())) == [1, 2, 3]
