"""Multi-node clusters: one real Ray of a head with the job API and no CPUs (as on
KubeRay) and two CPU worker nodes, shared by this module's stories in order: the
default plan scores on every node, the nightly job submitted with `ray job submit`,
and, last since it kills a node, a job that survives losing one."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from rstar_batch.faults import FAULT_ENV
from rstar_batch.testing import write_sample_data
from tests.infra_files import REPO
from tests.jobs import (Job, committed_rows, LocalCluster, kill_until_gone, local_cluster, new_token,
                        session_pids, venv_bin, worker_args)
from tests.test_resume import (PACED, TOTAL, _args, _assert_same_output,  # noqa: F401
                               job_input, job_reference)  # (fixtures)
from tests.test_score_corpus import (TOP_K, _args as corpus_args,  # noqa: F401 (fixtures)
                                     _assert_equals_brute_force as assert_equals_brute_force,
                                     brute_force, corpus_inputs)

pytestmark = pytest.mark.slow
DATE = "2026-11-26"
QUERIES, CANDIDATES = 10, 20
WORKER_CPUS = 4
# The GCS checks each node every second and calls it lost after 3 missed answers
# (Ray's defaults: every 3 s, 5 misses of up to 10 s each): the test of surviving a
# node's loss then waits seconds, not half a minute, for Ray to notice it.
NODE_LOSS_SEEN_IN_SECONDS = {"RAY_health_check_period_ms": "1000",
                             "RAY_health_check_timeout_ms": "1000",
                             "RAY_health_check_failure_threshold": "3"}


@pytest.fixture(scope="module")
def nodes() -> Iterator[LocalCluster]:
    """A head with the job API (no CPUs) and two worker nodes of WORKER_CPUS logical CPUs
    and half this machine's cores each. Jobs carry their faults to the workers."""
    with local_cluster(worker_cpus=WORKER_CPUS, workers=2, dashboard=True,
                       token=new_token(), env=NODE_LOSS_SEEN_IN_SECONDS) as cluster:
        yield cluster


def test_default_plan_scores_a_corpus_on_every_node_and_commits_one_running_top_k(
        nodes, micro_model, corpus_inputs, brute_force, tmp_path):
    """score-corpus on the default plan: one replica a node, both used (the pool grows
    to its plan). Each node's forwarder passes on what enters its running top K and the
    job's one committer commits the running top K of all: once every passage is
    committed (the rank pass held up), _work/ holds one record of each query's K rows
    and the rejected one (a writer per node committing its own top K held a set a
    node). The result equals brute force."""
    corpus, queries, _, _ = corpus_inputs
    out = str(tmp_path / "out")
    # Scoring costs about R*'s time on 2 cores (45 replica calls of 2 passages × 5
    # queries, 0.5 s each), so the pool grows to its plan.
    job = Job(corpus_args(corpus, queries, out, micro_model, "--replica-batch-rows", "10"),
              str(tmp_path / "job.log"), {FAULT_ENV: "slow:0.5,slowrank:3"}, cluster=nodes)
    job.wait_until(lambda: committed_rows(out) >= 90)
    records = [json.load(open(p)) for p in glob.glob(os.path.join(out, "_work", "commits",
                                                                  "*.json"))]
    assert len(records) == 1, records
    assert sum(s[3] for s in records[0]["segments"]) == 5 * TOP_K + 1  # + the null passage
    assert job.wait() == 0, job.output()[-5000:]
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    plan = manifest["replicas"]
    # one replica a node, one thread each: as many as the CPUs it reserves
    assert (plan["device"], plan["threads"], plan["num_cpus"], plan["max_size"]) == (
        "cpu", 1, 1.0, 2)
    # held for the job in a placement group, so tokenizers could not take their CPUs
    assert plan["placement_group"].startswith("rstar-batch-replicas-")
    scored = manifest["pairs_by_node"]
    assert len(scored) == 2 and sum(scored.values()) == 90 * 5, scored
    assert_equals_brute_force(out, brute_force)


def _submit(cluster: LocalCluster, workdir: str, log: Path, *entrypoint: str) -> tuple[int, str]:
    """`ray job submit` without --no-wait: it streams the job's log and exits 1 on failure.
    Its output is kept in `log` for a failing test's reader."""
    proc = subprocess.Popen(
        [venv_bin("ray"), "job", "submit", "--address", cluster.dashboard_url,
         "--working-dir", workdir, "--", *entrypoint],
        cwd=workdir, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True)
    try:
        output = proc.communicate(timeout=240)[0]
    except subprocess.TimeoutExpired:
        kill_until_gone(lambda: session_pids(proc.pid), "ray job submit")
        raise AssertionError("ray job submit did not finish in 240 s") from None
    log.write_text(output)
    return proc.returncode, output


def _record(output: str) -> dict:
    """The job's last stdout line: its JSON record for schedulers."""
    lines = [line for line in output.splitlines() if line.startswith('{"status"')]
    assert lines, f"no JSON record in the job's output:\n{output[-3000:]}"
    return json.loads(lines[-1])


def test_nightly_job_submitted_to_a_cluster_succeeds_and_a_bad_night_fails(
        nodes, micro_model, tmp_path):
    data = tmp_path / "warehouse"
    write_sample_data(str(data / "candidates" / f"date={DATE}"), QUERIES, CANDIDATES,
                      files=2, seed=3)
    write_sample_data(str(data / "candidates" / "date=2026-11-25"), 2, 5)  # another night
    config = os.path.join(nodes.base, "nightly.yaml")  # short, unique to this cluster
    with open(config, "w") as fh:
        fh.write(f"candidates: ['{data}/candidates/date={{date}}/']\n"
                 f"output: '{data}/ranked/date={{date}}/'\n"
                 f"model: '{micro_model}'\nmax_length: 512\nrank_partitions: 2\n")
    workdir = os.path.join(nodes.base, "wd")  # what `--working-dir .` would upload
    shutil.copytree(REPO / "jobs", os.path.join(workdir, "jobs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    entrypoint = ["python", "jobs/nightly_rerank.py", "--config", config, "--date", DATE,
                  "--max-length", "64"]  # an option after the config overrides it

    code, output = _submit(nodes, workdir, tmp_path / "submit1.log", *entrypoint)
    assert code == 0, output[-5000:]
    out = data / "ranked" / f"date={DATE}"
    record = _record(output)
    assert record == {**record, "status": "SUCCEEDED", "date": DATE, "output": f"{out}/",
                      "pairs": QUERIES * CANDIDATES, "queries": QUERIES,
                      "already_done": False}
    assert (out / "_SUCCESS").exists() and not (data / "ranked" / "date=2026-11-25").exists()
    ranked = pq.read_table(str(out))
    assert ranked.num_rows == QUERIES * CANDIDATES
    assert len(set(ranked["query_id"].to_pylist())) == QUERIES
    manifest = (out / "_manifest.json").read_bytes()
    assert json.loads(manifest)["config"]["max_length"] == 64

    # (a rerun is a no-op: the score-corpus entrypoint's test in test_nightly.py)
    # A night whose candidates are missing fails the submission, and says why.
    code, output = _submit(nodes, workdir, tmp_path / "submit3.log",
                           *entrypoint[:4], "--date", "2026-11-27")
    assert code != 0
    failed = _record(output)
    assert failed["status"] == "FAILED" and failed["date"] == "2026-11-27"
    assert failed["error"].startswith("InputError: candidates path")
    assert not (data / "ranked" / "date=2026-11-27" / "_SUCCESS").exists()


def test_job_survives_losing_a_worker_node(nodes, job_input, job_reference, micro_model,
                                           tmp_path):
    out = str(tmp_path / "out")
    job = Job(_args(job_input, out, micro_model), str(tmp_path / "run1.log"), PACED,
              cluster=nodes)
    job.wait_until(lambda: committed_rows(out) >= TOTAL // 3)
    os.kill(nodes.raylet_of("worker1"), signal.SIGKILL)
    nodes.start("worker3", *worker_args(WORKER_CPUS, 2))  # the replacement node
    code = job.wait(timeout=300)
    assert code == 0, job.output()[-3000:]  # it survives the loss, without a rerun
    _assert_same_output(out, job_reference)
