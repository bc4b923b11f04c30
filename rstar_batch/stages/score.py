"""Score: token ids → float32 relevance scores, on model-replica actors.

Rows handed to a replica are sorted by token count (longest first, so the CUDA
allocator's first batch is its largest), cut into forward passes that fit a
token budget, each padded only to its own longest row, and put back in input
order. Padding is masked, so no choice here changes a score.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C
from rstar_batch.base.cores import usable_cores
from rstar_batch.bert_cls import cls_only_forward
from rstar_batch.config import resolve_activation
from rstar_batch.faults import FaultHook
from rstar_batch.model import ModelInfo, load_replica, sleep_idle_threads
from rstar_batch.stages.contract import Stage

log = logging.getLogger(__name__)


def plan_batches(lengths: np.ndarray, batch_tokens: int, max_pairs: int,
                 min_fill: float = 0.8) -> list[np.ndarray]:
    """Group row indices into forward passes, longest rows first.

    A pass holds rows while (rows × its longest row) stays within `batch_tokens`,
    rows ≤ `max_pairs`, and each row is at least `min_fill` of the longest (so at
    most 1 - min_fill of a pass is padding); a row longer than the budget gets a
    pass alone.
    """
    order = np.argsort(-lengths, kind="stable")
    sorted_lengths = lengths[order]
    batches, start = [], 0
    while start < len(order):
        longest = max(int(sorted_lengths[start]), 1)
        size = max(1, min(max_pairs, batch_tokens // longest))
        end = min(start + size, len(order))
        # sorted descending: the first row under min_fill × longest ends the pass
        short = np.flatnonzero(sorted_lengths[start:end] < min_fill * longest)
        if len(short):
            end = start + max(1, int(short[0]))
        batches.append(order[start:end])
        start = end
    return batches


def pad_rows(values: pa.ListArray, rows: np.ndarray, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a list array as a right-padded int64 matrix and its attention mask."""
    return Ragged.of(values).pad(rows, pad)


class Ragged:
    """A list array's values and offsets as numpy, so that every forward pass pads
    its rows with one gather instead of an Arrow take and flatten per pass."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat, self.offsets = flat, offsets

    @classmethod
    def of(cls, values: pa.ListArray) -> "Ragged":
        values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        offsets = values.offsets.to_numpy().astype(np.int64)
        flat = values.values.to_numpy(zero_copy_only=False)
        return cls(flat, offsets)

    def pad(self, rows: np.ndarray, pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        width = int(lengths.max()) if len(lengths) else 0
        mask = np.arange(width)[None, :] < lengths[:, None]
        index = np.where(mask, starts[:, None] + np.arange(width)[None, :], 0)
        matrix = self.flat[index].astype(np.int64) if len(self.flat) else np.zeros(
            index.shape, dtype=np.int64)
        matrix[~mask] = pad
        return matrix, mask.astype(np.int64)


def default_batch_tokens(device_type: str, hidden_size: Optional[int]) -> int:
    """A forward pass's token budget: 16384 on GPUs; on CPU 4096 for R*'s width (512)
    and up, which benchmarks/batch_tokens.py measured 1.10x faster than 16384 on 2
    cores, and proportionally more for narrower models, so that each pass holds about
    as many activations and spreads the fixed cost of a pass (a few dozen torch calls)
    over as much work: a 64-wide model's pass of 32768 tokens scored at 1.8x the rate of
    4096 (BENCHMARKS.md, "Feeding a GPU")."""
    if device_type != "cpu":
        return 16384
    return 4096 * max(1, 512 // (hidden_size or 512))


class Scorer:
    """One model replica scoring pre-tokenized pairs in-process (no Ray needed)."""

    def __init__(self, model: ModelInfo, device: str = "cpu", dtype: str = "auto",
                 activation: str = "auto", batch_tokens: Optional[int] = None,
                 max_batch_pairs: int = 256, cpu_threads: Optional[int] = None,
                 trust_remote_code: bool = False, quantize: str = "none",
                 compile: bool = False, full_forward: bool = False) -> None:
        sleep_idle_threads()
        import torch

        self.torch = torch
        self.model, self.device, self.dtype = load_replica(
            model, device, dtype, trust_remote_code, quantize=quantize, compile=compile,
            transformers_modeling=full_forward)
        if self.device.type == "cpu":
            torch.set_num_threads(cpu_threads or usable_cores())
        self.activation = resolve_activation(activation, model.num_labels)
        self.batch_tokens = batch_tokens or default_batch_tokens(
            self.device.type, getattr(self.model.config, "hidden_size", None))
        self.max_batch_pairs = max_batch_pairs
        self.pad_id = getattr(self.model.config, "pad_token_id", None) or 0
        self.logits = self._logits_function(compile, full_forward)

    def _logits_function(self, compile: bool, full_forward: bool) -> Any:
        """BERT's [CLS]-only last layer (bert_cls.py) where it applies, else (or when
        asked: benchmarks and tests compare the two) the forward of the model as
        transformers builds it."""
        plain = getattr(self.model, "_orig_mod", self.model)  # under torch.compile
        reuse = (self.device.type == "cpu" and self.dtype == self.torch.float32
                 and not compile)
        fast = None if full_forward else cls_only_forward(plain, reuse_buffers=reuse)
        self.cls_only = fast is not None
        if fast is None:
            return lambda inputs: self.model(**inputs).logits
        log.info("scoring with the [CLS]-only last layer")
        if compile:
            fast = self.torch.compile(fast, dynamic=True)
        return lambda inputs: fast(**inputs)

    def _to_device(self, array: np.ndarray) -> Any:
        tensor = self.torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _forward(self, input_ids: Ragged, token_types: Optional[Ragged],
                 rows: np.ndarray) -> Any:
        """One forward pass's scores, left on the device: reading them back would make
        the host wait for the GPU before padding the next pass."""
        ids, mask = input_ids.pad(rows, self.pad_id)
        inputs = {"input_ids": self._to_device(ids), "attention_mask": self._to_device(mask)}
        if token_types is not None:
            inputs["token_type_ids"] = self._to_device(token_types.pad(rows)[0])
        logits = self.logits(inputs).float()
        if self.activation == "sigmoid":
            out = self.torch.sigmoid(logits[:, -1])
        elif self.activation == "softmax":
            out = self.torch.softmax(logits, dim=-1)[:, 1]
        else:
            out = logits[:, -1]
        return out

    def score(self, input_ids: pa.ListArray,
              token_types: Optional[pa.ListArray] = None) -> np.ndarray:
        """Scores for every row of `input_ids`, in input order."""
        ids = Ragged.of(input_ids)
        types = None if token_types is None else Ragged.of(token_types)
        lengths = np.diff(ids.offsets)
        scores = np.empty(len(lengths), dtype=np.float32)
        remaining = np.arange(len(lengths))
        done: list[tuple[np.ndarray, Any]] = []   # (rows, their scores on the device)
        with self.torch.inference_mode():
            while len(remaining):
                batches = [remaining[b] for b in plan_batches(
                    lengths[remaining], self.batch_tokens, self.max_batch_pairs)]
                remaining = remaining[:0]
                for i, rows in enumerate(batches):
                    try:
                        done.append((rows, self._forward(ids, types, rows)))
                    except self.torch.OutOfMemoryError:
                        if len(rows) == 1:
                            raise
                        self._shrink_after_oom(len(rows), int(lengths[rows].max()))
                        remaining = np.concatenate(batches[i:])  # re-plan what is left
                        break
            if done:  # one copy back, one wait for the device, per call
                values = self.torch.cat([out.float() for _, out in done]).cpu().numpy()
                scores[np.concatenate([rows for rows, _ in done])] = values
        return scores

    def _shrink_after_oom(self, rows: int, longest: int) -> None:
        self.torch.cuda.empty_cache()
        self.batch_tokens = max(1, min(self.batch_tokens, rows * longest) // 2)
        log.warning("CUDA out of memory on %d pairs of up to %d tokens; token budget now %d "
                    "for the rest of the run", rows, longest, self.batch_tokens)


def best_window_scores(scorer: Scorer, input_ids: pa.ListArray,
                       token_types: Optional[pa.ListArray], windows: pa.ListArray) -> np.ndarray:
    """maxp: every window of every row scored as a pair of its own (so windows of
    all rows share length-sorted passes); a row scores as its best window."""
    lengths = windows.flatten().to_numpy(zero_copy_only=False)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    ids = pa.ListArray.from_arrays(offsets, input_ids.flatten())
    types = None if token_types is None else pa.ListArray.from_arrays(
        offsets, token_types.flatten())
    return best_per_row(scorer.score(ids, types),
                        pc.list_value_length(windows).to_numpy(zero_copy_only=False))


def best_per_row(window_scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Each row's best window score; row i owns the next counts[i] (≥ 1) windows."""
    return np.maximum.reduceat(window_scores, np.concatenate([[0], np.cumsum(counts)[:-1]]))


class BatchFailedError(RuntimeError):
    """A batch failed every retry; names the pairs it held."""


class Score(Stage):
    """Callable class for `map_batches`: one model replica per actor.

    A batch whose scoring raises is retried `retries` times on the same replica;
    a replica that dies is restarted by Ray and its batch retried there.
    """

    reads = (C.QUERY_ID, C.DOC_ID, C.REJECT, C.INPUT_IDS)
    writes = (C.SCORE, C.NODE)

    def __init__(self, retries: int = 2, **scorer_kwargs: Any) -> None:
        self.scorer = Scorer(**scorer_kwargs)
        self.retries = retries
        self.fault = FaultHook.from_env()
        self.node = this_node()

    def _score_with_retries(self, batch: pa.Table, rows: np.ndarray) -> np.ndarray:
        types = batch[C.TOKEN_TYPE_IDS] if C.TOKEN_TYPE_IDS in batch.column_names else None
        take = pa.array(rows)
        ids = batch[C.INPUT_IDS].combine_chunks().take(take)
        types = None if types is None else types.combine_chunks().take(take)
        windows = (batch[C.WINDOWS].combine_chunks().take(take)
                   if C.WINDOWS in batch.column_names else None)

        def score() -> np.ndarray:
            scores = (self.scorer.score(ids, types) if windows is None
                      else best_window_scores(self.scorer, ids, types, windows))
            check_finite(scores, lambda i: (batch[C.QUERY_ID][int(rows[i])],
                                             batch[C.DOC_ID][int(rows[i])]))
            return scores

        return with_retries(score, self.retries, self.fault, len(rows), lambda: [
            (batch[C.QUERY_ID][int(i)], batch[C.DOC_ID][int(i)]) for i in rows[:5]])

    def process(self, batch: pa.Table) -> pa.Table:
        scored = np.flatnonzero(pc.is_null(batch[C.REJECT]).to_numpy(zero_copy_only=False))
        scores = np.full(batch.num_rows, np.nan, dtype=np.float32)
        if len(scored):
            scores[scored] = self._score_with_retries(batch, scored)
        out = batch.drop_columns([c for c in (C.INPUT_IDS, C.TOKEN_TYPE_IDS, C.WINDOWS)
                                  if c in batch.column_names])
        valid = np.zeros(batch.num_rows, dtype=bool)
        valid[scored] = True
        out = (out.append_column(C.SCORE, pa.array(scores, pa.float32(), mask=~valid))
               .append_column(C.NODE, node_column(self.node, batch.num_rows)))
        return out


def this_node() -> str:
    """The Ray node this replica runs on ("local" outside Ray): the manifest counts the
    pairs each node scored, which shows a job used the whole cluster."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def node_column(node: str, rows: int) -> pa.DictionaryArray:
    """C.NODE for `rows` rows: one dictionary entry, not one string per row."""
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, np.int32)), pa.array([node]))


def with_retries(score: Callable[[], np.ndarray], retries: int, fault: FaultHook,
                 pairs: int, first_pairs: Callable[[], list[tuple[Any, Any]]]) -> np.ndarray:
    """Run `score` up to retries + 1 times; the final failure names the batch's pairs."""
    for attempt in range(retries + 1):
        try:
            fault.before_batch()
            return score()
        except Exception as exc:  # noqa: BLE001 - any failure of a batch is retried
            if attempt == retries:
                named = ", ".join(f"({q}, {d})" for q, d in first_pairs())
                raise BatchFailedError(
                    f"scoring failed {attempt + 1} time(s) for a batch of {pairs} pairs "
                    f"(query_id, doc_id): {named}{', …' if pairs > 5 else ''}"
                    f": {type(exc).__name__}: {exc}") from exc
            log.warning("scoring a batch of %d pairs failed (%s); retry %d of %d",
                        pairs, exc, attempt + 1, retries)
    raise AssertionError("unreachable")


def check_finite(scores: np.ndarray, pair: Callable[[int], tuple[Any, Any]]) -> None:
    bad = np.flatnonzero(~np.isfinite(scores))
    if len(bad):
        query_id, doc_id = pair(int(bad[0]))
        raise FloatingPointError(
            f"the model produced non-finite scores for {len(bad)} pair(s), e.g. "
            f"query_id={query_id} doc_id={doc_id}; try --dtype float32")
