"""A BERT cross-encoder forward that computes only what the score needs.

The classifier reads the last layer's [CLS] vector alone, yet a plain forward
computes every token's output in that layer. Here the last layer runs for [CLS]
only: its query, attention output and feed-forward for one row, and no keys or
values at all. Softmax ignores the bias of the keys, and the values' projection
commutes with the attention-weighted sum, so [CLS] attends to the layer's input
through the folded query Wkᵀq and projects the weighted sum of inputs once
(`ClsOnlyBert._cls_layer`). For R*'s 4 layers that skips about a quarter of the
model's work, with the same sums in another order (float rounding apart).
Weights are the loaded model's own modules, so dtype, device and torch.compile
apply unchanged. Int8-quantized keys and values hold packed weights, which cannot
be folded; with them the last layer projects every token's keys and values
(`_cls_layer_projected`) and the rest is the same, with int8's dynamic activation
scales then taken from the [CLS] rows alone (a different approximation of float32,
whose drift BENCHMARKS.md measures like the default's). Only
`BertForSequenceClassification` with absolute positions is taken; any other model
keeps its own forward.

On CPU in float32, where the matrix products already run at the machine's peak,
the rest of the time goes to memory: each residual is summed into its product's
output, the query/key/value and feed-forward products are written into buffers
kept from pass to pass, and GELU runs in place (+3% and +7% measured in-process).
"""

from __future__ import annotations

from typing import Any, Callable, Optional


def cls_only_forward(model: Any, reuse_buffers: bool = False) -> Optional[Callable[..., Any]]:
    """A logits function for `model`, or None when the model is not plain BERT.
    `reuse_buffers` (CPU float32, not under torch.compile) writes the largest
    products into buffers kept from pass to pass.

    Chosen by the model's config, where the rewrite is proven (BERT's sequence
    classifier with absolute positions: tests/test_stages.py); every other
    architecture (RoBERTa, DeBERTa, ELECTRA, ModernBERT, ...) runs its own forward.
    """
    config = model.config
    architectures = getattr(config, "architectures", None) or ["BertForSequenceClassification"]
    if config.model_type != "bert" or architectures != ["BertForSequenceClassification"] \
            or config.is_decoder or not all(hasattr(model, a) for a in ("bert", "classifier")) \
            or getattr(config, "position_embedding_type", "absolute") != "absolute":
        return None
    return ClsOnlyBert(model, reuse_buffers)


class ClsOnlyBert:
    """Callable: (input_ids, attention_mask, token_type_ids) → logits."""

    def __init__(self, model: Any, reuse_buffers: bool = False) -> None:
        import torch
        import torch.nn.functional as F

        self.torch = torch
        self.model = model
        self.heads = model.config.num_attention_heads
        self.attention = F.scaled_dot_product_attention
        # CPU float32 only: every fresh tensor of a pass is tens of MB that the
        # allocator maps anew and the kernel first-touches page by page
        self.buffers: Optional[dict[str, Any]] = {} if reuse_buffers else None

    def __call__(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        bert = self.model.bert
        x = self._embed(bert.embeddings, input_ids, token_type_ids)
        keep = attention_mask[:, None, None, :].bool()        # (batch, 1, 1, tokens)
        *layers, last = bert.encoder.layer
        for layer in layers:
            x = self._layer(layer, x, keep)
        x = self._cls_layer(last, x, keep)
        pooled = bert.pooler.activation(bert.pooler.dense(x))
        return self.model.classifier(self.model.dropout(pooled))

    def _embed(self, embeddings: Any, input_ids: Any, token_type_ids: Any) -> Any:
        """BERT's embeddings: word + position + token type, then LayerNorm.

        transformers gathers all three into full (batch, tokens, hidden) tensors and
        adds them into two more. Positions are 0..tokens-1 in every row (padding is on
        the right), so position plus type 0 is one (tokens, hidden) row broadcast onto
        the words in place, and type 1 adds its difference from type 0 where it is
        set: one full tensor instead of five, the same sum in another order.
        """
        torch = self.torch
        types = embeddings.token_type_embeddings.weight
        x = torch.nn.functional.embedding(input_ids, embeddings.word_embeddings.weight)
        x += embeddings.position_embeddings.weight[:input_ids.shape[1]] + types[0]
        if token_type_ids is not None and types.shape[0] > 1:
            if types.shape[0] == 2:
                x.addcmul_(token_type_ids.unsqueeze(-1).to(x.dtype), types[1] - types[0])
            else:
                x += torch.nn.functional.embedding(token_type_ids, types) - types[0]
        return embeddings.dropout(embeddings.LayerNorm(x))

    def _layer(self, layer: Any, x: Any, keep: Any) -> Any:
        batch, tokens, hidden = x.shape
        size = hidden // self.heads
        attn = layer.attention.self

        def heads(t: Any) -> Any:
            return t.view(batch, tokens, self.heads, size).transpose(1, 2)

        context = self.attention(heads(self._linear(attn.query, x, "query")),
                                 heads(self._linear(attn.key, x, "key")),
                                 heads(self._linear(attn.value, x, "value")), attn_mask=keep)
        context = context.transpose(1, 2).reshape(batch, tokens, hidden)
        return self._rest(layer, context, x)

    def _cls_layer(self, layer: Any, x: Any, keep: Any) -> Any:
        """The last layer for [CLS] alone: (batch, tokens, hidden) → (batch, hidden)."""
        attn = layer.attention.self
        key, value = attn.key, attn.value
        if not (isinstance(getattr(key, "weight", None), self.torch.Tensor)
                and isinstance(getattr(value, "weight", None), self.torch.Tensor)):
            return self._cls_layer_projected(layer, x, keep)  # int8: packed weights
        batch, tokens, hidden = x.shape
        size = hidden // self.heads
        cls = x[:, 0]
        query = attn.query(cls).view(batch, self.heads, size)
        # Per head h, with the [CLS] query q and token j's input x_j:
        #   q·(Wk x_j + bk) = (Wkᵀq)·x_j + q·bk, and q·bk is the same for every j, so
        #   softmax drops it: the logits are x_j·(Wkᵀq), no keys needed;
        #   Σ_j p_j (Wv x_j + bv) = Wv (Σ_j p_j x_j) + bv, as the p_j sum to 1.
        # This replaces the keys and values of every token by a few small products
        # per row; the same sums in another order (float rounding apart).
        # Logits and softmax in float32 whatever the dtype, as attention kernels keep them.
        einsum, f32 = self.torch.einsum, self.torch.float32
        folded = einsum("bhd,hdi->bhi", query.to(f32) * size ** -0.5,
                        key.weight.unflatten(0, (self.heads, size)).to(f32))
        logits = self.torch.bmm(folded, x.to(f32).transpose(1, 2))  # (batch, heads, tokens)
        weights = logits.masked_fill(~keep[:, 0], float("-inf")).softmax(-1)
        mixed = self.torch.bmm(weights.to(x.dtype), x)  # (batch, heads, hidden)
        context = einsum("bhi,hdi->bhd", mixed, value.weight.unflatten(0, (self.heads, size)))
        context = context.reshape(batch, hidden)
        if value.bias is not None:
            context = context + value.bias
        return self._rest(layer, context, cls)

    def _cls_layer_projected(self, layer: Any, x: Any, keep: Any) -> Any:
        """The last layer for [CLS] alone, with keys and values from the layer's own
        projections of every token (for modules without a plain weight tensor)."""
        batch, tokens, hidden = x.shape
        size = hidden // self.heads
        attn = layer.attention.self
        cls = x[:, :1]

        def heads(t: Any) -> Any:
            return t.view(batch, -1, self.heads, size).transpose(1, 2)

        context = self.attention(heads(attn.query(cls)), heads(attn.key(x)),
                                 heads(attn.value(x)), attn_mask=keep)
        return self._rest(layer, context.reshape(batch, hidden), x[:, 0])

    def _rest(self, layer: Any, context: Any, residual: Any) -> Any:
        """Attention output, feed-forward and their residual LayerNorms."""
        out = layer.attention.output
        a = out.LayerNorm(self._dense_plus(out.dense, context, residual))
        inner = self._linear(layer.intermediate.dense, a, "intermediate")
        act = layer.intermediate.intermediate_act_fn
        if self.buffers is not None and getattr(act, "act", None) is self.torch.nn.functional.gelu:
            inner = self.torch.ops.aten.gelu_(inner)  # transformers' exact GELU, in place
        else:
            inner = act(inner)
        return layer.output.LayerNorm(self._dense_plus(layer.output.dense, inner, a))

    def _linear(self, linear: Any, x: Any, slot: str) -> Any:
        """linear(x), written into this slot's buffer from the previous pass when
        buffers are reused (its last use is within the same layer)."""
        weight = getattr(linear, "weight", None)
        if self.buffers is None or not isinstance(weight, self.torch.Tensor) or \
                linear.bias is None:
            return linear(x)
        rows, size = x.numel() // x.shape[-1], weight.shape[0]
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < rows * size:
            buffer = self.buffers[slot] = x.new_empty(rows * size)
        out = buffer[:rows * size].view(rows, size)
        self.torch.addmm(linear.bias, x.reshape(rows, -1), weight.t(), out=out)
        return out.view(*x.shape[:-1], size)

    def _dense_plus(self, linear: Any, x: Any, residual: Any) -> Any:
        """linear(x) + residual; in float32, with the product summed into `residual`
        (which the caller is done with) instead of added in a pass of its own. On
        CPU, where linear() first copies its bias into a fresh output, that saves a
        pass over memory (+3% measured). In bf16/fp16 (GPUs, where linear() adds the
        bias inside the product anyway) it would round the sum once more: measured
        on CPU, twice the bf16 error of the model's own forward; so not there."""
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, self.torch.Tensor) or not residual.is_contiguous() \
                or residual.dtype != self.torch.float32:
            return linear(x) + residual
        flat = residual.view(-1, residual.shape[-1])
        flat.addmm_(x.reshape(-1, x.shape[-1]), weight.t())
        if linear.bias is not None:
            flat.add_(linear.bias)
        return residual
