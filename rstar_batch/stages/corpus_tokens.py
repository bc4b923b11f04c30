"""Stages around a tokenized corpus (its format: io/tokenized.py).

`TokenizeWhole` is tokenize-corpus's tokenizer actor: `TokenizePassages` with no
cut, so the ids serve any later max_length or passage policy. `PassagesFromTokens`
is score-corpus's stand-in for `TokenizePassages` when the corpus is tokenized
already: it maps T's columns to the internal ones and cuts the ids exactly as
`TokenizePassages` cuts what it tokenizes.
"""

from __future__ import annotations

import pyarrow as pa

from rstar_batch.base import columns as C
from rstar_batch.model import ModelInfo
from rstar_batch.stages.contract import Stage
from rstar_batch.stages.pairs import PassagePolicy, TokenTable
from rstar_batch.stages.tokenize import TokenizePassages, fit_passages


class TokenizeWhole(TokenizePassages):
    """`map_batches` class: each passage's own ids, whole (neither cut nor clipped)."""

    def __init__(self, model: ModelInfo, max_length: int, trust_remote_code: bool = False,
                 passages: PassagePolicy = PassagePolicy(), texts_by: str = "auto"):
        super().__init__(model, max_length, trust_remote_code, PassagePolicy(),
                         texts_by=texts_by)
        self.limit = None


class PassagesFromTokens(Stage):
    """`map_batches` function: chunks of T → the rows `ScoreAllPairs` takes.

    T holds only scorable passages (its rejected rows stayed in T/_rejected/), so
    every row gets a null reason.
    """

    reads = (C.CHUNK, C.ROW, C.TOKENIZED_DOC_ID, C.TOKENIZED_PASSAGE_IDS,
             C.TOKENIZED_EMPTY_PASSAGE)
    writes = (C.CHUNK, C.ROW, C.DOC_ID, C.PASSAGE, C.REJECT, C.PASSAGE_IDS, C.EMPTY_PASSAGE)

    def __init__(self, passages: PassagePolicy, limit: int) -> None:
        """`limit`: the passage ids pairs depend on (`QuerySet.passage_tokens_needed`)."""
        self.passages = passages
        self.limit = None if passages.windowed else limit

    def process(self, batch: pa.Table) -> pa.Table:
        ids = TokenTable.from_list_array(batch[C.TOKENIZED_PASSAGE_IDS].combine_chunks())
        n = batch.num_rows
        return pa.table({
            C.CHUNK: batch[C.CHUNK], C.ROW: batch[C.ROW], C.DOC_ID: batch[C.TOKENIZED_DOC_ID],
            C.PASSAGE: pa.nulls(n, pa.string()), C.REJECT: pa.nulls(n, pa.string()),
            C.PASSAGE_IDS: fit_passages(ids, self.passages, self.limit).to_list_array(),
            C.EMPTY_PASSAGE: batch[C.TOKENIZED_EMPTY_PASSAGE]})
