"""Loading a model replica: hub id or folder, dtype, device. Nothing else.

`describe_model` runs once on the driver, before any data moves, so a model
that cannot be had fails the job in seconds with a one-line message instead of
inside every replica. `load_replica` and `load_tokenizer` run in the actors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urlparse

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


class ModelUnavailableError(RuntimeError):
    """The model cannot be loaded from where the user pointed."""


@dataclass(frozen=True)
class ModelInfo:
    """What the driver learned about the model, recorded in the manifest."""

    source: str            # hub id or absolute local folder
    revision: Optional[str]  # hub commit, or None for a folder
    fingerprint: str       # hub commit sha, or sha256 of the folder's files
    num_labels: int
    architecture: str


def is_local(spec: str) -> bool:
    return os.path.isdir(os.path.expanduser(spec))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or os.sep == "\\"


def _hub_reachable(timeout: float = 5.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _offline_hint(spec: str) -> str:
    return (f"cannot reach the Hugging Face hub to fetch model '{spec}' and it is not in "
            "the local cache; pass a local model folder instead: --model /path/to/model "
            "(for an offline smoke run: rstar-batch make-tiny-model DIR)")


def _folder_fingerprint(folder: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        digest.update(name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def describe_model(spec: str, revision: Optional[str] = None,
                   trust_remote_code: bool = False) -> ModelInfo:
    """Check the model can be had and read its config; raise one clear line if not."""
    from transformers import AutoConfig

    if is_local(spec):
        folder = os.path.abspath(os.path.expanduser(spec))
        if not os.path.exists(os.path.join(folder, "config.json")):
            raise ModelUnavailableError(
                f"model folder '{folder}' has no config.json; is it a saved transformers model?")
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        return ModelInfo(folder, None, _folder_fingerprint(folder), config.num_labels,
                         config.model_type)
    if _looks_like_path(spec):
        raise ModelUnavailableError(f"model folder '{spec}' does not exist")

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    local_only = offline or not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(
            spec, revision=revision, trust_remote_code=trust_remote_code,
            local_files_only=local_only)
    except OSError as exc:
        if local_only:
            raise ModelUnavailableError(_offline_hint(spec)) from None
        raise ModelUnavailableError(f"cannot load model '{spec}' from the hub: {exc}") from None
    commit = getattr(config, "_commit_hash", None) or revision
    return ModelInfo(spec, commit, f"hub:{commit}", config.num_labels, config.model_type)


def resolve_device(device: str) -> str:
    """'auto' → cuda when this process sees a GPU, else cpu."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but this worker sees no GPU")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """'auto' → bfloat16 on GPUs that support it, float16 on older GPUs; on CPU
    bfloat16 where this CPU has AMX-BF16, else float32 (`auto_cpu_dtype`)."""
    import torch

    if dtype == "auto":
        if device != "cuda":
            return getattr(torch, auto_cpu_dtype()[0])
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, _DTYPES[dtype])


# CPU flags (Linux /proc/cpuinfo) of units where bfloat16 scoring beats float32, so
# that --dtype auto picks it for CPU replicas: AMX tiles (R*'s architecture: 2.1x
# float32, issue 14's table). AVX-512 BF16 alone is not enough: on such a CPU without
# AMX our scorer ran bfloat16 at 0.6x float32 (BENCHMARKS.md, 2026-12-01).
NATIVE_BF16 = {"amx_bf16": "AMX-BF16"}


def cpu_flags() -> set[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo is not (then: float32)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def auto_cpu_dtype(flags: Optional[set[str]] = None) -> tuple[str, str]:
    """What --dtype auto means for CPU replicas on this CPU: (dtype, why)."""
    flags = cpu_flags() if flags is None else flags
    for flag, unit in NATIVE_BF16.items():
        if flag in flags:
            return "bfloat16", f"the CPU multiplies bfloat16 in {unit} tiles ({flag})"
    return "float32", "the CPU has no AMX-BF16 (amx_bf16), where bfloat16 would pay"


def load_tokenizer(info: ModelInfo, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    # Replicas load the exact commit the driver resolved, so a push to the hub in
    # the middle of a job cannot mix two model versions in one output.
    tokenizer = AutoTokenizer.from_pretrained(
        info.source, revision=info.revision, trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "is_fast", False):
        log.warning("model '%s' has no fast tokenizer; tokenization will be slow", info.source)
    return tokenizer


def sleep_idle_threads() -> None:
    """Let this process's OpenMP threads sleep, not spin, between parallel regions.

    A replica shares its node's cores with tokenizer actors, reads and writes;
    with OpenMP's default spin-waiting its idle threads took a whole core from them
    (a one-layer model's replica: 1.0 core spinning, 0.3 core with PASSIVE; see
    BENCHMARKS.md). Large passes lose nothing: a wake-up costs microseconds. Only
    takes effect before torch is first imported in the process (replicas run in
    their own actor processes), and a value the user set stands.
    """
    import sys

    if "torch" in sys.modules:
        log.debug("torch already imported; OMP_WAIT_POLICY left as it is")
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_replica(info: ModelInfo, device: str, dtype: str, trust_remote_code: bool = False,
                 quantize: str = "none", compile: bool = False,
                 transformers_modeling: bool = False) -> tuple[Any, Any, Any]:
    """Load the model once for a replica: (model in eval mode, torch device, dtype).

    A plain BERT classifier loads as plain_bert.PlainBert, which spares the replica
    transformers' modeling imports (most of its start-up); any other model, or
    `transformers_modeling`, loads through transformers."""
    import torch

    from rstar_batch.plain_bert import PlainBert, load_plain_bert

    device_name = resolve_device(device)
    torch_dtype = resolve_dtype("float32" if quantize == "int8" and dtype == "auto" else dtype,
                                device_name)
    if quantize == "int8" and (device_name != "cpu" or torch_dtype != torch.float32):
        raise ValueError("quantize int8 is for float32 CPU replicas; use --device cpu "
                         "--dtype float32 (GPUs get their speed from --dtype instead)")
    model = None if transformers_modeling else load_plain_bert(info, torch_dtype,
                                                                trust_remote_code)
    if model is None:
        model = _load_with_transformers(info, torch_dtype, trust_remote_code)
    torch_device = torch.device(device_name)
    model = model.to(torch_device).eval()
    if quantize == "int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                       dtype=torch.qint8)
    if compile:
        model = torch.compile(model, dynamic=True)
    log.info("loaded %s on %s as %s%s%s%s", info.source, torch_device, torch_dtype,
             " (int8 Linear)" if quantize == "int8" else "", " (compiled)" if compile else "",
             " (plain BERT)" if isinstance(model, PlainBert) else "")
    return model, torch_device, torch_dtype


def _load_with_transformers(info: ModelInfo, torch_dtype: Any, trust_remote_code: bool) -> Any:
    from transformers import AutoModelForSequenceClassification

    kwargs = dict(revision=info.revision, trust_remote_code=trust_remote_code, dtype=torch_dtype)
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            info.source, attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):
        log.info("model '%s' has no SDPA attention; using its default", info.source)
        return AutoModelForSequenceClassification.from_pretrained(info.source, **kwargs)
