"""The nightly job submitted with `ray job submit` to a real two-node Ray cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import pytest

from rstar_batch.testing import write_sample_data
from tests.infra_files import REPO
from tests.jobs import (LocalCluster, kill_until_gone, local_cluster, new_token, session_pids,
                        venv_bin)

pytestmark = pytest.mark.slow
DATE = "2026-11-26"
QUERIES, CANDIDATES = 10, 20


@pytest.fixture
def job_cluster() -> Iterator[LocalCluster]:
    """A head with the job API (no CPUs, as on KubeRay) and one worker node."""
    with local_cluster(worker_cpus=8, dashboard=True, token=new_token()) as cluster:
        yield cluster


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


def test_nightly_job_on_a_cluster_succeeds_a_rerun_is_a_noop_a_bad_night_fails(
        job_cluster, micro_model, tmp_path):
    data = tmp_path / "warehouse"
    write_sample_data(str(data / "candidates" / f"date={DATE}"), QUERIES, CANDIDATES,
                      files=2, seed=3)
    write_sample_data(str(data / "candidates" / "date=2026-11-25"), 2, 5)  # another night
    config = os.path.join(job_cluster.base, "nightly.yaml")  # short, unique to this cluster
    with open(config, "w") as fh:
        fh.write(f"candidates: ['{data}/candidates/date={{date}}/']\n"
                 f"output: '{data}/ranked/date={{date}}/'\n"
                 f"model: '{micro_model}'\nmax_length: 512\nrank_partitions: 2\n")
    workdir = os.path.join(job_cluster.base, "wd")  # what `--working-dir .` would upload
    shutil.copytree(REPO / "jobs", os.path.join(workdir, "jobs"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    entrypoint = ["python", "jobs/nightly_rerank.py", "--config", config, "--date", DATE,
                  "--max-length", "64"]  # an option after the config overrides it

    code, output = _submit(job_cluster, workdir, tmp_path / "submit1.log", *entrypoint)
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

    code, output = _submit(job_cluster, workdir, tmp_path / "submit2.log", *entrypoint)
    assert code == 0, output[-5000:]
    again = _record(output)
    assert again["already_done"] is True and again["status"] == "SUCCEEDED"
    assert again["pairs"] == QUERIES * CANDIDATES
    assert (out / "_manifest.json").read_bytes() == manifest

    # A night whose candidates are missing fails the submission, and says why.
    code, output = _submit(job_cluster, workdir, tmp_path / "submit3.log",
                           *entrypoint[:4], "--date", "2026-11-27")
    assert code != 0
    failed = _record(output)
    assert failed["status"] == "FAILED" and failed["date"] == "2026-11-27"
    assert failed["error"].startswith("InputError: candidates path")
    assert not (data / "ranked" / "date=2026-11-27" / "_SUCCESS").exists()
