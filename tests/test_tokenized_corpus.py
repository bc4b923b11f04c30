"""A corpus tokenized once: the nightly run against it scores exactly as against the texts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

import rstar_batch
from rstar_batch import ConfigError
from rstar_batch.base import columns as C
from rstar_batch.model import describe_model
from rstar_batch.stages.pairs import PassagePolicy
from rstar_batch.stages.tokenize import Tokenize
from rstar_batch.testing import make_candidates
from tests.jobs import Job, assert_same_ranking, committed_rows, paced, run

LONG = " ".join(["glacier river engine"] * 300)   # far past 512 tokens
FINGERPRINT = ("import sys, json; from transformers import AutoTokenizer; "
               "from rstar_batch.io.tokenized import tokenizer_fingerprint as f; "
               "print(json.dumps(f(AutoTokenizer.from_pretrained(sys.argv[1]))))")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """A corpus in two files (an empty passage, one past 512 tokens, a null passage, a
    null doc id), queries, and an id-only run that also names a doc id the corpus lacks
    and the doc whose passage is null."""
    base = tmp_path_factory.mktemp("tokcorpus")
    full = make_candidates(4, 12, seed=3)
    ids = full["doc_id"].to_pylist()
    texts = full["passage"].to_pylist()
    ids += ["d-empty", "d-long", "d-null", None]
    texts += ["", LONG, None, "a passage without an id"]
    corpus = pa.table({"doc_id": ids, "passage": texts})
    os.makedirs(base / "corpus")
    pq.write_table(corpus.slice(0, 30), base / "corpus" / "a.parquet")
    pq.write_table(corpus.slice(30), base / "corpus" / "b.parquet")
    queries = full.select(["query_id", "query"]).group_by("query_id", use_threads=False) \
        .aggregate([("query", "first")]).rename_columns(["query_id", "query"])
    pq.write_table(queries, base / "queries.parquet")
    extra = [(1, "d-empty"), (1, "d-long"), (2, "d-null"), (2, "d-missing"), (3, "d-long")]
    run_table = pa.concat_tables([full.select(["query_id", "doc_id"]), pa.table({
        "query_id": pa.array([q for q, _ in extra], pa.int64()), "doc_id": [d for _, d in extra]})])
    pq.write_table(run_table, base / "run.parquet")
    return {"base": base, "corpus": str(base / "corpus"), "queries": str(base / "queries.parquet"),
            "run": str(base / "run.parquet"), "table": corpus}


@pytest.fixture(scope="module")
def tokenized(ray_local, micro_model, inputs) -> str:
    out = str(inputs["base"] / "T")
    rstar_batch.tokenize_corpus(corpus=inputs["corpus"], output=out, model=micro_model,
                                checkpoint_rows=16, replica_batch_rows=8,
                                max_rejected_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def other_tokenizer_model(micro_model, tmp_path_factory) -> str:
    """The micro model with one more token in its vocabulary: another tokenizer."""
    folder = tmp_path_factory.mktemp("other") / "model"
    shutil.copytree(micro_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    tokenizer.add_tokens(["zzqxw"])
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def _encode(tokenize: Tokenize, batch: pa.Table) -> dict:
    out = tokenize(batch)
    return {c: out[c].to_pylist() for c in (C.INPUT_IDS, C.TOKEN_TYPE_IDS, C.WINDOWS)
            if c in out.column_names}


@pytest.mark.parametrize("policy", [PassagePolicy(), PassagePolicy("maxp", None, 40, 16),
                                    PassagePolicy("firstp", None, 40, 16),
                                    PassagePolicy("truncate", 30)], ids=str)
def test_pairs_from_a_passages_ids_equal_pairs_from_its_text(micro_model, policy):
    tokenize = Tokenize(describe_model(micro_model), 96, passages=policy)
    passages = ["", LONG, "violin", "Café in Zürich", LONG + " end", "   "]
    queries = ["violin festival", "q " * 200, "comet", "violin festival", "x", "y"]
    n = len(passages)
    common = {C.QUERY_ID: pa.array(range(n)), C.QUERY: queries, C.DOC_ID: pa.array(range(n)),
              C.REJECT: pa.nulls(n, pa.string())}
    texts = pa.table({**common, C.PASSAGE: passages})
    ids = tokenize.assembler.tokenize(passages).to_list_array()
    given = pa.table({**common, C.PASSAGE: pa.nulls(n, pa.string()), C.PASSAGE_IDS: ids,
                      C.EMPTY_PASSAGE: [p == "" for p in passages]})
    assert _encode(tokenize, given) == _encode(tokenize, texts)


def test_the_tokenizer_fingerprint_is_the_same_in_two_processes(micro_model):
    runs = [subprocess.run([sys.executable, "-c", FINGERPRINT, micro_model], check=True,
                           capture_output=True, text=True).stdout for _ in range(2)]
    assert runs[0] == runs[1] and json.loads(runs[0])["digest"].startswith("sha256:")


@pytest.mark.slow
def test_tokenized_corpus_holds_each_passages_own_ids_and_sets_aside_null_rows(
        micro_model, inputs, tokenized):
    table = pq.read_table(tokenized)
    assert table.schema.field("passage_ids").type == pa.list_(pa.int32())
    tokenizer = AutoTokenizer.from_pretrained(micro_model)
    want = {d: p for d, p in zip(inputs["table"]["doc_id"].to_pylist(),
                                 inputs["table"]["passage"].to_pylist())
            if d is not None and p is not None}
    got = {r["doc_id"]: r for r in table.to_pylist()}
    assert got.keys() == want.keys() and table.num_rows == len(want)
    for doc, text in want.items():
        assert got[doc]["passage_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert got[doc]["empty_passage"] == (text == "")
    assert len(got["d-long"]["passage_ids"]) > 512  # not cut
    rejected = pq.read_table(os.path.join(tokenized, "_rejected")).to_pylist()
    assert {(r["reason"], r["doc_id"], r["row"], os.path.basename(r["file"]))
            for r in rejected} == {(C.NULL_PASSAGE, "d-null", 20, "b.parquet"),
                                   (C.NULL_DOC_ID, None, 21, "b.parquet")}
    meta = json.load(open(os.path.join(tokenized, "_tokenized_corpus.json")))
    assert (meta["format_version"], meta["rows"], meta["model"]["source"]) == (
        1, len(want), micro_model)
    assert os.path.exists(os.path.join(tokenized, "_SUCCESS"))
    again = rstar_batch.tokenize_corpus(corpus=inputs["corpus"], output=tokenized,
                                        model=micro_model, checkpoint_rows=16,
                                        max_rejected_fraction=0.1)
    assert again.already_done and again.written == len(want)


def _rerank(inputs: dict, corpus: str, out: str, model: str, **extra) -> rstar_batch.JobSummary:
    return rstar_batch.rerank(candidates=[inputs["run"]], corpus=corpus,
                              queries=inputs["queries"], output=out, model=model,
                              max_rejected_fraction=0.1, **{"max_length": 96, **extra})


@pytest.mark.slow
@pytest.mark.parametrize("policy", [{}, dict(long_passages="maxp", window=40, stride=16)],
                         ids=["truncate", "maxp"])
def test_rerank_against_a_tokenized_corpus_equals_rerank_against_its_texts(
        micro_model, inputs, tokenized, tmp_path, policy):
    texts = _rerank(inputs, inputs["corpus"], str(tmp_path / "texts"), micro_model, **policy)
    # with a score cache keyed by the passages' ids (truncate: once is enough)
    cache = dict(score_cache=str(tmp_path / "cache")) if not policy else {}
    ids = _rerank(inputs, tokenized, str(tmp_path / "ids"), micro_model, **policy, **cache)
    assert texts.rejected == ids.rejected == {"missing_passage": 2}
    assert (texts.written, texts.pairs) == (ids.written, ids.pairs) == (51, 53)
    key = [("query_id", "ascending"), ("doc_id", "ascending")]
    want, got = (pq.read_table(tmp_path / name).sort_by(key) for name in ("texts", "ids"))
    assert got.equals(want)  # the same scores, bit for bit, and the same ranks
    rejected = pq.read_table(tmp_path / "ids" / "_rejected").sort_by(key)
    assert rejected["doc_id"].to_pylist() == ["d-missing", "d-null"]
    assert rejected["passage"].null_count == 2
    if cache:  # the next night finds every pair by its query text and passage ids
        again = _rerank(inputs, tokenized, str(tmp_path / "again"), micro_model, **cache)
        assert (again.reused, again.scored, again.rejected) == (51, 51, ids.rejected)
        assert pq.read_table(tmp_path / "again").sort_by(key).equals(got)
        manifest = json.load(open(tmp_path / "again" / "_manifest.json"))
        assert manifest["score_cache"]["scoring"]["passages"] == "token ids"


@pytest.mark.slow
def test_score_corpus_against_a_tokenized_corpus_equals_score_corpus_against_its_texts(
        micro_model, inputs, tokenized, tmp_path):
    args = dict(queries=inputs["queries"], model=micro_model, top_k=9, max_length=96,
                checkpoint_rows=40, replica_batch_rows=32, max_rejected_fraction=0.1)
    texts = rstar_batch.score_corpus(corpus=inputs["corpus"], output=str(tmp_path / "t"), **args)
    ids = rstar_batch.score_corpus(corpus=tokenized, output=str(tmp_path / "i"), **args)
    assert (texts.written, texts.pairs) == (ids.written, ids.pairs) == (4 * 9, 4 * 50)
    assert ids.rejected == {}  # the corpus's null rows were set aside in T/_rejected/
    # T lacks the corpus's two null rows, so replica blocks hold other passage sets and
    # CPU matmuls of other shapes may differ in the last float bits: same pairs, same
    # scores to 1e-5, only near-ties may swap (rerank's blocks match, and are bit-equal).
    assert_same_ranking(pq.read_table(tmp_path / "i"), pq.read_table(tmp_path / "t"), 4 * 9)


@pytest.mark.slow
def test_a_corpus_tokenized_for_another_tokenizer_is_refused_by_name(
        micro_model, other_tokenizer_model, inputs, tokenized, tmp_path):
    with pytest.raises(ConfigError, match=rf"'{micro_model}'.*'{other_tokenizer_model}'"):
        _rerank(inputs, tokenized, str(tmp_path / "out"), other_tokenizer_model)
    with pytest.raises(ConfigError, match="another tokenizer"):
        rstar_batch.score_corpus(corpus=tokenized, queries=inputs["queries"], top_k=3,
                                 output=str(tmp_path / "sc"), model=other_tokenizer_model)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "sc")


def _rows(folder: str) -> list[dict]:
    return sorted(pq.read_table(folder).to_pylist(), key=lambda r: r["doc_id"])


def _tokenize_args(inputs: dict, out: str, model: str) -> list[str]:
    """tokenize-corpus in chunks and writer calls of 8 rows, so a stop lands between."""
    return ["tokenize-corpus", "--corpus", inputs["corpus"], "--output", out, "--model",
            model, "--checkpoint-rows", "8", "--replica-batch-rows", "8",
            "--tokenize-workers", "1", "--max-rejected-fraction", "0.1"]


@pytest.mark.slow
def test_a_failed_then_drained_tokenize_corpus_resumes_to_the_same_corpus(
        micro_model, inputs, tokenized, cluster, tmp_path):
    """One output through four runs: one fails on an injected fault part way; its rerun
    is drained by SIGTERM (exit 75); the third finishes, tokenizing only the rows
    neither before it committed; the fourth finds it done."""
    out = str(tmp_path / "T")
    args = _tokenize_args(inputs, out, micro_model)
    corpus_rows = pq.read_table(inputs["corpus"]).num_rows
    fault = {"RSTAR_BATCH_TEST_FAULT": "raise:3", "RSTAR_BATCH_TEST_FAULT_DIR": str(tmp_path)}
    first = run(args, str(tmp_path / "run1.log"), env=fault, cluster=cluster)
    assert first.proc.returncode != 0 and "injected fault" in first.output()
    done_before = committed_rows(out)
    assert 0 < done_before < corpus_rows  # some chunks were done
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    job = Job(args, str(tmp_path / "run2.log"), paced(1), cluster=cluster)  # writes paced
    job.wait_until(lambda: committed_rows(out) > done_before)
    assert job.terminate() < 30
    assert job.proc.returncode == 75, job.output()[-3000:]
    done = committed_rows(out)
    assert f"stopped on SIGTERM: {done} of {corpus_rows} pairs are committed" in job.output()
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))

    rerun = run(args, str(tmp_path / "run3.log"), cluster=cluster)
    assert rerun.proc.returncode == 0, rerun.output()[-3000:]
    assert f"({corpus_rows - done} in this run)" in rerun.output()
    assert _rows(out) == _rows(tokenized)
    again = run(args, str(tmp_path / "run4.log"), cluster=cluster)
    assert again.proc.returncode == 0 and "already done" in again.output()
