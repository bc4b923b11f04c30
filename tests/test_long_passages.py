"""Long passages: --passage-max-tokens, --long-passages maxp|firstp, windows.

The reference here windows passages by *words* and scores every window as a
pair of its own, one at a time, with plain transformers (tests/reference.py).
The passages are built from words that are one token each, so windows of words
and windows of tokens are the same windows; the test checks that premise.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from rstar_batch.base import columns as C
from rstar_batch.config import Columns, ConfigError, RerankConfig
from rstar_batch.model import describe_model
from rstar_batch.stages.normalize import Normalize
from rstar_batch.stages.pairs import PassagePolicy, TokenTable
from rstar_batch.stages.score import Score
from rstar_batch.stages.tokenize import Tokenize
from rstar_batch.testing import make_candidates
from tests.reference import reference_scores

MAX_LENGTH, WINDOW, STRIDE = 64, 24, 10


def word_windows(words: list[str], window: int, stride: int) -> list[list[str]]:
    """Windows as the issue defines them, written plainly."""
    if len(words) <= window:
        return [words]
    out, start = [], 0
    while True:
        out.append(words[start:start + window])
        if start + window >= len(words):
            return out
        start += stride


@pytest.fixture(scope="module")
def one_token_words(tiny_model) -> list[str]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    words = sorted(set(" ".join(make_candidates(5, 20, seed=3)["passage"].to_pylist()).split()))
    single = [w for w in words
              if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(single) >= 50
    return single


@pytest.fixture(scope="module")
def long_table(one_token_words) -> pa.Table:
    """Passages of 0 to 100 one-token words: shorter than, equal to and longer than
    a window, ending mid-stride; one query long enough that the pair cuts it too."""
    rng = np.random.default_rng(11)
    lengths = [0, 1, 5, WINDOW - 1, WINDOW, WINDOW + 1, WINDOW + STRIDE, 47, 60, 100]
    rows = []
    for qid, query_words in [(1, 3), (2, 50)]:
        query = " ".join(rng.choice(one_token_words, query_words))
        for did, n in enumerate(lengths):
            rows.append((qid, query, did, " ".join(rng.choice(one_token_words, n))))
    qid, query, did, passage = zip(*rows)
    return pa.table({"query_id": list(qid), "query": list(query), "doc_id": list(did),
                     "passage": list(passage)})


def _expand(table: pa.Table, windows_of) -> tuple[pa.Table, list]:
    """One row per window; and, per input row, the keys of its windows."""
    rows, keys = [], []
    for row in table.to_pylist():
        mine = []
        for j, words in enumerate(windows_of(row["passage"].split())):
            key = f"{row['doc_id']}#{j}"
            rows.append({**row, "doc_id": key, "passage": " ".join(words)})
            mine.append((row["query_id"], key))
        keys.append(mine)
    return pa.Table.from_pylist(rows), keys


def _ours(tiny_model: str, table: pa.Table, policy: PassagePolicy) -> np.ndarray:
    info = describe_model(tiny_model)
    batch = Normalize(Columns(), 1)(table)
    batch = Tokenize(info, max_length=MAX_LENGTH, passages=policy)(batch)
    # a small token budget: windows of different rows share and split passes
    out = Score(model=info, device="cpu", dtype="float32", batch_tokens=300)(batch)
    return out[C.SCORE].to_numpy()


def test_maxp_is_the_best_window_scored_on_its_own(tiny_model, long_table):
    expanded, keys = _expand(long_table, lambda w: word_windows(w, WINDOW, STRIDE))
    reference = reference_scores(tiny_model, expanded, max_length=MAX_LENGTH)
    expected = [max(reference[k] for k in mine) for mine in keys]
    assert max(len(mine) for mine in keys) == 9       # 100 words: 1 + ceil(76 / 10)
    ours = _ours(tiny_model, long_table, PassagePolicy("maxp", None, WINDOW, STRIDE))
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_short_passages_score_as_without_windows(tiny_model, long_table):
    short = long_table.filter(pa.compute.less_equal(
        pa.compute.list_value_length(pa.compute.utf8_split_whitespace(long_table["passage"])),
        WINDOW))
    plain = _ours(tiny_model, short, PassagePolicy())
    np.testing.assert_array_equal(
        _ours(tiny_model, short, PassagePolicy("maxp", None, WINDOW, STRIDE)), plain)
    np.testing.assert_array_equal(
        _ours(tiny_model, short, PassagePolicy("firstp", None, WINDOW, STRIDE)), plain)


@pytest.mark.parametrize("policy, first_words", [
    (PassagePolicy("firstp", None, WINDOW, STRIDE), WINDOW),
    (PassagePolicy("truncate", 7, WINDOW, STRIDE), 7),
    (PassagePolicy("firstp", 7, WINDOW, STRIDE), 7),      # the tighter cut wins
])
def test_firstp_and_passage_max_tokens_score_the_passage_head(tiny_model, long_table,
                                                              policy, first_words):
    head, _ = _expand(long_table, lambda w: [w[:first_words]])
    reference = reference_scores(tiny_model, head, max_length=MAX_LENGTH)
    expected = [reference[(r["query_id"], f"{r['doc_id']}#0")] for r in long_table.to_pylist()]
    np.testing.assert_allclose(_ours(tiny_model, long_table, policy), expected, atol=1e-5,
                               rtol=0)


def test_windows_cover_every_token_once_stride_apart():
    table = TokenTable.from_rows([list(range(n)) for n in (0, 3, 10, 11, 15, 30)])
    windows, first = table.windows(10, 4)
    assert np.diff(first).tolist() == [1, 1, 1, 2, 3, 6]
    got = [windows.flat[s:s + n].tolist() for s, n in zip(windows.starts, windows.lengths)]
    assert got[first[4]:first[5]] == [list(range(0, 10)), list(range(4, 14)),
                                      list(range(8, 15))]
    for i, n in enumerate((0, 3, 10, 11, 15, 30)):
        mine = got[first[i]:first[i + 1]]
        assert sorted(set(t for w in mine for t in w)) == list(range(n))


def test_window_settings_are_checked():
    with pytest.raises(ConfigError, match="stride"):
        RerankConfig(long_passages="maxp", window=10, stride=11)
    with pytest.raises(ConfigError, match="window"):
        RerankConfig(long_passages="maxp", window=510, max_length=512)
    with pytest.raises(ConfigError, match="passage_max_tokens"):
        RerankConfig(passage_max_tokens=0)
    RerankConfig(long_passages="maxp", window=509, max_length=512)


def test_maxp_needs_a_pair_tokenizer_it_can_assemble(tiny_model):
    with pytest.raises(ConfigError, match="maxp"):
        Tokenize(describe_model(tiny_model), max_length=64, assemble=False,
                 passages=PassagePolicy("maxp", None, WINDOW, STRIDE))


@pytest.mark.slow
def test_a_rerank_job_with_maxp_scores_each_row_by_its_best_window(
        ray_local, tiny_model, long_table, tmp_path):
    import pyarrow.parquet as pq

    from rstar_batch import rerank

    pq.write_table(long_table, tmp_path / "candidates.parquet")
    summary = rerank(candidates=[str(tmp_path / "candidates.parquet")],
                     output=str(tmp_path / "out"), model=tiny_model, max_length=MAX_LENGTH,
                     long_passages="maxp", window=WINDOW, stride=STRIDE, dtype="float32")
    assert summary.scored == long_table.num_rows
    expanded, keys = _expand(long_table, lambda w: word_windows(w, WINDOW, STRIDE))
    reference = reference_scores(tiny_model, expanded, max_length=MAX_LENGTH)
    got = {(r["query_id"], r["doc_id"]): r["score"]
           for r in pq.read_table(tmp_path / "out").to_pylist()}
    for row, mine in zip(long_table.to_pylist(), keys):
        assert abs(got[(row["query_id"], row["doc_id"])] - max(reference[k] for k in mine)) \
            <= 1e-5
