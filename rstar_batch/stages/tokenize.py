"""Tokenize: (query, passage) → input ids, on CPU actors.

The result is exactly the pair encoding of `tokenizer(query, passage,
truncation=True, max_length=N)` done one pair at a time. Each distinct query
and passage of a batch is tokenized once and the pairs are assembled from them
(`pairs.py`), when the tokenizer passes the assembler's check; otherwise each
pair is tokenized. Long passages follow the job's `PassagePolicy`: with maxp a
row's `_input_ids` holds all its windows' encodings back to back and
`_windows` their lengths, so the score stage can score each and keep the best.
Texts of rejected rows are kept for the rejected-rows table;
texts of scored rows are dropped here, so only token ids travel to the GPUs.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C
from rstar_batch.config import ConfigError
from rstar_batch.model import ModelInfo, load_tokenizer
from rstar_batch.stages.contract import Stage
from rstar_batch.stages.pairs import PairAssembler, PassagePolicy, TokenTable

log = logging.getLogger(__name__)


def list_array(rows: list[list[int]], value_type: pa.DataType) -> pa.ListArray:
    """Build a list<value_type> array from Python lists without per-row Arrow calls."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for r in rows for t in r), dtype=value_type.to_pandas_dtype(),
                       count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type))


class Tokenize(Stage):
    """Callable class for `map_batches`: loads the tokenizer once per actor, or takes
    the driver's verified `assembler` (then transformers is never imported here)."""

    # a tokenized corpus's rows also carry C.PASSAGE_IDS and C.EMPTY_PASSAGE
    reads = (C.QUERY, C.PASSAGE, C.REJECT)
    writes = (C.INPUT_IDS,)

    def __init__(self, model: ModelInfo, max_length: int, trust_remote_code: bool = False,
                 assemble: bool = True, passages: PassagePolicy = PassagePolicy(),
                 assembler: PairAssembler | None = None, texts_by: str = "auto"):
        self.max_length = max_length
        self.passages = passages
        if assembler is not None:
            self.tokenizer, self.assembler = None, assembler
            self.with_types = assembler.with_types
            return
        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.with_types = "token_type_ids" in self.tokenizer.model_input_names
        self.assembler = (PairAssembler(self.tokenizer, max_length, texts_by) if assemble
                          else None)
        why_not = self.assembler.verify() if self.assembler else "not asked to assemble"
        if why_not:
            fall_back_to_whole_pairs(passages, why_not)
            self.assembler = None

    def encode_pairs(self, queries: pa.Array, passages: pa.Array
                     ) -> tuple[pa.ListArray, pa.ListArray | None, pa.ListArray | None]:
        """(input_ids, token_type_ids or None, window lengths or None) for non-null
        query and passage arrays."""
        if self.assembler is None:
            enc = self.encode(queries.to_pylist(), passages.to_pylist())
            types = list_array(enc["token_type_ids"], pa.int8()) if self.with_types else None
            return list_array(enc["input_ids"], pa.int32()), types, None
        q = pc.dictionary_encode(queries)
        p = pc.dictionary_encode(passages)
        texts = (self.assembler.tokenize(q.dictionary.to_pylist()),
                 self.passages.cut(self.assembler.tokenize(p.dictionary.to_pylist())))
        pairs = (q.indices.to_numpy(), p.indices.to_numpy(),
                 pc.equal(passages, "").to_numpy(zero_copy_only=False))
        return self._assemble(texts, pairs)

    def encode_with_passage_ids(self, queries: pa.Array, passage_ids: pa.ListArray,
                                empty: pa.Array
                                ) -> tuple[pa.ListArray, pa.ListArray | None, pa.ListArray | None]:
        """`encode_pairs` for passages given as their own ids (a tokenized corpus):
        only the queries are tokenized; the policy cuts the ids as it cuts texts."""
        if self.assembler is None:
            raise ConfigError("a tokenized corpus needs a tokenizer whose pairs can be "
                              "assembled from separate ids; pass the text corpus")
        q = pc.dictionary_encode(queries)
        texts = (self.assembler.tokenize(q.dictionary.to_pylist()),
                 self.passages.cut(TokenTable.from_list_array(passage_ids)))
        pairs = (q.indices.to_numpy(), np.arange(len(passage_ids)),
                 empty.to_numpy(zero_copy_only=False))
        return self._assemble(texts, pairs)

    def _assemble(self, texts: tuple[TokenTable, TokenTable], pairs: tuple[np.ndarray, ...]
                  ) -> tuple[pa.ListArray, pa.ListArray | None, pa.ListArray | None]:
        if not self.passages.windowed:
            return (*self.assembler.assemble(*texts, *pairs), None)
        ids, types, counts = self.assembler.assemble_windows(
            *texts, *pairs, self.passages.window, self.passages.stride)
        return group_windows(ids, types, counts)

    def encode(self, queries: list[str], passages: list[str]) -> dict[str, list[list[int]]]:
        """Encode pairs exactly as `tokenizer(query, passage, ...)` does one at a time.

        transformers treats an empty-string passage as no passage at all
        ([CLS] query [SEP]), while a batch call would add a second [SEP]; those
        rows are encoded alone so both paths give the same ids and scores.
        """
        args = dict(truncation=True, max_length=self.max_length, return_attention_mask=False,
                    return_token_type_ids=self.with_types)
        enc = dict(self.tokenizer(queries, passages, **args))
        empty = [i for i, p in enumerate(passages) if p == ""]
        if empty:
            alone = self.tokenizer([queries[i] for i in empty], **args)
            for key, rows in enc.items():
                for j, i in enumerate(empty):
                    rows[i] = alone[key][j]
        return enc

    def process(self, batch: pa.Table) -> pa.Table:
        scored = pc.is_null(batch[C.REJECT]).combine_chunks()
        index = pa.array(np.flatnonzero(scored.to_numpy(zero_copy_only=False)))
        queries = batch[C.QUERY].combine_chunks().take(index)
        if C.PASSAGE_IDS in batch.column_names:  # joined with a tokenized corpus
            ids, types, windows = self.encode_with_passage_ids(
                queries, batch[C.PASSAGE_IDS].combine_chunks().take(index),
                batch[C.EMPTY_PASSAGE].combine_chunks().take(index))
            batch = batch.drop_columns([C.PASSAGE_IDS, C.EMPTY_PASSAGE])
        else:
            ids, types, windows = self.encode_pairs(
                queries, batch[C.PASSAGE].combine_chunks().take(index))
        out = texts_of_rejected_only(batch, scored, (C.QUERY, C.PASSAGE))
        out = out.append_column(C.INPUT_IDS, _scatter(ids, index, batch.num_rows, pa.int32()))
        if types is not None:
            out = out.append_column(C.TOKEN_TYPE_IDS,
                                    _scatter(types, index, batch.num_rows, pa.int8()))
        if windows is not None:
            out = out.append_column(C.WINDOWS,
                                    _scatter(windows, index, batch.num_rows, pa.int32()))
        return out


def checked_assembler(tokenizer: Any, model_source: str, max_length: int,
                      passages: PassagePolicy, needs_ids: Optional[str] = None,
                      texts_by: str = "auto") -> tuple[PairAssembler, Optional[str]]:
    """The job's pair assembler, checked on the driver before Ray starts, and why its
    pairs cannot be assembled from separately tokenized texts (None: they can).

    Where they cannot, pairs are tokenized whole (logged once), unless the job needs
    the passages' own ids: `needs_ids` (why: a tokenized corpus, tokenize-corpus) and
    passage policies that cut or window passages are refused with the reason.
    """
    assembler = PairAssembler(tokenizer, max_length, texts_by)
    log.info("texts are tokenized by %s", assembler.encoded_by)
    why_not = assembler.verify()
    if why_not:
        why_not = f"for model '{model_source}' {why_not}"
        if needs_ids:
            raise ConfigError(f"{needs_ids}, but {why_not}; use the text corpus instead")
        fall_back_to_whole_pairs(passages, why_not)
    return assembler, why_not


def fall_back_to_whole_pairs(passages: PassagePolicy, why_not: str) -> None:
    """Pairs will be tokenized whole, each by the tokenizer, because they cannot be
    assembled (`why_not`): logged once, or refused where the passage policy cuts or
    windows passages before pairing, which needs their own ids."""
    if passages.changes_passages:
        raise ConfigError(f"--long-passages {passages.mode} and --passage-max-tokens need "
                          f"pairs assembled from separately tokenized texts, but {why_not}")
    log.info("tokenizing each pair whole (slower): %s", why_not)


class TokenizePassages(Stage):
    """score-corpus: each corpus passage tokenized alone, once per job.

    The score stage pairs these ids with every query. Without maxp a pair depends
    on no more than `limit` of a passage's ids (`QuerySet.passage_tokens_needed`),
    so only those travel on.
    """

    reads = (C.PASSAGE, C.REJECT)
    writes = (C.PASSAGE_IDS, C.EMPTY_PASSAGE)

    def __init__(self, model: ModelInfo, max_length: int, trust_remote_code: bool = False,
                 passages: PassagePolicy = PassagePolicy(),
                 assembler: PairAssembler | None = None, limit: int | None = None,
                 texts_by: str = "auto"):
        self.assembler = assembler or PairAssembler(load_tokenizer(model, trust_remote_code),
                                                    max_length, texts_by)
        self.passages = passages
        self.limit = None if passages.windowed else limit

    def process(self, batch: pa.Table) -> pa.Table:
        scored = pc.is_null(batch[C.REJECT]).combine_chunks()
        index = pa.array(np.flatnonzero(scored.to_numpy(zero_copy_only=False)))
        texts = batch[C.PASSAGE].combine_chunks().take(index)
        tokens = fit_passages(self.assembler.tokenize(texts.to_pylist()), self.passages,
                              self.limit)
        out = texts_of_rejected_only(batch, scored, (C.PASSAGE,))
        return (out.append_column(C.PASSAGE_IDS, _scatter(tokens.to_list_array(), index,
                                                          batch.num_rows, pa.int32()))
                .append_column(C.EMPTY_PASSAGE, pc.fill_null(pc.equal(batch[C.PASSAGE], ""),
                                                             False)))


def fit_passages(tokens: TokenTable, policy: PassagePolicy, limit: int | None) -> TokenTable:
    """score-corpus: a passage's ids as pairs can use them (the policy's cut, then
    `limit` tokens), whether just tokenized or read from a tokenized corpus."""
    tokens = policy.cut(tokens)
    return tokens.clip(limit) if limit is not None else tokens


def texts_of_rejected_only(batch: pa.Table, scored: pa.Array, columns: tuple[str, ...]
                           ) -> pa.Table:
    """Texts are kept for the rejected-rows table only: scored rows travel on as ids.

    A take with null indices, not `pc.if_else`: on pyarrow 17-18 if_else of a sliced
    string column gave an array that Ray's pickling of blocks could not cut to size
    ("buffer slice would exceed buffer length"); a take builds a compact one."""
    keep = np.arange(batch.num_rows)
    mask = pc.fill_null(scored, False).to_numpy(zero_copy_only=False)
    index = pa.array(keep, pa.int64(), mask=mask)
    for column in columns:
        batch = batch.set_column(batch.schema.get_field_index(column), column,
                                 batch[column].combine_chunks().take(index))
    return batch


def group_windows(ids: pa.ListArray, types: pa.ListArray | None, counts: np.ndarray
                  ) -> tuple[pa.ListArray, pa.ListArray | None, pa.ListArray]:
    """Per-window encodings (consecutive per pair) → one row per pair: its windows'
    ids and types (if any) back to back, and the windows' lengths."""
    offsets = ids.offsets.to_numpy()
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    rows = pa.array(offsets[bounds])
    return (pa.ListArray.from_arrays(rows, ids.values),
            None if types is None else pa.ListArray.from_arrays(rows, types.values),
            pa.ListArray.from_arrays(pa.array(bounds), pa.array(np.diff(offsets), pa.int32())))


def _scatter(values: pa.ListArray, index: pa.Array, size: int,
             value_type: pa.DataType) -> pa.ListArray:
    """A list column of `size` rows: values at `index`, empty lists elsewhere."""
    if len(index) == size:
        return values
    lengths = np.zeros(size, dtype=np.int32)
    lengths[index.to_numpy()] = pc.list_value_length(values).to_numpy(zero_copy_only=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets),
                                    values.flatten().cast(value_type))
