"""Id-only runs joined with a corpus and queries: texts found, missing ones kept aside."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rstar_batch
from rstar_batch.testing import make_candidates
from tests.reference import reference_scores



@pytest.fixture
def split_inputs(tmp_path):
    """make_candidates split into a run (ids + first-stage score), a corpus and queries."""
    full = make_candidates(6, 20, seed=21)
    run = full.select(["query_id", "doc_id", "first_stage_score"])
    extra = pa.table({"query_id": pa.array([6, 99], pa.int64()),  # 99: no such query
                      "doc_id": ["D-missing", full["doc_id"][0].as_py()],
                      "first_stage_score": pa.array([1.0, 2.0], pa.float32())})
    corpus = full.select(["doc_id", "passage"])
    corpus = pa.concat_tables([corpus, corpus.slice(0, 3)])  # repeated corpus ids
    queries = full.select(["query_id", "query"]).group_by("query_id", use_threads=False) \
        .aggregate([("query", "first")]).rename_columns(["query_id", "query"])
    os.makedirs(tmp_path / "run")
    pq.write_table(run, str(tmp_path / "run" / "a.parquet"))
    pq.write_table(extra, str(tmp_path / "run" / "b.parquet"))
    pq.write_table(corpus, str(tmp_path / "corpus.parquet"), row_group_size=30)
    pq.write_table(queries, str(tmp_path / "queries.parquet"))
    return full, tmp_path


@pytest.mark.slow
def test_run_joined_with_corpus_and_queries_scores_like_the_reference(
        ray_local, micro_model, split_inputs, monkeypatch):
    from rstar_batch.io import join

    full, base = split_inputs
    monkeypatch.setattr(join, "CORPUS_BUCKET_BYTES", 2000)  # several join buckets
    out = str(base / "out")
    summary = rstar_batch.rerank(
        candidates=[str(base / "run")], corpus=str(base / "corpus.parquet"),
        queries=str(base / "queries.parquet"), output=out, model=micro_model,
        keep_columns=["first_stage_score"], max_rejected_fraction=0.05, dtype="float32")
    assert summary.rejected == {"missing_passage": 1, "missing_query": 1}
    assert (summary.pairs, summary.written) == (122, 120)
    ranked = pq.read_table(out)
    assert ranked.column_names == ["query_id", "doc_id", "score", "rank", "first_stage_score"]
    reference = reference_scores(micro_model, full)
    for row in ranked.to_pylist():
        assert abs(row["score"] - reference[(row["query_id"], row["doc_id"])]) <= 1e-5
    rejected = {r["reason"]: r for r in pq.read_table(os.path.join(out, "_rejected")).to_pylist()}
    assert rejected["missing_passage"]["doc_id"] == "D-missing"
    assert rejected["missing_passage"]["passage"] is None  # never scored as ""
    assert rejected["missing_query"]["query_id"] == 99
    again = rstar_batch.rerank(
        candidates=[str(base / "run")], corpus=str(base / "corpus.parquet"),
        queries=str(base / "queries.parquet"), output=out, model=micro_model,
        keep_columns=["first_stage_score"], max_rejected_fraction=0.05, dtype="float32")
    assert again.already_done


@pytest.mark.slow
def test_a_changed_corpus_is_refused_like_a_changed_input(ray_local, micro_model, split_inputs):
    from rstar_batch.progress.checkpoint import ResumeError

    full, base = split_inputs
    args = dict(candidates=[str(base / "run")], corpus=str(base / "corpus.parquet"),
                queries=str(base / "queries.parquet"), output=str(base / "out"),
                model=micro_model, max_rejected_fraction=0.05)
    rstar_batch.rerank(**args)
    pq.write_table(full.select(["doc_id", "passage"]), str(base / "corpus.parquet"))
    with pytest.raises(ResumeError, match="corpus.parquet"):
        rstar_batch.rerank(**args)


def test_join_tasks_are_sized_by_the_corpus_and_by_the_run():
    from types import SimpleNamespace

    from rstar_batch.io.join import CORPUS_BUCKET_BYTES, RUN_BUCKET_ROWS, join_buckets

    def files(rows=0, size=0):
        return SimpleNamespace(num_rows=rows, total_bytes=size)

    assert join_buckets(files(rows=10), files(size=100)) == 1        # joined as they are
    assert join_buckets(files(rows=10), files(size=3 * CORPUS_BUCKET_BYTES)) == 3
    # a large run against a small corpus: no task holds more than a bucket of it
    assert join_buckets(files(rows=5 * RUN_BUCKET_ROWS), files(size=100)) == 5
    assert join_buckets(files(rows=RUN_BUCKET_ROWS + 1), None) == 2
