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
