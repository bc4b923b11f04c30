"""A BERT cross-encoder forward that computes only what the score needs.

The classifier reads the last layer's [CLS] vector alone, yet a plain forward
computes every token's output in that layer. Here the last layer computes keys
and values for all tokens (the [CLS] query attends to them) but its query,
attention output and feed-forward for [CLS] only: for R*'s 4 layers about a
fifth of the model's work, with the same arithmetic for the row that is kept.
Weights are the loaded model's own modules, so dtype, device, int8 quantization
and torch.compile apply unchanged (int8's dynamic activation scales then come from
the [CLS] rows alone in the last layer: a different approximation of float32, whose
drift BENCHMARKS.md measures like the default's). Only `BertForSequenceClassification` with
absolute positions is taken; any other model keeps its own forward.
"""

from __future__ import annotations

from typing import Any, Callable, Optional


def cls_only_forward(model: Any) -> Optional[Callable[..., Any]]:
    """A logits function for `model`, or None when the model is not plain BERT."""
    config = model.config
    if type(model).__name__ != "BertForSequenceClassification" or config.is_decoder or \
            getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    return ClsOnlyBert(model)


class ClsOnlyBert:
    """Callable: (input_ids, attention_mask, token_type_ids) → logits."""

    def __init__(self, model: Any) -> None:
        import torch.nn.functional as F

        self.model = model
        self.heads = model.config.num_attention_heads
        self.attention = F.scaled_dot_product_attention

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        bert = self.model.bert
        x = bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        keep = attention_mask[:, None, None, :].bool()        # (batch, 1, 1, tokens)
        layers = bert.encoder.layer
        for i, layer in enumerate(layers):
            x = self._layer(layer, x, keep, cls_only=i == len(layers) - 1)
        pooled = bert.pooler.activation(bert.pooler.dense(x[:, 0]))
        return self.model.classifier(self.model.dropout(pooled))

    def _layer(self, layer: Any, x: Any, keep: Any, cls_only: bool) -> Any:
        batch, tokens, hidden = x.shape
        size = hidden // self.heads
        attn = layer.attention.self
        queries = x[:, :1] if cls_only else x

        def heads(t: Any) -> Any:
            return t.view(batch, -1, self.heads, size).transpose(1, 2)

        context = self.attention(heads(attn.query(queries)), heads(attn.key(x)),
                                 heads(attn.value(x)), attn_mask=keep)
        context = context.transpose(1, 2).reshape(batch, -1, hidden)
        out = layer.attention.output
        a = out.LayerNorm(out.dense(context) + queries)
        inner = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(a))
        return layer.output.LayerNorm(layer.output.dense(inner) + a)
