"""The score cache (--score-cache): a night reuses the scores of pairs whose exact texts
were scored before under the same model and config, and writes exactly what a night
without the cache writes."""

from __future__ import annotations

import json
import os
import shutil
import types

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import rstar_batch
from rstar_batch.cache import compact as compaction
from rstar_batch.base.pair_keys import id_keys, key_buckets, text_keys
from rstar_batch.cache.store import CacheError, Record, ScoreCache, open_cache
from rstar_batch.config import ConfigError, RerankConfig
from tests.reference import reference_scores
from tests.test_rerank_job import _assert_matches_reference

EDITED, NEW = 10, 100  # of the 1,000 sample pairs, night 2's edited passages and new pairs


def test_a_key_is_the_exact_texts_and_nothing_else():
    queries = pa.array(["q", "q", "q ", None, "q", "qp"])
    passages = pa.array(["p", "p", "p", "p", "p.", ""])
    keys = text_keys(queries, passages).to_pylist()
    assert keys[0] == keys[1] and len(keys[0]) == 16
    assert len({keys[0], keys[2], keys[4], keys[5]}) == 4  # a space, a dot, the split
    assert keys[3] is None
    ids = id_keys(pa.array(["q", "q", "q"]), pa.array([[1, 2], [1, 2], []], pa.list_(pa.int32())),
                  pa.array([False, False, True])).to_pylist()
    assert ids[0] == ids[1] and ids[2] != ids[0] and ids[0] not in keys
    buckets = key_buckets(text_keys(pa.array(["q"] * 50), pa.array([str(i) for i in range(50)])),
                          7)
    assert set(buckets) == set(range(7))


def _night_two(night_one: pa.Table) -> tuple[pa.Table, set, set]:
    """Night 1 with NEW pairs replaced by unseen ones, EDITED passages changed under the
    same doc_id, a row without a passage and a repeat of a pair (two files)."""
    rows = night_one.to_pylist()
    rng = np.random.default_rng(3)
    picked = rng.choice(len(rows), NEW + EDITED, replace=False)
    new, edited = set(), set()
    for i in picked[:NEW]:
        rows[i] = {**rows[i], "doc_id": f"new-{i}",
                   "passage": f"an unseen passage number {i} about {rows[i]['query']}"}
        new.add((rows[i]["query_id"], rows[i]["doc_id"]))
    for i in picked[NEW:]:
        rows[i] = {**rows[i], "passage": rows[i]["passage"] + " (edited)"}
        edited.add((rows[i]["query_id"], rows[i]["doc_id"]))
    repeat = next(r for i, r in enumerate(rows) if i not in set(picked))
    rows += [{**rows[5], "doc_id": "no-passage", "passage": None}, dict(repeat)]
    return pa.Table.from_pylist(rows, schema=night_one.schema), new, edited


def _write(table: pa.Table, folder: str) -> str:
    os.makedirs(folder)
    half = table.num_rows // 2
    for i, part in enumerate([table.slice(0, half), table.slice(half)]):
        pq.write_table(part, os.path.join(folder, f"part-{i:05d}.parquet"))
    return folder


def _output(out: str) -> dict[str, pa.Table]:
    found = {}
    for folder in (out, os.path.join(out, "_rejected")):
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.endswith(".parquet"):
                found[os.path.relpath(os.path.join(folder, name), out)] = pq.read_table(
                    os.path.join(folder, name))
    return found


def _assert_same_rows(got: pa.Table, expected: pa.Table, name: str) -> None:
    """The same rows in the same file (scores within float32 batch noise)."""
    assert got.schema == expected.schema, name
    if "score" not in got.column_names:
        assert got.equals(expected), name
        return
    def rows(t): return {(r["query_id"], r["doc_id"]): r for r in t.to_pylist()}
    mine, theirs = rows(got), rows(expected)
    assert mine.keys() == theirs.keys() and got.num_rows == expected.num_rows, name
    for pair, row in mine.items():
        assert abs(row["score"] - theirs[pair]["score"]) <= 1e-6, (name, pair)
        assert {k: v for k, v in row.items() if k not in ("score", "rank")} == {
            k: v for k, v in theirs[pair].items() if k not in ("score", "rank")}


def _live_keys(uri: str) -> list[bytes]:
    """Every entry of every live record of the cache's (one) scoring key."""
    (key,) = [d for d in os.listdir(uri) if not d.startswith(".")]
    cache = ScoreCache.at(*rstar_batch.base.fs.resolve(uri), uri, key)
    records = cache.records()
    found, _ = cache.entries(cache.reads(records, set(range(cache.buckets))))
    return [k for t in found.values() for k in t["key"].to_pylist()]


@pytest.mark.slow
def test_night_two_scores_only_new_and_edited_pairs_and_writes_what_a_night_without_the_cache_writes(
        ray_local, micro_model, sample_dir, sample_reference, tmp_path):
    cache = str(tmp_path / "cache")
    common = dict(model=micro_model, dtype="float32", checkpoint_rows=128, rank_partitions=3)
    first = rstar_batch.rerank(candidates=[sample_dir], output=str(tmp_path / "night1"),
                               score_cache=cache, **common)
    assert first.scored == 1000 and first.reused == 0
    _assert_matches_reference(pa.concat_tables(
        _output(str(tmp_path / "night1")).values()).to_pylist(), sample_reference)
    assert sorted(_live_keys(cache)) == sorted(set(_live_keys(cache)))  # 1,000 distinct
    assert len(_live_keys(cache)) == 1000

    night_two, new, edited = _night_two(pq.read_table(sample_dir))
    folder = _write(night_two, str(tmp_path / "candidates2"))
    cached = rstar_batch.rerank(candidates=[folder], output=str(tmp_path / "cached"),
                                score_cache=cache, **common)
    plain = rstar_batch.rerank(candidates=[folder], output=str(tmp_path / "plain"), **common)

    # the same files with the same rows as the night without the cache; the scores as
    # equal as two runs of one job are (float32 sums over other batches: within 1e-6)
    with_cache, without = _output(str(tmp_path / "cached")), _output(str(tmp_path / "plain"))
    assert with_cache.keys() == without.keys()
    assert any(name.startswith("_rejected/") for name in without)
    for name in without:
        _assert_same_rows(with_cache[name], without[name], name)
    assert (cached.pairs, cached.scored, cached.rejected) == (plain.pairs, plain.scored,
                                                              plain.rejected)
    assert cached.rejected == {"null_passage": 1, "duplicate_pair": 1}
    # only the new and edited pairs (and the row without a passage) met the model
    manifest = json.load(open(tmp_path / "cached" / "_manifest.json"))
    assert manifest["pairs_scored_per_run"] == {"1": NEW + EDITED + 1}
    assert manifest["score_cache"]["found"] == 1000 - NEW - EDITED + 1  # the repeat too
    assert cached.reused == manifest["score_cache"]["reused"] == 1000 - NEW - EDITED
    assert (NEW + EDITED + 1) / cached.pairs <= 0.12
    # every score is the one-pair reference's: changed pairs rescored, the rest reused
    changed = night_two.filter(pc.is_in(
        pc.binary_join_element_wise(pc.cast(night_two["query_id"], pa.string()),
                                    pc.cast(night_two["doc_id"], pa.string()), ":"),
        value_set=pa.array([f"{q}:{d}" for q, d in new | edited])))
    rescored = reference_scores(micro_model, changed)
    reference = {(q, d): rescored.get((q, d), sample_reference.get((q, d)))
                 for q, d in zip(night_two["query_id"].to_pylist(),
                                 night_two["doc_id"].to_pylist()) if d != "no-passage"}
    _assert_matches_reference(pa.concat_tables(
        t for n, t in with_cache.items() if not n.startswith("_rejected")).to_pylist(),
        reference)
    # the cache now holds night 1's entries and night 2's (each key once per record)
    keys = _live_keys(cache)
    assert len(keys) == 1000 + cached.scored and len(set(keys)) == 1000 + NEW + EDITED

    compaction.compact(cache, grace_s=0)
    assert sorted(_live_keys(cache)) == sorted(set(keys))
    again = rstar_batch.rerank(candidates=[folder], output=str(tmp_path / "compacted"),
                               score_cache=cache, **common)
    assert again.reused == cached.scored
    assert json.load(open(tmp_path / "compacted" / "_manifest.json"))[
        "pairs_scored_per_run"] == {"1": 1}  # only the row without a passage
    for name, table in _output(str(tmp_path / "compacted")).items():
        _assert_same_rows(table, with_cache[name], name)


@pytest.mark.slow
def test_a_crash_while_the_cache_is_added_to_then_the_rerun_leave_each_entry_once(
        ray_local, micro_model, sample_dir, tmp_path, monkeypatch):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "out")
    config = dict(candidates=[sample_dir], output=out, model=micro_model, dtype="float32",
                  score_cache=cache)

    class Crash(RuntimeError):
        pass

    def crash(*_, **__):
        raise Crash("killed")

    # 0. a first night fills the cache; the second dies in its lookup after the hits
    # were committed, before the lookup was recorded done: its rerun looks up again
    first = rstar_batch.rerank(**{**config, "output": str(tmp_path / "first")})
    assert first.reused == 0
    import rstar_batch.cache.lookup as lookup_module

    class NoDone:
        def __getattr__(self, name):
            return getattr(rstar_batch.base.fs, name)

        @staticmethod
        def write_json(fs, path, value):
            if path.endswith("_DONE"):
                crash()
            return rstar_batch.base.fs.write_json(fs, path, value)

    with monkeypatch.context() as patch:
        patch.setattr(lookup_module, "fsio", NoDone())
        with pytest.raises(Crash):
            rstar_batch.rerank(**config)
    assert any(n.startswith("r0001-cache-") for n in os.listdir(os.path.join(
        out, "_work", "commits")))
    again = rstar_batch.rerank(**config)
    assert again.reused == again.scored == 1000
    _assert_same_rows(pq.read_table(out), pq.read_table(str(tmp_path / "first")), out)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    assert set(manifest["pairs_scored_per_run"].values()) == {0}  # the model scored none
    shutil.rmtree(out)
    shutil.rmtree(cache)

    # 1. the rank pass wrote the entries' packs, then the job died before their record
    with monkeypatch.context() as patch:
        patch.setattr(ScoreCache, "write_record", crash)
        with pytest.raises(Crash):
            rstar_batch.rerank(**config)
    assert _live_keys(cache) == []  # packs without a record are never read
    # 2. the record was written, then the job died before its manifest
    import rstar_batch.driver as driver_module

    with monkeypatch.context() as patch:
        patch.setattr(driver_module, "finish_job", crash)
        with pytest.raises(Crash):
            rstar_batch.rerank(**config)
    assert len(_live_keys(cache)) == len(set(_live_keys(cache))) == 1000
    summary = rstar_batch.rerank(**config)
    assert summary.scored == 1000 and not summary.already_done
    assert len(_live_keys(cache)) == len(set(_live_keys(cache))) == 1000
    # a compaction killed after its record: readers see each entry once, and a rerun ends it
    with monkeypatch.context() as patch:
        patch.setattr(compaction, "_delete_unused", crash)
        with pytest.raises(Crash):
            compaction.compact(cache, grace_s=0)
    assert len(_live_keys(cache)) == len(set(_live_keys(cache))) == 1000
    compaction.compact(cache, grace_s=0)
    (key,) = os.listdir(cache)
    assert len(os.listdir(os.path.join(cache, key, "log"))) == 1
    assert not os.path.exists(os.path.join(cache, key, "_compacting"))
    # every pack left is named by the one record
    record = json.load(open(os.path.join(cache, key, "log", os.listdir(
        os.path.join(cache, key, "log"))[0])))
    assert sorted(f"packs/{p}" for p in os.listdir(os.path.join(cache, key, "packs"))) == \
        sorted(data for data, _ in record["packs"])


def _scoring_config(tmp_path, **fields) -> ScoreCache:
    config = RerankConfig(candidates=["x"], output="y", score_cache=str(tmp_path / "cache"),
                          **fields)
    model = types.SimpleNamespace(fingerprint="sha256:model-a")
    replicas = types.SimpleNamespace(device="cpu", dtype="float32")
    return open_cache(config, model, "sigmoid", replicas, tokenized=False)


def test_another_model_or_config_is_kept_apart_and_named(tmp_path, caplog):
    first = _scoring_config(tmp_path)
    assert _scoring_config(tmp_path).key == first.key
    caplog.set_level("INFO")
    other = _scoring_config(tmp_path, max_length=256)
    assert other.key != first.key
    assert "max_length 512 there, 256 in this job" in caplog.text
    assert "kept apart" in caplog.text
    windows = _scoring_config(tmp_path, long_passages="maxp")
    assert windows.key not in (first.key, other.key)
    # an entry under one key is never found under the other
    first.write_record(Record("night", (first.write_pack("night-b00000", pa.table({
        "key": text_keys(pa.array(["q"]), pa.array(["p"])), "score": pa.array([0.5], pa.float32()),
        "used": pa.array([1], pa.int64())})),), 1, 1.0))
    assert len(first.records()) == 1 and other.records() == []


def test_an_unreadable_cache_file_fails_naming_it_or_is_skipped(tmp_path):
    cache = _scoring_config(tmp_path)
    entries = pa.table({"key": text_keys(pa.array(["q", "r"]), pa.array(["p", "p"])),
                        "score": pa.array([0.5, 0.25], pa.float32()),
                        "used": pa.array([1, 1], pa.int64())})
    pack = cache.write_pack("night-b00000", entries)
    cache.write_record(Record("night", (pack,), 2, 1.0))
    reads = cache.reads(cache.records(), set(range(cache.buckets)))
    found, skipped = cache.entries(reads)
    assert sum(t.num_rows for t in found.values()) == 2 and skipped == []
    path = os.path.join(cache.root, pack[0])
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\xff" * 64)
    with pytest.raises(CacheError, match="packs/night-b00000.pack' cannot be read"):
        cache.entries(reads)
    found, skipped = cache.entries(reads, skip_bad=True)
    assert skipped and skipped[0].endswith("packs/night-b00000.pack")
    with open(os.path.join(cache.root, "log", "night.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CacheError, match="log/night.json' cannot be read"):
        cache.records()
    assert cache.records(skip_bad=True) == []


def test_two_jobs_adding_at_once_each_add_whole_files_of_their_own(tmp_path):
    """Two nights' steps interleaved (pack A, pack B, record B, record A): no file is
    written twice, each record lands whole, a reader between them sees only B."""
    cache = _scoring_config(tmp_path)
    keys = text_keys(pa.array(["q"] * 4), pa.array(["a", "b", "c", "d"]))

    def entries(part):
        return pa.table({"key": part, "score": pa.array([0.5] * len(part), pa.float32()),
                         "used": pa.array([1] * len(part), pa.int64())})

    pack_a = cache.write_pack("night-a-b00000", entries(keys.slice(0, 3)))
    pack_b = cache.write_pack("night-b-b00000", entries(keys.slice(2, 2)))
    cache.write_record(Record("night-b", (pack_b,), 2, 1.0))
    found, _ = cache.entries(cache.reads(cache.records(), set(range(cache.buckets))))
    assert sorted(k for t in found.values() for k in t["key"].to_pylist()) == sorted(
        keys.slice(2, 2).to_pylist())
    cache.write_record(Record("night-a", (pack_a,), 3, 1.0))
    assert [r.name for r in cache.records()] == ["night-a", "night-b"]
    found, _ = cache.entries(cache.reads(cache.records(), set(range(cache.buckets))))
    assert sorted(k for t in found.values() for k in t["key"].to_pylist()) == sorted(
        keys.to_pylist() + keys.slice(2, 1).to_pylist())  # "c" twice: harmless, compacted


def test_compaction_keeps_each_keys_latest_use_and_drops_what_no_night_used(tmp_path):
    cache = _scoring_config(tmp_path)
    day = compaction.DAY_S
    keys = text_keys(pa.array(["q"] * 3), pa.array(["a", "b", "c"]))
    for name, used, scores in [("old", 0, [0.1, 0.2, 0.3]), ("new", 9 * day, [0.1, 0.2])]:
        part = pa.table({"key": keys.slice(0, len(scores)), "score": pa.array(scores, pa.float32()),
                         "used": pa.array([int(used)] * len(scores), pa.int64())})
        cache.write_record(Record(name, (cache.write_pack(f"{name}-b00000", part),),
                                  len(scores), used))
    compaction.compact_key(cache, keep_days=5, now=10 * day, grace_s=0)
    (record,) = cache.records()
    found, _ = cache.entries(cache.reads([record], set(range(cache.buckets))))
    kept = pa.concat_tables(found.values())
    assert sorted(kept["key"].to_pylist()) == sorted(keys.slice(0, 2).to_pylist())
    assert set(kept["used"].to_pylist()) == {int(9 * day)}
    assert sorted(os.listdir(os.path.join(cache.root, "log"))) == [record.name + ".json"]


def test_score_corpus_refuses_a_cache(micro_model, tmp_path):
    with pytest.raises(ConfigError, match="score-corpus does not use a score cache"):
        rstar_batch.score_corpus(corpus="c", queries="q", output=str(tmp_path / "o"),
                                 model=micro_model, top_k=5, score_cache=str(tmp_path / "cache"))
