"""A CPU cluster scores on all its nodes: the default plan on a real two-node Ray."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from tests.jobs import local_cluster, paced, run
from tests.test_rerank_job import _assert_matches_reference

pytestmark = pytest.mark.slow


def test_default_plan_scores_on_every_node_of_a_cpu_cluster(
        micro_model, sample_dir, sample_reference, tmp_path):
    out = str(tmp_path / "ranked")
    # Scoring costs about R*'s time on 2 cores (40 replica batches of 25 pairs, 1.5 s
    # each), so the pool grows to its plan.
    # Two worker nodes of 3 logical CPUs and one core each, and a head without CPUs.
    with local_cluster(worker_cpus=3, workers=2, env=paced(1.5)) as cluster:
        job = run(["rerank", "--candidates", sample_dir, "--output", out, "--model", micro_model,
                   "--dtype", "float32", "--replica-batch-rows", "25",
                   "--address", cluster.address],
                  str(tmp_path / "job.log"), {"RAY_AUTH_MODE": "token"})
        assert job.proc.returncode == 0, job.output()[-5000:]

    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    plan = manifest["replicas"]
    # one replica a node, one thread each: as many as the CPUs it reserves
    assert (plan["device"], plan["threads"], plan["num_cpus"], plan["max_size"]) == (
        "cpu", 1, 1.0, 2)
    # held for the job in a placement group, so tokenizers could not take their CPUs
    assert plan["placement_group"].startswith("rstar-batch-replicas-")
    scored = manifest["pairs_by_node"]
    assert len(scored) == 2 and sum(scored.values()) == 1000, scored
    _assert_matches_reference(pq.read_table(out).to_pylist(), sample_reference)
