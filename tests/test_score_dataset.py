"""score_dataset: a caller's Ray Dataset of pairs scored in place, as the one-pair
reference scores them, with no files or checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch import score_dataset
from tests.jobs import kill_until_gone, session_pids
from tests.test_rerank_job import TOL, _assert_matches_reference

pytestmark = pytest.mark.slow


def _pairs_with_bad_rows(sample_dir: str) -> pa.Table:
    table = pq.read_table(sample_dir).combine_chunks()
    bad = pa.table({"query_id": pa.array([table["query_id"][0].as_py(), None],
                                         table.schema.field("query_id").type),
                    "query": ["some query", "another"], "doc_id": ["no-text", "no-query"],
                    "passage": [None, "a passage"]}).cast(table.select(
                        ["query_id", "query", "doc_id", "passage"]).schema)
    return pa.concat_tables([table.select(bad.column_names), bad])


def test_a_dataset_of_pairs_gets_the_reference_scores_and_keeps_unscorable_rows(
        ray_local, micro_model, sample_dir, sample_reference):
    import ray

    table = _pairs_with_bad_rows(sample_dir)
    ds = ray.data.from_arrow(table).repartition(7)
    out = score_dataset(ds, model=micro_model, dtype="float32",
                        replica_batch_rows=128).take_all()
    assert len(out) == table.num_rows
    scored = [r for r in out if r["reason"] is None]
    assert len(scored) == table.num_rows - 2
    for row in scored:
        assert abs(row["score"] - sample_reference[(row["query_id"], row["doc_id"])]) <= TOL
    rejected = {r["doc_id"]: (r["reason"], r["score"]) for r in out if r["reason"]}
    assert rejected == {"no-text": ("null_passage", None), "no-query": ("null_query_id", None)}


def test_the_ranked_variant_ranks_each_query_as_the_rerank_job_does(
        ray_local, micro_model, sample_dir, sample_reference):
    import ray

    table = _pairs_with_bad_rows(sample_dir)
    out = score_dataset(ray.data.from_arrow(table), model=micro_model, dtype="float32",
                        top_k=10, ranked=True).take_all()
    rows = sorted(out, key=lambda r: (r["query_id"] is None, r["query_id"] or 0,
                                                  r["rank"] or 1 << 30))
    ranked = [r for r in rows if r["reason"] is None]
    assert len(ranked) == 10 * 20   # top 10 of each of the 20 queries
    _assert_matches_reference(ranked, sample_reference)
    assert sorted(r["reason"] for r in rows if r["reason"]) == ["null_passage",
                                                               "null_query_id"]


def test_a_plain_two_cpu_ray_scores_a_dataset_instead_of_waiting_forever(
        micro_model, sample_dir):
    """`ray.init(num_cpus=2)` as on a laptop or this 2-core CI machine: the replica and
    the tokenizer used to reserve both CPUs, and the read tasks never ran."""
    temp = tempfile.mkdtemp(prefix="rb-", dir="/tmp")   # short: Ray's socket paths
    script = textwrap.dedent(f"""
        import ray, rstar_batch
        ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir={temp!r})
        rows = rstar_batch.score_dataset(ray.data.read_parquet({sample_dir!r}),
                                         model={micro_model!r}, dtype="float32").take_all()
        print("scored", sum(r["reason"] is None for r in rows), "of", len(rows))
        ray.shutdown()
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env=env)
    try:
        out, _ = proc.communicate(timeout=480)
    except subprocess.TimeoutExpired:
        out = "still waiting after 480 s"
    finally:
        kill_until_gone(lambda: session_pids(proc.pid), "the 2-CPU Ray")
        proc.wait()
        shutil.rmtree(temp, ignore_errors=True)
    assert "scored 1000 of 1000" in out, out[-3000:]
