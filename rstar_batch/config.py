"""The job's one typed configuration.

`RerankConfig` is the single source for the CLI flags (`cli.py` builds its
parser from these fields), the YAML keys (`from_yaml`) and the Python API.
Each field's metadata carries its help text and the option group it is shown in.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

DEFAULT_MODEL = "jaspercatapang/R-star"

Activation = Literal["auto", "sigmoid", "softmax", "none"]
Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "float16", "bfloat16"]
Quantize = Literal["none", "int8"]
BadFile = Literal["fail", "skip"]
LongPassages = Literal["truncate", "maxp", "firstp"]
TokenizerBackend = Literal["auto", "hf", "fast"]


# The fewest special tokens a pair takes ([CLS] q [SEP] p [SEP]), for the rules that
# must hold before any tokenizer is loaded. The pair budget itself is the tokenizer's
# own, learned from it (stages/pairs.PairAssembler): RoBERTa's template takes 4.
PAIR_SPECIAL_TOKENS = 3


class ConfigError(ValueError):
    """A configuration value or file a user must fix."""


@dataclass(frozen=True)
class Columns:
    """The input's column for each role, and the columns kept: made once from the config
    (`RerankConfig.columns`) for every reader and stage that maps the user's names."""

    query_id: str = "query_id"
    query: str = "query"
    doc_id: str = "doc_id"
    passage: str = "passage"
    keep: tuple[str, ...] = ()

    ROLES = ("query_id", "query", "doc_id", "passage")

    def roles(self, *names: str) -> dict[str, str]:
        """{role: the input's column} for the roles named (all four by default)."""
        return {role: getattr(self, role) for role in names or self.ROLES}


def _opt(default: Any, help: str, group: str, **extra: Any) -> Any:
    meta = {"help": help, "group": group, **extra}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RerankConfig:
    """Everything a rerank job needs; shared by the CLI, YAML files and `rerank()`."""

    # -- input / output -------------------------------------------------------------
    candidates: list[str] = _opt(
        [], "Candidate Parquet: files, folders or globs; local paths or any fsspec URI.",
        "input/output", required=True)
    corpus: Optional[str] = _opt(
        None, "Corpus Parquet (doc id and passage columns), or a tokenized corpus from "
        "tokenize-corpus: rerank joins its passages onto candidates that hold only ids; "
        "score-corpus scores all of it.", "input/output")
    queries: Optional[str] = _opt(
        None, "Queries Parquet (query id and query columns): rerank joins their texts "
        "onto candidates that hold only ids; score-corpus scores each.", "input/output")
    nested_column: Optional[str] = _opt(
        None, "Candidates nested as one row per query: the list<struct> column holding "
        "them (default: found from the schema).", "input/output")
    output: str = _opt(
        "", "Output folder (local path or URI) for the ranked Parquet files.",
        "input/output", required=True)
    overwrite: bool = _opt(
        False, "Replace an output folder that holds files this tool did not write.",
        "input/output")
    restart: bool = _opt(
        False, "Discard the progress or result of an earlier run in the output folder "
        "and start again (needed when the config or input changed).", "input/output")
    max_rejected_fraction: float = _opt(
        0.01, "Fail the job when more than this fraction of rows is rejected (a wrong "
        "column mapping must not pass as success); rejected rows are in _rejected/.",
        "input/output")
    on_bad_file: BadFile = _opt(
        "fail", "A candidates file that is not readable Parquet: fail the job, or skip "
        "it and record it in the manifest.", "input/output")
    score_cache: Optional[str] = _opt(
        None, "Score cache (local path or URI): pairs whose exact texts were scored "
        "before under the same model and scoring config reuse their score instead of "
        "being scored; the pairs this job scores are added once it succeeds. Entries of "
        "another model or config are kept apart under the same URI (docs/operations.md).",
        "input/output")
    checkpoint_rows: int = _opt(
        4096, "Pairs per checkpoint chunk: a killed job redoes at most the chunks that "
        "were in flight.", "input/output")
    commit_seconds: float = _opt(
        10.0, "Each node's commit writer commits what its replicas scored at least about "
        "this often, so a node killed without notice loses about this much scoring.",
        "input/output")
    drain_seconds: float = _opt(
        20.0, "On SIGTERM or SIGINT, wait at most this long for scored rows to be "
        "committed, then exit with code 75 (a second signal exits at once). Keep it "
        "under the grace period before SIGKILL (Kubernetes: 30 s).", "input/output")
    progress_seconds: float = _opt(
        30.0, "Log a progress line (pairs committed, pairs/s, ETA) at most this often, "
        "as commits land.", "input/output")

    # -- columns ----------------------------------------------------------------------
    query_id_column: str = _opt("query_id", "Input column holding the query id.", "columns")
    query_column: str = _opt("query", "Input column holding the query text.", "columns")
    doc_id_column: str = _opt("doc_id", "Input column holding the passage id.", "columns")
    passage_column: str = _opt("passage", "Input column holding the passage text.", "columns")
    keep_columns: list[str] = _opt(
        [], "Input columns copied unchanged to the output, after rank.", "columns")

    # -- model ------------------------------------------------------------------------
    model: str = _opt(DEFAULT_MODEL, "Hugging Face hub id or local model folder.", "model")
    revision: Optional[str] = _opt(
        None, "Hub revision (branch, tag or commit) of the model.", "model")
    trust_remote_code: bool = _opt(
        False, "Allow the model repository to run its own Python code.", "model")
    max_length: int = _opt(
        512, "Tokens per (query, passage) pair; longer pairs are cut longest-first.", "model")
    score_activation: Activation = _opt(
        "auto", "Logits to score: auto = sigmoid for one logit, softmax class 1 for two.",
        "model")
    device: Device = _opt(
        "auto", "Where replicas run: auto = cuda when the cluster has GPUs, else cpu.",
        "model")
    dtype: DType = _opt(
        "auto", "Model dtype: auto = bfloat16 on GPUs that support it, float16 on "
        "older GPUs; on CPU bfloat16 where the driver's CPU has AMX-BF16, else float32. "
        "float32 scores as plain transformers does (within 1e-5); the others drift "
        "(BENCHMARKS.md). Scores are always float32.", "model")
    quantize: Quantize = _opt(
        "none", "int8 = dynamic int8 quantization of the Linear layers (CPU replicas "
        "only; faster, scores drift: see BENCHMARKS.md).", "model")
    compile: bool = _opt(
        False, "torch.compile each replica's model (minutes of warm-up; see "
        "BENCHMARKS.md for when it pays).", "model")

    # -- long passages ----------------------------------------------------------------
    passage_max_tokens: Optional[int] = _opt(
        None, "Cut every passage to its first N tokens before pairing it (evens out "
        "lengths, which R* favours; see docs/evaluation.md).", "long passages")
    long_passages: LongPassages = _opt(
        "truncate", "A passage over --window tokens: truncate = one pair, cut "
        "longest-first at max_length; maxp = score overlapping windows, keep the best "
        "(BERT-MaxP); firstp = score its first window only.", "long passages")
    window: int = _opt(
        384, "Passage tokens per window for maxp and firstp (at most max_length - 3).",
        "long passages")
    stride: int = _opt(
        192, "Tokens from one maxp window's start to the next (at most --window).",
        "long passages")

    # -- ranking ----------------------------------------------------------------------
    top_k: Optional[int] = _opt(
        None, "Keep the best K passages per query (default: all).", "ranking")
    rank_partitions: Optional[int] = _opt(
        None, "Output files; each query lands in exactly one (default: one per ~2M pairs).",
        "ranking")

    # -- scaling ----------------------------------------------------------------------
    min_replicas: int = _opt(1, "Smallest number of model replicas.", "scaling")
    max_replicas: Optional[int] = _opt(
        None, "Largest number of model replicas (default: one per GPU; on CPU, as many "
        "as the nodes' CPUs hold).", "scaling")
    gpus_per_replica: float = _opt(
        1.0, "GPUs each replica reserves (a fraction packs several per GPU).", "scaling")
    cpus_per_replica: Optional[float] = _opt(
        None, "Logical CPUs each replica reserves; a CPU replica runs one torch thread per "
        "CPU (default: 1 on GPU; on CPU, each node's CPUs less 2 for tokenizing and I/O, "
        "one replica a node).", "scaling")
    tokenizer_backend: TokenizerBackend = _opt(
        "auto", "What turns texts into token ids: fast = nanotoken's WordPiece (BERT-family "
        "tokenizers, R*'s included; tens of times the Hugging Face tokenizer's rate), "
        "checked against the Hugging Face tokenizer in every process; hf = the Hugging "
        "Face tokenizer; auto = fast where it loads and checks out, else hf. The ids, and "
        "so the scores, are the same.", "scaling")
    tokenize_workers: Optional[int] = _opt(
        None, "Largest number of CPU tokenizer actors; the pool grows to it while blocks "
        "queue (default: the cluster's CPUs the replicas leave, up to 16 per GPU replica "
        "or 2 per CPU replica).",
        "scaling")
    batch_tokens: Optional[int] = _opt(
        None, "Token budget of one forward pass, rows x longest row (default: 4096 on "
        "CPU for models 512 wide and up, measured fastest there, and 512/width times "
        "that for narrower ones; 16384 on GPU).", "scaling")
    max_batch_pairs: int = _opt(256, "Most pairs in one forward pass.", "scaling")
    replica_batch_rows: Optional[int] = _opt(
        None, "Rows handed to a replica per call; it length-sorts within them (default: "
        "2048 on CPU; 32768 on GPU, where a call takes a fraction of a second and "
        "Ray's cost per block would show).", "scaling")
    batch_retries: int = _opt(
        2, "Times a replica retries a batch whose scoring raised before the job fails.",
        "scaling")

    # -- cluster ----------------------------------------------------------------------
    address: Optional[str] = _opt(
        None, "Ray cluster to join (auto, ray://host:port). Default: the submitting "
        "job's cluster under `ray job submit`, else a local Ray started in-process.",
        "cluster")

    def __post_init__(self) -> None:
        if isinstance(self.candidates, str):
            self.candidates = [self.candidates]
        self.candidates = [str(c) for c in self.candidates]
        self.keep_columns = list(self.keep_columns)
        _check_literals(self)
        _check_positive(self, "max_length", "max_batch_pairs", "min_replicas",
                        "checkpoint_rows", "window", "stride")
        if isinstance(self.batch_retries, bool) or not isinstance(self.batch_retries, int) \
                or self.batch_retries < 0:
            raise ConfigError(f"batch_retries must be 0 or more, got {self.batch_retries!r}")
        for name in ("commit_seconds", "drain_seconds", "progress_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name} must be a number of seconds above 0, got {value!r}")
        _check_positive(self, "top_k", "rank_partitions", "max_replicas",
                        "batch_tokens", "passage_max_tokens", "tokenize_workers",
                        "replica_batch_rows", optional=True)
        most = self.max_length - PAIR_SPECIAL_TOKENS
        if self.long_passages != "truncate" and self.window > most:
            raise ConfigError(f"window ({self.window}) must leave room for the query in "
                              f"max_length ({self.max_length}): at most {most}")
        if self.stride > self.window:
            raise ConfigError(f"stride ({self.stride}) above window ({self.window}) would "
                              "skip passage tokens")
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"max_replicas ({self.max_replicas}) is below min_replicas "
                f"({self.min_replicas})")
        if self.quantize == "int8" and (self.device == "cuda"
                                        or self.dtype in ("float16", "bfloat16")):
            raise ConfigError("quantize int8 is for float32 CPU replicas: drop --device cuda "
                              f"and --dtype {self.dtype} (GPUs get their speed from --dtype)")
        if not 0.0 <= self.max_rejected_fraction <= 1.0:
            raise ConfigError("max_rejected_fraction must be between 0 and 1, got "
                              f"{self.max_rejected_fraction}")
        if not 0 < self.gpus_per_replica <= 8:
            raise ConfigError(f"gpus_per_replica must be in (0, 8], got {self.gpus_per_replica}")
        if self.cpus_per_replica is not None and self.cpus_per_replica <= 0:
            raise ConfigError(f"cpus_per_replica must be > 0, got {self.cpus_per_replica}")
        names = [self.query_id_column, self.query_column, self.doc_id_column,
                 self.passage_column]
        if len(set(names)) != 4:
            raise ConfigError(f"the four input column names must differ, got {names}")
        clash = {"score", "rank"} & set(self.keep_columns)
        if clash:
            raise ConfigError(f"keep_columns cannot include output columns {sorted(clash)}")
        clash = {"query_id", "doc_id", self.query_id_column, self.doc_id_column} & set(
            self.keep_columns)
        if clash:
            raise ConfigError(f"keep_columns {sorted(clash)}: ids are always in the output "
                              "as query_id and doc_id")

    @property
    def columns(self) -> Columns:
        return Columns(self.query_id_column, self.query_column, self.doc_id_column,
                       self.passage_column, tuple(self.keep_columns))

    def validate_required(self) -> None:
        """Raise if a field the job cannot run without is empty."""
        if not self.candidates:
            raise ConfigError("no candidates given: set --candidates (or `candidates:` in YAML)")
        if not self.output:
            raise ConfigError("no output given: set --output (or `output:` in YAML)")

    def validate_for_corpus(self) -> None:
        """Raise unless the fields score-corpus needs are set (and candidates are not)."""
        if self.candidates:
            raise ConfigError("score-corpus scores every query against the whole corpus: "
                              "drop --candidates (rerank scores candidate sets)")
        for name in ("queries", "corpus", "output"):
            if not getattr(self, name):
                raise ConfigError(f"no {name} given: set --{name} (or `{name}:` in YAML)")
        if self.top_k is None:
            raise ConfigError("score-corpus needs --top-k: it keeps the best K passages "
                              "of the corpus per query")

    # -- construction ---------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "RerankConfig":
        """Build from a mapping; unknown keys are an error naming the closest key."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                near = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{near[0]}'?)" if near else ""
                raise ConfigError(f"{source}: unknown key '{key}'{hint}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str, overrides: Optional[dict[str, Any]] = None) -> "RerankConfig":
        """Load a YAML file; `overrides` (e.g. command-line values) win over it."""
        try:
            with open(path, encoding="utf-8") as fh:
                values = yaml.safe_load(fh) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file '{path}' does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
        values.update(overrides or {})
        return cls.from_dict(values, source=f"config file '{path}'")

    def replace(self, **changes: Any) -> "RerankConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def resolve_activation(activation: str, num_labels: int) -> str:
    """The score activation for a model with `num_labels` logits: 'auto' → sigmoid for
    one logit, softmax (class 1) for two; checked on the driver before Ray starts."""
    if activation != "auto":
        if activation == "softmax" and num_labels < 2:
            raise ConfigError("score_activation 'softmax' needs a model with two or more "
                              f"labels; this one has {num_labels}")
        return activation
    if num_labels == 1:
        return "sigmoid"
    if num_labels == 2:
        return "softmax"
    raise ConfigError(f"the model has {num_labels} labels; set score_activation explicitly")


def field_type(f: dataclasses.Field) -> tuple[Any, bool]:
    """The field's base type and whether it may be None."""
    hint = typing.get_type_hints(RerankConfig)[f.name]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _check_literals(cfg: RerankConfig) -> None:
    for f in dataclasses.fields(cfg):
        base, _ = field_type(f)
        if typing.get_origin(base) is Literal:
            allowed = typing.get_args(base)
            if getattr(cfg, f.name) not in allowed:
                raise ConfigError(
                    f"{f.name} must be one of {', '.join(allowed)}; got {getattr(cfg, f.name)!r}")


def _check_positive(cfg: RerankConfig, *names: str, optional: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
