"""Pair encodings assembled from separately tokenized texts.

A query with 100 candidates is tokenized once, not 100 times: queries and
passages are tokenized alone (no special tokens), then every pair is built as
[CLS] query [SEP] passage [SEP] with exactly the `longest_first` truncation the
pair tokenizer applies. `PairAssembler.verify` checks a tokenizer against its
own pair encoding before this is used; a tokenizer with another template falls
back to tokenizing each pair.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pyarrow as pa

_PROBES = [
    ("short query", "a short passage"),
    ("query", ""),
    ("", "passage only"),
    ("query words " * 300, "passage words " * 10),     # the query is cut
    ("query words " * 10, "passage words " * 300),     # the passage is cut
    ("query words " * 300, "passage words " * 300),    # both are cut
    ("query words " * 256, "passage " * 257),          # odd budgets and near-ties
]


def truncate_pair(n_query: np.ndarray, n_passage: np.ndarray,
                  budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens kept of each side, as the `tokenizers` library's LongestFirst does it.

    `budget` is max_length minus the special tokens. The shorter side is kept
    whole when the longer can absorb the cut; otherwise both get half the budget.
    """
    n1 = np.minimum(n_query, n_passage)
    n2 = np.where(n1 > budget, n1, np.maximum(n1, budget - n1))
    over = n1 + n2 > budget
    n1 = np.where(over, budget // 2, n1)
    n2 = np.where(over, budget // 2 + budget % 2, n2)
    query_shorter = n_query <= n_passage
    keep_q = np.where(query_shorter, n1, n2)
    keep_p = np.where(query_shorter, n2, n1)
    return np.minimum(keep_q, n_query), np.minimum(keep_p, n_passage)


def _ragged_gather(flat: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate flat[starts[i] : starts[i] + counts[i]] for every i."""
    total = int(counts.sum())
    if total == 0:
        return flat[:0]
    run_starts = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return flat[run_starts + np.arange(total)]


class TokenTable:
    """Token ids of many texts as one flat array plus offsets."""

    def __init__(self, rows: list[list[int]]) -> None:
        self.lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]]).astype(np.int64)
        self.flat = np.fromiter((t for r in rows for t in r), dtype=np.int32,
                                count=int(self.lengths.sum()))


class PairAssembler:
    """Builds BERT-style pair encodings from per-text token ids."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.cls = tokenizer.cls_token_id
        self.sep = tokenizer.sep_token_id

    def tokenize(self, texts: list[str]) -> TokenTable:
        enc = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False)
        return TokenTable(enc["input_ids"])

    def assemble(self, queries: TokenTable, passages: TokenTable, query_index: np.ndarray,
                 passage_index: np.ndarray, empty_passage: np.ndarray
                 ) -> tuple[pa.ListArray, pa.ListArray]:
        """(input_ids, token_type_ids) for pairs given as indices into the two tables.

        A pair whose passage is the empty string is encoded as the query alone, as
        `tokenizer(query, "")` does.
        """
        nq = queries.lengths[query_index]
        np_ = np.where(empty_passage, 0, passages.lengths[passage_index])
        kq, kp = truncate_pair(nq, np_, self.max_length - 3)
        alone = np.minimum(nq, self.max_length - 2)
        kq = np.where(empty_passage, alone, kq)
        kp = np.where(empty_passage, 0, kp)
        seps = np.where(empty_passage, 1, 2)
        lengths = 1 + kq + kp + seps
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        types = np.zeros(len(ids), dtype=np.int8)
        start = offsets[:-1].astype(np.int64)
        ids[start] = self.cls
        q_pos = _ragged_gather(np.arange(len(ids)), start + 1, kq)
        ids[q_pos] = _ragged_gather(queries.flat, queries.starts[query_index], kq)
        ids[start + 1 + kq] = self.sep
        p_pos = _ragged_gather(np.arange(len(ids)), start + 2 + kq, kp)
        ids[p_pos] = _ragged_gather(passages.flat, passages.starts[passage_index], kp)
        pair = ~empty_passage
        ids[(start + 2 + kq + kp)[pair]] = self.sep
        second = _ragged_gather(np.arange(len(ids)), (start + 2 + kq)[pair], (kp + 1)[pair])
        types[second] = 1
        return (pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                pa.ListArray.from_arrays(pa.array(offsets), pa.array(types)))

    def verify(self) -> Optional[str]:
        """None if assembly reproduces the tokenizer's own pair encoding, else why not."""
        if self.cls is None or self.sep is None:
            return "the tokenizer has no [CLS]/[SEP] tokens"
        if "token_type_ids" not in self.tokenizer.model_input_names:
            return "the tokenizer has no token type ids"
        queries = [q for q, _ in _PROBES]
        passages = [p for _, p in _PROBES]
        index = np.arange(len(_PROBES))
        empty = np.array([p == "" for p in passages])
        ids, types = self.assemble(self.tokenize(queries), self.tokenize(passages), index,
                                   index, empty)
        for i, (q, p) in enumerate(_PROBES):
            single = self.tokenizer(q, p, truncation=True, max_length=self.max_length)
            if ids[i].as_py() != single["input_ids"] or \
                    types[i].as_py() != single["token_type_ids"]:
                return f"its pair encoding differs from [CLS] A [SEP] B [SEP] (probe {i})"
        return None
