"""Tiny model and sample data makers shared by tests, the demo and benchmarks.

`make_tiny_model` builds a model with R*'s exact architecture (BERT, 4 layers,
hidden 512, 8 heads, FFN 2048, vocab 28,996, 512 positions, one logit) with
random weights and a cased WordPiece tokenizer trained locally, so everything
runs without the Hugging Face hub. Its scores are meaningless but deterministic.
"""

from __future__ import annotations

import logging
import os
import random
import re
from pathlib import Path
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

R_STAR_ARCHITECTURE = dict(
    vocab_size=28996,
    hidden_size=512,
    num_hidden_layers=4,
    num_attention_heads=8,
    intermediate_size=2048,
    max_position_embeddings=512,
    type_vocab_size=2,
    hidden_act="gelu",
    num_labels=1,
)

# The feed benchmark's model: R*'s tokenizer and vocabulary on a one-layer BERT so
# small that scoring costs almost nothing, and the host side (read, tokenize,
# ship, write, rank) is what a run times.
MICRO_ARCHITECTURE = {**R_STAR_ARCHITECTURE, "hidden_size": 64, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "intermediate_size": 128}

_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# A small English-like lexicon with some accented, CJK and emoji words, so the
# tokenizer and the tests see non-ASCII text.
_COMMON = (
    "the of and to in is was for on that with as by at from it an be this are or which "
    "has had not but were its also they their have been one two first new more after "
    "most other some time into used can than only over such years during between many "
    "where when these both under while may about through each because however"
).split()
_TOPICS = (
    "river bridge engine protein galaxy violin harbour glacier vaccine turbine novel "
    "market cathedral volcano algorithm satellite orchard reactor museum senate "
    "canal telescope enzyme railway festival parliament desert island fossil comet "
    "battery language molecule kingdom climate highway treaty opera stadium tribe "
    "library Paris Einstein Amazon Tokyo Nile Beethoven Marie Curie Sahara Himalaya "
    "café naïve résumé Zürich São Paulo Kraków 東京 北京 数据 検索 음악 😀 🚀 ✨"
).split()
_FILLER = (
    "system history population water energy process structure region century "
    "government company research species music theory city country family school "
    "building science war public form field period area design power control study"
).split()


def _sentence(rng: random.Random, n_words: int, topic: list[str]) -> str:
    words = []
    for _ in range(n_words):
        r = rng.random()
        pool = topic if r < 0.25 else _FILLER if r < 0.55 else _COMMON
        words.append(rng.choice(pool))
    if words:
        words[0] = words[0][:1].upper() + words[0][1:]
    return " ".join(words) + "."


def _passage_length(rng: random.Random) -> int:
    """Words in a passage: ~20-200, mean ~60, and about 1 in 100 very long."""
    if rng.random() < 0.01:
        return rng.randint(600, 1200)
    return max(20, min(200, int(rng.lognormvariate(3.95, 0.45))))


def make_candidates(num_queries: int, candidates_per_query: int,
                    seed: int = 0) -> pa.Table:
    """A synthetic candidate set with the default input columns.

    query_id is int64 and doc_id a string, so both id types are exercised; a
    `first_stage_score` column mimics the retriever's score (higher is better).
    """
    rng = random.Random(seed)
    qids, queries, dids, passages, first = [], [], [], [], []
    for q in range(num_queries):
        topic = rng.sample(_TOPICS, 4)
        query = " ".join(rng.choice(topic + _FILLER) for _ in range(rng.randint(3, 12)))
        for c in range(candidates_per_query):
            qids.append(q + 1)
            queries.append(query)
            dids.append(f"D{rng.randrange(10**8):08d}-{q}-{c}")
            passages.append(_sentence(rng, _passage_length(rng), topic))
            first.append(round(30.0 - c * 0.25 + rng.random(), 4))
    return pa.table({
        "query_id": pa.array(qids, pa.int64()),
        "query": pa.array(queries, pa.string()),
        "doc_id": pa.array(dids, pa.string()),
        "passage": pa.array(passages, pa.string()),
        "first_stage_score": pa.array(first, pa.float32()),
    })


_WORD = re.compile(r"\w+")


def make_qrels(candidates: pa.Table, seed: int = 0, relevant_per_query: int = 3) -> pa.Table:
    """Synthetic judgments for a candidate table: query_id, doc_id, relevance.

    Per query, the `relevant_per_query` candidates that share the most distinct
    words with the query are relevant: the best with relevance 2, the others 1.
    Equal overlaps are ordered by a shuffle seeded with `seed`, so the same table
    and seed always give the same judgments. Only relevant pairs are listed.
    """
    rng = random.Random(seed)
    by_query: dict = {}
    columns = (candidates[c].to_pylist() for c in ("query_id", "query", "doc_id", "passage"))
    for qid, query, did, passage in zip(*columns):
        words = set(_WORD.findall(query.lower()))
        shared = len(words & set(_WORD.findall(passage.lower())))
        by_query.setdefault(qid, []).append((shared, rng.random(), did))
    qids, dids, rels = [], [], []
    for qid, scored in by_query.items():
        for place, (_, _, did) in enumerate(sorted(scored, reverse=True)[:relevant_per_query]):
            qids.append(qid)
            dids.append(did)
            rels.append(2 if place == 0 else 1)
    return pa.table({"query_id": pa.array(qids, candidates.schema.field("query_id").type),
                     "doc_id": pa.array(dids, candidates.schema.field("doc_id").type),
                     "relevance": pa.array(rels, pa.int32())})


def write_trec_qrels(qrels: pa.Table, path: str) -> None:
    """Write judgments as TREC qrels text: `qid 0 docid relevance` per line."""
    with open(path, "w", encoding="utf-8") as out:
        for qid, did, rel in zip(*(qrels[c].to_pylist()
                                   for c in ("query_id", "doc_id", "relevance"))):
            out.write(f"{qid} 0 {did} {rel}\n")


def write_sample_data(out_dir: str, num_queries: int, candidates_per_query: int,
                      files: int = 2, seed: int = 0,
                      qrels_path: Optional[str] = None) -> list[str]:
    """Write `make_candidates(...)` as `files` Parquet parts; return their paths.

    Parts are cut by row, so a query's candidates may span two files, as they
    do in real retriever output. With `qrels_path`, also write `make_qrels(...)`
    there as TREC qrels.
    """
    table = make_candidates(num_queries, candidates_per_query, seed=seed)
    if qrels_path:
        parent = os.path.dirname(os.path.abspath(qrels_path))
        os.makedirs(parent, exist_ok=True)
        write_trec_qrels(make_qrels(table, seed=seed), qrels_path)
    os.makedirs(out_dir, exist_ok=True)
    files = max(1, min(files, table.num_rows))
    step = -(-table.num_rows // files)
    paths = []
    for i in range(files):
        path = os.path.join(out_dir, f"part-{i:05d}.parquet")
        pq.write_table(table.slice(i * step, step), path)
        paths.append(path)
    return paths


def _training_text(seed: int = 1234) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(3000):
        yield _sentence(rng, rng.randint(5, 40), rng.sample(_TOPICS, 6))
    yield " ".join(_COMMON + _TOPICS + _FILLER)
    yield "".join(chr(c) for c in range(33, 127))  # every printable ASCII character


def make_tiny_model(path: str, seed: int = 0,
                    architecture: Optional[dict] = None) -> str:
    """Write a random-weight model with R*'s architecture (or `architecture`, e.g.
    MICRO_ARCHITECTURE) and a local tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    target = Path(path)
    if (target / "config.json").exists():
        return str(target)
    target.mkdir(parents=True, exist_ok=True)

    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(
        lowercase=False, strip_accents=False, clean_text=True, handle_chinese_chars=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=R_STAR_ARCHITECTURE["vocab_size"], special_tokens=_SPECIAL_TOKENS)
    wordpiece.train_from_iterator(_training_text(), trainer)
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    # BertTokenizerFast(tokenizer_object=...): the one constructor that builds BERT's
    # tokenizer from a trained vocabulary on transformers 4.57 and 5 alike (4.57's
    # BertTokenizer wants a vocab file; 5's ignores one)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, do_lower_case=False,
                                  strip_accents=False, model_max_length=512)
    tokenizer.save_pretrained(str(target))

    torch.manual_seed(seed)
    config = BertConfig(**(architecture or R_STAR_ARCHITECTURE))
    model = BertForSequenceClassification(config).eval()
    # Random init gives near-identical logits; widen the head so scores spread out.
    # BERT's init zeroes every bias; a trained model's are not, and a forward that
    # mishandled one would go unseen, so they are drawn too.
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.1)
    model.save_pretrained(str(target), safe_serialization=True)
    log.info("wrote tiny R*-architecture model to %s", target)
    return str(target)


def default_tiny_model_dir(base: Optional[str] = None) -> str:
    """Where the demo keeps its tiny model when the user names none."""
    root = base or os.environ.get("RSTAR_BATCH_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "rstar-batch")
    return os.path.join(root, "tiny-r-star")
