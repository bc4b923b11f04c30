"""The score cache for a streaming lookup (score_dataset): held in memory by bucket range.

A lazy `ray.data.Dataset` has no checkpoint to stage a lookup in, as the rerank job
does (cache/lookup.py). Instead the cache as it stood when the dataset was built is
partitioned across shard actors, each holding a consecutive range of cache buckets
(the newest entry of each key, keys sorted), and each batch of pairs asks the shards
that hold its keys: a partitioned join in which only keys travel, and no node holds
the whole cache. Each shard is one actor scheduled apart (SPREAD) with no CPU reserved:
it works for milliseconds a batch. A shard holds up to SHARD_ENTRIES entries (20 bytes
each in memory, ~0.5 GB); a cache of 1e9 entries is 40 shards.

New entries are added as the dataset streams (`AddEntries`): each bundle of scored rows
becomes one pack and one record, written last, so a consumer stopped at any moment
leaves only whole records, and a dataset consumed twice adds its entries twice (the
same scores: `rstar-batch cache compact` keeps one). Rows reused from the cache are
written again with this run's time, as the rerank job does, so that `--keep-days`
counts from their last use.
"""

from __future__ import annotations

import logging
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import columns as C
from rstar_batch.base.pair_keys import KEY_BYTES, key_buckets, key_bytes
from rstar_batch.cache.store import (Record, ScoreCache, consecutive, latest,
                                     rows_by_bucket)
from rstar_batch.stages.contract import Stage

log = logging.getLogger(__name__)

SHARD_ENTRIES = 25_000_000
# Rows a streaming run writes per pack and record: fewer, larger files, each a whole
# record; a consumer that stops loses at most this many rows' entries.
ADD_ROWS = 1 << 18
# Set aside between the lookup and the model: a reused row is not the model's to score.
# Never seen outside score_dataset: `AddEntries` clears it before the rows leave.
REUSED = "_in_score_cache"
CACHED = "_cached_score"


class CacheShard:
    """Ray actor: some buckets' newest entries, looked up by key."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=f"V{KEY_BYTES}")
        self.scores = np.zeros(0, dtype=np.float32)

    def load(self, cache: ScoreCache, reads: list, skip_bad: bool) -> tuple[int, list[str]]:
        """Hold the newest entry of each key `reads` finds; how many, and the cache files
        skipped as unreadable (one that cannot be read raises CacheError naming it)."""
        tables, skipped = cache.entries(reads, skip_bad)
        newest = latest(pa.concat_tables(tables.values())) if tables else None
        if newest is not None and newest.num_rows:
            keys = key_bytes(newest["key"])
            order = np.argsort(keys, kind="stable")
            self.keys = keys[order]
            self.scores = newest["score"].to_numpy(zero_copy_only=False)[order]
        return len(self.keys), skipped

    def probe(self, keys: np.ndarray) -> np.ndarray:
        """The cached score of each key; NaN where the cache has none."""
        found = np.full(len(keys), np.nan, dtype=np.float32)
        if not len(self.keys) or not len(keys):
            return found
        at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[at] == keys
        found[hit] = self.scores[at[hit]]
        return found


class Shards:
    """The shards of one cache snapshot and the bucket → shard map a batch routes by."""

    def __init__(self, cache: ScoreCache, skip_bad: bool,
                 per_shard: int = SHARD_ENTRIES) -> None:
        import ray

        records = cache.records(skip_bad=skip_bad)
        self.records = len(records)
        packs = [pack for record in records for pack in record.packs]
        runs = consecutive(rows_by_bucket(packs, cache.buckets), per_shard) if packs else []
        self.buckets = cache.buckets
        self.shard_of = np.full(cache.buckets, -1, dtype=np.int32)
        actor = ray.remote(num_cpus=0, scheduling_strategy="SPREAD")(CacheShard)
        self.actors = [actor.remote() for _ in runs]
        for i, run in enumerate(runs):
            self.shard_of[run] = i
        held = ray.get([a.load.remote(cache, cache.reads(records, set(run)), skip_bad)
                        for a, run in zip(self.actors, runs)])
        self.entries = sum(n for n, _ in held)
        self.skipped = [path for _, paths in held for path in paths]


class ProbeCache(Stage):
    """Each scorable pair's cached score (CACHED, null where the cache has none); a pair
    found is set aside from the model (its C.REJECT is REUSED until AddEntries)."""

    reads = (C.PAIR_KEY, C.REJECT)
    writes = (CACHED, C.REJECT)

    def __init__(self, shards: Shards) -> None:
        self.actors, self.shard_of, self.buckets = shards.actors, shards.shard_of, shards.buckets

    def process(self, batch: pa.Table) -> pa.Table:
        import ray

        keys = batch[C.PAIR_KEY].combine_chunks()
        rows = np.flatnonzero(pc.is_valid(keys).to_numpy(zero_copy_only=False))
        scores = np.full(batch.num_rows, np.nan, dtype=np.float32)
        if len(rows) and self.actors:
            scorable = keys.take(pa.array(rows))
            wanted = key_bytes(scorable)
            shard = self.shard_of[key_buckets(scorable, self.buckets)]
            asks = [(np.flatnonzero(shard == s), self.actors[s])
                    for s in np.unique(shard[shard >= 0])]
            answers = ray.get([actor.probe.remote(wanted[i]) for i, actor in asks])
            for (i, _), found in zip(asks, answers):
                scores[rows[i]] = found
        hit = ~np.isnan(scores)
        reason = pc.if_else(pa.array(hit), pa.scalar(REUSED), batch[C.REJECT])
        return (batch.set_column(batch.column_names.index(C.REJECT), C.REJECT, reason)
                .append_column(CACHED, pa.array(scores, pa.float32(), mask=~hit)))


class AddEntries(Stage):
    """Rows back from the model: a reused row gets its cached score back and its reason
    cleared; every scored or reused pair becomes an entry of one new pack and record."""

    reads = (C.PAIR_KEY, C.REJECT, C.SCORE, CACHED)
    writes = (C.SCORE, C.REJECT)

    def __init__(self, cache: ScoreCache, used: int) -> None:
        self.cache, self.used = cache, used  # used: when the dataset was built

    def process(self, batch: pa.Table) -> pa.Table:
        reused = pc.fill_null(pc.equal(batch[C.REJECT], REUSED), False)
        score = pc.if_else(reused, batch[CACHED], batch[C.SCORE])
        reason = pc.if_else(reused, pa.scalar(None, pa.string()), batch[C.REJECT])
        out = batch.drop_columns([CACHED, C.SCORE, C.REJECT]).append_column(
            C.SCORE, score).append_column(C.REJECT, reason)
        valid = pc.and_(pc.is_valid(out[C.PAIR_KEY]), pc.is_null(reason))
        entries = out.filter(valid)
        if entries.num_rows:
            name = f"stream-{uuid.uuid4().hex[:16]}"
            pack = self.cache.write_pack(name, pa.table({
                "key": entries[C.PAIR_KEY], "score": entries[C.SCORE],
                "used": pa.array(np.full(entries.num_rows, self.used), pa.int64())}))
            self.cache.write_record(Record(name, (pack,), entries.num_rows, time.time(),
                                           "score_dataset"))
        return out.drop_columns([C.PAIR_KEY])
