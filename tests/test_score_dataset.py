"""score_dataset: a caller's Ray Dataset of pairs scored in place, as the one-pair
reference scores them, with no files or checkpoints."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from rstar_batch import score_dataset
from rstar_batch.base.fs import resolve
from rstar_batch.base.pair_keys import text_keys
from rstar_batch.cache.store import CacheError, Record, ScoreCache
from tests.reference import reference_scores
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


def test_a_dataset_with_a_score_cache_takes_cached_scores_and_scores_only_new_texts(
        ray_local, micro_model, sample_dir, sample_reference, tmp_path):
    """Night 1 fills the cache as the result streams; then every cached pair is given a
    planted score no model gives (newer than night 1's): night 2 must show exactly those
    for its unchanged pairs, and the reference for its edited passages (new keys)."""
    import ray

    table, cache_uri = _pairs_with_bad_rows(sample_dir), str(tmp_path / "cache")
    common = dict(model=micro_model, dtype="float32", replica_batch_rows=128,
                  score_cache=cache_uri)
    first = score_dataset(ray.data.from_arrow(table).repartition(3), **common).take_all()
    assert sorted(r["reason"] or "" for r in first)[-2:] == ["null_passage", "null_query_id"]
    for row in first:
        if row["reason"] is None:
            assert abs(row["score"] - sample_reference[(row["query_id"], row["doc_id"])]) <= TOL
    (key,) = os.listdir(cache_uri)
    cache = ScoreCache.at(*resolve(cache_uri), cache_uri, key)
    entries, _ = cache.entries(cache.reads(cache.records(), set(range(cache.buckets))))
    stored = pa.concat_tables(entries.values())
    assert stored.num_rows == table.num_rows - 2   # every scorable pair, once

    planted = pa.table({"key": stored["key"], "used": pc.add(stored["used"], 1),
                        "score": pa.array(-1000.0 - np.arange(stored.num_rows), pa.float32())})
    cache.write_record(Record("planted", (cache.write_pack("planted", planted),),
                              planted.num_rows, 0.0, "test"))
    fake = dict(zip(planted["key"].to_pylist(), planted["score"].to_pylist()))
    rows = table.to_pylist()
    for i in range(0, 100, 10):   # ten passages edited under the same doc_id
        rows[i]["passage"] += " (edited)"
    night_two = pa.Table.from_pylist(rows, schema=table.schema)
    edited = {(rows[i]["query_id"], rows[i]["doc_id"]) for i in range(0, 100, 10)}
    rescored = reference_scores(micro_model, night_two.filter(pc.is_in(
        night_two["doc_id"], pa.array([d for _, d in edited]))))

    second = score_dataset(ray.data.from_arrow(night_two).repartition(3), **common).take_all()
    keys = dict(zip(zip(night_two["query_id"].to_pylist(), night_two["doc_id"].to_pylist()),
                    text_keys(night_two["query"], night_two["passage"]).to_pylist()))
    assert len(second) == night_two.num_rows
    for row in second:
        pair = (row["query_id"], row["doc_id"])
        if row["reason"] is not None:
            assert row["score"] is None
        elif pair in edited:
            assert abs(row["score"] - rescored[pair]) <= TOL, pair
        else:
            assert row["score"] == fake[keys[pair]], pair   # reused: never scored
    # the edited pairs were added (scored) and the reused ones refreshed
    records = cache.records()
    assert len(records) > 2
    newest, _ = cache.entries(cache.reads(records, set(range(cache.buckets))))
    added = pa.concat_tables(newest.values())
    assert {keys[p] for p in edited} <= set(added["key"].to_pylist())

    # a cache file that cannot be read is named when the dataset is built
    with open(os.path.join(cache.root, "packs", "planted.pack"), "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(CacheError, match="planted.pack' cannot be read"):
        score_dataset(ray.data.from_arrow(night_two), **common)


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
