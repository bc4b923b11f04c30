"""BERT's sequence classifier in plain torch, loaded straight from its safetensors.

A replica that loads R* through transformers spends most of its start-up importing
transformers' modeling code (`BertForSequenceClassification` pulls
torch.distributed.tensor, torch._dynamo and scipy: 5.2 s on an idle 2-core machine,
more while the node's other actors start), which is most of what a restarted job
waits for before its first commit. Inference needs none of it: this module rebuilds
the same layers under the same parameter names, so the checkpoint's tensors load
one to one and everything that works on the transformers model (bert_cls.py's
[CLS]-only forward, int8 dynamic quantization, torch.compile) works unchanged.

Only what is proven equal is taken (tests/test_plain_bert.py compares it with
transformers' forward): `BertForSequenceClassification` with absolute positions,
exact GELU, no remote code, one `model.safetensors` (or `pytorch_model.bin`) whose
tensors are exactly this module's. Anything else returns None and loads through
transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from types import SimpleNamespace
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: the weight files read, in transformers' order of preference (sharded ones are not)
WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: tensors some checkpoints carry that are not weights (transformers rebuilds them)
NOT_WEIGHTS = {"bert.embeddings.position_ids"}


def load_plain_bert(info: Any, dtype: Any, trust_remote_code: bool = False) -> Optional[nn.Module]:
    """The model of `info` (a model.ModelInfo) as a `PlainBert` in `dtype`, or None when
    it is not a checkpoint this module reproduces exactly."""
    if trust_remote_code:
        return None
    config_path = _model_file(info, "config.json")
    if config_path is None:
        return None
    with open(config_path) as f:
        config = _config(json.load(f), info.num_labels)
    why = _unsupported(config)
    if why:
        log.info("model '%s' loads through transformers: %s", info.source, why)
        return None
    tensors = _read_weights(info)
    if tensors is None:
        log.info("model '%s' loads through transformers: none of %s", info.source,
                 ", ".join(WEIGHTS))
        return None
    with _without_init():  # every tensor comes from the checkpoint
        model = PlainBert(config)
    expected = model.state_dict()
    if set(tensors) != set(expected) or any(
            tensors[k].shape != expected[k].shape for k in expected):
        log.info("model '%s' loads through transformers: its tensors are not plain BERT's",
                 info.source)
        return None
    model.load_state_dict(tensors, assign=True)
    return model.to(dtype).eval()


@contextlib.contextmanager
def _without_init() -> Iterator[None]:
    """Build modules with uninitialised tensors (torch.empty), not random ones.

    Building on the meta device skips the init too, but torch runs a meta tensor's init
    through torch._refs, whose first use imports torch._dynamo: 0.9-1.3 s of CPU in
    every replica's start. Our modules only (this process builds no other meanwhile)."""
    kinds = (nn.Linear, nn.Embedding, nn.LayerNorm)
    saved = [kind.reset_parameters for kind in kinds]
    for kind in kinds:
        kind.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for kind, reset in zip(kinds, saved):
            kind.reset_parameters = reset  # type: ignore[method-assign]


def _read_weights(info: Any) -> Optional[dict[str, torch.Tensor]]:
    """The checkpoint's tensors by name, with TF-era LayerNorm names (gamma, beta) read
    as transformers reads them; None when it has no single weight file."""
    for name in WEIGHTS:
        path = _model_file(info, name)
        if path is None:
            continue
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:  # tensors only: weights_only refuses pickled code
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        return {_current_name(k): v for k, v in tensors.items() if k not in NOT_WEIGHTS}
    return None


def _current_name(key: str) -> str:
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if key.endswith(old):
            return key[:-len(old)] + new
    return key


def _model_file(info: Any, name: str) -> Optional[str]:
    """A file of the model: from its folder, or the hub's cache at the driver's commit."""
    if os.path.isdir(info.source):
        path = os.path.join(info.source, name)
        return path if os.path.isfile(path) else None
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(info.source, name, revision=info.revision)
    except Exception as err:  # not on the hub under that name: transformers decides
        log.debug("model '%s': no %s (%s)", info.source, name, err)
        return None


def _config(raw: dict, num_labels: int) -> SimpleNamespace:
    """The config's fields, with transformers' BertConfig defaults where one is absent
    and the labels the driver counted (model.describe_model)."""
    defaults = dict(type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu",
                    position_embedding_type="absolute", is_decoder=False, pad_token_id=0,
                    classifier_dropout=None, hidden_dropout_prob=0.1, architectures=None)
    return SimpleNamespace(**{**defaults, **raw, "num_labels": num_labels})


def _unsupported(config: SimpleNamespace) -> Optional[str]:
    if getattr(config, "auto_map", None):
        return "it ships its own code"
    if config.model_type != "bert" or config.architectures != ["BertForSequenceClassification"]:
        return f"{config.architectures or config.model_type} is not BertForSequenceClassification"
    if config.position_embedding_type != "absolute" or config.is_decoder \
            or getattr(config, "add_cross_attention", False):
        return "not absolute positions in an encoder"
    if config.hidden_act != "gelu":
        return f"activation {config.hidden_act!r}"
    return None


class PlainBert(nn.Module):
    """transformers' BertForSequenceClassification for inference, same parameter names."""

    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.config = config
        self.bert = _Bert(config)
        self.dropout = nn.Dropout(config.classifier_dropout or config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    @property
    def dtype(self) -> torch.dtype:
        return self.classifier.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.classifier.weight.device

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None) -> SimpleNamespace:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        x = self.bert.embeddings(input_ids, token_type_ids)
        keep = attention_mask[:, None, None, :].bool()
        for layer in self.bert.encoder.layer:
            x = layer(x, keep)
        pooled = self.bert.pooler(x)
        return SimpleNamespace(logits=self.classifier(self.dropout(pooled)))


class _Bert(nn.Module):
    def __init__(self, config: SimpleNamespace) -> None:
        super().__init__()
        self.embeddings = _Embeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(_Layer(config)
                                           for _ in range(config.num_hidden_layers))
        self.pooler = _Pooler(config)


class _Embeddings(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor,
                token_type_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = self.position_embeddings.weight[:input_ids.shape[1]]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x + positions))


class _SelfAttention(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        batch, tokens, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, self.heads, hidden // self.heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=keep)
        return context.transpose(1, 2).reshape(batch, tokens, hidden)


class _DenseNorm(nn.Module):
    """dense(x), dropout, plus the residual, then LayerNorm (BertSelfOutput, BertOutput)."""

    def __init__(self, c: SimpleNamespace, inner: int) -> None:
        super().__init__()
        self.dense = nn.Linear(inner, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class _Gelu(nn.Module):
    """Exact (erf) GELU; `act` is what bert_cls.py checks before running it in place."""
    act = staticmethod(F.gelu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)


class _Layer(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.attention = nn.Module()
        self.attention.self = _SelfAttention(c)
        self.attention.output = _DenseNorm(c, c.hidden_size)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.intermediate.intermediate_act_fn = _Gelu()
        self.output = _DenseNorm(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        a = self.attention.output(self.attention.self(x, keep), x)
        inner = self.intermediate.intermediate_act_fn(self.intermediate.dense(a))
        return self.output(inner, a)


class _Pooler(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x[:, 0]))
