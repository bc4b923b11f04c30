"""The score cache on storage: (pair key, score, last used) entries, kept by model and
scoring config, partitioned by key, added to by whole new files only.

    URI/<scoring key>/_scoring.json          what the entries were scored with
    URI/<scoring key>/packs/<name>.pack      entries sorted by cache bucket, each bucket's
                                             entries one Parquet file, back to back
    URI/<scoring key>/log/<name>.json        a record: the packs it adds and where each
                                             bucket lies in them (as a job's commits)

The scoring key hashes everything that changes a score: the model's files, max_length,
the long-passage policy and window, the dtype and device, the activation, quantization,
whether passages are keyed by text or by token ids, and the key scheme (base/pair_keys.py).
Entries scored under another model or config live under another key: they are kept
apart, never mixed in, and a job says which config it does not share (`other_keys`).

A record is the commit point, written after its packs: a job killed before it leaves
only packs no record names, which readers never see. A record's name is the job's
(its output and input), so a job that runs again rewrites its own record instead of
adding a second. Two jobs adding at once write two records: each is whole. A record
may name records it `replaces` (compact.py): they are void from the moment it exists.
Readers take one listing of log/ and a GET of each record; a bucket's entries are one
ranged GET per pack, so a lookup costs (lookup tasks × packs) requests, which
`rstar-batch cache compact` brings back to one pack per task.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from rstar_batch.base import columns as C
from rstar_batch.base import fs as fsio
from rstar_batch.base.pair_keys import KEY_TYPE, SCHEME, key_buckets, key_bytes
from rstar_batch.io.scored import encode_pack, read_segments
from rstar_batch.progress.log import Segment

log = logging.getLogger(__name__)

# Cache buckets of a new scoring key: a lookup or compaction task holds whole buckets, and
# 256 keep one under ~300 MB at 2e9 entries (28 bytes an entry).
CACHE_BUCKETS = 256
ENTRIES = pa.schema([("key", KEY_TYPE), ("score", pa.float32()), ("used", pa.int64())])
SCORING = "_scoring.json"
LOG, PACKS = "log", "packs"
_READERS = 32


class CacheError(ValueError):
    """A score cache that cannot be used as asked."""


def scoring_key(scoring: dict[str, Any]) -> str:
    """The folder name of a scoring config: 16 hex digits of its SHA-256."""
    text = json.dumps(scoring, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Record:
    """One record of log/: the packs it adds (name, segments by cache bucket)."""

    name: str
    packs: tuple[tuple[str, tuple[Segment, ...]], ...]
    entries: int
    time: float
    source: str = ""                  # the job's output, or "compact"
    replaces: tuple[str, ...] = ()    # records void once this one exists

    def to_json(self) -> dict[str, Any]:
        return {"packs": [[data, [[s.bucket, s.offset, s.length, s.rows] for s in segs]]
                          for data, segs in self.packs],
                "entries": self.entries, "time": self.time, "source": self.source,
                "replaces": list(self.replaces)}

    @classmethod
    def from_json(cls, name: str, value: dict[str, Any]) -> "Record":
        packs = tuple((data, tuple(Segment(*s) for s in segs)) for data, segs in value["packs"])
        return cls(name, packs, int(value["entries"]), float(value["time"]),
                   value.get("source", ""), tuple(value.get("replaces", ())))


class ScoreCache:
    """One scoring key's part of a cache URI."""

    def __init__(self, uri: str, scoring: dict[str, Any]) -> None:
        self.uri = uri
        self.fs, self.base = fsio.resolve(uri)
        self.scoring = {**scoring, "key_scheme": SCHEME}
        self.key = scoring_key(self.scoring)
        self.root = fsio.join(self.base, self.key)
        self.buckets = CACHE_BUCKETS

    @classmethod
    def at(cls, fs: pafs.FileSystem, base: str, uri: str, key: str) -> "ScoreCache":
        """An existing scoring key's cache, as stored (compaction)."""
        cache = cls.__new__(cls)
        cache.uri, cache.fs, cache.base, cache.key = uri, fs, base, key
        cache.root = fsio.join(base, key)
        stored = fsio.read_json(fs, fsio.join(cache.root, SCORING))
        cache.scoring, cache.buckets = stored["scoring"], int(stored["buckets"])
        return cache

    def open(self) -> "ScoreCache":
        """Read this key's bucket count, or create the key (a new config's first job)."""
        path = fsio.join(self.root, SCORING)
        try:
            stored = fsio.read_json(self.fs, path)
        except FileNotFoundError:
            stored = None
        except OSError as exc:  # a bucket that does not exist, no permission
            raise CacheError(f"cannot read the score cache '{fsio.redact(self.uri)}': "
                             f"{exc}") from None
        if stored is None:
            try:
                fsio.write_json(self.fs, path, {"scoring": self.scoring,
                                                "buckets": self.buckets})
            except OSError as exc:
                raise CacheError(f"cannot write to the score cache "
                                 f"'{fsio.redact(self.uri)}': {exc}") from None
        elif stored.get("scoring") != self.scoring:
            raise CacheError(f"score cache '{fsio.redact(self.uri)}/{self.key}' holds "
                             f"entries of another scoring config ({_differences(stored.get('scoring', {}), self.scoring)}); "
                             "its _scoring.json was changed by hand?")
        else:
            self.buckets = int(stored["buckets"])
        return self

    def other_keys(self) -> list[str]:
        """The other scoring configs under the URI, each with what differs from this one
        (their entries are kept apart: this job neither reads nor writes them)."""
        found = []
        for info in fsio.list_top(self.fs, self.base):
            name = info.path.rstrip("/").rsplit("/", 1)[-1]
            if info.type != pafs.FileType.Directory or name == self.key:
                continue
            try:
                other = fsio.read_json(self.fs, fsio.join(info.path, SCORING))["scoring"]
            except (OSError, ValueError, KeyError):
                continue
            found.append(f"{name} ({_differences(other, self.scoring)})")
        return found

    # -- records -----------------------------------------------------------------------

    def records(self, include_void: bool = False, skip_bad: bool = False) -> list[Record]:
        """Every live record: one listing of log/, a GET of each, void ones left out
        (`include_void`: kept, for the compaction that deletes them). A record that
        cannot be read fails naming it, or with `skip_bad` is left out."""
        paths = [i.path for i in fsio.list_files(self.fs, fsio.join(self.root, LOG),
                                                  recursive=False)
                 if i.path.endswith(".json")]
        if not paths:
            return []
        with ThreadPoolExecutor(max_workers=min(_READERS, len(paths))) as pool:
            values = list(pool.map(lambda p: self._read_record(p, skip_bad), paths))
        records = sorted((Record.from_json(p.rsplit("/", 1)[-1][:-5], v)
                          for p, v in zip(paths, values) if v is not None),
                         key=lambda r: r.name)
        return records if include_void else live_records(records)

    def _read_record(self, path: str, skip_bad: bool) -> Optional[dict]:
        try:
            value = fsio.read_json(self.fs, path)
            Record.from_json("", value)
            return value
        except FileNotFoundError:  # replaced and deleted since the listing
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if skip_bad:
                log.warning("skipping score cache record '%s': %s", path, exc)
                return None
            raise CacheError(f"score cache record '{path}' cannot be read ({exc}); pass "
                             "--on-bad-file skip to leave it out, or delete it") from None

    def write_record(self, record: Record) -> None:
        fsio.write_json(self.fs, fsio.join(self.root, LOG, record.name + ".json"),
                        record.to_json())

    def delete_record(self, record: Record) -> None:
        fsio.delete(self.fs, fsio.join(self.root, LOG, record.name + ".json"))

    # -- packs -------------------------------------------------------------------------

    def write_pack(self, name: str, entries: pa.Table) -> tuple[str, tuple[Segment, ...]]:
        """Write `entries` (ENTRIES' columns) as pack `name`; its path under this key and
        its segments by cache bucket."""
        entries = entries.select(ENTRIES.names).cast(ENTRIES)
        bucketed = entries.append_column(C.BUCKET, pa.array(
            key_buckets(entries["key"], self.buckets), pa.int32()))
        data, segments = encode_pack(bucketed, ipc=True)
        relative = f"{PACKS}/{name}.pack"
        fsio.write_bytes(self.fs, fsio.join(self.root, relative), data)
        return relative, tuple(segments)

    def reads(self, records: Iterable[Record], buckets: set[int]
              ) -> list[tuple[str, list[Segment]]]:
        """Per pack of `records`, the segments of `buckets` it holds: what a task reads."""
        return segments_of([pack for record in records for pack in record.packs], buckets)

    def entries(self, reads: list[tuple[str, list[Segment]]], skip_bad: bool = False
                ) -> tuple[dict[int, pa.Table], list[str]]:
        """Each bucket's entries from `reads`, newest use first (a key's first entry is
        the one a lookup takes), and the packs skipped. A pack that cannot be read fails
        naming it, or with `skip_bad` is left out (its pairs are scored again)."""
        pieces: dict[int, list[pa.Table]] = {}
        skipped = []
        for data, segments in reads:
            try:
                found = read_segments(self.fs, self.root, [(data, segments)])
                for table in found.values():
                    table.validate(full=True)
            except (OSError, pa.ArrowException) as exc:
                path = fsio.redact(fsio.join(self.uri, self.key, data))
                if not skip_bad:
                    raise CacheError(f"score cache file '{path}' cannot be read ({exc}); "
                                     "pass --on-bad-file skip to score its pairs again, "
                                     "or delete its record in log/") from None
                log.warning("skipping score cache file '%s': %s", path, exc)
                skipped.append(path)
                continue
            for bucket, table in found.items():
                pieces.setdefault(bucket, []).append(table)
        tables = {b: pa.concat_tables(t) for b, t in pieces.items()}
        return {b: t.take(np.argsort(-t["used"].to_numpy(), kind="stable"))
                for b, t in tables.items()}, skipped


def segments_of(packs: Iterable[tuple[str, Iterable[Segment]]], buckets: set[int]
                ) -> list[tuple[str, list[Segment]]]:
    """Per pack, its segments of `buckets` (packs holding none left out)."""
    wanted = []
    for data, segments in packs:
        mine = [s for s in segments if s.bucket in buckets]
        if mine:
            wanted.append((data, mine))
    return wanted


def live_records(records: list[Record]) -> list[Record]:
    """`records` less those another of them replaces."""
    void = {name for r in records for name in r.replaces}
    return [r for r in records if r.name not in void]


def rows_by_bucket(packs: Iterable[tuple[str, Iterable[Segment]]], buckets: int
                   ) -> np.ndarray:
    """Rows each bucket holds across `packs`."""
    rows = np.zeros(buckets, dtype=np.int64)
    for _, segments in packs:
        for s in segments:
            rows[s.bucket] += s.rows
    return rows


def consecutive(sizes: Iterable[int], per: float, most: Optional[int] = None
                ) -> list[list[int]]:
    """The indices of `sizes`, in order, cut into runs that pass `per` only when one
    item does (at most `most` runs: the last takes the rest)."""
    runs: list[list[int]] = [[]]
    held = 0
    for i, size in enumerate(sizes):
        if runs[-1] and held + size > per and (most is None or len(runs) < most):
            runs.append([])
            held = 0
        runs[-1].append(i)
        held += int(size)
    return [r for r in runs if r]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    changed = [f"{k} {old.get(k)!r} there, {new.get(k)!r} in this job"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "; ".join(changed) or "the same"


def latest(entries: pa.Table) -> pa.Table:
    """One entry per key: its most recent use (entries newest first, as `entries`)."""
    if not entries.num_rows:
        return entries
    _, first = np.unique(key_bytes(entries["key"]), return_index=True)
    return entries.take(pa.array(np.sort(first)))


def open_cache(config: Any, model: Any, activation: str, replicas: Any,
               tokenized: bool) -> ScoreCache:
    """The job's part of its score cache (`config.score_cache`): the scoring key from
    everything that changes a score. Entries under other keys are named in the log."""
    scoring = {
        "model": model.fingerprint, "max_length": config.max_length,
        "passage_max_tokens": config.passage_max_tokens,
        "long_passages": config.long_passages,
        "window": config.window if config.long_passages != "truncate" else None,
        "stride": config.stride if config.long_passages == "maxp" else None,
        "activation": activation, "device": replicas.device, "dtype": replicas.dtype,
        "quantize": config.quantize, "passages": "token ids" if tokenized else "text"}
    cache = ScoreCache(config.score_cache, scoring).open()
    others = cache.other_keys()
    log.info("score cache %s: scoring key %s (%d bucket(s))", fsio.redact(cache.uri),
             cache.key, cache.buckets)
    if others:
        log.info("score cache: entries of %d other scoring config(s) are kept apart, "
                 "neither read nor added to: %s", len(others), "; ".join(others[:4]))
    return cache
