"""Nested candidates (one row per query, a list of structs) rank like flat ones."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rstar_batch
from rstar_batch.io.sources import InputError
from rstar_batch.testing import make_candidates
from tests.reference import reference_scores

pytestmark = pytest.mark.slow


def _nest(flat: pa.Table) -> pa.Table:
    rows = {}
    for r in flat.to_pylist():
        entry = rows.setdefault(r["query_id"], {"query_id": r["query_id"], "query": r["query"],
                                                "source": "bm25", "hits": []})
        entry["hits"].append({"doc_id": r["doc_id"], "passage": r["passage"],
                              "first_stage_score": r["first_stage_score"]})
    return pa.Table.from_pylist(list(rows.values()))


def test_nested_candidates_are_recognised_flattened_and_ranked(ray_local, micro_model, tmp_path):
    flat = make_candidates(5, 12, seed=31)
    pq.write_table(_nest(flat), str(tmp_path / "nested.parquet"))
    out = str(tmp_path / "out")
    summary = rstar_batch.rerank(candidates=[str(tmp_path / "nested.parquet")], output=out,
                                 model=micro_model, keep_columns=["first_stage_score", "source"],
                                 dtype="float32")
    assert (summary.pairs, summary.queries, summary.written) == (60, 5, 60)
    ranked = pq.read_table(out)
    assert ranked.column_names == ["query_id", "doc_id", "score", "rank", "first_stage_score",
                                   "source"]
    assert set(ranked["source"].to_pylist()) == {"bm25"}
    reference = reference_scores(micro_model, flat)
    kept = {(r["query_id"], r["doc_id"]): r["first_stage_score"] for r in flat.to_pylist()}
    for row in ranked.to_pylist():
        key = (row["query_id"], row["doc_id"])
        assert abs(row["score"] - reference[key]) <= 1e-5
        assert row["first_stage_score"] == kept[key]
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["plan"]["total_rows"] == 60  # pairs, not query rows
    again = rstar_batch.rerank(candidates=[str(tmp_path / "nested.parquet")], output=out,
                               model=micro_model, keep_columns=["first_stage_score", "source"],
                               dtype="float32")
    assert again.already_done


def test_nested_struct_without_a_passage_field_is_refused(ray_local, micro_model, tmp_path):
    table = pa.Table.from_pylist([{"query_id": 1, "query": "q",
                                   "hits": [{"doc_id": "a", "text": "t"}]}])
    pq.write_table(table, str(tmp_path / "n.parquet"))
    with pytest.raises(InputError, match="nested column 'hits' .* has no field 'passage'"):
        rstar_batch.rerank(candidates=[str(tmp_path / "n.parquet")],
                           output=str(tmp_path / "o"), model=micro_model)
