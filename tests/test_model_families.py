"""Any cross-encoder a user points `--model` at scores as transformers scores it one
pair at a time: BERT with and without token type ids, RoBERTa, XLM-RoBERTa,
DeBERTa-v2, ELECTRA, ModernBERT and a two-logit BERT, each made locally with its
family's own tokenizer class and pair template (rstar_batch/tiny_families.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from rstar_batch import Columns, ConfigError, rerank, score_corpus, tokenize_corpus
from rstar_batch.base import columns as C
from rstar_batch.io import tokenized as tok
from rstar_batch.model import describe_model
from rstar_batch.stages.all_pairs import QuerySet, ScoreAllPairs
from rstar_batch.stages.normalize import Normalize, NormalizePassages
from rstar_batch.stages.pairs import PairAssembler, PassagePolicy
from rstar_batch.stages.score import Scorer
from rstar_batch.stages.tokenize import Tokenize, TokenizePassages, checked_assembler
from rstar_batch.tiny_families import FAMILIES, save_tokenizer
from tests.reference import reference_scores

MAX_LENGTH = 32   # the long texts below are cut at this length, on either side
TOL = 1e-5


def _pairs() -> pa.Table:
    """3 queries × 5 passages: short and long texts (either side cut), an empty
    passage, accents and punctuation."""
    long = "violin river engine protein galaxy harbour glacier " * 6
    queries = ["violin festival Paris", "Café in Zürich?", long]
    passages = ["the old harbour bridge", long, "", "naïve senate, 1999.", "comet"]
    rows = [(q, query, d, passage) for q, query in enumerate(queries)
            for d, passage in enumerate(passages)]
    qid, query, did, passage = zip(*rows)
    return pa.table({"query_id": pa.array(qid, pa.int64()), "query": list(query),
                     "doc_id": pa.array(did, pa.int64()), "passage": list(passage)})


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_assembles_its_own_pair_template_and_scores_as_transformers(
        family_models, family):
    path = family_models[family]
    table = _pairs()
    stage = Tokenize(describe_model(path), max_length=MAX_LENGTH)
    assert stage.assembler is not None, stage.assembler   # learned and verified
    out = stage(Normalize(Columns(), 1)(table))
    tokenizer = AutoTokenizer.from_pretrained(path)
    has_types = "token_type_ids" in tokenizer.model_input_names
    assert (C.TOKEN_TYPE_IDS in out.column_names) == has_types
    for i, row in enumerate(table.to_pylist()):
        enc = tokenizer(row["query"], row["passage"], truncation=True, max_length=MAX_LENGTH)
        assert out[C.INPUT_IDS][i].as_py() == enc["input_ids"], (family, i)
        if has_types:
            assert out[C.TOKEN_TYPE_IDS][i].as_py() == enc["token_type_ids"], (family, i)
    types = out[C.TOKEN_TYPE_IDS] if has_types else None
    scores = Scorer(describe_model(path), dtype="float32").score(out[C.INPUT_IDS], types)
    reference = reference_scores(path, table, max_length=MAX_LENGTH)
    want = np.array([reference[(r["query_id"], r["doc_id"])] for r in table.to_pylist()])
    assert np.abs(scores - want).max() <= TOL, family
    assert want.std() > 1e-3, "the model's scores hardly differ: the check would be weak"


@pytest.fixture(scope="module")
def unlearnable_model(micro_model, tmp_path_factory) -> str:
    """The micro model with a tokenizer that puts the passage before the query: no
    special tokens around (query, passage) describe its pairs."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    path = str(tmp_path_factory.mktemp("unlearnable") / "model")
    shutil.copytree(micro_model, path)
    bert = AutoTokenizer.from_pretrained(path)
    backend = bert.backend_tokenizer
    backend.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $B:1 [SEP]:1 $A [SEP]",
        special_tokens=[("[CLS]", bert.cls_token_id), ("[SEP]", bert.sep_token_id)])
    # the generic class keeps a tokenizer.json's post-processor (BERT's rebuilds its own)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    save_tokenizer(PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_max_length=512,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"]), path)
    return path


def _every_command_scores_as_transformers(path: str, tmp_path, texts_by: str) -> None:
    """rerank and score-corpus (every query × every passage) on `_pairs()` equal the
    one-pair reference; rerank's manifest says what tokenized the texts (`texts_by`
    begins it)."""
    table = _pairs()
    reference = reference_scores(path, table, max_length=MAX_LENGTH)
    common = dict(model=path, max_length=MAX_LENGTH, dtype="float32")

    candidates = str(tmp_path / "candidates.parquet")
    pq.write_table(table, candidates)
    rerank(candidates=[candidates], output=str(tmp_path / "reranked"), **common)
    ranked = pq.read_table(str(tmp_path / "reranked")).to_pylist()
    assert len(ranked) == table.num_rows
    for row in ranked:
        assert abs(row["score"] - reference[(row["query_id"], row["doc_id"])]) <= TOL
    manifest = json.load(open(tmp_path / "reranked" / "_manifest.json"))
    assert manifest["texts_tokenized_by"].startswith(texts_by), manifest["texts_tokenized_by"]

    corpus, queries = str(tmp_path / "corpus.parquet"), str(tmp_path / "queries.parquet")
    passages = table.num_rows // len(set(table["query_id"].to_pylist()))
    pq.write_table(table.select(["doc_id", "passage"]).slice(0, passages), corpus)
    pq.write_table(table.select(["query_id", "query"]).take(
        list(range(0, table.num_rows, passages))), queries)
    score_corpus(corpus=corpus, queries=queries, output=str(tmp_path / "corpus-scored"),
                 top_k=table.num_rows, **common)
    scored = pq.read_table(str(tmp_path / "corpus-scored")).to_pylist()
    assert len(scored) == table.num_rows   # every query × every passage: the table's pairs
    for row in scored:
        assert abs(row["score"] - reference[(row["query_id"], row["doc_id"])]) <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_scores_queries_with_passages_tokenized_alone_as_transformers(
        family_models, family):
    """score-corpus pairs each query with passages tokenized on their own, so it is the
    command that depends most on the family's template: its stages without Ray (the
    driver's checked assembler, the queries tokenized once, each passage tokenized
    alone, the replica's pairing), every query × passage equal to the one-pair
    reference. The jobs themselves run end to end for RoBERTa below."""
    path = family_models[family]
    table = _pairs()
    model = describe_model(path)
    assembler, why_not = checked_assembler(AutoTokenizer.from_pretrained(path), path,
                                           MAX_LENGTH, PassagePolicy())
    assert why_not is None, why_not
    passages = table.num_rows // 3
    query_rows = table.take(list(range(0, table.num_rows, passages)))
    queries = QuerySet(query_rows["query_id"].combine_chunks(),
                       assembler.tokenize(query_rows["query"].to_pylist()),
                       np.zeros(query_rows.num_rows, dtype=np.int32))
    block = NormalizePassages(Columns())(pa.table({
        C.CHUNK: pa.array([0] * passages, pa.int64()),
        C.ROW: pa.array(range(passages), pa.int32()),
        "doc_id": table["doc_id"].slice(0, passages),
        "passage": table["passage"].slice(0, passages)}))
    block = TokenizePassages(model, MAX_LENGTH, assembler=assembler,
                             limit=queries.passage_tokens_needed(assembler))(block)
    out = ScoreAllPairs(queries, table.num_rows, PassagePolicy(), assembler, MAX_LENGTH,
                        model=model, dtype="float32")(block)
    reference = reference_scores(path, table, max_length=MAX_LENGTH)
    assert out.num_rows == table.num_rows
    for row in out.to_pylist():
        assert abs(row[C.SCORE] - reference[(row[C.QUERY_ID], row[C.DOC_ID])]) <= TOL, family


@pytest.mark.slow
def test_a_family_without_token_type_ids_reranks_and_scores_a_corpus_end_to_end(
        ray_local, family_models, tmp_path):
    """rerank and score-corpus, as jobs, for one family without token type ids
    (RoBERTa), as for BERT in the other tests."""
    _every_command_scores_as_transformers(family_models["roberta"], tmp_path,
                                          "hf (nanotoken does not implement")


def test_pairs_of_a_tokenizer_without_a_learnable_template_are_tokenized_whole(
        unlearnable_model):

    tokenizer = AutoTokenizer.from_pretrained(unlearnable_model)
    assembler = PairAssembler(tokenizer, MAX_LENGTH)
    assert "not special tokens around the two texts" in assembler.verify()
    table = _pairs()
    texts = table["query"].combine_chunks().take([0, 5, 10])
    queries = QuerySet(pa.array([0, 1, 2]), assembler.tokenize(texts.to_pylist()),
                       np.zeros(3, dtype=np.int32), texts=texts)
    block = pa.table({C.CHUNK: pa.array([0] * 5, pa.int64()),
                      C.ROW: pa.array(range(5), pa.int32()),
                      C.DOC_ID: table["doc_id"].slice(0, 5),
                      C.PASSAGE: table["passage"].slice(0, 5),
                      C.REJECT: pa.nulls(5, pa.string())})
    out = ScoreAllPairs(queries, 5, PassagePolicy(), None, MAX_LENGTH,
                        model=describe_model(unlearnable_model), dtype="float32")(block)
    reference = reference_scores(unlearnable_model, table, max_length=MAX_LENGTH)
    assert out.num_rows == table.num_rows
    for row in out.to_pylist():
        assert abs(row[C.SCORE] - reference[(row[C.QUERY_ID], row[C.DOC_ID])]) <= TOL


@pytest.mark.slow
def test_a_tokenizer_without_a_learnable_template_still_runs_every_command(
        ray_local, unlearnable_model, tmp_path):
    _every_command_scores_as_transformers(unlearnable_model, tmp_path,
                                          "hf (each pair tokenized whole")


def test_what_needs_a_passages_own_ids_refuses_a_tokenizer_without_a_template(
        unlearnable_model, micro_model, tmp_path):
    """tokenize-corpus, a tokenized corpus and passage cuts refuse it on the driver, before
    Ray starts (this test starts none), each saying why; plain rerank and score-corpus
    accept it (above)."""
    table = _pairs()
    candidates, corpus = str(tmp_path / "candidates.parquet"), str(tmp_path / "corpus.parquet")
    pq.write_table(table, candidates)
    pq.write_table(table.select(["doc_id", "passage"]), corpus)
    common = dict(model=unlearnable_model, max_length=MAX_LENGTH)
    with pytest.raises(ConfigError, match="tokenize-corpus writes passage ids .* not special"):
        tokenize_corpus(corpus=corpus, output=str(tmp_path / "t"), **common)
    with pytest.raises(ConfigError, match="--long-passages maxp .* not special tokens"):
        rerank(candidates=[candidates], output=str(tmp_path / "r"), long_passages="maxp",
               window=16, stride=8, **common)
    # A tokenized corpus of this very tokenizer (written by hand: tokenize-corpus refuses)
    tokenized = str(tmp_path / "tokenized")
    os.makedirs(tokenized)
    with open(os.path.join(tokenized, tok.METADATA), "w") as meta:
        json.dump({"format_version": tok.FORMAT_VERSION, "model": {"source": "by hand"},
                   "tokenizer": tok.tokenizer_fingerprint(
                       AutoTokenizer.from_pretrained(unlearnable_model))}, meta)
    open(os.path.join(tokenized, "_SUCCESS"), "w").close()
    for job in (rerank, score_corpus):
        with pytest.raises(ConfigError, match=f"tokenized corpus '{tokenized}': .* not special"):
            job(candidates=[candidates] if job is rerank else [], corpus=tokenized,
                queries=candidates, top_k=3, output=str(tmp_path / job.__name__), **common)
