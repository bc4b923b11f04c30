"""score-corpus: every query against a whole corpus, top K, equal to brute force.

Brute force here is the independent reference (tests/reference.py): every
query × passage pair scored one at a time with plain transformers, then sorted.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rstar_batch import Columns, RerankConfig, score_corpus
from rstar_batch.base import columns as C
from rstar_batch.io.sources import InputError
from rstar_batch.stages.all_pairs import block_top_k
from rstar_batch.stages.rank import rank_table
from rstar_batch.testing import make_candidates
from tests.jobs import Job, committed_rows, paced, run
from tests.reference import reference_scores, reference_window_scores

TOP_K = 7
LONG = " ".join(["glacier river engine"] * 300)


@pytest.fixture(scope="module")
def corpus_inputs(tmp_path_factory) -> tuple[str, str, pa.Table, pa.Table]:
    """90 passages in two files (ids "d000"…; repeated texts under other ids, so the
    reference has exact ties; an empty passage, one past 512 tokens, one null) and
    seven queries: one without text, one repeating an id, one longer than max_length."""
    folder = tmp_path_factory.mktemp("corpus")
    texts = list(dict.fromkeys(make_candidates(4, 30, seed=5)["passage"].to_pylist()))[:80]
    texts += texts[:6] + ["", LONG, None, "violin"]
    corpus = pa.table({"doc_id": [f"d{i:03d}" for i in range(len(texts))], "passage": texts,
                       "source": [f"s{i % 3}" for i in range(len(texts))]})
    os.makedirs(folder / "corpus")
    pq.write_table(corpus.slice(0, 50), folder / "corpus" / "a.parquet")
    pq.write_table(corpus.slice(50), folder / "corpus" / "b.parquet")
    long_query = " ".join(texts[0].split() * 20)[:3000]   # cut in every pair, with LONG too
    queries = pa.table({"qid": [3, 1, 4, 5, 9, 1, 7],
                        "text": ["comet telescope orbit", "violin festival Paris",
                                 "glacier river", None, "café 東京 😀", "repeated id",
                                 long_query]})
    pq.write_table(queries, folder / "queries.parquet")
    return str(folder / "corpus"), str(folder / "queries.parquet"), corpus, queries


@pytest.fixture(scope="module")
def brute_force(micro_model, corpus_inputs) -> dict[int, list[tuple[str, float]]]:
    """Per valid query: every passage as (doc_id, reference score), best first."""
    _, _, corpus, queries = corpus_inputs
    valid_docs = corpus.filter(pa.compute.is_valid(corpus["passage"])).to_pylist()
    pairs = [{"query_id": q["qid"], "query": q["text"], "doc_id": d["doc_id"],
              "passage": d["passage"]}
             for q in queries.to_pylist() if q["text"] is not None and q["text"] != "repeated id"
             for d in valid_docs]
    scores = reference_scores(micro_model, pa.Table.from_pylist(pairs), max_length=128)
    ranked: dict[int, list] = {}
    for (qid, doc), score in scores.items():
        ranked.setdefault(qid, []).append((doc, score))
    return {q: sorted(rows, key=lambda r: (-r[1], r[0])) for q, rows in ranked.items()}


def _args(corpus: str, queries: str, out: str, model: str, *extra: str) -> list[str]:
    # 5 valid queries: chunks of 12 passages, replica calls of 6, so calls straddle
    # chunks and every chunk is a run of its own.
    return ["score-corpus", "--corpus", corpus, "--queries", queries, "--output", out,
            "--model", model, "--dtype", "float32", "--top-k", str(TOP_K), "--max-length", "128",
            "--query-id-column", "qid", "--query-column", "text", "--keep-columns", "source",
            "--checkpoint-rows", "60", "--replica-batch-rows", "32", "--commit-seconds", "1",
            "--max-rejected-fraction", "0.05", *extra]


def _assert_equals_brute_force(out: str, brute_force: dict) -> None:
    got = pq.read_table(out)
    assert got.column_names == ["query_id", "doc_id", "score", "rank", "source"]
    assert sorted(set(got["query_id"].to_pylist())) == [1, 3, 4, 7, 9]
    for qid, expected in brute_force.items():
        mine = got.filter(pa.compute.equal(got["query_id"], qid)).sort_by("rank").to_pylist()
        assert [r["rank"] for r in mine] == list(range(1, TOP_K + 1))
        reference = dict(expected)
        for position, row in enumerate(mine):
            assert abs(row["score"] - reference[row["doc_id"]]) <= 1e-5
            want_doc, want_score = expected[position]
            # the same document, or an exact/near tie (float noise of batching)
            assert row["doc_id"] == want_doc or abs(want_score - reference[row["doc_id"]]) \
                <= 2e-6, (qid, position, row, expected[:TOP_K + 2])


@pytest.mark.slow
def test_score_corpus_equals_brute_force_and_keeps_rejected_rows(
        ray_local, micro_model, corpus_inputs, brute_force, tmp_path):
    corpus, queries, _, _ = corpus_inputs
    out = str(tmp_path / "out")
    config = RerankConfig(corpus=corpus, queries=queries, output=out, model=micro_model,
                          top_k=TOP_K, max_length=128, query_id_column="qid",
                          query_column="text", keep_columns=["source"], checkpoint_rows=60,
                          replica_batch_rows=32, max_rejected_fraction=0.05, dtype="float32")
    summary = score_corpus(config)
    assert (summary.queries, summary.written, summary.pairs) == (5, 5 * TOP_K, 5 * 89)
    assert summary.rejected == {C.NULL_PASSAGE: 1, C.NULL_QUERY: 1, C.DUPLICATE_QUERY_ID: 1}
    _assert_equals_brute_force(out, brute_force)
    rejected = pq.read_table(os.path.join(out, "_rejected")).to_pylist()
    assert {(r["reason"], r["doc_id"], r["query_id"]) for r in rejected} == {
        (C.NULL_PASSAGE, "d088", None), (C.NULL_QUERY, None, 5),
        (C.DUPLICATE_QUERY_ID, None, 1)}
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert manifest["command"] == "score-corpus" and os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not os.path.exists(os.path.join(out, "_work"))
    again = score_corpus(config)
    assert again.already_done


@pytest.mark.slow
def test_maxp_over_the_corpus_windows_only_long_passages(ray_local, micro_model,
                                                        corpus_inputs, brute_force, tmp_path):
    """Passages over the window score their best window; shorter ones as brute force."""
    from transformers import AutoTokenizer

    corpus, queries, table, query_table = corpus_inputs
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    windowed = {d for d, p in zip(table["doc_id"].to_pylist(), table["passage"].to_pylist())
                if p and len(tokenizer(p, add_special_tokens=False)["input_ids"]) > 64}
    assert 0 < len(windowed) < 80
    summary = score_corpus(corpus=corpus, queries=queries, output=str(tmp_path / "maxp"),
                           model=micro_model, top_k=90, max_length=128, query_id_column="qid",
                           query_column="text", checkpoint_rows=400, replica_batch_rows=400,
                           max_rejected_fraction=0.05, long_passages="maxp", window=64,
                           stride=32, dtype="float32")
    assert summary.written == 5 * 89
    maxp = {(r["query_id"], r["doc_id"]): r["score"]
            for r in pq.read_table(tmp_path / "maxp").to_pylist()}
    plain = {(q, d): s for q, rows in brute_force.items() for d, s in rows}
    assert maxp.keys() == plain.keys()
    for key, score in plain.items():
        if key[1] not in windowed:
            assert abs(maxp[key] - score) <= 1e-5
    passages = dict(zip(table["doc_id"].to_pylist(), table["passage"].to_pylist()))
    texts = {}  # the first text of each query id: a repeated id is rejected
    for qid, text in zip(query_table["qid"].to_pylist(), query_table["text"].to_pylist()):
        texts.setdefault(qid, text)
    for qid, doc in sorted(k for k in plain if k[1] in windowed):
        windows = reference_window_scores(micro_model, texts[qid], passages[doc], 64, 32, 128)
        assert abs(maxp[(qid, doc)] - max(windows)) <= 1e-5, (qid, doc)  # the best window


def test_block_top_k_merges_to_the_exact_top_k_with_ties():
    """Many exact ties: per-block top K, merged by the rank pass, equals a full sort."""
    rng = np.random.default_rng(0)
    queries, docs, k = 6, 300, 5
    scores = rng.choice([0.25, 0.5, 0.75], size=(queries, docs)).astype(np.float32)
    doc_ids = np.array([f"doc{i:04d}" for i in rng.permutation(docs)])
    blocks = np.sort(rng.integers(0, 9, docs))
    q, d = np.meshgrid(np.arange(queries), np.arange(docs), indexing="ij")
    q, d = q.ravel(), d.ravel()
    kept = block_top_k(blocks[d], q, scores[q, d], pa.array(doc_ids[d]), k)
    merged = rank_table(pa.table({C.QUERY_ID: q[kept], C.DOC_ID: doc_ids[d[kept]],
                                  C.SCORE: scores[q, d][kept]}), keep=[], top_k=k)
    for query in range(queries):
        full = sorted(range(docs), key=lambda i: (-scores[query, i], doc_ids[i]))[:k]
        mine = merged.filter(pa.compute.equal(merged["query_id"], query))
        assert mine["doc_id"].to_pylist() == [doc_ids[i] for i in full]


def test_the_rank_pass_and_block_top_k_order_ties_alike():
    """score-corpus keeps a block's top K in the order the rank pass then ranks them:
    were their tie-breaks to differ, its top K would not be exact."""
    rng = np.random.default_rng(1)
    n = 400
    query = rng.integers(0, 5, n)
    scores = rng.choice([-0.5, 0.0, 0.5], n).astype(np.float32)
    doc_ids = pa.array([f"d{i}" for i in rng.permutation(n)])
    ranked = rank_table(pa.table({C.QUERY_ID: query, C.DOC_ID: doc_ids, C.SCORE: scores}),
                        keep=[])
    kept = block_top_k(np.zeros(n, np.int64), query, scores, doc_ids, k=n)
    assert kept.tolist() != sorted(kept.tolist())  # ties were broken, not input order kept
    assert ranked["doc_id"].to_pylist() == doc_ids.take(pa.array(kept)).to_pylist()


def test_a_block_of_rejected_passages_only_is_kept_with_its_reasons(micro_model):
    from rstar_batch.model import describe_model
    from rstar_batch.stages.all_pairs import QuerySet, ScoreAllPairs
    from rstar_batch.stages.normalize import NormalizePassages
    from rstar_batch.stages.pairs import PassagePolicy
    from rstar_batch.stages.tokenize import TokenizePassages

    info = describe_model(micro_model)
    block = pa.table({"doc_id": ["a", None], "passage": pa.array([None, "p"], pa.string()),
                      C.CHUNK: pa.array([4, 4], pa.int64()), C.ROW: pa.array([0, 1], pa.int32())})
    tokenize = TokenizePassages(info, 64)
    tokens = tokenize(NormalizePassages(Columns())(block))
    queries = QuerySet(pa.array([1, 2]), tokenize.assembler.tokenize(["q one", "q two"]),
                       np.zeros(2, dtype=np.int32))
    out = ScoreAllPairs(queries, 3, PassagePolicy(), tokenize.assembler, 64, model=info,
                        device="cpu", dtype="float32")(tokens)
    assert out[C.REJECT].to_pylist() == [C.NULL_PASSAGE, C.NULL_DOC_ID]
    assert out[C.DOC_ID].to_pylist() == ["a", None] and out[C.ROW].to_pylist() == [0, 1]


def test_passages_sent_cut_to_the_replicas_pair_as_the_whole_passage_would(micro_model):
    # longest_first gives the budget's odd token to the longer side when both are cut:
    # a passage cut to the budget before pairing looked shorter than a long query
    from rstar_batch.model import describe_model
    from rstar_batch.stages.all_pairs import QuerySet, ScoreAllPairs
    from rstar_batch.stages.normalize import NormalizePassages
    from rstar_batch.stages.pairs import PassagePolicy
    from rstar_batch.stages.tokenize import TokenizePassages

    info = describe_model(micro_model)
    long = "violin river engine protein galaxy harbour glacier " * 6
    texts = {1: long, 2: long + "comet telescope", 3: "a short query"}
    passages = {"a": long, "b": long[:120], "c": "harbour"}
    assembler = TokenizePassages(info, 32).assembler   # a budget of 29: odd
    queries = QuerySet(pa.array(list(texts)), assembler.tokenize(list(texts.values())),
                       np.zeros(len(texts), dtype=np.int32))
    tokenize = TokenizePassages(info, 32, assembler=assembler,
                                limit=queries.passage_tokens_needed(assembler))
    block = pa.table({"doc_id": list(passages), "passage": list(passages.values()),
                      C.CHUNK: pa.array([0] * 3, pa.int64()),
                      C.ROW: pa.array(range(3), pa.int32())})
    scorer = ScoreAllPairs(queries, 3, PassagePolicy(), assembler, 32, model=info,
                           device="cpu", dtype="float32")
    out = scorer(tokenize(NormalizePassages(Columns())(block)))
    pairs = [{"query_id": q, "query": text, "doc_id": d, "passage": p}
             for q, text in texts.items() for d, p in passages.items()]
    reference = reference_scores(micro_model, pa.Table.from_pylist(pairs), max_length=32)
    assert out.num_rows == len(pairs)
    for row in out.to_pylist():
        assert abs(row[C.SCORE] - reference[(row[C.QUERY_ID], row[C.DOC_ID])]) <= 1e-5, row


def test_repeated_corpus_ids_are_refused_naming_them(micro_model, tmp_path):
    pq.write_table(pa.table({"doc_id": ["a", "b", "a"], "passage": ["x", "y", "z"]}),
                   tmp_path / "corpus.parquet")
    pq.write_table(pa.table({"query_id": [1], "query": ["q"]}), tmp_path / "q.parquet")
    with pytest.raises(InputError, match=r"repeats 1 doc id.*'a'.*row 0.*row 2"):
        score_corpus(corpus=str(tmp_path / "corpus.parquet"), queries=str(tmp_path / "q.parquet"),
                     output=str(tmp_path / "out"), model=micro_model, top_k=2)


@pytest.mark.slow
def test_a_killed_then_drained_score_corpus_resumes_to_the_brute_force_result(
        micro_model, corpus_inputs, brute_force, cluster, tmp_path):
    """One output through three runs: SIGKILL part way, SIGTERM part way into the
    rerun (a drain: exit 75), then a run that finishes; each scores only passages the
    runs before it did not commit."""
    corpus, queries, _, _ = corpus_inputs
    out = str(tmp_path / "out")
    args = _args(corpus, queries, out, micro_model)
    # paced by the fault hook (each replica batch 0.5 s longer) so there is time to stop it
    job = Job(args, str(tmp_path / "run1.log"), paced(0.5), cluster=cluster)
    job.wait_until(lambda: committed_rows(out) >= 10)
    job.kill()
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    done_at_kill = committed_rows(out)
    assert done_at_kill < 90
    status = run(["status", out], str(tmp_path / "status.log")).output()
    assert f"{done_at_kill * 5}/{90 * 5} pairs scored" in status, status

    job = Job(args, str(tmp_path / "run2.log"), paced(0.5), cluster=cluster)
    job.wait_until(lambda: committed_rows(out) >= done_at_kill + 10)
    assert job.terminate() < 30
    assert job.proc.returncode == 75, job.output()[-3000:]
    done_at_stop = committed_rows(out)
    assert f"stopped on SIGTERM: {done_at_stop * 5} of {90 * 5} pairs are " \
        "committed" in job.output()
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    rerun = run(args, str(tmp_path / "run3.log"), cluster=cluster)
    assert rerun.proc.returncode == 0, rerun.output()[-3000:]
    _assert_equals_brute_force(out, brute_force)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    per_run = {int(k): v for k, v in manifest["passages_scored_per_run"].items()}
    assert per_run[1] == done_at_kill and per_run[1] + per_run[2] == done_at_stop
    assert sum(per_run.values()) >= 90  # nothing lost
    done = run(["status", out], str(tmp_path / "status2.log")).output()
    assert done.startswith(f"DONE {5 * 89} pairs, 5 queries"), done
