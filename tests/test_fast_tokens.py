"""The fast tokenizer path (stages/fast_tokens.py) gives the Hugging Face tokenizer's ids
exactly, for every family it accepts, and gives way to it for the rest."""

from __future__ import annotations

import logging
import pickle
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from rstar_batch.config import ConfigError
from rstar_batch.stages import fast_tokens
from rstar_batch.stages.fast_tokens import EDGE_TEXTS, FastTokens
from rstar_batch.stages.pairs import PairAssembler
from rstar_batch.tiny_families import FAMILIES

# The families whose tokenizers are WordPiece (BERT's normalizer and pre-tokenizer):
# the fast path's; the others (byte-level BPE, SentencePiece Unigram) are not.
WORDPIECE = {"bert", "bert_notype", "bert_2labels", "electra"}

# Pieces of text of every class where fast WordPiece implementations were seen to
# differ from Hugging Face's (issue 28), mixed at random into texts.
PIECES = ["violin", "festival", "Paris", "glacier", "river", ",", ".", ";", "!", "?", "(",
          ")", "'s", "-", "12,345.67", "1999", "Café", "Zürich", "naïve", "résumé", "São",
          "東京", "北京", "数据", "検索", "음악", "😀", "🚀", "✨", "👩\u200d👩\u200d👧", "[SEP]",
          "[CLS]", "[PAD]", "[UNK]", "[MASK]", "soft\u00adhyphen", "e\u0301", "a\u0308",
          "ＡＢＣ", "１２３", "\x00", "\x07", "\x1b", "\t", "\n", "\r\n", "\u2028", "\u00a0",
          "\u200b", "\ufeff", "ß", "İ", "ı", "Ǆ", "ﬁ", "Ⅻ", "①", "¼", "Ελληνικά", "Русский",
          "العربية", "עברית", "हिन्दी", "ไทย", "𝔘𝔫𝔦", "\ue000", "user@example.com",
          "http://x.y/z?q=1&r=2", "a" * 99, "a" * 100, "b" * 101, "é" * 100]


def generated_texts(count: int, seed: int = 0) -> list[str]:
    """`count` texts of 0-120 pieces, joined by odd whitespace or none."""
    rng = random.Random(seed)
    joins = [" ", " ", " ", "  ", "\t", "", "\u3000"]
    return [rng.choice(joins).join(rng.choice(PIECES) for _ in range(rng.randint(0, 120)))
            for _ in range(count)]


@pytest.fixture(scope="module")
def family_tokenizers(family_models) -> dict:
    return {family: AutoTokenizer.from_pretrained(path) for family, path in family_models.items()}


def _hf_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_gets_the_hugging_face_ids_fast_where_wordpiece(family_tokenizers, family):
    tokenizer = family_tokenizers[family]
    assembler = PairAssembler(tokenizer, 128)            # auto
    if family in WORDPIECE:
        assert assembler.encoded_by.startswith("fast (nanotoken "), assembler.encoded_by
    else:
        assert assembler.fast is None
        assert assembler.encoded_by.startswith("hf (nanotoken does not implement"), \
            assembler.encoded_by
    texts = generated_texts(1000, seed=FAMILIES.index(family)) + EDGE_TEXTS
    got = assembler.tokenize(texts)
    assert [got.row(i) for i in range(len(texts))] == _hf_ids(tokenizer, texts)
    assert assembler.verify() is None  # pairs still equal the tokenizer's own


def test_an_actor_checks_the_fast_path_again_and_encodes_alike(family_tokenizers):
    tokenizer = family_tokenizers["bert"]
    sent = pickle.loads(pickle.dumps(PairAssembler(tokenizer, 64)))
    assert sent.encoded_by.startswith("fast") and sent.tokenizer is None
    texts = generated_texts(500, seed=9)
    got = sent.tokenize(texts)
    assert [got.row(i) for i in range(len(texts))] == _hf_ids(tokenizer, texts)


def test_hf_is_never_fast_and_fast_insists(family_tokenizers):
    assert PairAssembler(family_tokenizers["bert"], 64, "hf").fast is None
    with pytest.raises(ConfigError, match=r"--tokenizer-backend fast: nanotoken does not "
                                          "implement this tokenizer"):
        PairAssembler(family_tokenizers["roberta"], 64, "fast")


class _Off:
    """A fast tokenizer that gets one token wrong where `bad` is in a text."""

    def __init__(self, real, bad: str) -> None:
        self.real, self.bad = real, bad

    def encode_batch(self, texts, **kwargs):
        ragged = self.real.encode_batch(texts, **kwargs)
        for i, text in enumerate(texts):
            if self.bad in text and ragged.offsets[i + 1] > ragged.offsets[i]:
                ragged.ids[ragged.offsets[i]] += 1
        return ragged


def test_a_difference_on_the_probes_or_the_first_texts_leaves_hugging_faces_ids(
        family_tokenizers, monkeypatch, caplog):
    tokenizer = family_tokenizers["bert"]
    real = fast_tokens.FastTokens.encode

    def off_on(bad: str):
        def encode(self, texts):
            return real(FastTokens(_Off(self.fast, bad), self.reference, self.insist), texts)
        return encode

    # a difference on the edge probes: hf from the start, saying which text
    monkeypatch.setattr(FastTokens, "encode", off_on("Zürich"))
    assembler = PairAssembler(tokenizer, 64)
    assert assembler.fast is None and "nanotoken encodes text" in assembler.encoded_by
    with pytest.raises(ConfigError, match="--tokenizer-backend fast: nanotoken encodes text"):
        PairAssembler(tokenizer, 64, "fast")

    # a difference on the job's own first texts only: logged, then hf for the rest
    monkeypatch.setattr(FastTokens, "encode", off_on("zebra"))
    assembler = PairAssembler(tokenizer, 64)
    assert assembler.fast is not None
    texts = ["a zebra crossing", "violin festival"] * 10
    with caplog.at_level(logging.WARNING):
        got = assembler.tokenize(texts)
    assert "differs on this job's texts" in caplog.text and assembler.fast is None
    assert [got.row(i) for i in range(len(texts))] == _hf_ids(tokenizer, texts)
    insisting = PairAssembler(tokenizer, 64, "fast")
    with pytest.raises(RuntimeError, match="--tokenizer-backend fast: nanotoken encodes"):
        insisting.tokenize(texts)


def test_without_nanotoken_auto_is_hf_and_fast_is_refused(family_tokenizers, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "nanotoken", None)  # an import of it fails
    assembler = PairAssembler(family_tokenizers["bert"], 64)
    assert assembler.fast is None and assembler.encoded_by.startswith(
        "hf (nanotoken is not installed")
    with pytest.raises(ConfigError, match="nanotoken is not installed"):
        PairAssembler(family_tokenizers["bert"], 64, "fast")


def test_the_fast_path_hands_over_int32_ids_and_offsets(family_tokenizers):
    fast, _ = FastTokens.of(PairAssembler(family_tokenizers["bert"], 64).backend, "auto")
    flat, offsets = fast.encode(["violin festival", "", "Paris"])
    assert flat.dtype == np.int32 and offsets.tolist()[0] == 0 and len(offsets) == 4
    assert offsets[2] == offsets[1]  # the empty text has no ids
