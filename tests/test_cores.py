"""The cores a job plans on are the ones it may use: its affinity and its CPU quota,
not the machine's count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rstar_batch.base.cores import cpu_quota, usable_cores
from tests.jobs import run

PRINT_CORES = "from rstar_batch.base.cores import usable_cores; print(usable_cores())"


def _write(root, path: str, text: str) -> None:
    target = root / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text + "\n")


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_a_process_pinned_to_one_core_counts_one():
    one = min(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", PRINT_CORES], check=True, text=True,
                         capture_output=True, preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert int(out.stdout) == 1


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000"}, 1.5),                  # cgroup v2, docker --cpus 1.5
    ({"cpu.max": "max 100000"}, None),                    # v2, no limit
    ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 0.5),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),    # v1, none
    ({"cpu,cpuacct/cpu.cfs_quota_us": "300000",
      "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 3.0),
    ({"cpu.max": "garbage"}, None),
    ({}, None),                                           # no cgroup files at all
])
def test_the_cpu_quota_is_read_from_either_cgroup_version(tmp_path, files, quota):
    for path, text in files.items():
        _write(tmp_path, path, text)
    assert cpu_quota(str(tmp_path)) == quota


def test_a_quota_caps_the_affinity_rounded_up(tmp_path):
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    _write(tmp_path, "cpu.max", "50000 100000")           # half a CPU: one thread
    assert usable_cores(str(tmp_path)) == 1
    _write(tmp_path, "cpu.max", f"{affinity * 100000 + 1} 100000")  # more than we have
    assert usable_cores(str(tmp_path)) == affinity


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux affinity")
def test_a_job_pinned_to_one_core_plans_on_it_and_equals_the_reference(
        micro_model, sample_dir, sample_reference, tmp_path):
    """`taskset -c N rstar-batch rerank ...`: the embedded Ray and the replica's threads
    are sized to the one core (not the machine's), and the job still completes."""
    out = str(tmp_path / "ranked")
    job = run(["rerank", "--candidates", sample_dir, "--output", out, "--model", micro_model,
               "--dtype", "float32"],
              str(tmp_path / "job.log"), cores={min(os.sched_getaffinity(0))})
    assert job.proc.returncode == 0, job.output()[-3000:]
    assert "logical CPUs on 1 cores" in job.output()
    assert json.load(open(os.path.join(out, "_manifest.json")))["replicas"]["threads"] == 1
    table = pq.read_table(out)
    scores = dict(zip(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist()),
                      table["score"].to_pylist()))
    assert scores.keys() == sample_reference.keys()
    assert max(abs(scores[k] - v) for k, v in sample_reference.items()) <= 1e-5
