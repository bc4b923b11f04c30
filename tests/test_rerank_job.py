"""End to end: the rerank job on a local Ray, checked against the one-pair reference."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rstar_batch
from rstar_batch.cli import main

TOL = 1e-5
pytestmark = pytest.mark.slow


def _read_parts(out: str) -> dict[str, pa.Table]:
    names = sorted(n for n in os.listdir(out) if n.endswith(".parquet"))
    return {n: pq.read_table(os.path.join(out, n)) for n in names}


def _expected_order(reference: dict, qid) -> list:
    """Doc ids of one query by reference score (desc), ties by doc id."""
    docs = [(d, s) for (q, d), s in reference.items() if q == qid]
    return [d for d, _ in sorted(docs, key=lambda x: (-x[1], x[0]))]


def _assert_matches_reference(rows: list[dict], reference: dict) -> None:
    by_query = collections.defaultdict(list)
    for row in rows:
        assert abs(row["score"] - reference[(row["query_id"], row["doc_id"])]) <= TOL
        by_query[row["query_id"]].append(row)
    for qid, got in by_query.items():
        assert [r["rank"] for r in got] == list(range(1, len(got) + 1))
        scores = [r["score"] for r in got]
        assert scores == sorted(scores, reverse=True)
        for a, b in zip(got, got[1:]):  # ties broken by doc_id ascending
            assert a["score"] > b["score"] or a["doc_id"] < b["doc_id"]
        # The reference orders the same wherever its scores are not within tolerance.
        expected = _expected_order(reference, qid)[:len(got)]
        for i, (mine, theirs) in enumerate(zip(got, expected)):
            if mine["doc_id"] != theirs:
                assert abs(reference[(qid, mine["doc_id"])]
                           - reference[(qid, theirs)]) <= 2 * TOL, (qid, i)


def test_rerank_cli_output_equals_the_one_pair_reference(
        ray_local, micro_model, sample_dir, sample_reference, tmp_path, capsys):
    out = str(tmp_path / "ranked")
    assert main(["rerank", "--candidates", sample_dir, "--output", out, "--model", micro_model,
                 "--keep-columns", "first_stage_score", "passage", "--dtype", "float32"]) == 0
    assert "1000 pairs, 20 queries, 1000 scored, 0 rejected" in capsys.readouterr().out

    parts = _read_parts(out)
    table = pa.concat_tables(parts.values())
    assert table.column_names == ["query_id", "doc_id", "score", "rank",
                                  "first_stage_score", "passage"]
    assert [str(t) for t in table.schema.types] == ["int64", "string", "float", "int32",
                                                      "float", "string"]
    assert table.num_rows == 1000 == len(sample_reference)
    pairs = set(zip(table["query_id"].to_pylist(), table["doc_id"].to_pylist()))
    assert pairs == set(sample_reference)  # every pair exactly once

    source = pq.read_table(sample_dir).to_pylist()
    kept = {(r["query_id"], r["doc_id"]): (r["first_stage_score"], r["passage"]) for r in source}
    rows = table.to_pylist()
    for row in rows:
        assert (row["first_stage_score"], row["passage"]) == kept[(row["query_id"], row["doc_id"])]
    _assert_matches_reference(rows, sample_reference)
    # R*'s tokenizer is WordPiece: the fast path tokenized the texts (tests/test_fast_tokens.py)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["texts_tokenized_by"].startswith("fast (nanotoken "), manifest

    files_of_query = collections.defaultdict(set)
    for name, part in parts.items():
        for qid in part["query_id"].to_pylist():
            files_of_query[qid].add(name)
    assert all(len(files) == 1 for files in files_of_query.values())

    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["summary"]["scored"] == 1000 and manifest["summary"]["queries"] == 20
    assert manifest["summary"]["pairs_per_second"] > 0
    assert manifest["model"]["fingerprint"].startswith("sha256:")
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not os.path.exists(os.path.join(out, "_work"))


def test_top_k_keeps_the_reference_best_k_per_query(
        ray_local, micro_model, sample_dir, sample_reference, tmp_path):
    out = str(tmp_path / "top5")
    summary = rstar_batch.rerank(rstar_batch.RerankConfig(
        candidates=[sample_dir], output=out, model=micro_model, top_k=5, rank_partitions=3,
        dtype="float32"))
    assert summary.written == 100 and summary.scored == 1000
    parts = _read_parts(out)
    assert len(parts) == 3
    rows = pa.concat_tables(parts.values()).to_pylist()
    assert collections.Counter(r["query_id"] for r in rows) == {q: 5 for q in range(1, 21)}
    _assert_matches_reference(rows, sample_reference)
    for part in parts.values():  # within a file: queries ascending, ranks ascending
        keys = list(zip(part["query_id"].to_pylist(), part["rank"].to_pylist()))
        assert keys == sorted(keys)


def test_string_query_ids_and_integer_doc_ids_keep_their_types(
        ray_local, tiny_model, edge_cases, edge_case_reference, tmp_path):
    table = edge_cases.set_column(0, "qid", edge_cases["query_id"].cast(pa.string()))
    table = table.rename_columns(["qid", "q", "did", "text"])
    path = str(tmp_path / "edge.parquet")
    pq.write_table(table, path)
    out = str(tmp_path / "out")
    rstar_batch.rerank(candidates=[path], output=out, model=tiny_model, query_id_column="qid",
                       query_column="q", doc_id_column="did", passage_column="text",
                       batch_tokens=2048, max_batch_pairs=8, dtype="float32")
    result = pq.read_table(out)
    assert result.schema.field("query_id").type == pa.string()
    assert result.schema.field("doc_id").type == pa.int64()
    reference = {(str(q), d): s for (q, d), s in edge_case_reference.items()}
    _assert_matches_reference(result.to_pylist(), reference)
    assert result.num_rows == len(reference)


def test_rows_with_null_fields_are_counted_and_kept_with_their_reason(
        ray_local, micro_model, tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.table({
        "query_id": pa.array([1, 1, 1, 2, None], pa.int64()),
        "query": ["q one", "q one", "q one", None, "q"],
        "doc_id": ["a", "b", "c", "d", "e"],
        "passage": ["first passage", None, "third", "fourth", "fifth"],
    }), path)
    out = str(tmp_path / "out")
    summary = rstar_batch.rerank(candidates=[path], output=out, model=micro_model,
                                 max_rejected_fraction=1.0)
    assert (summary.pairs, summary.scored, summary.queries) == (5, 2, 1)
    assert summary.rejected == {"null_passage": 1, "null_query": 1, "null_query_id": 1}
    assert "3 rejected (null_passage=1, null_query=1, null_query_id=1)" in summary.line()
    ranked = pq.read_table(out)
    assert sorted(ranked["doc_id"].to_pylist()) == ["a", "c"]
    rejected = pq.read_table(os.path.join(out, "_rejected")).sort_by("doc_id").to_pylist()
    assert [(r["doc_id"], r["reason"]) for r in rejected] == [
        ("b", "null_passage"), ("d", "null_query"), ("e", "null_query_id")]
    assert rejected[1]["passage"] == "fourth"  # the row is kept whole
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["summary"]["rejected"] == summary.rejected


def test_rerunning_a_finished_job_is_a_no_op_that_says_so(
        ray_local, micro_model, edge_cases, tmp_path):
    path = str(tmp_path / "c.parquet")
    pq.write_table(edge_cases, path)
    out = str(tmp_path / "out")
    first = rstar_batch.rerank(candidates=[path], output=out, model=micro_model)
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    again = rstar_batch.rerank(candidates=[path], output=out, model=micro_model)
    assert again.already_done and not first.already_done
    assert "already done, nothing to do" in again.line()
    assert (again.pairs, again.written) == (first.pairs, first.written)
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    import ray

    assert ray.is_initialized()  # the caller's Ray is left running


def test_demo_runs_end_to_end_on_an_embedded_ray(micro_model, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run(
        [sys.executable, "-m", "rstar_batch", "demo", "--model", micro_model,
         "--workdir", str(tmp_path / "demo")],
        capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("rstar-batch: 1000 pairs, 20 queries") for line in lines)
    assert f"ranked output: {tmp_path / 'demo' / 'ranked'}" in lines
    top = [line for line in lines if line.startswith(("  1. ", "  2. ", "  3. "))]
    assert len(top) == 3


def test_replicas_taking_large_calls_get_tokens_from_tokenizers_that_read_the_candidates(
        ray_local, micro_model, sample_dir, sample_reference, tmp_path, caplog):
    """A GPU's 32,768-row replica calls: the tokenizer actors read, normalize and tokenize
    (pipeline.ReadTokenize), so texts never cross the object store. The output is still
    the one-pair reference, every pair once, and rows that cannot be scored are kept with
    their reason."""
    table = pq.read_table(sample_dir)
    nulls = pa.table({"query_id": pa.array([1, None], pa.int64()), "query": ["q", "q"],
                      "doc_id": ["null-passage", "null-query-id"],
                      "passage": pa.array([None, "text"], pa.string()),
                      "first_stage_score": pa.array([0.0, 0.0], pa.float32())})
    path = str(tmp_path / "c.parquet")
    pq.write_table(pa.concat_tables([table, nulls.cast(table.schema)]), path,
                   row_group_size=400)
    out = str(tmp_path / "out")
    with caplog.at_level("INFO"):
        summary = rstar_batch.rerank(candidates=[path], output=out, model=micro_model,
                                     dtype="float32", replica_batch_rows=32768,
                                     checkpoint_rows=300, max_rejected_fraction=1.0)
    assert "the tokenizer actors read the candidates" in caplog.text
    assert (summary.pairs, summary.scored) == (1002, 1000)
    assert summary.rejected == {"null_passage": 1, "null_query_id": 1}
    result = pq.read_table(out)
    assert result.num_rows == 1000
    assert set(zip(result["query_id"].to_pylist(), result["doc_id"].to_pylist())) == set(
        sample_reference)
    _assert_matches_reference(result.to_pylist(), sample_reference)
    rejected = pq.read_table(os.path.join(out, "_rejected")).sort_by("doc_id").to_pylist()
    assert [(r["doc_id"], r["reason"], r["passage"]) for r in rejected] == [
        ("null-passage", "null_passage", None), ("null-query-id", "null_query_id", "text")]
