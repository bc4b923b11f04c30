"""Scoring as a building block: a Ray Dataset of pairs in, the same rows with scores out.

For pipelines that already hold their candidates as a `ray.data.Dataset` (a retrieval
step upstream, a write downstream) and want no files, checkpoints or output folder:
rerank's pass-1 stages (normalize → tokenize → score, each checking its contract) as
lazy `map_batches` on the caller's dataset, and with `ranked=True` a group-by-query
rank. The caller's Ray runs it when the dataset is consumed.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional

import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch import driver
from rstar_batch.base import columns as C
from rstar_batch.cache.shards import ADD_ROWS, AddEntries, ProbeCache, Shards
from rstar_batch.cache.store import open_cache
from rstar_batch.cluster import live_nodes
from rstar_batch.config import RerankConfig
from rstar_batch.replicas import (on_replicas, on_tokenizers, plan_replicas, scorer_kwargs,
                                  tokenizer_batch_rows)
from rstar_batch.stages.normalize import Normalize
from rstar_batch.stages.rank import rank_table
from rstar_batch.stages.score import Score
from rstar_batch.stages.tokenize import Tokenize

log = logging.getLogger(__name__)


def score_dataset(ds: Any, config: Optional[RerankConfig] = None, *, ranked: bool = False,
                  **fields: Any) -> Any:
    """`ds` with every (query, passage) pair scored: a lazy `ray.data.Dataset`.

    `ds` has the config's query id, query, doc id and passage columns (by default
    `query_id`, `query`, `doc_id`, `passage`). The result has `query_id`, `doc_id`, the
    `keep_columns`, `score` (float32) and `reason`: null for a scored row, else why it
    was not scored (a null id or text), with a null score. No row is dropped. With
    `ranked=True` each query's rows also get `rank` (1 = best; score descending, ties
    by doc id, as the rerank job ranks), cut to `top_k` if set; rejected rows keep a
    null rank. Pairs are scored as given: a repeated pair is scored twice.

    Takes the config (or its fields as keywords) that `rerank` takes; the output,
    checkpoint and rank-pass fields do not apply. The model is checked now, on the
    caller's process; scoring runs when the result is consumed.

    With `score_cache`, pairs the cache held when this was called take its scores
    without the model, and every pair scored or reused is added to the cache as the
    result streams (cache/shards.py): consume the dataset to the end to add them all.
    """
    import ray

    config = (config or RerankConfig()).replace(**fields)
    checked = driver.check_scoring_model(config, corpus=None)
    model, assembler, why_not = checked.model, checked.assembler, checked.why_not
    if not ray.is_initialized():
        ray.init()  # as Ray Data does when a dataset first runs
    replicas = plan_replicas(config, live_nodes())
    cache = None
    if config.score_cache:
        cache = open_cache(config, model, checked.activation, replicas, tokenized=False)
        shards = Shards(cache, skip_bad=config.on_bad_file == "skip")
        log.info("score cache: %d entries of %d record(s) held by %d shard(s)%s",
                 shards.entries, shards.records, len(shards.actors),
                 f"; skipped {len(shards.skipped)} unreadable file(s): "
                 f"{', '.join(shards.skipped[:3])}" if shards.skipped else "")
    rows = tokenizer_batch_rows(replicas, passages_tokenized=False)
    ds = ds.map_batches(Normalize(config.columns, 1, keyed=cache is not None),
                        batch_format="pyarrow", batch_size=None)
    if cache is not None:
        ds = ds.map_batches(ProbeCache(shards), batch_format="pyarrow", batch_size=None)
    ds = on_tokenizers(ds, Tokenize, config, model, replicas, rows,
                       None if why_not else assembler)
    ds = on_replicas(ds, Score, scorer_kwargs(config, model, replicas), replicas,
                     replicas.batch_rows)
    if cache is not None:
        ds = ds.map_batches(AddEntries(cache, int(time.time())), batch_format="pyarrow",
                            batch_size=ADD_ROWS)
    keep = list(config.keep_columns)
    if not ranked:
        return ds.map_batches(_Scored(keep), batch_format="pyarrow", batch_size=None)
    return ds.groupby(C.QUERY_ID).map_groups(_ranked(keep, config.top_k),
                                             batch_format="pyarrow")


class _Scored:
    """Internal columns back to the output's names."""

    def __init__(self, keep: list[str]) -> None:
        self.keep = keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.table({"query_id": batch[C.QUERY_ID], "doc_id": batch[C.DOC_ID],
                         **{k: batch[k] for k in self.keep}, "score": batch[C.SCORE],
                         "reason": batch[C.REJECT]})


def _ranked(keep: list[str], top_k: Optional[int]) -> Callable[[pa.Table], pa.Table]:
    """`map_groups` function: one query's rows (or the rows without a query id) ranked,
    then its rejected rows (Ray takes a function or a class here, not an instance)."""

    def rank_group(group: pa.Table) -> pa.Table:
        rejected = pc.is_valid(group[C.REJECT])
        ranked = rank_table(group.filter(pc.invert(rejected)), keep, top_k)
        ranked = ranked.append_column("reason", pa.nulls(ranked.num_rows, pa.string()))
        bad = group.filter(rejected)
        n = bad.num_rows
        return pa.concat_tables([ranked, pa.table({
            "query_id": bad[C.QUERY_ID], "doc_id": bad[C.DOC_ID],
            "score": pa.nulls(n, pa.float32()), "rank": pa.nulls(n, pa.int32()),
            **{k: bad[k] for k in keep}, "reason": bad[C.REJECT]}, schema=ranked.schema)])

    return rank_group
