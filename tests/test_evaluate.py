"""`evaluate` and `export --format trec` on a tiny hand-built example.

Ranked outputs are written by hand with pyarrow (no Ray job), so these run in
seconds. The expected metric values are derived by hand in the comments.
"""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch.base.order import group_starts
from rstar_batch.cli import main
from rstar_batch.config import ConfigError
from rstar_batch.evaluate import evaluate, read_qrels, read_run
from rstar_batch.export import export_trec, trec_scores
from rstar_batch.progress import checkpoint
from rstar_batch.testing import make_candidates, make_qrels

QRELS = """\
1 0 d1 1
1 0 d3 2
2 0 d7 1
3 0 d9 1
4 0 d2 1
"""

# Our ranked output. Ties are broken by doc_id ascending, as the rank pass does:
# in query 2, 'd50' < 'd7', so d50 is rank 2 and d7 rank 3 with equal scores.
PART_0 = [  # (query_id, doc_id, score, rank)
    (1, "d2", 0.9, 1), (1, "d1", 0.8, 2), (1, "d3", 0.7, 3), (1, "d4", 0.6, 4),
    (3, "d8", 0.5, 1), (3, "d10", 0.4, 2),
]
PART_1 = [(2, "d6", 0.9, 1), (2, "d50", 0.4, 2), (2, "d7", 0.4, 3)]  # query 4: absent

# Judged queries: 1, 2, 3, 4 -> every mean divides by 4.
# Ours, by rank:
#   q1: relevant d1 (1) at 2, d3 (2) at 3.
#       RR = 1/2; AP = (1/2 + 2/3) / 2 = 7/12; R@100 = 2/2 = 1
#       DCG = 1/log2(3) + 2/log2(4) = 1.630930; IDCG = 2/log2(2) + 1/log2(3) = 2.630930
#       nDCG@10 = 0.619906
#   q2: d7 at 3 (not at 2, as trec_eval's descending-doc-id tie rule would put it).
#       RR = 1/3; AP = 1/3; R@100 = 1; nDCG@10 = (1/log2(4)) / 1 = 0.5
#   q3: d9 not retrieved -> 0.   q4: not in the run -> 0.
LOG3 = math.log2(3)
OURS = {
    "RR@10": (1 / 2 + 1 / 3) / 4,                                   # 0.208333
    "AP": (7 / 12 + 1 / 3) / 4,                                     # 0.229167
    "R@100": (1 + 1) / 4,                                           # 0.5
    "nDCG@10": ((1 / LOG3 + 1) / (2 + 1 / LOG3) + 0.5) / 4,         # 0.279977
}

# The first stage as a TREC run. trec_eval ignores the rank column and breaks the
# d6/d7 score tie by doc id descending: d7 first.
BASELINE = """\
1 Q0 d3 1 12.5 bm25
1 Q0 d2 2 11.0 bm25
1 Q0 d1 3 10.0 bm25
2 Q0 d6 1 7.0 bm25
2 Q0 d7 2 7.0 bm25
4 Q0 d2 1 3.0 bm25
"""
#   q1: d3 (2) at 1, d1 (1) at 3: RR = 1; AP = (1 + 2/3) / 2 = 5/6; R@100 = 1
#       DCG = 2 + 1/log2(4) = 2.5; nDCG@10 = 2.5 / 2.630930 = 0.950236
#   q2: d7 at 1: all 1.   q3: not in the run: 0.   q4: d2 at 1: all 1.
BASE = {
    "RR@10": (1 + 1 + 1) / 4,                                       # 0.75
    "AP": (5 / 6 + 1 + 1) / 4,                                      # 0.708333
    "R@100": 3 / 4,                                                 # 0.75
    "nDCG@10": (2.5 / (2 + 1 / LOG3) + 1 + 1) / 4,                  # 0.737559
}


def _ranked(rows: list[tuple]) -> pa.Table:
    qid, did, score, rank = zip(*rows)
    return pa.table({"query_id": pa.array(qid, pa.int64()), "doc_id": pa.array(did),
                     "score": pa.array(score, pa.float32()),
                     "rank": pa.array(rank, pa.int32())})


def write_output(folder, parts: list[list[tuple]], finished: bool = True) -> str:
    """A ranked output folder as a finished rerank job leaves it."""
    os.makedirs(folder, exist_ok=True)
    for i, rows in enumerate(parts):
        pq.write_table(_ranked(rows), os.path.join(folder, f"part-{i:05d}.parquet"))
    with open(os.path.join(folder, checkpoint.MARKER), "w") as f:
        f.write("{}")
    if finished:
        open(os.path.join(folder, checkpoint.SUCCESS), "w").close()
    return str(folder)


def write_text(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture()
def example(tmp_path) -> dict:
    return {"run": write_output(tmp_path / "ranked", [PART_0, PART_1]),
            "qrels": write_text(tmp_path / "qrels.txt", QRELS),
            "baseline": write_text(tmp_path / "bm25.txt", BASELINE)}


def test_metrics_match_hand_computed_values(example):
    result = evaluate(example["run"], example["qrels"], baseline=example["baseline"])
    assert result.judged_queries == 4
    assert result.run.queries_ranked == 3 and result.baseline.queries_ranked == 3
    assert result.run.metrics == pytest.approx(OURS, abs=1e-6)
    assert result.baseline.metrics == pytest.approx(BASE, abs=1e-6)
    assert result.difference() == pytest.approx(
        {m: OURS[m] - BASE[m] for m in OURS}, abs=1e-6)
    table = result.table()
    assert "RR@10" in table and "-0.5417" in table and "judged queries: 4" in table


def test_judged_query_missing_from_the_run_counts_as_zero(example):
    # Only query 4 is missing from our run: averaging over the 3 ranked queries
    # would give RR@10 = (1/2 + 1/3 + 0) / 3 = 0.2778; over all 4 it is 0.2083.
    rr = evaluate(example["run"], example["qrels"], metrics=["RR@10"]).run.metrics["RR@10"]
    assert rr == pytest.approx(5 / 24)


def test_trec_run_ties_are_broken_as_trec_eval_breaks_them(example):
    import pytrec_eval  # the test extra's (ir-measures): a missing one fails, not skips
    run = next(read_run(example["baseline"]))
    assert list(run["2"]) == ["d7", "d6"]          # doc id descending among equal scores
    raw: dict = {}
    for line in BASELINE.splitlines():
        qid, _, did, _, score, _ = line.split()
        raw.setdefault(qid, {})[did] = float(score)
    per_query = pytrec_eval.RelevanceEvaluator(read_qrels(example["qrels"]),
                                               {"map"}).evaluate(raw)
    assert sum(v["map"] for v in per_query.values()) / 4 == pytest.approx(BASE["AP"])


def test_qrels_from_trec_text_and_parquet_agree(example, tmp_path):
    path = tmp_path / "qrels.parquet"
    pq.write_table(pa.table({"query_id": pa.array([1, 1, 2, 3, 4], pa.int64()),
                             "doc_id": ["d1", "d3", "d7", "d9", "d2"],
                             "relevance": pa.array([1, 2, 1, 1, 1], pa.int8())}), path)
    text = read_qrels(example["qrels"])
    assert text == {"1": {"d1": 1, "d3": 2}, "2": {"d7": 1}, "3": {"d9": 1}, "4": {"d2": 1}}
    assert read_qrels(str(path)) == text
    result = evaluate(example["run"], str(path))
    assert result.run.metrics == pytest.approx(OURS, abs=1e-6)


def test_parquet_first_stage_baseline_uses_its_score_column(example, tmp_path):
    folder = tmp_path / "first-stage"
    folder.mkdir()
    rows = [line.split() for line in BASELINE.splitlines()]
    pq.write_table(pa.table({"query_id": pa.array([int(r[0]) for r in rows]),
                             "doc_id": [r[2] for r in rows],
                             "bm25": pa.array([float(r[4]) for r in rows])}),
                   folder / "part-0.parquet")
    result = evaluate(example["run"], example["qrels"], baseline=str(folder),
                      baseline_score_column="bm25")
    assert result.baseline.metrics == pytest.approx(BASE, abs=1e-6)


def test_malformed_qrels_line_names_file_and_line(example, tmp_path):
    bad = write_text(tmp_path / "bad-qrels.txt", "1 0 d1 1\n1 0 d3\n")
    with pytest.raises(ConfigError, match=r"bad-qrels\.txt, line 2: expected 'qid 0 docid"):
        evaluate(example["run"], bad)
    bad = write_text(tmp_path / "bad-rel.txt", "1 0 d1 yes\n")
    with pytest.raises(ConfigError, match=r"bad-rel\.txt, line 1"):
        read_qrels(bad)


def test_malformed_run_line_names_file_and_line(example, tmp_path):
    bad = write_text(tmp_path / "bad-run.txt",
                     "1 Q0 d1 1 2.0 t\n\n1 Q0 d2 2 high t\n")   # line 3: score not a number
    with pytest.raises(ConfigError, match=r"bad-run\.txt, line 3: expected 'qid Q0 docid"):
        evaluate(example["run"], example["qrels"], baseline=bad)


def test_unusable_inputs_are_refused_with_a_reason(example, tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        evaluate(str(tmp_path / "nope"), example["qrels"])
    unfinished = write_output(tmp_path / "unfinished", [PART_0], finished=False)
    with pytest.raises(ConfigError, match="not finished"):
        evaluate(unfinished, example["qrels"])
    with pytest.raises(ConfigError, match="unknown metric 'Bogus@3'"):
        evaluate(example["run"], example["qrels"], metrics=["Bogus@3"])


def test_missing_ir_measures_names_the_install_command(example, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ir_measures", None)
    with pytest.raises(ConfigError, match=r"pip install 'rstar-batch\[eval\]'"):
        evaluate(example["run"], example["qrels"])


def _trec_order(path) -> dict[str, list[str]]:
    """Each query's doc ids as trec_eval orders them: float32 score desc, doc id desc."""
    by_query: dict = {}
    for line in open(path):
        qid, q0, did, rank, score, tag = line.split()
        assert q0 == "Q0" and tag == "t1"
        by_query.setdefault(qid, []).append((np.float32(float(score)), did))
    return {q: [d for _, d in sorted(rows, reverse=True)] for q, rows in by_query.items()}


def test_exported_trec_run_keeps_our_order_under_trec_eval_sorting(example, tmp_path):
    below_one = float(np.nextafter(np.float32(1), np.float32(0)))
    ties = [  # equal scores, the last tied at 1.0 with the next float32 down
        (5, "a", 1.0, 1), (5, "b", 1.0, 2), (5, "c", 1.0, 3), (5, "d", below_one, 4),
        (5, "e", 0.25, 5), (5, "f", 0.25, 6),
        (6, "x", 1.0, 1), (6, "y", 1.0, 2),
    ]
    run = write_output(tmp_path / "ties", [PART_0, PART_1 + ties])
    target = tmp_path / "out" / "run.txt"
    assert export_trec(run, str(target), tag="t1") == len(PART_0) + len(PART_1) + len(ties)

    lines = [line.split() for line in target.read_text().splitlines()]
    ours = {}
    for qid, did, _, rank in PART_0 + PART_1 + ties:
        ours.setdefault(str(qid), []).append(did)
    assert _trec_order(target) == ours
    # Lines come query by query in rank order; untied scores are printed unchanged.
    assert [(r[0], r[2], r[3]) for r in lines[:4]] == [
        ("1", "d2", "1"), ("1", "d1", "2"), ("1", "d3", "3"), ("1", "d4", "4")]
    assert lines[0][4] == "0.9" and lines[-2][4] == "1"  # query 6 starts again at 1.0
    # The exported file measures exactly as the folder does.
    from_file = evaluate(str(target), example["qrels"]).run.metrics
    assert from_file == pytest.approx(OURS, abs=1e-9)


def test_trec_scores_lower_only_what_would_tie():
    scores = np.array([3, 3, 2, 2, 5, 5, np.nan], np.float32)
    starts = group_starts(pa.array(["a", "a", "a", "a", "b", "b", "b"]))
    out = trec_scores(scores, starts)
    assert out[0] == 3 and out[2] == 2 and out[4] == 5
    assert all(out[i] > out[i + 1] for i in (0, 1, 2, 4, 5))
    assert out[1] == np.nextafter(np.float32(3), np.float32(0))


def test_cli_evaluate_and_export(example, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--run", example["run"], "--qrels", example["qrels"],
                 "--baseline", example["baseline"], "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and f"wrote {out}" in printed
    saved = json.loads(out.read_text())
    assert saved["judged_queries"] == 4
    assert saved["run"]["metrics"]["RR@10"] == pytest.approx(OURS["RR@10"])
    assert main(["evaluate", "--run", example["run"], "--qrels", example["qrels"]]) == 0
    assert os.path.exists(os.path.join(example["run"], "_evaluation.json"))

    assert main(["export", "--format", "trec", example["run"], str(tmp_path / "r.txt")]) == 0
    assert (tmp_path / "r.txt").read_text().splitlines()[0] == "1 Q0 d2 1 0.9 rstar-batch"

    assert main(["evaluate", "--run", str(tmp_path / "nope"), "--qrels", example["qrels"]]) == 2
    err = capsys.readouterr().err.strip()  # log lines of the earlier commands may come first
    err = err[err.index("rstar-batch: error: "):]
    assert err.startswith("rstar-batch: error: run ") and "\n" not in err


def test_synthetic_qrels_judge_the_most_overlapping_candidates(tmp_path):
    candidates = make_candidates(4, 10, seed=3)
    qrels = make_qrels(candidates, seed=3)
    assert qrels.equals(make_qrels(candidates, seed=3))
    rows = qrels.to_pylist()
    assert sorted({r["query_id"] for r in rows}) == [1, 2, 3, 4]
    assert [r["relevance"] for r in rows].count(2) == 4 and len(rows) == 12

    def shared(row: dict) -> int:
        words = set(re.findall(r"\w+", row["query"].lower()))
        return len(words & set(re.findall(r"\w+", row["passage"].lower())))

    judged = {(r["query_id"], r["doc_id"]) for r in rows}
    for q in [1, 2, 3, 4]:
        cands = [c for c in candidates.to_pylist() if c["query_id"] == q]
        relevant = [shared(c) for c in cands if (q, c["doc_id"]) in judged]
        others = [shared(c) for c in cands if (q, c["doc_id"]) not in judged]
        assert min(relevant) >= max(others)

    path = tmp_path / "qrels.txt"
    assert main(["sample-data", str(tmp_path / "cands"), "--queries", "4", "--candidates",
                 "10", "--seed", "3", "--qrels", str(path)]) == 0
    assert read_qrels(str(path)) == {
        str(q): {r["doc_id"]: r["relevance"] for r in rows if r["query_id"] == q}
        for q in [1, 2, 3, 4]}
