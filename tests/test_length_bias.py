"""The length-bias report, from small ranked outputs and candidates built here."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch.io.sources import InputError
from rstar_batch.length_bias import _spearman_by, length_bias, plot_length_bias
from rstar_batch.progress import checkpoint


def write_output(folder, rows: list[tuple]) -> str:
    """A finished output folder: one ranked part plus bookkeeping files to ignore."""
    os.makedirs(folder, exist_ok=True)
    qid, did, score = zip(*rows)
    table = pa.table({"query_id": pa.array(qid, pa.int64()), "doc_id": list(did),
                      "score": pa.array(score, pa.float32()),
                      "rank": pa.array(np.zeros(len(rows)), pa.int32())})
    pq.write_table(table, os.path.join(folder, "part-00000.parquet"))
    for name in (checkpoint.MARKER, "_manifest.json"):
        with open(os.path.join(folder, name), "w") as f:
            json.dump({}, f)
    open(os.path.join(folder, checkpoint.SUCCESS), "w").close()
    return str(folder)


def write_candidates(path, docs: list[tuple], names=("doc_id", "passage")) -> str:
    did, passage = zip(*docs)
    pq.write_table(pa.table({names[0]: list(did), names[1]: pa.array(passage, pa.string()),
                             "query": ["unused"] * len(docs)}), str(path))
    return str(path)


def job(tmp_path, sign: int, queries: int = 4, docs: int = 30):
    """Query q scores docs of lengths q*docs+1 .. (q+1)*docs words; score = sign * length / 10."""
    rows, passages = [], []
    for q in range(queries):
        for i in range(1, docs + 1):
            doc = f"q{q}d{i}"
            length = i + q * docs
            rows.append((q, doc, sign * length / 10))
            passages.append((doc, " ".join(["word"] * length)))
    out = write_output(tmp_path / "out", rows)
    return out, [write_candidates(tmp_path / "candidates.parquet", passages)]


def test_scores_that_grow_with_length_correlate_perfectly(tmp_path):
    report = length_bias(*job(tmp_path, +1))
    assert report.pairs == 120 and report.queries == 4 and report.queries_used == 4
    assert report.pooled_spearman == pytest.approx(1.0)
    assert report.mean_query_spearman == pytest.approx(1.0)
    means = [d.mean_score for d in report.deciles]
    assert len(means) == 10 and means == sorted(means) and len(set(means)) == 10
    assert sum(d.pairs for d in report.deciles) == 120
    assert report.deciles[0].min_length == 1 and report.deciles[-1].max_length == 120
    lines = report.text().splitlines()
    assert lines[0] == "length bias: 120 pairs, 4 queries, unit=words"
    assert lines[1] == "Spearman(score, length): pooled 1.000, mean per query 1.000 (4 queries)"
    assert len(lines) == 3 + 10
    assert json.loads(json.dumps(report.to_dict()))["deciles"][0]["pairs"] == 12


def test_scores_that_fall_with_length_correlate_negatively(tmp_path):
    report = length_bias(*job(tmp_path, -1))
    assert report.pooled_spearman == pytest.approx(-1.0)
    assert report.mean_query_spearman == pytest.approx(-1.0)
    means = [d.mean_score for d in report.deciles]
    assert means == sorted(means, reverse=True)


def test_spearman_matches_ranks_computed_independently():
    rng = np.random.default_rng(7)
    score = rng.normal(size=200)
    noisy = score + rng.normal(size=200)                         # correlated, not fully
    length = 3 + 7 * np.argsort(np.argsort(noisy))              # distinct word counts
    assert len(set(score)) == len(set(length)) == 200           # no ties: ranks are exact
    ranks = [np.argsort(np.argsort(v)) for v in (score, length)]
    expected = np.corrcoef(*ranks)[0, 1]
    assert 0.3 < expected < 0.9
    frame = pd.DataFrame({"score": score, "length": length, "k": np.arange(200) % 4})
    assert _spearman_by(frame.assign(k=0), "k").iloc[0] == pytest.approx(expected, abs=1e-12)
    per_query = _spearman_by(frame, "k")                         # four groups at once
    for k in range(4):
        part = [np.argsort(np.argsort(v[k::4])) for v in (score, length)]
        assert per_query[k] == pytest.approx(np.corrcoef(*part)[0, 1], abs=1e-12)


def test_spearman_averages_tied_ranks():
    # score ranks 1, 2.5, 2.5, 4; length ranks 1, 2, 3, 4 -> Pearson by hand: 3/sqrt(10)
    frame = pd.DataFrame({"score": [0.1, 0.5, 0.5, 0.9], "length": [3, 4, 7, 9], "k": 0})
    assert _spearman_by(frame, "k").iloc[0] == pytest.approx(3 / np.sqrt(10), abs=1e-12)
    constant = frame.assign(length=5)
    assert np.isnan(_spearman_by(constant, "k").iloc[0])


def test_short_or_constant_queries_are_left_out_of_the_mean(tmp_path):
    rows = [(1, "a", 0.1), (1, "b", 0.2), (1, "c", 0.3),         # used: rho 1
            (2, "a", 0.5), (2, "b", 0.4),                        # two pairs
            (3, "a", 0.7), (3, "b", 0.7), (3, "c", 0.7)]         # constant score
    cands = write_candidates(tmp_path / "c.parquet", [("a", "x"), ("b", "x x"),
                                                      ("c", "x x x"), ("b", "x x")])
    report = length_bias(write_output(tmp_path / "out", rows), [cands])
    assert report.queries == 3 and report.queries_used == 1
    assert report.mean_query_spearman == pytest.approx(1.0)


def test_words_and_chars_measure_different_lengths(tmp_path):
    rows = [(1, "a", 0.1), (1, "b", 0.2), (1, "c", 0.3), (1, "d", 0.4)]
    docs = [("a", "  two\twords "), ("b", "naïve café"), ("c", "   "), ("d", "one"),
            ("unscored", None)]
    out = write_output(tmp_path / "out", rows)
    cands = [write_candidates(tmp_path / "c.parquet", docs)]
    words = {(d.min_length, d.max_length) for d in length_bias(out, cands).deciles}
    chars = {(d.min_length, d.max_length)
             for d in length_bias(out, cands, unit="chars").deciles}
    assert words == {(0, 0), (1, 1), (2, 2)}                    # ties merge deciles
    assert chars == {(3, 3), (10, 10), (12, 12)}


def test_column_names_are_configurable(tmp_path):
    out = write_output(tmp_path / "out", [(1, "a", 0.1), (1, "b", 0.2)])
    cands = write_candidates(tmp_path / "c.parquet", [("a", "x"), ("b", "x y")],
                             names=("pid", "text"))
    report = length_bias(out, [cands], doc_id_column="pid", passage_column="text")
    assert report.pooled_spearman == pytest.approx(1.0)


def test_scored_doc_without_passage_is_an_error(tmp_path):
    out = write_output(tmp_path / "out", [(1, "a", 0.1), (1, "ghost", 0.2), (1, "nul", .3)])
    cands = write_candidates(tmp_path / "c.parquet", [("a", "x"), ("nul", None)])
    with pytest.raises(InputError, match=r"2 scored doc_id\(s\) have no passage") as err:
        length_bias(out, [cands])
    assert "'ghost'" in str(err.value) and cands in str(err.value)


def test_conflicting_passages_for_one_doc_is_an_error(tmp_path):
    out = write_output(tmp_path / "out", [(1, "a", 0.1), (1, "b", 0.2)])
    first = write_candidates(tmp_path / "c1.parquet", [("a", "x"), ("b", "same")])
    second = write_candidates(tmp_path / "c2.parquet", [("a", "x y"), ("b", "same")])
    with pytest.raises(InputError, match="doc_id 'a' has different passages"):
        length_bias(out, [first, second])


def test_missing_column_names_column_and_file(tmp_path):
    out = write_output(tmp_path / "out", [(1, "a", 0.1)])
    cands = write_candidates(tmp_path / "c.parquet", [("a", "x")], names=("doc_id", "text"))
    with pytest.raises(InputError, match="passage column 'passage'") as err:
        length_bias(out, [cands])
    assert cands in str(err.value)


def test_plot_writes_a_png(tmp_path):
    report = length_bias(*job(tmp_path, +1))
    target = tmp_path / "plots" / "length_bias.png"
    plot_length_bias(report, str(target))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    report = length_bias(*job(tmp_path, +1, queries=1, docs=3))
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)   # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'rstar-batch\[plot\]'"):
        plot_length_bias(report, str(tmp_path / "x.png"))
