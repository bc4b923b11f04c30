"""Each stage on its own, in-process: normalize, tokenize, score, rank."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rstar_batch.base import columns as C
from rstar_batch.base.ids import id_buckets
from rstar_batch.config import Columns, ConfigError, resolve_activation
from rstar_batch.model import describe_model
from rstar_batch.stages.contract import Stage, StageError
from rstar_batch.stages.normalize import Normalize
from rstar_batch.stages.pairs import PairAssembler
from rstar_batch.stages.rank import rank_table
from rstar_batch.stages.score import Score, Scorer, default_batch_tokens, pad_rows, plan_batches
from rstar_batch.stages.tokenize import Tokenize


def _normalized(table: pa.Table, buckets: int = 1, keep=()) -> pa.Table:
    return Normalize(Columns(keep=tuple(keep)), buckets)(table)


def test_normalize_flags_each_null_field_and_keeps_the_row():
    table = pa.table({
        "query_id": pa.array([1, None, 3, 4, 5], pa.int64()),
        "query": ["q", "q", None, "q", "q"],
        "doc_id": ["a", "b", "c", None, "e"],
        "passage": ["p", "p", "p", "p", None],
    })
    out = _normalized(table)
    assert out.num_rows == 5
    assert out[C.REJECT].to_pylist() == [None, C.NULL_QUERY_ID, C.NULL_QUERY,
                                         C.NULL_DOC_ID, C.NULL_PASSAGE]


def test_id_buckets_are_stable_and_keep_a_query_together():
    ids = pa.array(["q1", "q2", "q1", "q3"] * 50)
    first, again = id_buckets(ids, 7), id_buckets(ids, 7)
    assert (first == again).all()
    assert len(set(first[::4])) == 1  # every "q1" row in one bucket
    assert set(np.unique(first)) <= set(range(7))
    ints = id_buckets(pa.array(np.arange(1000)), 8)
    assert len(np.unique(ints)) == 8  # spreads over all buckets


def test_cpu_passes_of_narrower_models_hold_more_tokens(micro_model, tiny_model):
    """R*'s width keeps the budget measured fastest for it; a narrower model's passes
    hold as many activations; GPUs keep theirs."""
    assert [default_batch_tokens("cpu", w) for w in (1024, 768, 512, 384, 256, 128, 64)] \
        == [4096, 4096, 4096, 4096, 8192, 16384, 32768]
    assert default_batch_tokens("cpu", None) == 4096
    assert default_batch_tokens("cuda", 64) == default_batch_tokens("cuda", 512) == 16384
    assert Scorer(describe_model(tiny_model)).batch_tokens == 4096
    assert Scorer(describe_model(micro_model)).batch_tokens == 32768
    assert Scorer(describe_model(micro_model), batch_tokens=1000).batch_tokens == 1000


def test_plan_batches_sorts_longest_first_and_respects_the_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 512, size=1000)
    batches = plan_batches(lengths, batch_tokens=4096, max_pairs=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))  # every row exactly once
    assert (np.diff(lengths[flat]) <= 0).all()           # longest first
    for rows in batches:
        assert len(rows) <= 64
        assert len(rows) == 1 or len(rows) * lengths[rows].max() <= 4096


def test_plan_batches_gives_an_over_budget_row_its_own_batch():
    assert [len(b) for b in plan_batches(np.array([900, 10, 10]), 512, 8)] == [1, 2]


def test_plan_batches_keeps_padding_under_a_fifth_of_each_pass():
    lengths = np.array([512, 100, 95, 90, 85, 81, 80, 79, 60])
    batches = plan_batches(lengths, batch_tokens=100_000, max_pairs=64)
    assert [sorted(lengths[b].tolist(), reverse=True) for b in batches] == [
        [512], [100, 95, 90, 85, 81, 80], [79], [60]]


def test_pad_rows_pads_right_and_masks():
    values = pa.array([[5, 6, 7], [8], [9, 10]], pa.list_(pa.int32()))
    ids, mask = pad_rows(values, np.array([2, 0]), pad=0)
    assert ids.tolist() == [[9, 10, 0], [5, 6, 7]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    # a slice of a larger array (its offsets do not start at 0), and an empty row
    values = pa.array([[1], [5, 6, 7], [], [9, 10]], pa.list_(pa.int32())).slice(1)
    ids, mask = pad_rows(values, np.array([2, 1, 0]), pad=-1)
    assert ids.tolist() == [[9, 10, -1], [-1, -1, -1], [5, 6, 7]]
    assert mask.tolist() == [[1, 1, 0], [0, 0, 0], [1, 1, 1]]


def test_a_stage_missing_an_input_column_names_itself_the_column_and_the_batch(tiny_model):
    table = pa.table({"query_id": [1], "query": ["q"], "doc_id": ["d"], "text": ["p"]})
    with pytest.raises(StageError, match=r"Normalize needs column\(s\) \['passage'\].*'text'"):
        _normalized(table)
    with pytest.raises(StageError, match=r"Tokenize needs column\(s\) \['_query', '_passage'"):
        Tokenize(describe_model(tiny_model), max_length=32)(table)


class _Repeats(Stage):
    """A broken stage: it scores its first row twice and drops the last."""

    def process(self, batch: pa.Table) -> pa.Table:
        return batch.take([0] + list(range(batch.num_rows - 1)))


class _Reorders(Stage):
    def process(self, batch: pa.Table) -> pa.Table:
        return batch.take(list(reversed(range(batch.num_rows))))


def test_a_stage_that_drops_repeats_or_reorders_rows_fails_on_that_batch():
    batch = pa.table({C.CHUNK: [7, 7, 7], C.ROW: pa.array([0, 1, 2], pa.int32()),
                      "x": [1, 2, 3]})
    with pytest.raises(StageError, match="_Repeats dropped, repeated or reordered rows"):
        _Repeats()(batch)
    with pytest.raises(StageError, match="_Reorders dropped, repeated or reordered rows"):
        _Reorders()(batch)
    with pytest.raises(StageError, match="returned 2 rows for 3"):
        type("_Drops", (Stage,), {"process": lambda self, b: b.slice(1)})()(batch)
    unchanged = type("_Adds", (Stage,), {
        "writes": ("y",), "process": lambda self, b: b.append_column("y", b["x"])})()(batch)
    assert unchanged["y"].to_pylist() == [1, 2, 3]


def test_activation_follows_the_number_of_labels():
    assert resolve_activation("auto", 1) == "sigmoid"
    assert resolve_activation("auto", 2) == "softmax"
    assert resolve_activation("none", 1) == "none"
    with pytest.raises(ConfigError, match="3 labels"):
        resolve_activation("auto", 3)
    with pytest.raises(ConfigError, match="two or more"):
        resolve_activation("softmax", 1)


def test_rank_breaks_ties_by_doc_id_and_cuts_top_k():
    scored = pa.table({
        C.QUERY_ID: pa.array([2, 1, 1, 1, 2], pa.int64()),
        C.DOC_ID: ["z", "b", "a", "c", "y"],
        C.SCORE: pa.array([0.1, 0.5, 0.5, 0.9, 0.1], pa.float32()),
        "extra": [1, 2, 3, 4, 5],
    })
    out = rank_table(scored, keep=["extra"])
    assert out.column_names == ["query_id", "doc_id", "score", "rank", "extra"]
    assert out.to_pydict()["doc_id"] == ["c", "a", "b", "y", "z"]
    assert out.to_pydict()["rank"] == [1, 2, 3, 1, 2]
    assert out.schema.field("rank").type == pa.int32()
    top1 = rank_table(scored, keep=[], top_k=1)
    assert top1.to_pydict()["doc_id"] == ["c", "y"]


def _tokenized(tiny_model: str, table: pa.Table) -> pa.Table:
    info = describe_model(tiny_model)
    return Tokenize(info, max_length=512)(_normalized(table))


def test_tokenize_matches_the_pair_tokenizer(tiny_model, edge_cases):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    out = _tokenized(tiny_model, edge_cases)
    for i, row in enumerate(edge_cases.to_pylist()):
        enc = tokenizer(row["query"], row["passage"], truncation=True, max_length=512)
        assert out[C.INPUT_IDS][i].as_py() == enc["input_ids"]
        assert out[C.TOKEN_TYPE_IDS][i].as_py() == enc["token_type_ids"]
    assert max(len(x) for x in out[C.INPUT_IDS].to_pylist()) == 512
    assert out[C.PASSAGE].null_count == out.num_rows  # texts of scored rows are dropped


@pytest.mark.parametrize("batch_tokens,max_pairs", [(100_000, 256), (2048, 16), (1, 1)])
def test_scores_equal_the_one_pair_reference_whatever_the_batching(
        tiny_model, edge_cases, edge_case_reference, batch_tokens, max_pairs):
    tokens = _tokenized(tiny_model, edge_cases)
    scorer = Scorer(describe_model(tiny_model), device="cpu", dtype="float32",
                    batch_tokens=batch_tokens, max_batch_pairs=max_pairs)
    scores = scorer.score(tokens[C.INPUT_IDS].combine_chunks(),
                          tokens[C.TOKEN_TYPE_IDS].combine_chunks())
    keys = zip(edge_cases["query_id"].to_pylist(), edge_cases["doc_id"].to_pylist())
    expected = np.array([edge_case_reference[k] for k in keys])
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-5)
    assert np.std(expected) > 1e-3  # the tiny model separates pairs: a real comparison


def test_the_cls_only_last_layer_gives_the_models_own_logits(tiny_model, edge_cases):
    tokens = _tokenized(tiny_model, edge_cases)
    ids, types = (tokens[C.INPUT_IDS].combine_chunks(),
                  tokens[C.TOKEN_TYPE_IDS].combine_chunks())
    fast, full = (Scorer(describe_model(tiny_model), device="cpu", dtype="float32",
                         activation="none", full_forward=own)
                  for own in (False, True))
    assert fast.cls_only and not full.cls_only
    # logits reach ~10 (the tiny model's widened head): float32 rounding scales with them,
    # and the two forwards sum in different orders (seen once: 1.26e-5 on a logit of 1.49)
    np.testing.assert_allclose(fast.score(ids, types), full.score(ids, types), rtol=1e-6,
                               atol=3e-5)


def test_models_other_than_plain_bert_keep_their_own_forward():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from rstar_batch.bert_cls import cls_only_forward

    small = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=1))
    assert cls_only_forward(small) is None


def test_score_stage_keeps_rejected_rows_unscored(tiny_model):
    table = pa.table({"query_id": [1, 1], "query": ["q", None], "doc_id": [1, 2],
                      "passage": ["p", "p"]})
    tokens = _tokenized(tiny_model, table)
    out = Score(model=describe_model(tiny_model), device="cpu", dtype="float32")(tokens)
    assert out.num_rows == 2
    assert out[C.SCORE].null_count == 1 and out[C.SCORE][1].as_py() is None
    assert C.INPUT_IDS not in out.column_names


def test_a_batch_of_rejected_rows_only_passes_through_unscored(tiny_model):
    table = pa.table({"query_id": [1, 1], "query": ["q", "q"], "doc_id": [1, 2],
                      "passage": pa.array([None, None], pa.string())})
    out = Score(model=describe_model(tiny_model), device="cpu", dtype="float32")(
        _tokenized(tiny_model, table))
    assert out[C.SCORE].null_count == 2
    assert out[C.REJECT].to_pylist() == [C.NULL_PASSAGE] * 2


def test_cuda_out_of_memory_halves_the_batch_and_keeps_it_small(tiny_model, monkeypatch):
    import torch

    scorer = Scorer(describe_model(tiny_model), device="cpu", dtype="float32",
                    batch_tokens=4096, max_batch_pairs=64)
    real_forward, calls = scorer._forward, []

    def forward(ids, types, rows):
        calls.append(len(rows))
        if len(rows) > 8:
            raise torch.OutOfMemoryError("fake")
        return real_forward(ids, types, rows)

    monkeypatch.setattr(scorer, "_forward", forward)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    ids = pa.array([[2, 7, 8, 3, 9, 3]] * 32, pa.list_(pa.int32()))
    scores = scorer.score(ids)
    assert len(scores) == 32 and np.isfinite(scores).all()
    # 32 rows × 6 tokens fail → budget 96 tokens; 16 rows fail → 48; then 8 rows fit
    assert calls == [32, 16, 8, 8, 8, 8] and scorer.batch_tokens == 48
    assert np.allclose(scores, scores[0], atol=1e-6)  # identical rows, identical scores


@pytest.mark.parametrize("max_length", [8, 9, 33, 128, 512])
def test_assembled_pairs_equal_pair_tokenization_on_random_lengths(tiny_model, max_length):
    from transformers import AutoTokenizer

    from rstar_batch.testing import make_candidates

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    table = make_candidates(12, 20, seed=max_length)
    rng = np.random.default_rng(max_length)
    words = " ".join(table["passage"].to_pylist()).split()
    # Queries from none to past max_length (at most 600 words), so both sides get cut,
    # repeated across rows. (Far past it, the reference tokenizer pairs up every window
    # of both sides: 600 words at max_length 8 took a minute.)
    most = min(600, 8 * max_length)
    queries = [" ".join(words[: int(n)]) for n in rng.integers(0, most, 12)]
    table = table.set_column(1, "query", pa.array([queries[i // 20] for i in range(240)]))
    stage = Tokenize(describe_model(tiny_model), max_length=max_length)
    assert stage.assembler is not None
    out = stage(_normalized(table))
    for i, row in enumerate(table.to_pylist()):
        enc = tokenizer(row["query"], row["passage"], truncation=True, max_length=max_length)
        assert out[C.INPUT_IDS][i].as_py() == enc["input_ids"], i
        assert out[C.TOKEN_TYPE_IDS][i].as_py() == enc["token_type_ids"], i


def _with_template(tiny_model, pair: str):
    """The tiny model's tokenizer with another pair template."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair=pair,
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer


def test_a_tokenizer_with_another_pair_template_is_assembled_with_its_own(tiny_model):
    # RoBERTa's shape (A </s></s> B) with BERT's tokens, types 1 from the second [SEP]
    tokenizer = _with_template(tiny_model, "[CLS] $A [SEP] [SEP]:1 $B:1 [SEP]:1")
    assembler = PairAssembler(tokenizer, max_length=16)
    assert assembler.pair.added == 4 and assembler.verify() is None
    queries = ["violin", "violin " * 20, "violin"]
    passages = ["river bridge", "river", ""]
    index = np.arange(3)
    ids, types = assembler.assemble(assembler.tokenize(queries), assembler.tokenize(passages),
                                    index, index, np.array([False, False, True]))
    for i, (q, p) in enumerate(zip(queries, passages)):
        enc = tokenizer(q, p, truncation=True, max_length=16)
        assert (ids[i].as_py(), types[i].as_py()) == (enc["input_ids"], enc["token_type_ids"])


def test_a_tokenizer_whose_template_cannot_be_learned_is_tokenized_pair_by_pair(tiny_model):
    tokenizer = _with_template(tiny_model, "[CLS] $B:1 [SEP]:1 $A [SEP]")  # B before A
    assert "not special tokens around the two texts" in PairAssembler(tokenizer, 64).verify()
    fallback = Tokenize(describe_model(tiny_model), max_length=64, assemble=False)
    fallback.tokenizer = tokenizer
    table = pa.table({"query_id": [1], "query": ["violin"], "doc_id": [1],
                      "passage": ["river"]})
    ids = fallback(_normalized(table))[C.INPUT_IDS][0].as_py()
    assert ids == tokenizer("violin", "river", truncation=True, max_length=64)["input_ids"]


def test_the_cls_only_last_layer_with_projected_keys_gives_the_models_own_logits(
        tiny_model, edge_cases, monkeypatch):
    """Int8 keys and values hold packed weights, so that last layer projects them;
    the same path on float32 weights must give the model's own logits too."""
    from rstar_batch.bert_cls import ClsOnlyBert

    tokens = _tokenized(tiny_model, edge_cases)
    ids, types = (tokens[C.INPUT_IDS].combine_chunks(),
                  tokens[C.TOKEN_TYPE_IDS].combine_chunks())
    full = Scorer(describe_model(tiny_model), device="cpu", dtype="float32",
                  activation="none", full_forward=True).score(ids, types)
    called = []

    def projected(self, layer, x, keep):
        called.append(x.shape[0])
        return ClsOnlyBert._cls_layer_projected(self, layer, x, keep)

    monkeypatch.setattr(ClsOnlyBert, "_cls_layer", projected)
    fast = Scorer(describe_model(tiny_model), device="cpu", dtype="float32",
                  activation="none").score(ids, types)
    assert sum(called) == len(full)
    # Projecting every key and value sums in yet another order than the folded query:
    # a run here was 1.3e-5 off at a logit of 2.83 (MKL's order varies with alignment),
    # over the folded path's 1e-5 + 1e-6 × |logit|. This path serves int8 weights, whose
    # own error is orders larger.
    np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5)


def test_int8_scoring_takes_the_projected_last_layer(tiny_model, edge_cases, monkeypatch):
    from rstar_batch.bert_cls import ClsOnlyBert

    tokens = _tokenized(tiny_model, edge_cases)
    ids, types = (tokens[C.INPUT_IDS].combine_chunks(),
                  tokens[C.TOKEN_TYPE_IDS].combine_chunks())
    called = []
    projected = ClsOnlyBert._cls_layer_projected
    monkeypatch.setattr(ClsOnlyBert, "_cls_layer_projected",
                        lambda self, *args: called.append(1) or projected(self, *args))
    int8 = Scorer(describe_model(tiny_model), device="cpu", dtype="float32", quantize="int8")
    scores = int8.score(ids, types)
    reference = Scorer(describe_model(tiny_model), device="cpu",
                       dtype="float32").score(ids, types)
    assert int8.cls_only and called
    # int8's drift on the random-weight model: BENCHMARKS.md measured a max of 0.14
    assert np.isfinite(scores).all() and np.abs(scores - reference).max() < 0.3


def test_reused_buffers_give_the_same_logits_across_pass_shapes(tiny_model):
    """CPU float32 passes write into buffers kept from the previous pass; passes that
    grow and shrink them must give what fresh tensors give."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from rstar_batch.bert_cls import ClsOnlyBert

    model = AutoModelForSequenceClassification.from_pretrained(tiny_model).eval()
    reused, fresh = ClsOnlyBert(model, reuse_buffers=True), ClsOnlyBert(model)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch, tokens in [(3, 9), (8, 40), (2, 5), (8, 40)]:
            ids = torch.randint(5, 1000, (batch, tokens), generator=generator)
            mask = (torch.arange(tokens)[None, :] < torch.randint(
                1, tokens + 1, (batch, 1), generator=generator)).long()
            mask[:, 0] = 1
            types = (torch.arange(tokens)[None, :] >= tokens // 2).long().expand(batch, -1)
            inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            np.testing.assert_allclose(reused(**inputs).numpy(), fresh(**inputs).numpy(),
                                       rtol=1e-6, atol=1e-6)
            assert reused(**inputs).shape == (batch, 1)
    assert set(reused.buffers) == {"query", "key", "value", "intermediate"}


def test_read_tokenize_reads_normalizes_and_tokenizes_each_chunk_as_hugging_face_would(
        tiny_model, tmp_path):
    """The tokenizer actors' own reading (pipeline.ReadTokenize): every unskipped row of
    every chunk once, in order, scored rows as the plain HF tokenizer encodes the pair,
    rejected rows kept with their reason and texts."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from rstar_batch.io.read import ReadChunks, plan_read_tasks
    from rstar_batch.progress.checkpoint import Chunk
    from rstar_batch.pipeline import ReadTokenize, host_in_tokenizers

    words = ["alpha", "beta", "gamma", "café", "東京", "delta-epsilon", "x" * 30]
    passages = [" ".join(words[(i + j) % len(words)] for j in range(i % 9 + 1))
                for i in range(50)]
    passages[13] = None
    table = pa.table({"query_id": pa.array(np.arange(50) // 10, pa.int64()),
                      "query": [f"query {i // 10} {words[i % 7]}" for i in range(50)],
                      "doc_id": [f"d{i}" for i in range(50)], "passage": passages})
    path = str(tmp_path / "c.parquet")
    pq.write_table(table, path, row_group_size=16)
    chunks = [Chunk(0, 0, 0, 20, skip=((5, 8),)), Chunk(1, 0, 20, 20), Chunk(2, 0, 40, 10)]
    tasks = plan_read_tasks(chunks, [path], [[16, 16, 16, 2]])
    stage = ReadTokenize(ReadChunks(pafs.LocalFileSystem(), table.column_names),
                         Normalize(Columns(), 3), rows=7, model=describe_model(tiny_model),
                         max_length=24)
    out = pa.concat_tables([t for task in tasks for t in stage(pa.Table.from_pylist([task]))])

    tags = list(zip(out[C.CHUNK].to_pylist(), out[C.ROW].to_pylist()))
    assert tags == ([(0, r) for r in range(20) if not 5 <= r < 8]
                    + [(1, r) for r in range(20)] + [(2, r) for r in range(10)])
    hf = AutoTokenizer.from_pretrained(tiny_model)
    for row in out.to_pylist():
        source = 20 * row[C.CHUNK] + row[C.ROW]
        assert row[C.DOC_ID] == f"d{source}"
        if passages[source] is None:
            assert row[C.REJECT] == C.NULL_PASSAGE and row[C.QUERY] == table["query"][source].as_py()
            continue
        expected = hf(table["query"][source].as_py(), passages[source], truncation=True,
                      max_length=24)
        assert row[C.REJECT] is None
        assert row[C.INPUT_IDS] == expected["input_ids"], source
    assert host_in_tokenizers(32768) and not host_in_tokenizers(2048)
