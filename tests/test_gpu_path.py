"""The GPU path, checked on CPU: placement, dtype choice and the CUDA-only branches."""

from __future__ import annotations

import pytest
import torch

from rstar_batch.cluster import Node
from rstar_batch.config import ConfigError, RerankConfig
from rstar_batch.model import resolve_device, resolve_dtype
from rstar_batch.replicas import plan_replicas


def _config(**kw) -> RerankConfig:
    return RerankConfig(candidates=["x"], output="o", **kw)


def test_replicas_go_one_per_gpu_when_the_cluster_has_gpus():
    plan = plan_replicas(_config(), [Node(cpus=64.0, gpus=4.0)])
    assert (plan.device, plan.num_gpus, plan.min_size, plan.max_size) == ("cuda", 1.0, 1, 4)


def test_fractional_gpus_pack_several_replicas_per_gpu():
    plan = plan_replicas(_config(gpus_per_replica=0.5), [Node(gpus=2.0)])
    assert (plan.num_gpus, plan.max_size) == (0.5, 4)


def test_asking_for_cuda_on_an_autoscaling_cluster_without_gpus_yet():
    plan = plan_replicas(_config(device="cuda", min_replicas=2, max_replicas=4), [Node(cpus=4.0)])
    assert (plan.device, plan.num_gpus, plan.min_size, plan.max_size) == ("cuda", 1.0, 2, 4)


@pytest.mark.parametrize("bf16,expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_is_bf16_where_supported_else_fp16_on_gpu(monkeypatch, bf16, expected):
    from rstar_batch import model

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    monkeypatch.setattr(model, "cpu_flags", lambda: {"avx512f"})
    assert resolve_dtype("auto", "cuda") is expected
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(model, "cpu_flags", lambda: {"amx_bf16"})
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    assert resolve_dtype("float16", "cuda") is torch.float16


def test_cuda_without_a_visible_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="sees no GPU"):
        resolve_device("cuda")


def test_int8_quantization_is_refused_off_cpu(tiny_model, monkeypatch):
    from rstar_batch.model import describe_model, load_replica

    with pytest.raises(ValueError, match="CPU replicas"):
        load_replica(describe_model(tiny_model), "cpu", "bfloat16", quantize="int8")
    monkeypatch.setattr("rstar_batch.model.resolve_device", lambda device: "cuda")
    with pytest.raises(ValueError, match="CPU replicas"):
        load_replica(describe_model(tiny_model), "cuda", "float32", quantize="int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_cls_only_last_layer_is_as_close_to_float32_as_the_models_forward(tiny_model, dtype):
    """GPUs run bf16/fp16; the same dtypes on CPU (emulated, slow, so 60 rows). Both
    forwards round differently, so each is held to float32, not to the other."""
    import numpy as np

    from rstar_batch import Columns
    from rstar_batch.base import columns as C
    from rstar_batch.model import describe_model
    from rstar_batch.stages.normalize import Normalize
    from rstar_batch.stages.score import Scorer
    from rstar_batch.stages.tokenize import Tokenize
    from rstar_batch.testing import make_candidates

    info = describe_model(tiny_model)
    tokens = Tokenize(info, max_length=512)(Normalize(Columns(), 1)(
        make_candidates(3, 20, seed=5)))
    ids, types = (tokens[C.INPUT_IDS].combine_chunks(), tokens[C.TOKEN_TYPE_IDS].combine_chunks())
    reference = Scorer(info, dtype="float32", activation="none",
                       full_forward=True).score(ids, types)
    fast, full = (Scorer(info, device="cpu", dtype=dtype, activation="none", full_forward=own)
                  for own in (False, True))
    assert fast.cls_only and fast.model.dtype == getattr(torch, dtype)
    fast_error = np.abs(fast.score(ids, types) - reference)
    full_error = np.abs(full.score(ids, types) - reference)
    assert full_error.max() > 0  # the dtype really rounds
    assert fast_error.max() <= 1.5 * full_error.max()
    assert fast_error.mean() <= 1.5 * full_error.mean()


def test_tokenizer_pool_feeds_gpu_replicas_with_the_cpus_they_leave():
    # 1 GPU, 16 CPUs (the H100 machine): 16 - 1 for the replica - 1 for reads/writes
    assert plan_replicas(_config(), [Node(cpus=16.0, gpus=1.0)]).tokenizers == 14
    # many CPUs: at most 16 per GPU replica
    assert plan_replicas(_config(), [Node(cpus=200.0, gpus=2.0)]).tokenizers == 32
    # a GPU cluster scaling from zero has no CPUs yet: still two
    assert plan_replicas(_config(device="cuda"), [Node(cpus=0.0)]).tokenizers == 2
    # an explicit setting wins
    assert plan_replicas(_config(tokenize_workers=3), [Node(cpus=16.0, gpus=1.0)]).tokenizers == 3


def test_replica_calls_are_larger_on_gpus_unless_set():
    # a GPU scores a large block in a fraction of a second; Ray's cost per block
    # would otherwise show (benchmarks/feed.py)
    assert plan_replicas(_config(), [Node(cpus=16.0, gpus=1.0)]).batch_rows == 32768
    assert plan_replicas(_config(), [Node(cpus=8.0)]).batch_rows == 2048
    assert plan_replicas(_config(replica_batch_rows=500), [Node(gpus=1.0)]).batch_rows == 500
    with pytest.raises(ConfigError, match="replica_batch_rows"):
        _config(replica_batch_rows=0)


def test_dtype_auto_on_cpu_is_bfloat16_only_where_amx_makes_it_pay(monkeypatch):
    from rstar_batch import model

    assert model.auto_cpu_dtype({"avx512f", "amx_bf16", "amx_tile"})[0] == "bfloat16"
    # AVX-512 BF16 without AMX scored bfloat16 slower than float32 (BENCHMARKS.md)
    assert model.auto_cpu_dtype({"avx512f", "avx512_bf16"})[0] == "float32"
    assert model.auto_cpu_dtype(set())[0] == "float32"
    monkeypatch.setattr(model, "cpu_flags", lambda: {"amx_bf16"})
    plan = plan_replicas(_config(), [Node(cpus=8.0)])
    assert (plan.dtype, "AMX" in plan.dtype_reason) == ("bfloat16", True)
    # asked for, quantized, or on GPUs (each GPU replica picks bf16 or fp16)
    assert plan_replicas(_config(dtype="float32"), [Node(cpus=8.0)]).dtype == "float32"
    assert plan_replicas(_config(quantize="int8"), [Node(cpus=8.0)]).dtype == "float32"
    assert plan_replicas(_config(), [Node(cpus=8.0, gpus=1.0)]).dtype == "auto"
    monkeypatch.setattr(model, "cpu_flags", lambda: {"avx512_bf16"})
    assert plan_replicas(_config(), [Node(cpus=8.0)]).dtype == "float32"


def test_int8_with_a_half_dtype_or_on_gpus_is_refused_before_anything_runs():
    for bad in (dict(dtype="bfloat16"), dict(dtype="float16"), dict(device="cuda")):
        with pytest.raises(ConfigError, match="int8"):
            _config(quantize="int8", **bad)
