"""Pair encodings assembled from separately tokenized texts.

A query with 100 candidates is tokenized once, not 100 times: queries and
passages are tokenized alone (no special tokens), then every pair is built with
the tokenizer's own template, learned from its encoding of a probe pair
(`[CLS] A [SEP] B [SEP]` with token types for BERT, `<s> A </s></s> B </s>`
without for RoBERTa, ...), and exactly the `longest_first` truncation the pair
tokenizer applies. `PairAssembler.verify` checks the result against the
tokenizer's own pair encodings before it is used; a tokenizer whose template
cannot be learned or does not check out is tokenized pair by pair instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa

from rstar_batch.stages.fast_tokens import FastTokens


def _probes(max_length: int) -> list[tuple[str, str]]:
    """Pairs that meet every truncation case at `max_length`, and are no longer than
    that takes: the tokenizers library cuts an over-long pair into windows and pairs
    them all up, so 600 tokens a side took 20-40 s per pair at max_length 8."""
    short = max(1, max_length // 64)  # a few words: 8 at max_length 512
    long = max_length // 2 + 10       # "query words " is 2+ tokens: past any budget
    return [
        ("short query", "a short passage"),
        ("query", ""),
        ("", "passage only"),
        ("query words " * long, "passage words " * short),  # the query is cut
        ("query words " * short, "passage words " * long),  # the passage is cut
        ("query words " * long, "passage words " * long),   # both are cut
        # odd budgets and near-ties (512: 512 query and 257 passage tokens)
        ("query words " * (max_length // 2), "passage " * (max_length // 2 + 1)),
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


def _bare_backend(tokenizer: Any) -> Any:
    """A copy of a fast tokenizer's Rust backend with no truncation or padding (a
    tokenizer.json may carry either; transformers resets them on every call), or
    None for a slow tokenizer. `verify` checks the result against the tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    bare = type(backend).from_str(backend.to_str())
    bare.no_truncation()
    bare.no_padding()
    return bare


def _ragged_index(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate range(starts[i], starts[i] + counts[i]) for every i (int64)."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    index = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    index += np.arange(total)
    return index


def _ragged_gather(flat: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate flat[starts[i] : starts[i] + counts[i]] for every i."""
    return flat[_ragged_index(starts, counts)]


@dataclass(frozen=True)
class PassagePolicy:
    """What happens to long passages before they are paired with a query.

    `max_tokens` cuts every passage; `firstp` keeps a passage's first window;
    `maxp` scores every window and keeps the best (BERT-MaxP); `truncate` leaves
    it to the pair's longest-first cut at max_length.
    """

    mode: str = "truncate"            # truncate | maxp | firstp
    max_tokens: Optional[int] = None
    window: int = 384
    stride: int = 192

    @classmethod
    def of(cls, config: Any) -> "PassagePolicy":
        """The policy a job's config asks for."""
        return cls(config.long_passages, config.passage_max_tokens, config.window,
                   config.stride)

    @property
    def windowed(self) -> bool:
        return self.mode == "maxp"

    @property
    def changes_passages(self) -> bool:
        return self.mode != "truncate" or self.max_tokens is not None

    def cut(self, passages: "TokenTable") -> "TokenTable":
        """Passages after --passage-max-tokens and firstp's first window."""
        if self.max_tokens is not None:
            passages = passages.clip(self.max_tokens)
        if self.mode == "firstp":
            passages = passages.clip(self.window)
        return passages


class TokenTable:
    """Token ids of many texts as one flat array plus each text's start and length.

    Views (`clip`, `windows`) share `flat` and only move starts and lengths.
    """

    def __init__(self, flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> None:
        self.flat = flat
        self.starts = starts.astype(np.int64)
        self.lengths = lengths.astype(np.int64)

    @classmethod
    def from_rows(cls, rows: list[list[int]]) -> "TokenTable":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        flat = np.fromiter((t for r in rows for t in r), dtype=np.int32,
                           count=int(lengths.sum()))
        return cls(flat, np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)

    @classmethod
    def from_list_array(cls, values: pa.ListArray) -> "TokenTable":
        offsets = values.offsets.to_numpy()
        flat = values.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        return cls(flat, offsets[:-1], np.diff(offsets))

    def __len__(self) -> int:
        return len(self.lengths)

    def row(self, i: int) -> list[int]:
        """Text i's ids."""
        start = int(self.starts[i])
        return self.flat[start:start + int(self.lengths[i])].tolist()

    def to_list_array(self) -> pa.ListArray:
        """The texts' ids as a compact list<int32> array."""
        offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(_ragged_gather(self.flat, self.starts, self.lengths)))

    def clip(self, max_tokens: int) -> "TokenTable":
        """Every text cut to its first `max_tokens` tokens."""
        return TokenTable(self.flat, self.starts, np.minimum(self.lengths, max_tokens))

    def windows(self, window: int, stride: int) -> tuple["TokenTable", np.ndarray]:
        """Overlapping windows of every text, and each text's first window's index.

        A text of n > window tokens gets windows starting at 0, stride, 2·stride, …
        until one reaches its end; a shorter text is one window, itself. Text i's
        windows are first[i] … first[i+1]-1, so `np.diff(first)` counts them.
        """
        over = np.maximum(self.lengths - window, 0)
        counts = 1 + -(-over // stride)                       # ceil(over / stride)
        first = np.concatenate([[0], np.cumsum(counts)])
        owner = np.repeat(np.arange(len(self)), counts)
        offset = (np.arange(int(first[-1])) - first[owner]) * stride
        lengths = np.minimum(self.lengths[owner] - offset, window)
        return TokenTable(self.flat, self.starts[owner] + offset, lengths), first


@dataclass(frozen=True)
class Template:
    """Where a tokenizer puts its special tokens around one or two texts.

    `specials[i]` are the ids before text i (the last entry: after the last text),
    `special_types[i]` their token types, `text_types[i]` text i's token type.
    Types are all 0 when the tokenizer gives none (`with_types` False).
    """

    specials: tuple[tuple[int, ...], ...]
    special_types: tuple[tuple[int, ...], ...]
    text_types: tuple[int, ...]
    with_types: bool

    @property
    def added(self) -> int:
        """How many special tokens the template adds: max_length's share for them."""
        return sum(len(ids) for ids in self.specials)

    @classmethod
    def learn(cls, tokenizer: Any, texts: Sequence[str], alone: Sequence[list[int]],
              with_types: bool) -> Optional["Template"]:
        """The template of `tokenizer(*texts)`, given each text's ids alone; None
        unless that encoding is special tokens around exactly those ids, in order."""
        enc = tokenizer(*texts, return_special_tokens_mask=True,
                        return_token_type_ids=with_types, return_attention_mask=False)
        ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
        types = list(enc["token_type_ids"]) if with_types else [0] * len(ids)
        specials, special_types, text_types, at = [], [], [], 0
        for text in [*alone, None]:
            start = at
            while at < len(ids) and special[at]:
                at += 1
            specials.append(tuple(ids[start:at]))
            special_types.append(tuple(types[start:at]))
            if text is None:
                break
            end = at + len(text)
            if not text or ids[at:end] != list(text) or any(special[at:end]) or \
                    len(set(types[at:end])) != 1:
                return None
            text_types.append(types[at])
            at = end
        if at != len(ids):
            return None
        return cls(tuple(specials), tuple(special_types), tuple(text_types), with_types)


# Probe texts whose template is learned: plain words, tokenized alike alone or paired.
_TEMPLATE_PROBE = ("violin river", "the old harbour bridge")


def learn_templates(tokenizer: Any, tokenize: Any) -> tuple[Optional[Template],
                                                            Optional[Template], str]:
    """(pair template, one-text template, why not) of a tokenizer: the one-text
    template encodes a query whose passage is the empty string, as transformers
    encodes `tokenizer(query, "")`."""
    if not hasattr(tokenizer, "model_input_names"):
        return None, None, "it is not a transformers tokenizer"
    with_types = "token_type_ids" in tokenizer.model_input_names
    alone = [tokenize([text]).row(0) for text in _TEMPLATE_PROBE]
    try:
        pair = Template.learn(tokenizer, _TEMPLATE_PROBE, alone, with_types)
        single = Template.learn(tokenizer, _TEMPLATE_PROBE[:1], alone[:1], with_types)
    except (TypeError, ValueError, KeyError) as exc:  # a tokenizer without these options
        return None, None, f"its pair template could not be read ({exc})"
    if pair is None or single is None:
        return None, None, ("its pair encoding is not special tokens around the two texts' "
                            "own ids")
    return pair, single, ""


def _place(ids: np.ndarray, types: Optional[np.ndarray], starts: np.ndarray,
           tokens: tuple[int, ...], token_types: tuple[int, ...]) -> None:
    """Write the special `tokens` (and their types) at starts, starts + 1, ..."""
    for j, (token, kind) in enumerate(zip(tokens, token_types)):
        ids[starts + j] = token
        if types is not None:
            types[starts + j] = kind


class PairAssembler:
    """Builds a tokenizer's pair encodings from per-text token ids, with its template."""

    def __init__(self, tokenizer: Any, max_length: int, texts_by: str = "auto") -> None:
        """`texts_by`: what encodes each text (fast_tokens.BACKENDS: auto, hf, fast)."""
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.backend = _bare_backend(tokenizer)
        self.texts_by = texts_by
        self.fast, self.encoded_by = FastTokens.of(self.backend, texts_by)
        self.pair, self.single, self.why_no_template = learn_templates(
            tokenizer, lambda texts: self.tokenize(texts, probes=True))

    @property
    def with_types(self) -> bool:
        """Whether pairs carry token type ids (the tokenizer's model inputs do)."""
        return self.pair is not None and self.pair.with_types

    @property
    def passage_limit(self) -> int:
        """The most passage tokens any pair can keep: max_length less the specials."""
        return self.max_length - (self.pair.added if self.pair else 0)

    def __getstate__(self) -> dict[str, Any]:
        """What a tokenizer actor needs: the Rust tokenizer as JSON and the templates,
        so that it neither imports transformers (nor torch) nor loads the model folder.
        Only an assembler the driver verified should travel."""
        if self.backend is None or self.pair is None:
            raise TypeError("only a verified assembler of a fast tokenizer can be sent "
                            "to actors")
        return {"backend": self.backend.to_str(), "pair": self.pair, "single": self.single,
                "max_length": self.max_length, "texts_by": self.texts_by}

    def __setstate__(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = None  # verify() runs where the tokenizer was loaded
        self.backend = Tokenizer.from_str(state["backend"])
        self.pair, self.single = state["pair"], state["single"]
        self.max_length, self.why_no_template = state["max_length"], ""
        # checked again here: this process's nanotoken, against this process's tokenizers
        self.texts_by = state["texts_by"]
        self.fast, self.encoded_by = FastTokens.of(self.backend, self.texts_by)

    def tokenize(self, texts: list[str], probes: bool = False) -> TokenTable:
        """Each text's own token ids, without special tokens and uncut. The first job
        texts (not `probes`) a process tokenizes check the fast path once more."""
        if not texts:  # the tokenizer fails on an empty batch
            return TokenTable.from_rows([])
        if self.fast is not None and not probes and not self.fast.check_first(texts):
            self.fast, self.encoded_by = None, "hf (the fast tokenizer differed)"
        if self.fast is not None:
            flat, offsets = self.fast.encode(texts)
            return TokenTable(flat, offsets[:-1], np.diff(offsets))
        if self.backend is None:
            enc = self.tokenizer(texts, add_special_tokens=False, return_attention_mask=False,
                                 return_token_type_ids=False)
            return TokenTable.from_rows(enc["input_ids"])
        # The Rust tokenizer directly: no offsets, no BatchEncoding of Python lists.
        encodings = self.backend.encode_batch_fast(texts, add_special_tokens=False)
        return TokenTable.from_list_array(
            pa.array([e.ids for e in encodings], pa.list_(pa.int32())))

    def assemble(self, queries: TokenTable, passages: TokenTable, query_index: np.ndarray,
                 passage_index: np.ndarray, empty_passage: np.ndarray
                 ) -> tuple[pa.ListArray, Optional[pa.ListArray]]:
        """(input_ids, token_type_ids or None) for pairs given as indices into the two
        tables.

        A pair whose passage is the empty string is encoded as the query alone, as
        `tokenizer(query, "")` does.
        """
        pair, single = self.pair, self.single
        if pair is None or single is None:
            raise RuntimeError(f"no pair template to assemble with: {self.why_no_template}")
        nq = queries.lengths[query_index]
        np_ = np.where(empty_passage, 0, passages.lengths[passage_index])
        kq, kp = truncate_pair(nq, np_, self.max_length - pair.added)
        kq = np.where(empty_passage, np.minimum(nq, self.max_length - single.added), kq)
        kp = np.where(empty_passage, 0, kp)
        # pair rows: specials 0, query, specials 1, passage, specials 2; one-text rows:
        # specials 0, query, specials 1 (the one-text template's), nothing more
        before, between = (np.where(empty_passage, len(single.specials[i]),
                                    len(pair.specials[i])) for i in (0, 1))
        after = np.where(empty_passage, 0, len(pair.specials[2]))
        lengths = before + kq + between + kp + after
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        start = offsets[:-1].astype(np.int64)
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        types = np.empty(len(ids), dtype=np.int8) if pair.with_types else None
        q_at, p_at = start + before, start + before + kq + between
        q_pos, p_pos = _ragged_index(q_at, kq), _ragged_index(p_at, kp)
        ids[q_pos] = _ragged_gather(queries.flat, queries.starts[query_index], kq)
        ids[p_pos] = _ragged_gather(passages.flat, passages.starts[passage_index], kp)
        if types is not None:
            types[q_pos] = np.repeat(np.where(empty_passage, single.text_types[0],
                                              pair.text_types[0]), kq)
            types[p_pos] = pair.text_types[1]
        for rows, template, at in ((~empty_passage, pair, (start, q_at + kq, p_at + kp)),
                                   (empty_passage, single, (start, q_at + kq))):
            for i, where in enumerate(at):
                _place(ids, types, where[rows], template.specials[i],
                       template.special_types[i])
        id_array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids))
        return id_array, (None if types is None else
                          pa.ListArray.from_arrays(pa.array(offsets), pa.array(types)))

    def assemble_windows(self, queries: TokenTable, passages: TokenTable,
                         query_index: np.ndarray, passage_index: np.ndarray,
                         empty_passage: np.ndarray, window: int, stride: int
                         ) -> tuple[pa.ListArray, Optional[pa.ListArray], np.ndarray]:
        """`assemble` with every passage split into windows, each paired with the query.

        Returns one encoding per window, pair i's windows consecutive, and the
        number of windows of each pair.
        """
        windows, first = passages.windows(window, stride)
        counts = np.diff(first)[passage_index]
        index = _ragged_index(first[passage_index], counts)
        ids, types = self.assemble(queries, windows, np.repeat(query_index, counts), index,
                                   np.repeat(empty_passage, counts))
        return ids, types, counts

    def verify(self) -> Optional[str]:
        """None if assembly reproduces the tokenizer's own pair encoding, else why not."""
        if self.pair is None:
            return self.why_no_template
        probes = _probes(self.max_length)
        queries = [q for q, _ in probes]
        passages = [p for _, p in probes]
        index = np.arange(len(probes))
        empty = np.array([p == "" for p in passages])
        ids, types = self.assemble(self.tokenize(queries, probes=True),
                                   self.tokenize(passages, probes=True), index, index, empty)
        for i, (q, p) in enumerate(probes):
            single = self.tokenizer(q, p, truncation=True, max_length=self.max_length,
                                    return_token_type_ids=self.with_types)
            if ids[i].as_py() != single["input_ids"] or (
                    types is not None and types[i].as_py() != single["token_type_ids"]):
                return f"its pair encoding differs from the learned template (probe {i})"
        return None
