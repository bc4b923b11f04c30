"""A replica loads plain BERT without transformers' modeling code (rstar_batch/plain_bert.py):
the same logits as transformers' own model, and anything it does not reproduce exactly
loads through transformers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from rstar_batch.model import describe_model, load_replica
from rstar_batch.plain_bert import PlainBert


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Four pairs of different lengths, right-padded, with both token types."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 20000, (4, 60), generator=gen)
    mask = torch.ones_like(ids)
    for row, length in enumerate((60, 41, 17, 5)):
        mask[row, length:] = 0
        ids[row, length:] = 0
    types = torch.zeros_like(ids)
    types[:, 12:] = 1
    return {"input_ids": ids, "attention_mask": mask * 1, "token_type_ids": types * mask}


def test_plain_bert_gives_transformers_logits(tiny_model):
    model, _, _ = load_replica(describe_model(tiny_model), "cpu", "float32")
    assert isinstance(model, PlainBert)
    reference = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, attn_implementation="eager").eval()
    with torch.inference_mode():
        for seed in range(3):
            inputs = _inputs(seed)
            ours, theirs = model(**inputs).logits, reference(**inputs).logits
            assert ours.shape == theirs.shape == (4, 1)
            assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def test_replica_start_imports_no_transformers_modeling(tiny_model):
    """What the restart time rests on: a replica's process never imports transformers'
    modeling code (5+ s of its start-up)."""
    code = (
        "import pickle, sys\n"
        "from rstar_batch.stages.score import Scorer\n"
        "scorer = Scorer(pickle.loads(sys.stdin.buffer.read()))\n"
        "assert type(scorer.model).__name__ == 'PlainBert' and scorer.cls_only\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers')))\n")
    import pickle

    out = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(
        describe_model(tiny_model)), capture_output=True, check=True, timeout=300)
    assert out.stdout.decode().strip() == "[]", out.stdout.decode()


def test_a_pytorch_bin_checkpoint_with_tf_era_names_loads_plain(tiny_model, tmp_path):
    """Older hub checkpoints ship pytorch_model.bin, some with LayerNorm gamma/beta."""
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model, folder)
    weights = os.path.join(folder, "model.safetensors")
    tensors = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
               .replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in load_file(weights).items()}
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    os.remove(weights)
    model, _, _ = load_replica(describe_model(folder), "cpu", "float32")
    assert isinstance(model, PlainBert)
    reference = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, attn_implementation="eager").eval()
    with torch.inference_mode():
        inputs = _inputs()
        assert torch.allclose(model(**inputs).logits, reference(**inputs).logits, atol=1e-5,
                              rtol=0)


@pytest.mark.parametrize("change", ["extra tensor", "gelu_new", "relative positions"])
def test_what_plain_bert_does_not_reproduce_loads_through_transformers(
        tiny_model, tmp_path, change):
    folder = str(tmp_path / "model")
    shutil.copytree(tiny_model, folder)
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    if change == "extra tensor":
        weights = os.path.join(folder, "model.safetensors")
        tensors = load_file(weights)
        tensors["bert.encoder.layer.0.attention.self.distance_embedding.weight"] = \
            torch.zeros(3, 512)
        save_file(tensors, weights, metadata={"format": "pt"})
    elif change == "gelu_new":
        config["hidden_act"] = "gelu_new"
    else:
        config["position_embedding_type"] = "relative_key"
    json.dump(config, open(config_path, "w"))
    model, _, _ = load_replica(describe_model(folder), "cpu", "float32")
    assert not isinstance(model, PlainBert)
    assert type(model).__name__ == "BertForSequenceClassification"


def test_int8_quantization_applies_to_plain_bert(tiny_model):
    model, _, _ = load_replica(describe_model(tiny_model), "cpu", "float32", quantize="int8")
    assert isinstance(model, PlainBert)
    query = model.bert.encoder.layer[0].attention.self.query
    assert "quantized" in type(query).__module__
