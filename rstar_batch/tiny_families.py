"""Tiny random-weight rerankers of several model families, made locally (no hub).

    make_family_model("roberta", "/tmp/tiny-roberta")

Tests build one of each family a user may point `--model` at: BERT with and without
token type ids, RoBERTa, XLM-RoBERTa, DeBERTa-v2, ELECTRA, ModernBERT and a
two-logit BERT, and check every command against one-pair transformers scoring.
They load on transformers 4.57 and 5.x alike.

Each tokenizer is trained with the `tokenizers` library and given exactly the
normalizer, pre-tokenizer, decoder and post-processor (the pair template) that its
family's transformers class builds, then wrapped by `<Family>TokenizerFast(
tokenizer_object=...)`: those names exist in both major versions, and transformers
5 rebuilds everything but the vocabulary and the post-processor from the class on
reload. Tokenizer training is made deterministic (WordPiece's vocabulary is taken
from a BPE run, Unigram's is rounded and sorted), so a seed gives the same model in
every process.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

FAMILIES = ("bert", "bert_notype", "roberta", "xlm_roberta", "deberta_v2",
            "electra", "modernbert", "bert_2labels")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, initializer_range=0.2)
MAX_LEN = 128          # tokenizer model_max_length
VOCAB = 1000           # trainer target; the real size comes from the corpus

_WORDS = ("the of and to in is was for on that with as by at from it an be this are or "
          "which has had not but were its also they their have been one two first new "
          "river bridge engine protein galaxy violin harbour glacier vaccine turbine "
          "novel market cathedral volcano algorithm satellite orchard reactor museum "
          "senate canal telescope enzyme railway festival parliament desert island "
          "fossil comet battery language molecule kingdom climate highway treaty opera "
          "Paris Einstein Amazon Tokyo Nile Beethoven Marie Curie Sahara café naïve "
          "Zürich São Kraków system history population water energy process structure "
          "region century government company research species music theory city").split()


def _corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        words[0] = words[0][:1].upper() + words[0][1:]
        out.append(" ".join(words) + rng.choice([".", "?", "!", ", 42.", " (1999)."]))
    return out


# ---------------------------------------------------------------- tokenizers ----

def _fresh(model, specials, normalizer=None, pre_tokenizer=None, decoder=None):
    """A Tokenizer around `model` with the given parts and `specials` as added tokens."""
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer(model)
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tok


def _wordpiece(specials=("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")):
    """Cased BERT WordPiece, identical to what BertTokenizer(do_lower_case=False,
    strip_accents=False) builds, with the BERT pair template (type ids 0/1).

    tokenizers' WordPieceTrainer is not deterministic (ties between equally frequent
    pairs are broken by '##' ids assigned in hash order: the vocabulary *set* changes
    from run to run), so the vocabulary comes from a (deterministic) BpeTrainer run:
    every BPE piece p is taken as both `p` and `##p`.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                            strip_accents=False, lowercase=False)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizer
    bpe.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bpe.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(specials), show_progress=False))
    vocab = {s: i for i, s in enumerate(specials)}
    for piece, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1]):
        for token in (piece, "##" + piece):
            vocab.setdefault(token, len(vocab))
    tok = _fresh(models.WordPiece(vocab, unk_token="[UNK]"), specials, normalizer,
                 pre_tokenizers.BertPreTokenizer(), decoders.WordPiece(prefix="##"))
    _bert_template(tok)
    return tok


def _bert_template(tok):
    from tokenizers import processors
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def _byte_bpe(specials):
    """Byte-level BPE as RobertaTokenizer builds it (ByteLevel, add_prefix_space=False).
    (BpeTrainer with ByteLevel is deterministic: same tokenizer.json every run.)"""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _unigram(specials, unk, normalizer=None, pre_tokenizer=None):
    """SentencePiece-style Unigram with '▁' (Metaspace, prepend always).

    UnigramTrainer's scores differ between runs in the last bits (parallel float
    sums), and so does the id order: scores are rounded and pieces re-sorted.
    """
    from tokenizers import Tokenizer, decoders, models, trainers
    raw = Tokenizer(models.Unigram())
    if normalizer is not None:
        raw.normalizer = normalizer
    raw.pre_tokenizer = pre_tokenizer
    raw.train_from_iterator(_corpus(), trainers.UnigramTrainer(
        vocab_size=VOCAB, special_tokens=list(specials), unk_token=unk, show_progress=False))
    pieces = [(p, s) for p, s in json.loads(raw.to_str())["model"]["vocab"] if p not in specials]
    # The trainer appends the corpus characters it did not keep, in hash order, with
    # scores min - 1e-4 * k: give that run of single characters codepoint order.
    chars = sorted(((s, p) for p, s in pieces if len(p) == 1), reverse=True)
    run = 1
    while run < len(chars) and abs(chars[-run - 1][0] - chars[-run][0] - 1e-4) < 1e-7:
        run += 1
    tail = dict(zip(sorted(p for _, p in chars[-run:]), [s for s, _ in chars[-run:]]))
    rest = sorted(((p, round(tail.get(p, s), 6)) for p, s in pieces),
                  key=lambda ps: (-ps[1], ps[0]))
    vocab = [(s, 0.0) for s in specials] + rest
    model = models.Unigram(vocab, unk_id=list(specials).index(unk), byte_fallback=False)
    return _fresh(model, specials, normalizer, pre_tokenizer,
                  decoders.Metaspace(replacement="▁", prepend_scheme="always"))


def build_tokenizer(family: str) -> Any:
    import transformers as T
    from tokenizers import Regex, normalizers, pre_tokenizers, processors

    common = dict(model_max_length=MAX_LEN)
    if family in ("bert", "bert_2labels"):
        return T.BertTokenizerFast(tokenizer_object=_wordpiece(), do_lower_case=False,
                                   strip_accents=False, **common)
    if family == "electra":
        # 4.57: ElectraTokenizerFast (saved as "ElectraTokenizer"); 5.x: alias of BertTokenizer.
        return T.ElectraTokenizerFast(tokenizer_object=_wordpiece(), do_lower_case=False,
                                      strip_accents=False, **common)
    if family == "bert_notype":
        return T.PreTrainedTokenizerFast(
            tokenizer_object=_wordpiece(), unk_token="[UNK]", pad_token="[PAD]",
            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
            model_input_names=["input_ids", "attention_mask"], **common)
    if family == "roberta":
        tok = _byte_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        tok.post_processor = processors.RobertaProcessing(
            ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")),
            trim_offsets=True, add_prefix_space=False)
        return T.RobertaTokenizerFast(tokenizer_object=tok, add_prefix_space=False, **common)
    if family == "xlm_roberta":
        # 5.x XLMRobertaTokenizer hard-codes unk_id=3 on reload: keep <unk> at id 3.
        tok = _unigram(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], "<unk>",
                       pre_tokenizer=pre_tokenizers.Sequence([
                           pre_tokenizers.WhitespaceSplit(),
                           pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]))
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", bos), ("</s>", eos)])
        return T.XLMRobertaTokenizerFast(tokenizer_object=tok, **common)
    if family == "deberta_v2":
        # DeBERTa-v3 order: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3
        tok = _unigram(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[UNK]",
                       normalizer=normalizers.Sequence([
                           normalizers.Replace(Regex(r"\s{2,}|[\n\r\t]"), " "),
                           normalizers.NFC(), normalizers.Strip(left=False, right=True)]),
                       pre_tokenizer=pre_tokenizers.Sequence([
                           pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]))
        _bert_template(tok)
        return T.DebertaV2TokenizerFast(tokenizer_object=tok, do_lower_case=False,
                                        split_by_punct=False, **common)
    if family == "modernbert":
        # ModernBERT ships a byte-level BPE tokenizer.json + PreTrainedTokenizerFast,
        # BERT template, no token_type_ids.
        tok = _byte_bpe(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
        _bert_template(tok)
        return T.PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
            model_input_names=["input_ids", "attention_mask"], **common)
    raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")


# -------------------------------------------------------------------- models ----

def build_model(family: str, tokenizer: Any, seed: int = 0) -> Any:
    import torch
    import transformers as T

    torch.manual_seed(seed)
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    num_labels = 2 if family == "bert_2labels" else 1
    if family in ("bert", "bert_notype", "bert_2labels"):
        config = T.BertConfig(**TINY, **ids, max_position_embeddings=MAX_LEN,
                              type_vocab_size=2, num_labels=num_labels)
    elif family in ("roberta", "xlm_roberta"):
        # Positions start at pad_token_id + 1, so a MAX_LEN input needs MAX_LEN + 2 rows.
        cls = T.RobertaConfig if family == "roberta" else T.XLMRobertaConfig
        config = cls(**TINY, **ids, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id,
                     max_position_embeddings=MAX_LEN + tokenizer.pad_token_id + 1,
                     type_vocab_size=1, num_labels=num_labels)
    elif family == "deberta_v2":
        # DeBERTa-v3-like attention. type_vocab_size: 0 (as in real v3) ignores token
        # type ids; 2 makes them matter.
        config = T.DebertaV2Config(**TINY, **ids, max_position_embeddings=MAX_LEN,
                                   type_vocab_size=2, relative_attention=True,
                                   position_buckets=32, max_relative_positions=-1,
                                   pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm",
                                   share_att_key=True, position_biased_input=False,
                                   num_labels=num_labels)
    elif family == "electra":
        config = T.ElectraConfig(**TINY, **ids, embedding_size=32,
                                 max_position_embeddings=MAX_LEN, type_vocab_size=2,
                                 num_labels=num_labels)
    elif family == "modernbert":
        # Defaults for pad/bos/eos/cls/sep ids are 5028x: out of range for a tiny vocab.
        config = T.ModernBertConfig(**TINY, **ids, bos_token_id=tokenizer.cls_token_id,
                                    eos_token_id=tokenizer.sep_token_id,
                                    cls_token_id=tokenizer.cls_token_id,
                                    sep_token_id=tokenizer.sep_token_id,
                                    max_position_embeddings=MAX_LEN, local_attention=64,
                                    global_attn_every_n_layers=2, num_labels=num_labels)
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    model = T.AutoModelForSequenceClassification.from_config(config).eval()
    # With the default initializer_range (0.02) logits barely move between inputs
    # (std ~1e-3): TINY uses 0.2. Biases are drawn too (BERT-style init zeroes them).
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    return model


def save_tokenizer(tokenizer: Any, path: str) -> None:
    """save_pretrained, readable by 4.57 and 5.x alike.

    5.x writes "tokenizer_class": "TokenizersBackend" for a PreTrainedTokenizerFast
    (an alias there), which 4.57's AutoTokenizer rejects ("Tokenizer class
    TokenizersBackend does not exist"); "PreTrainedTokenizerFast" loads in both.
    """
    tokenizer.save_pretrained(path)
    cfg_path = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_family_model(family: str, path: str, seed: int = 0) -> str:
    """Write tokenizer + random-weight model for `family` to `path`; return path."""
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family)
    save_tokenizer(tokenizer, str(target))
    build_model(family, tokenizer, seed).save_pretrained(str(target), safe_serialization=True)
    return str(target)
