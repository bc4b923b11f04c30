"""Texts to token ids at the GPU's pace: an exact fast path for WordPiece tokenizers.

From text, tokenizing is the host's floor: the Hugging Face `tokenizers` library
encodes ~4,000 passages/s on one core. nanotoken (MIT, Rust) implements WordPiece
tokenizers (BERT's normalizer, pre-tokenizer and model: R*'s and most
cross-encoders') and claims output identical to `tokenizers`; it encoded ~30x as
fast in issue 28's trial, with no difference on 80,000 generated texts. It is one
author's first release, so here it is pinned (pyproject.toml), checked and
replaceable:

- `--tokenizer-backend auto` (the default) uses it where it loads the tokenizer
  (it refuses what it does not implement: BPE, SentencePiece, other normalizers)
  and where it encodes `EDGE_TEXTS` and the job's own first texts exactly as the
  `tokenizers` backend does; anything else is encoded by `tokenizers`, and the
  reason is logged. `fast` insists (a job that cannot have it fails, saying why);
  `hf` never uses it.
- Only the texts' own ids come from it (no special tokens, no truncation): the
  learned pair template (pairs.PairAssembler) still builds every pair, so each
  model family keeps its own specials and cut, and `verify` still checks pairs
  against the tokenizer's own pair encoding.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "fast")

# Where other fast WordPiece implementations were seen to differ from `tokenizers`
# (issue 28: a soft hyphen became [UNK], combining marks were dropped, long words were
# split), and the rest of what a BERT normalizer and pre-tokenizer decide.
EDGE_TEXTS = [
    "", " ", "   leading and trailing   ", "plain words, punctuation; digits 12,345.67!",
    "[SEP] literal [CLS] special [PAD] tokens [UNK] [MASK] inside text",
    "a" * 100, "b" * 101, "x" + "\u00e9" * 99, "y" + "\u00e9" * 100,  # the 100-char limit
    "soft\u00adhyphen", "combining e\u0301 a\u0308 o\u0302 marks",
    "fullwidth \uff21\uff22\uff23 \uff11\uff12",
    "\u6771\u4eac and \u5317\u4eac \u6570\u636e \u691c\u7d22 \uc74c\uc545",
    "emoji \U0001f600 \U0001f680 \u2728 \U0001f469\u200d\U0001f469\u200d\U0001f467",
    "control\x00chars\x07and\x1b[0m escapes", "tabs\tand\nnew\r\nlines\u2028sep\u00a0nbsp",
    "Caf\u00e9 in Z\u00fcrich, na\u00efve r\u00e9sum\u00e9 of S\u00e3o Paulo",
    "\u00c5\u00c4\u00d6 \u00e5\u00e4\u00f6 \u00df \u1e9e \u01c4 \u01c5 \u01c6 \u0130 \u0131",
    "don't won't O'Neil's e-mail user@example.com http://x.y/z?q=1&r=2",
    "math \u2211 \u222b \u221a \u2264 \u00b1 \u00d7 \u00f7 ligatures \ufb01 \ufb02",
    "zero\u200bwidth\u200djoiner\ufeffbom \u2162 \u2460 \u00bc",
    "\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac \u0420\u0443\u0441\u0441\u043a\u0438\u0439 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u05e2\u05d1\u05e8\u05d9\u05ea "
    "\u0939\u093f\u0928\u094d\u0926\u0940 \u0e44\u0e17\u0e22",
    "unknown \U0001d518\U0001d52b\U0001d526 \U00013000 \ue000 private use",
    "glacier river engine " * 60,
]
# How many texts of each of a process's first calls are encoded both ways before the
# fast path is trusted with the rest (a few milliseconds of the reference's time): two
# calls, as a batch's queries and then its passages are tokenized apart.
FIRST_TEXTS = 64
FIRST_CALLS = 2


def _encode_reference(reference: Any, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in reference.encode_batch_fast(list(texts), add_special_tokens=False)]


class FastTokens:
    """nanotoken's tokenizer for a `tokenizers` backend (`reference`, no truncation or
    padding), used only while it encodes exactly as that backend does."""

    def __init__(self, fast: Any, reference: Any, insist: bool) -> None:
        self.fast, self.reference, self.insist = fast, reference, insist
        self.calls_checked = 0

    @classmethod
    def of(cls, reference: Any, choice: str) -> tuple[Optional["FastTokens"], str]:
        """(the fast path or None, what encodes the texts and why) for `choice`."""
        if choice not in BACKENDS:
            raise ValueError(f"tokenizer backend {choice!r} is not one of {BACKENDS}")
        if choice == "hf":
            return None, "hf (--tokenizer-backend hf)"
        if reference is None:
            return _without(choice, "the model has no fast (Rust) tokenizer to check against")
        try:
            import nanotoken
        except ImportError as exc:
            return _without(choice, f"nanotoken is not installed ({exc})")
        try:
            fast = nanotoken.Tokenizer.from_json(reference.to_str())
        except nanotoken.UnsupportedTokenizerError as exc:
            why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return _without(choice, f"nanotoken does not implement this tokenizer ({why})")
        tokens = cls(fast, reference, insist=choice == "fast")
        differs = tokens.differs(EDGE_TEXTS)
        if differs:
            return _without(choice, differs)
        return tokens, f"fast (nanotoken {nanotoken_version()})"

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(every text's ids as one int32 array, the texts' offsets into it)."""
        ragged = self.fast.encode_batch(texts, add_special_tokens=False, parallel=False)
        return ragged.ids.astype(np.int32), ragged.offsets

    def differs(self, texts: Sequence[str]) -> Optional[str]:
        """None if the fast path encodes `texts` as the reference does, else the first
        difference."""
        flat, offsets = self.encode(texts)
        for i, want in enumerate(_encode_reference(self.reference, texts)):
            got = flat[offsets[i]:offsets[i + 1]].tolist()
            if got != want:
                return (f"nanotoken encodes text {i} ({texts[i][:60]!r}) as {got[:12]}, "
                        f"the tokenizer as {want[:12]}")
        return None

    def check_first(self, texts: Sequence[str]) -> bool:
        """In a process's first calls: whether the fast path encodes the job's texts as
        the reference does. A difference is logged (auto: the reference encodes from
        now on) or raised (`fast` insists)."""
        if self.calls_checked >= FIRST_CALLS:
            return True
        self.calls_checked += 1
        differs = self.differs(texts[:FIRST_TEXTS])
        if differs is None:
            return True
        if self.insist:
            raise RuntimeError(f"--tokenizer-backend fast: {differs}")
        log.warning("the fast tokenizer differs on this job's texts, so the Hugging Face "
                    "tokenizer encodes them: %s", differs)
        return False


def _without(choice: str, why: str) -> tuple[None, str]:
    """No fast path: an error where `fast` was asked for, else hf and why."""
    if choice == "fast":
        from rstar_batch.config import ConfigError

        raise ConfigError(f"--tokenizer-backend fast: {why}")
    return None, f"hf ({why})"


def nanotoken_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("nanotoken")
    except metadata.PackageNotFoundError:
        return "unknown"
