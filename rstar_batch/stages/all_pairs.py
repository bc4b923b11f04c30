"""Score every query against a block of corpus passages; keep each query's top K.

The score-corpus stage. Queries arrive tokenized once (in the driver), passages
tokenized once (`TokenizePassages`); pairs are assembled here from the two, so
|queries| × |corpus| pairs exist only a block at a time, inside a replica. A
block keeps its top K per query, ordered as the final ranking is (score desc,
doc_id asc): whatever is in the global top K is then in its block's top K, so
merging blocks (the commit writer's running top K, then the rank pass) is exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C
from rstar_batch.base.order import group_starts, positions_in_groups, rank_order
from rstar_batch.faults import FaultHook
from rstar_batch.stages.contract import Stage
from rstar_batch.stages.pairs import PairAssembler, PassagePolicy, TokenTable
from rstar_batch.stages.score import (Scorer, best_per_row, check_finite, node_column, this_node,
                                      with_retries)
from rstar_batch.stages.tokenize import Tokenize, texts_of_rejected_only


@dataclasses.dataclass(frozen=True)
class QuerySet:
    """The job's valid queries: ids, texts' token ids, each one's output bucket, and
    the texts themselves where pairs are tokenized whole (no pair template)."""

    ids: pa.Array
    tokens: TokenTable
    buckets: np.ndarray
    texts: Optional[pa.Array] = None

    def __len__(self) -> int:
        return len(self.ids)

    def passage_tokens_needed(self, assembler: PairAssembler) -> int:
        """How many of a passage's ids its pairs with these queries depend on.

        No pair keeps more than the assembler's budget of them; past that,
        longest_first only asks whether the passage is longer than the query (the
        longer side gets the odd token when both are cut). One more than the budget
        and than the longest query answers that as the whole passage would.
        """
        longest = int(self.tokens.lengths.max()) if len(self) else 0
        return max(assembler.passage_limit, longest) + 1


def block_top_k(group: np.ndarray, query: np.ndarray, scores: np.ndarray,
                doc_ids: pa.Array, k: int) -> np.ndarray:
    """Indices of the rows to keep: per (group, query), the k first in the ranking's
    order (rank.RANK_KEYS), the order the rank pass then merges them in."""
    rows = pa.table({"group": group, "query": query, C.SCORE: scores, C.DOC_ID: doc_ids})
    order = rank_order(rows, ["group", "query"])
    starts = group_starts(group[order], query[order])
    return order[positions_in_groups(starts) < k]


class ScoreAllPairs(Stage):
    """Callable class for `map_batches`: one model replica per actor.

    Pairs are assembled from the passages' ids with the driver's verified
    `assembler`; without one (a tokenizer whose pair template could not be learned)
    blocks carry passage texts and each pair is tokenized whole, as rerank does.
    It keeps the block's top K per query and every rejected row: rows are selected,
    so exactly-once is the job's check (every query gets exactly min(K, passages)
    rows). The commit writer merges blocks into a running top K (io/scored.py).
    """

    writes = (C.QUERY_ID, C.SCORE, C.BUCKET, C.NODE)
    one_row_per_row = False

    def __init__(self, queries: QuerySet, top_k: int, passages: PassagePolicy,
                 assembler: Optional[PairAssembler], max_length: int, retries: int = 2,
                 **scorer_kwargs: Any) -> None:
        self.scorer = Scorer(**scorer_kwargs)
        self.assembler = assembler
        self.whole = None if assembler else Tokenize(
            scorer_kwargs["model"], max_length, scorer_kwargs.get("trust_remote_code", False),
            assemble=False)
        self.queries, self.top_k, self.passages = queries, top_k, passages
        self.reads = (C.CHUNK, C.ROW, C.DOC_ID, C.REJECT,
                      *((C.PASSAGE,) if assembler is None else (C.PASSAGE_IDS, C.EMPTY_PASSAGE)))
        self.retries = retries
        self.fault = FaultHook.from_env()
        self.node = this_node()

    def _score(self, passages: Any, empty: Optional[np.ndarray], doc_ids: pa.Array
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query index, passage index, score) of every query × passage pair."""
        nq, npas = len(self.queries), len(passages)
        query = np.tile(np.arange(nq), npas)
        passage = np.repeat(np.arange(npas), nq)

        def score() -> np.ndarray:
            if self.whole is not None:
                ids, types, _ = self.whole.encode_pairs(self.queries.texts.take(query),
                                                        passages.take(passage))
                scores = self.scorer.score(ids, types)
            elif not self.passages.windowed:
                ids, types = self.assembler.assemble(self.queries.tokens, passages, query,
                                                     passage, empty[passage])
                scores = self.scorer.score(ids, types)
            else:
                ids, types, counts = self.assembler.assemble_windows(
                    self.queries.tokens, passages, query, passage, empty[passage],
                    self.passages.window, self.passages.stride)
                scores = best_per_row(self.scorer.score(ids, types), counts)
            check_finite(scores, lambda i: (self.queries.ids[int(query[i])],
                                             doc_ids[int(passage[i])]))
            return scores

        scores = with_retries(score, self.retries, self.fault, len(query), lambda: [
            (self.queries.ids[int(q)], doc_ids[int(p)]) for q, p in zip(query[:5], passage[:5])])
        return query, passage, scores

    def process(self, batch: pa.Table) -> pa.Table:
        scored = pc.is_null(batch[C.REJECT]).combine_chunks()
        valid = np.flatnonzero(scored.to_numpy(zero_copy_only=False))
        take = pa.array(valid)
        doc_ids = batch[C.DOC_ID].combine_chunks().take(take)
        if self.whole is not None:   # texts: the pairs are tokenized whole
            passages, empty = batch[C.PASSAGE].combine_chunks().take(take), None
            batch = texts_of_rejected_only(batch, scored, (C.PASSAGE,))
        else:
            passages = TokenTable.from_list_array(
                batch[C.PASSAGE_IDS].combine_chunks().take(take))
            empty = batch[C.EMPTY_PASSAGE].combine_chunks().take(take).to_numpy(
                zero_copy_only=False)
        if len(valid) == 0:  # a block of rejected rows only
            query = passage = np.zeros(0, dtype=np.int64)
            scores = np.zeros(0, dtype=np.float32)
        else:
            query, passage, scores = self._score(passages, empty, doc_ids)
        keep = block_top_k(np.zeros(len(query), dtype=np.int64), query, scores,
                           doc_ids.take(pa.array(passage)), self.top_k)
        best = self._rows(batch, valid[passage[keep]], query[keep], scores[keep])
        rejected = np.setdiff1d(np.arange(batch.num_rows), valid)
        out = pa.concat_tables([best, self._rows(batch, rejected, None, None)])
        return out.append_column(C.NODE, node_column(self.node, out.num_rows))

    def _rows(self, batch: pa.Table, rows: np.ndarray, query: Any, scores: Any) -> pa.Table:
        """Output rows for corpus rows `rows`: scored against `query` or, without
        queries, the rejected corpus rows themselves."""
        picked = batch.take(pa.array(rows, pa.int64())).drop_columns(
            [c for c in (C.PASSAGE_IDS, C.EMPTY_PASSAGE) if c in batch.column_names])
        n = len(rows)
        if query is None:
            qids = pa.nulls(n, self.queries.ids.type)
            score = pa.nulls(n, pa.float32())
            bucket = np.zeros(n, dtype=np.int32)
        else:
            qids = self.queries.ids.take(pa.array(query))
            score = pa.array(scores, pa.float32())
            bucket = self.queries.buckets[query]
        return (picked.append_column(C.QUERY_ID, qids)
                .append_column(C.QUERY, pa.nulls(n, pa.string()))
                .append_column(C.SCORE, score)
                .append_column(C.BUCKET, pa.array(bucket, pa.int32())))
