"""`rstar-batch cache compact`: merge a score cache's packs, drop entries not used lately.

Every job adds a record and its packs, and each lookup reads every pack once per probe
task; compaction brings a scoring key back to one pack per range of cache buckets:

    1. read the live records (one listing of log/, a GET each);
    2. per range of buckets (threads; a range at most PROBE_ROWS entries): read every
       pack's segments of the range, keep each key's most recent use, drop entries not
       used within --keep-days, write one pack; the range's segments are recorded under
       _compacting/<name>/ so a rerun of a killed compaction skips the ranges done;
    3. write one record naming every record read as `replaces`: from that moment they
       are void to every reader, and the cache holds each key once;
    4. delete what was made void or left behind (records, their packs, packs no record
       names) more than `grace` ago (an hour): a lookup that listed the log before step 3
       may still be reading them, as Delta Lake's VACUUM keeps files a retention period.

Jobs may add records meanwhile: those are not read, not replaced, and stay. Run one
compaction of a cache at a time (two at once each keep every entry: duplicates, which
lookups tolerate and the next compaction removes).
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from rstar_batch.base import fs as fsio
from rstar_batch.cache.store import (PACKS, SCORING, CacheError, Record, ScoreCache,
                                     consecutive, latest, live_records,
                                     rows_by_bucket)
from rstar_batch.progress.log import Segment

log = logging.getLogger(__name__)

RANGE_ROWS = 4_000_000   # entries one range holds at most (~30 bytes each in memory)
THREADS = 4
GRACE_S = 3600.0
DAY_S = 86400.0


def compact(uri: str, keep_days: Optional[float] = None, now: Optional[float] = None,
            grace_s: float = GRACE_S) -> list[dict]:
    """Compact every scoring key under `uri`; what each held before and after."""
    fs, base = fsio.resolve(uri)
    keys = [i.path.rstrip("/").rsplit("/", 1)[-1] for i in fsio.list_top(fs, base)
            if fsio.exists(fs, fsio.join(i.path, SCORING))]
    if not keys:
        raise CacheError(f"'{fsio.redact(uri)}' holds no score cache (no "
                         f"<key>/{SCORING} under it)")
    return [compact_key(ScoreCache.at(fs, base, uri, key), keep_days, now, grace_s)
            for key in sorted(keys)]


def compact_key(cache: ScoreCache, keep_days: Optional[float] = None,
                now: Optional[float] = None, grace_s: float = GRACE_S) -> dict:
    now = time.time() if now is None else now
    records = cache.records()
    before = sum(r.entries for r in records)
    report = {"key": cache.key, "records_before": len(records), "entries_before": before}
    merged = len(records) == 1 and records[0].source == "compact" and keep_days is None
    if records and not merged:
        cutoff = None if keep_days is None else int(now - keep_days * DAY_S)
        token = hashlib.sha256(" ".join(
            [r.name for r in records] + [str(cutoff)]).encode()).hexdigest()[:16]
        name = f"compact-{token}"
        ranges = _ranges(records, cache.buckets)
        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            packs = [p for p in pool.map(
                lambda r: _compact_range(cache, records, r, cutoff, name), ranges) if p]
        entries = sum(s.rows for _, segments in packs for s in segments)
        cache.write_record(Record(name, tuple(packs), entries, now, "compact",
                                  tuple(r.name for r in records)))
        fsio.delete(cache.fs, fsio.join(cache.root, "_compacting"))  # one compaction at a time
        report.update(records_after=1, entries_after=entries)
        log.info("score cache %s: %d records, %d entries → 1 record, %d entries",
                 cache.key, len(records), before, entries)
    report["deleted_files"] = _delete_unused(cache, now, grace_s)
    return report


def _ranges(records: list[Record], buckets: int) -> list[list[int]]:
    """Consecutive buckets, about RANGE_ROWS entries a range (one pack each)."""
    return consecutive(rows_by_bucket([p for r in records for p in r.packs], buckets),
                       RANGE_ROWS)


def _compact_range(cache: ScoreCache, records: list[Record], buckets: list[int],
                   cutoff: Optional[int], name: str
                   ) -> Optional[tuple[str, tuple[Segment, ...]]]:
    """One range of buckets merged into one pack (or what a killed run already did)."""
    done = fsio.join(cache.root, "_compacting", name, f"b{buckets[0]:05d}.json")
    if fsio.exists(cache.fs, done):
        kept = fsio.read_json(cache.fs, done)
        return (kept[0], tuple(Segment(*s) for s in kept[1])) if kept else None
    found, _ = cache.entries(cache.reads(records, set(buckets)))
    kept_tables = []
    for bucket in sorted(found):
        table = latest(found[bucket])
        if cutoff is not None:
            table = table.filter(pc.greater_equal(table["used"], cutoff))
        if table.num_rows:
            kept_tables.append(table)
    pack = None
    if kept_tables:
        pack = cache.write_pack(f"{name}-b{buckets[0]:05d}",
                                pa.concat_tables(kept_tables))
    fsio.write_json(cache.fs, done, [pack[0], [[s.bucket, s.offset, s.length, s.rows]
                                               for s in pack[1]]] if pack else [])
    return pack


def _delete_unused(cache: ScoreCache, now: float, grace_s: float) -> int:
    """Records made void and packs no live record names, once older than the grace."""
    fs = cache.fs
    every = cache.records(include_void=True)
    live = {r.name for r in live_records(every)}
    voided_at = {name: r.time for r in every if r.name in live for name in r.replaces}
    deleted = 0
    kept = set(live)
    for record in every:
        if record.name in live:
            continue
        if now - voided_at.get(record.name, now) >= grace_s:
            cache.delete_record(record)
            deleted += 1
        else:
            kept.add(record.name)
    named = {data for r in every if r.name in kept for data, _ in r.packs}
    for info in fsio.list_files(fs, fsio.join(cache.root, PACKS), recursive=False):
        relative = f"{PACKS}/{info.path.rsplit('/', 1)[-1]}"
        age = now - (info.mtime.timestamp() if info.mtime else now)
        if relative not in named and age >= grace_s:
            fs.delete_file(info.path)
            deleted += 1
    return deleted

