"""Bad data loses nothing: repeats, too many rejections, unreadable files."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rstar_batch
from rstar_batch.io.sources import InputError
from rstar_batch.summary import TooManyRejectedError

pytestmark = pytest.mark.slow


def _candidates(n_queries: int = 4, per_query: int = 25) -> pa.Table:
    rows = [(q, f"query {q} violin", f"d{q}-{c}", f"passage {c} about violin {q}")
            for q in range(n_queries) for c in range(per_query)]
    qid, query, did, passage = zip(*rows)
    return pa.table({"query_id": list(qid), "query": list(query), "doc_id": list(did),
                     "passage": list(passage)})


def test_repeated_pairs_are_written_once_and_the_repeats_kept_as_rejected(
        ray_local, micro_model, tmp_path):
    table = _candidates()
    repeats = table.slice(10, 2)  # (0, d0-10) and (0, d0-11) again, in a second file
    pq.write_table(table, str(tmp_path / "a.parquet"))
    pq.write_table(repeats, str(tmp_path / "b.parquet"))
    out = str(tmp_path / "out")
    summary = rstar_batch.rerank(candidates=[str(tmp_path / "a.parquet"),
                                             str(tmp_path / "b.parquet")],
                                 output=out, model=micro_model, max_rejected_fraction=0.05)
    assert summary.rejected == {"duplicate_pair": 2}
    assert (summary.pairs, summary.written) == (102, 100)
    ranked = pq.read_table(out)
    pairs = list(zip(ranked["query_id"].to_pylist(), ranked["doc_id"].to_pylist()))
    assert len(pairs) == len(set(pairs)) == 100
    rejected = pq.read_table(os.path.join(out, "_rejected")).to_pylist()
    assert sorted((r["doc_id"], r["reason"]) for r in rejected) == [
        ("d0-10", "duplicate_pair"), ("d0-11", "duplicate_pair")]


def test_too_many_rejected_rows_fail_the_job_with_the_counts(ray_local, micro_model, tmp_path):
    table = _candidates()
    passages = table["passage"].to_pylist()
    for i in range(0, 100, 20):  # 5% of the passages are missing
        passages[i] = None
    (tmp_path / "in").mkdir()
    pq.write_table(table.set_column(3, "passage", pa.array(passages)),
                   str(tmp_path / "in" / "c.parquet"))
    out = str(tmp_path / "in" / "_reranked")  # inside the input folder, as people do
    with pytest.raises(TooManyRejectedError, match=r"5 of 100 rows were rejected \(5\.00% > "
                       r"--max-rejected-fraction 0\.01\): null_passage=5; see .*_rejected/"):
        rstar_batch.rerank(candidates=[str(tmp_path / "in")], output=out, model=micro_model)
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    assert pq.read_table(os.path.join(out, "_rejected")).num_rows == 5  # kept for a look
    summary = rstar_batch.rerank(candidates=[str(tmp_path / "in")], output=out,
                                 model=micro_model, max_rejected_fraction=0.1)
    assert summary.pairs_this_run == 0 and summary.written == 95  # nothing scored again
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_unreadable_file_fails_naming_it_or_is_skipped_and_recorded(
        ray_local, micro_model, tmp_path, damage):
    inputs = tmp_path / "in"
    inputs.mkdir()
    pq.write_table(_candidates(2), str(inputs / "good.parquet"))
    pq.write_table(_candidates(3), str(inputs / "bad.parquet"))
    data = (inputs / "bad.parquet").read_bytes()
    (inputs / "bad.parquet").write_bytes(
        data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 100)
    out = str(tmp_path / "out")
    with pytest.raises(InputError, match=r"bad\.parquet' is not a readable Parquet file.*"
                       r"--on-bad-file skip"):
        rstar_batch.rerank(candidates=[str(inputs)], output=out, model=micro_model)
    summary = rstar_batch.rerank(candidates=[str(inputs)], output=out, model=micro_model,
                                 on_bad_file="skip")
    assert summary.pairs == 50
    skipped = json.load(open(os.path.join(out, "_manifest.json")))["input"]["skipped_files"]
    assert [s["path"].rsplit("/", 1)[-1] for s in skipped] == ["bad.parquet"]
