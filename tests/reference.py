"""The independent reference: plain transformers, one (query, passage) at a time.

Nothing from rstar_batch is used here; tests compare the job's output with it.
"""

from __future__ import annotations

import pyarrow as pa
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def reference_scores(model_dir: str, table: pa.Table, max_length: int = 512) -> dict:
    """{(query_id, doc_id): the model's relevance score} for every row, scored one pair
    at a time: sigmoid of a single logit, or class 1's softmax of two."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    scores = {}
    with torch.inference_mode():
        for row in table.select(["query_id", "query", "doc_id", "passage"]).to_pylist():
            enc = tokenizer(row["query"], row["passage"], truncation=True,
                            max_length=max_length, return_tensors="pt")
            logits = model(**enc).logits[0]
            # one logit: its sigmoid; two (not relevant, relevant): class 1's softmax
            score = torch.sigmoid(logits[0]) if len(logits) == 1 else logits.softmax(-1)[1]
            scores[(row["query_id"], row["doc_id"])] = float(score)
    return scores


def reference_window_scores(model_dir: str, query: str, passage: str, window: int,
                            stride: int, max_length: int) -> list[float]:
    """The score of each window of `passage`'s tokens (`window` long, `stride` apart,
    the last one reaching its end) paired with `query`, one pair at a time. The windows
    are the tokenizers library's own overflowing encodings, and each pair is its
    post-processor's (special tokens, token types, longest-first truncation)."""
    import copy

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_truncation()
    backend.no_padding()
    first = backend.encode(passage, add_special_tokens=False)
    query_encoding = backend.encode(query, add_special_tokens=False)
    first.truncate(window, stride=window - stride)  # overlap: a window starts every stride
    backend.enable_truncation(max_length, strategy="longest_first")
    scores = []
    with torch.inference_mode():
        for part in [first, *first.overflowing]:
            pair = backend.post_process(query_encoding, part, add_special_tokens=True)
            logits = model(input_ids=torch.tensor([pair.ids]),
                           token_type_ids=torch.tensor([pair.type_ids]),
                           attention_mask=torch.tensor([pair.attention_mask])).logits[0]
            score = torch.sigmoid(logits[0]) if len(logits) == 1 else logits.softmax(-1)[1]
            scores.append(float(score))
    return scores
