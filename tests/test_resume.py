"""Checkpointed progress: kill the job anywhere, rerun it, get exactly the uninterrupted output."""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import shutil
import signal
import time
from typing import Callable, Optional

import pyarrow.parquet as pq
import pytest

import rstar_batch
from rstar_batch.faults import FAULT_ENV
from rstar_batch.progress.checkpoint import ResumeError
from rstar_batch.testing import write_sample_data
from tests.jobs import Job, catches, committed_rows, paced, run
from tests.reference import reference_scores
from tests.test_rerank_job import _assert_matches_reference

pytestmark = pytest.mark.slow
TOTAL = 1200
# A run that is stopped part way is paced by the fault hook (each replica batch of 60
# pairs takes 0.5 s longer, 20 batches), not by a model that takes as long.
PACED = paced(0.5)


@pytest.fixture(scope="module")
def job_input(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("resume") / "candidates")
    write_sample_data(out, num_queries=30, candidates_per_query=40, files=3, seed=11)
    return out


def _args(candidates: str, output: str, model: str, *extra: str) -> list[str]:
    # Short pairs and small chunks keep each run to seconds while leaving 20 chunks to kill in.
    return ["rerank", "--candidates", candidates, "--output", output, "--model", model,
            "--dtype", "float32", "--max-length", "96", "--checkpoint-rows", "60",
            "--commit-seconds", "1",
            "--replica-batch-rows", "60",
            "--rank-partitions", "4", *extra]


@pytest.fixture(scope="module")
def job_reference(job_input, micro_model) -> dict:
    """The one-pair reference of `job_input` (3 s; an uninterrupted job took 13 s)."""
    return reference_scores(micro_model, pq.read_table(job_input), max_length=96)


def _assert_same_output(out: str, reference: dict) -> None:
    """Every pair once, scored and ranked as the one-pair reference; each query in one
    ranked file."""
    table = pq.read_table(out)
    assert table.num_rows == len(set(zip(table["query_id"].to_pylist(),
                                         table["doc_id"].to_pylist()))) == TOTAL
    assert len(reference) == TOTAL
    _assert_matches_reference(table.to_pylist(), reference)
    files = {}
    for path in glob.glob(os.path.join(out, "part-*.parquet")):
        for qid in set(pq.read_table(path)["query_id"].to_pylist()):
            assert files.setdefault(qid, path) == path  # each query in one file


def _commits(out: str) -> int:
    return len(glob.glob(os.path.join(out, "_work", "commits", "*.json")))


KILL_POINTS = {
    "during_final_pass": lambda out: committed_rows(out) >= TOTAL,
}


def test_a_job_killed_then_interrupted_resumes_each_time_without_loss_or_duplicates(
        job_input, micro_model, job_reference, cluster, tmp_path):
    """One output through three runs: the first is SIGKILLed (a lost driver) a third of
    the way, with `status` read while it runs; the second is stopped by Ctrl-C (SIGINT
    drains as SIGTERM does) two thirds of the way; the third finishes. Each run scores
    only what the runs before it did not commit."""
    out = str(tmp_path / "out")
    args = _args(job_input, out, micro_model, "--drain-seconds", "20")
    # Both runs log their progress each second (the second with a GPU's replica calls,
    # which span several commits and make the tokenizer actors read the candidates:
    # pipeline.ReadTokenize): what they log must follow the commit records.
    logging_each_second = [*args, "--progress-seconds", "1"]
    samples: list[tuple[float, int]] = []  # (when, pairs committed) as the test saw them

    def committed_at_least(rows: int) -> Callable[[], bool]:
        def check() -> bool:
            samples.append((time.time(), committed_rows(out)))
            return samples[-1][1] >= rows
        return check

    job = Job(logging_each_second, str(tmp_path / "run1.log"), PACED, cluster=cluster)
    job.wait_until(lambda: _commits(out) >= 3)
    text = run(["status", out], str(tmp_path / "status.log")).output()
    assert "pairs scored" in text and "pairs/s, ETA" in text and "run 1" in text
    report = json.loads(run(["status", out, "--json"], str(tmp_path / "s.json")).output())
    assert 0 < report["done"] < TOTAL and report["total"] == TOTAL
    assert report["rate"] > 0 and report["eta_s"] > 0
    job.wait_until(committed_at_least(TOTAL // 3))
    job.kill()
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    done_at_kill = committed_rows(out)
    assert done_at_kill < TOTAL
    logs = job.output()
    status = run(["status", out], str(tmp_path / "status1.log")).output()
    assert f"{done_at_kill}/{TOTAL} pairs scored" in status
    assert "rerun the same command" in status

    job = Job([*logging_each_second, "--replica-batch-rows", "32768"],
              str(tmp_path / "run2.log"), PACED, cluster=cluster)
    job.wait_until(committed_at_least(2 * TOTAL // 3))
    seconds = job.terminate(sig=signal.SIGINT)
    text = job.output()
    _assert_logged_progress_follows_the_commits(logs + text, samples, committed_rows(out))
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    assert job.proc.returncode == 75, text[-3000:]
    assert "SIGINT: draining" in text and "the tokenizer actors read the candidates" in text
    done_at_stop = committed_rows(out)
    assert f"rstar-batch: stopped on SIGINT: {done_at_stop} of {TOTAL} pairs are " \
        "committed; rerun the same command to resume" in text

    per_run = _rerun_equals_the_reference(job_input, out, micro_model, job_reference, tmp_path,
                                         cluster, log="run3.log")
    assert per_run.get(1, 0) == done_at_kill  # nothing committed was lost
    assert per_run[1] + per_run[2] == done_at_stop
    assert sum(per_run.values()) == TOTAL  # and nothing was scored twice


def test_sigterm_before_ray_starts_then_during_start_up_then_between_the_passes_stops(
        job_input, micro_model, job_reference, cluster, tmp_path):
    """SIGTERM to the driver as soon as it handles one at all (it is still importing
    and checking: it must stop there, say so and exit 75, not die of the signal), then
    to a rerun as soon as its plan is written (Ray starting), then to a third run
    between the passes (every pair committed, nothing ranked: a moment no outside
    timing hits, so the driver signals itself there, the fault hook); the fourth run
    only ranks."""
    out = str(tmp_path / "out")
    args = _args(job_input, out, micro_model, "--drain-seconds", "20")
    job = Job(args, str(tmp_path / "run1.log"), cluster=cluster)
    job.wait_until(lambda: catches(job.proc.pid, signal.SIGTERM), timeout=60)
    seconds = job.terminate()
    text = job.output()
    assert job.proc.returncode == 75, text[-3000:]
    assert f"rstar-batch: stopped on SIGTERM: 0 of {TOTAL} pairs are committed" in text
    assert "joining Ray cluster" not in text and seconds < 30  # stopped before Ray

    job = Job(args, str(tmp_path / "run2.log"), PACED, cluster=cluster)
    job.wait_until(lambda: os.path.exists(os.path.join(out, "_work", "plan.json")))
    seconds = job.terminate()
    text = job.output()
    assert job.proc.returncode == 75 and seconds < 30, text[-3000:]
    assert "SIGTERM: draining" in text
    done_at_stop = committed_rows(out)
    assert f"stopped on SIGTERM: {done_at_stop} of {TOTAL} pairs are committed" in text

    job = run(args, str(tmp_path / "run3.log"), {FAULT_ENV: "sigterm:between_passes"},
              cluster=cluster)
    text = job.output()
    assert job.proc.returncode == 75, text[-3000:]
    assert f"rstar-batch: stopped on SIGTERM: {TOTAL} of {TOTAL} pairs are committed" in text
    assert not glob.glob(os.path.join(out, "part-*.parquet"))  # nothing ranked yet

    per_run = _rerun_equals_the_reference(job_input, out, micro_model, job_reference, tmp_path,
                                         cluster, log="run4.log")
    assert sum(per_run.values()) == TOTAL and 4 not in per_run  # the last run only ranked


@pytest.mark.parametrize("point", ["during_final_pass"])
def test_sigterm_drains_stops_within_the_bound_and_the_rerun_resumes(
        point, job_input, micro_model, job_reference, cluster, tmp_path):
    """SIGTERM to the driver alone, as Kubernetes and `ray job stop` send it, in the
    rank pass (in the middle of scoring: the first test, with SIGINT; before Ray, in
    start-up and between the passes: the test above); the rerun gets one as it is about
    to write the manifest (the driver signals itself there, the fault hook) and
    finishes first: exit 0, its summary, the output."""
    sig = signal.SIGTERM
    name = signal.Signals(sig).name
    out = str(tmp_path / "out")
    # the rank pass is paced (its tasks 3 s longer) when the signal is to land in it
    pace = {FAULT_ENV: "slowrank:3"} if point == "during_final_pass" else PACED
    job = Job(_args(job_input, out, micro_model, "--drain-seconds", "20"),
              str(tmp_path / "run1.log"), pace, cluster=cluster)
    job.wait_until(lambda: KILL_POINTS[point](out))
    seconds = job.terminate(sig=sig)
    text = job.output()
    assert seconds < 30, f"took {seconds:.1f} s to stop"
    assert job.proc.returncode == 75, text[-3000:]
    assert f"{name}: draining" in text
    done_at_stop = committed_rows(out)
    assert f"rstar-batch: stopped on {name}: {done_at_stop} of {TOTAL} pairs are " \
        "committed; rerun the same command to resume" in text
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    per_run = _rerun_equals_the_reference(job_input, out, micro_model, job_reference, tmp_path,
                                         cluster, env={FAULT_ENV: "sigterm:manifest"})
    text = open(tmp_path / "run2.log").read()
    assert "SIGTERM: draining" in text and f"rstar-batch: {TOTAL} pairs" in text
    assert "Started a local Ray" not in text  # the drain, after Ray's shutdown, called it
    assert per_run.get(1, 0) == done_at_stop
    # nothing redone: the rerun scored exactly the rows the stopped run did not commit
    assert per_run.get(1, 0) + per_run.get(2, 0) == TOTAL
    if point == "during_final_pass":
        assert 2 not in per_run  # scoring was done: the rerun only ranked


# A commit lands within --commit-seconds (1) of scoring; the driver asks the writers
# every 2 s and logs at most every --progress-seconds (1); 2 s for a busy machine.
PROGRESS_LAG_S = 1 + 2 + 1 + 2


def _assert_logged_progress_follows_the_commits(text: str, samples: list, final: int) -> None:
    """Each progress line counts at least what was committed PROGRESS_LAG_S before it
    and never more than was ever committed; there is at least one."""
    logged = [(datetime.datetime.strptime(at, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(pairs))
              for at, pairs in re.findall(
                  rf"^(\S+ \S+) INFO rstar_batch.driver: progress: (\d+)/{TOTAL} pairs",
                  text, re.M)]
    assert logged, text[-3000:]
    for at, pairs in logged:
        seen = max((n for t, n in samples if t <= at - PROGRESS_LAG_S), default=0)
        assert seen <= pairs <= final, (at, pairs, seen, samples)


def _rerun_equals_the_reference(job_input, out, micro_model, job_reference, tmp_path,
                               cluster=None, log: str = "run2.log",
                               env: Optional[dict] = None) -> dict:
    """Rerun the job; check its output and status; return pairs scored per run."""
    rerun = run(_args(job_input, out, micro_model), str(tmp_path / log), env,
                cluster=cluster)
    assert rerun.proc.returncode == 0, rerun.output()[-3000:]
    _assert_same_output(out, job_reference)
    done = run(["status", out], str(tmp_path / "status2.log")).output()
    assert done.startswith(f"DONE {TOTAL} pairs, 30 queries")
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    return {int(k): v for k, v in manifest["pairs_scored_per_run"].items()}


def test_a_run_survives_its_replica_and_writer_faults_and_completes_exactly_once(
        job_input, micro_model, job_reference, cluster, tmp_path):
    """In one run: a batch raises once (its retry succeeds); a replica's process dies
    (Ray Data gives its block to another); a commit writer's process dies at its first
    commit with the rows it held, after the replica calls that scored them returned
    (its node lost, in effect): those rows are scored again in the same run."""
    out = str(tmp_path / "out")
    job = run(_args(job_input, out, micro_model), str(tmp_path / "run.log"),
              env={FAULT_ENV: "raise:2,exit:3,writerexit:1",
                   "RSTAR_BATCH_TEST_FAULT_DIR": str(tmp_path)}, cluster=cluster)
    assert job.proc.returncode == 0, job.output()[-3000:]
    for kind in ("raise", "exit", "writerexit"):
        assert os.path.exists(tmp_path / f"fired-{kind}"), kind  # the fault did happen
    assert "were scored but not committed (a commit writer was lost); scoring them again" \
        in job.output()
    _assert_same_output(out, job_reference)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["pairs_scored_per_run"] == {"1": TOTAL}  # no rerun needed


def test_batch_failing_every_retry_fails_the_job_naming_its_rows(job_input, micro_model, cluster,
                                                                  tmp_path):
    out = str(tmp_path / "out")
    job = run(_args(job_input, out, micro_model, "--batch-retries", "1"), str(tmp_path / "r.log"),
              env={"RSTAR_BATCH_TEST_FAULT": "raise:always"}, cluster=cluster)
    assert job.proc.returncode != 0
    text = job.output()
    assert "scoring failed 2 time(s) for a batch of 60 pairs (query_id, doc_id): (" in text
    assert "injected fault" in text
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))


def test_changed_config_or_input_is_refused_unless_restart(
        ray_local, micro_model, edge_cases, tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(edge_cases, path)
    out = str(tmp_path / "out")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    rstar_batch.rerank(candidates=[path], output=out, model=micro_model)
    # the caller's signal handlers are theirs again once the job returns
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
    with pytest.raises(ResumeError, match=r"finished output of a different job \(top_k: None → 3\)"):
        rstar_batch.rerank(candidates=[path], output=out, model=micro_model, top_k=3)
    pq.write_table(edge_cases.slice(0, 10), path)  # the input changes
    with pytest.raises(ResumeError, match="input file changed .*c.parquet.*--restart"):
        rstar_batch.rerank(candidates=[path], output=out, model=micro_model)
    summary = rstar_batch.rerank(candidates=[path], output=out, model=micro_model, restart=True)
    assert summary.pairs == 10 and pq.read_table(out).num_rows == 10


def test_unfinished_progress_of_another_config_is_refused(ray_local, micro_model, edge_cases,
                                                          tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(edge_cases, path)
    out = str(tmp_path / "out")
    rstar_batch.rerank(candidates=[path], output=out, model=micro_model)
    os.remove(os.path.join(out, "_SUCCESS"))  # as if killed before the end
    shutil.copy(os.path.join(out, "_manifest.json"), str(tmp_path / "m.json"))
    os.makedirs(os.path.join(out, "_work"), exist_ok=True)
    plan = json.load(open(tmp_path / "m.json"))["plan"]
    json.dump(plan, open(os.path.join(out, "_work", "plan.json"), "w"))
    with pytest.raises(ResumeError, match=r"unfinished progress .*max_length: 512 → 128"):
        rstar_batch.rerank(candidates=[path], output=out, model=micro_model, max_length=128)
