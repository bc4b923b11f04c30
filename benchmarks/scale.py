"""The bookkeeping of a 1e6…1e9-pair nightly rerank at object-storage scale, without
scoring: the real planner, commit writers' records, commit log, resume and rank-pass
plan, on a filesystem that counts requests.

What it runs is the driver's and the writers' own code (checkpoint.plan_chunks,
manifest.bucket_count, io/scored.encode_pack's segment layout, progress/log.py's
records and reader, rank_pass.plan_tasks, checkpoint.open_job); what it fakes is
only the scoring and the bytes of each pack (a pack's size is what encode_pack
writes for that many rows, measured once; its bytes are not kept). A cluster of
`--replicas` GPU replicas at `--rate` pairs/s each, `--replicas-per-node` to a node
(one commit writer each), commits every `--commit-seconds`.

Reports per size: objects under _work/, requests by kind (and per million pairs),
the driver's peak memory for reading the log and planning the rank pass, and that
bookkeeping's wall time on this machine, plus what the requests would cost at a
given latency with the driver's 32 parallel readers.

    python benchmarks/scale.py --pairs 1e6 1e7 1e8 1e9
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import time
import tracemalloc
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from fsspec.implementations.memory import MemoryFileSystem

from rstar_batch.base import columns as C
from rstar_batch.config import RerankConfig
from rstar_batch.io.scored import MAX_COMMIT_ROWS, encode_pack
from rstar_batch.manifest import bucket_count
from rstar_batch.progress import checkpoint
from rstar_batch.progress import log as commit_log
from rstar_batch.rank_pass import plan_tasks
from rstar_batch.score_corpus import corpus_chunk_rows


class CountingFS(MemoryFileSystem):
    """fsspec's in-memory filesystem, counting the S3 requests each call would be."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.requests: dict[str, int] = {}

    def _count(self, kind: str, n: int = 1) -> None:
        self.requests[kind] = self.requests.get(kind, 0) + n

    def ls(self, path, detail=True, **kwargs):
        found = super().ls(path, detail=detail, **kwargs)
        self._count("LIST", max(1, math.ceil(len(found) / 1000)))  # 1000 keys a page
        return found

    def info(self, path, **kwargs):
        self._count("HEAD")
        return super().info(path, **kwargs)

    def cat_file(self, path, start=None, end=None, **kwargs):
        self._count("GET")
        return super().cat_file(path, start=start, end=end, **kwargs)

    def _open(self, path, mode="rb", **kwargs):
        self._count("PUT" if "w" in mode else "GET")
        return super()._open(path, mode=mode, **kwargs)

    def rm_file(self, path):
        self._count("DELETE")
        return super().rm_file(path)


def counting_fs() -> tuple[CountingFS, pafs.FileSystem]:
    """A fresh counting in-memory filesystem, and pyarrow's view of it."""
    memory = CountingFS(skip_instance_cache=True)
    memory.store.clear()
    memory.pseudo_dirs.clear()
    return memory, pafs.PyFileSystem(pafs.FSSpecHandler(memory))


def read_log_measured(fs: pafs.FileSystem, root: str, chunks: list,
                      then: Any = lambda progress: None) -> tuple[Any, ...]:
    """The driver's read of the log, its pending chunks and `then(progress)` (the rank
    pass's plan): (progress, pending, what `then` gave, seconds, peak MB)."""
    tracemalloc.start()
    started = time.perf_counter()
    progress = commit_log.read_progress(fs, root)
    pending = progress.pending(chunks)
    planned = then(progress)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return progress, pending, planned, seconds, peak


def pack_bytes_per_row() -> float:
    """What encode_pack writes per scored row (ids, score, chunk/row, reject), measured
    on 200k rows over 500 buckets."""
    n, rng = 200_000, np.random.default_rng(0)
    table = pa.table({C.CHUNK: pa.array(np.repeat(np.arange(50), n // 50), pa.int64()),
                      C.ROW: pa.array(np.tile(np.arange(n // 50), 50), pa.int64()),
                      C.QUERY_ID: pa.array(rng.integers(0, 10**7, n)),
                      C.DOC_ID: pa.array(rng.integers(0, 9 * 10**6, n)),
                      C.SCORE: pa.array(rng.random(n), pa.float32()),
                      C.REJECT: pa.nulls(n, pa.string()),
                      C.BUCKET: pa.array(rng.integers(0, 500, n), pa.int32())})
    data, _ = encode_pack(table)
    return len(data) / n


def simulate(pairs: int, args: argparse.Namespace, row_bytes: float) -> dict[str, Any]:
    memory, fs = counting_fs()
    root = "/out"
    config = RerankConfig(candidates=["s3://in/"], output="s3://out/")
    buckets = bucket_count(config, pairs)
    files = math.ceil(pairs / args.file_rows)
    file_rows = [args.file_rows] * (files - 1) + [pairs - args.file_rows * (files - 1)]
    started = time.perf_counter()
    chunks = checkpoint.plan_chunks(file_rows, config.checkpoint_rows)
    checkpoint.open_job(fs, root, "s3://out/", {"total_rows": pairs, "buckets": buckets})
    plan_s = time.perf_counter() - started

    # the writers' commits: each node's writer every commit_seconds, chunks in order
    nodes = math.ceil(args.replicas / args.replicas_per_node)
    per_commit = min(MAX_COMMIT_ROWS,  # a writer commits early once it holds that many
                     int(args.rate * args.replicas_per_node * args.commit_seconds))
    commits, seq = 0, 0
    cursor = [(c.id, 0, c.rows) for c in chunks]
    at = 0
    while at < len(cursor):
        seq += 1
        for node in range(nodes):
            if at >= len(cursor):
                break
            ranges, rows = [], 0
            while at < len(cursor) and rows < per_commit:
                chunk, start, end = cursor[at]
                take = min(end - start, per_commit - rows)
                ranges.append((chunk, start, start + take))
                rows += take
                cursor[at] = (chunk, start + take, end)
                if start + take == end:
                    at += 1
            name = commit_log.commit_name(1, f"w{node:05d}", seq)
            size = int(rows * row_bytes)
            step = max(1, size // buckets)
            segments = tuple(commit_log.Segment(b, b * step, step, rows // buckets)
                             for b in range(buckets))
            memory.pipe_file(f"/out/_work/scored/{name}.pack", b"")  # bytes not kept
            memory._count("PUT")
            commit_log.write_commit(fs, root, commit_log.Commit(
                name, 1, tuple(ranges), scored=rows, data=f"scored/{name}.pack",
                segments=segments, nodes={f"node{node}": rows}, time=float(seq)))
            commits += 1
    writer_requests = dict(memory.requests)
    memory.requests.clear()

    # the driver: read the log (a resume, the end of pass 1, status), check, plan ranks
    progress, pending, tasks, driver_s, peak_mb = read_log_measured(
        fs, root, chunks, lambda p: plan_tasks(p, args.cluster_cpus))
    assert not pending and progress.committed_rows() == pairs
    driver_requests = dict(memory.requests)
    rank_gets = sum(len(reads) for _, reads in tasks)
    objects = sum(1 for p in memory.store if p.startswith("/out/_work/"))
    per_m = 1e6 / pairs
    latency_s = (driver_requests.get("GET", 0) / 32 + driver_requests.get("LIST", 0)) \
        * args.latency_ms / 1000
    return {
        "pairs": pairs, "buckets": buckets, "chunks": len(chunks), "commits": commits,
        "objects_under_work": objects, "objects_per_million": round(objects * per_m, 2),
        "writer_requests": writer_requests,
        "driver_log_requests": driver_requests,
        "rank_task_gets": rank_gets, "rank_tasks": len(tasks),
        "work_requests_per_million": round((sum(writer_requests.values())
                                            + sum(driver_requests.values()) + rank_gets)
                                           * per_m, 2),
        "driver_peak_mb": round(peak_mb, 1),
        "driver_bookkeeping_s": round(driver_s, 2), "plan_s": round(plan_s, 2),
        "log_read_at_latency_s": round(latency_s, 2),
        "pack_mb": round(per_commit * row_bytes / 2**20, 1),
    }


def simulate_cache(pairs: int, args: argparse.Namespace) -> dict[str, Any]:
    """The score cache's requests for a night of `pairs` pairs against a compacted cache
    of as many entries, all found: the lookup's own planner (cache/lookup.py: groups,
    probe ranges, which pack segments each task reads) and compaction's ranges
    (cache/compact.py), counted, not run. Reading the candidates is not counted (pass 1
    reads them as much without the cache)."""
    from types import SimpleNamespace

    from rstar_batch.cache import compact, lookup
    from rstar_batch.cache.store import CACHE_BUCKETS, Record, segments_of
    from rstar_batch.io.read import plan_read_tasks

    config = RerankConfig(candidates=["s3://in/"], output="s3://out/")
    files = math.ceil(pairs / args.file_rows)
    file_rows = [args.file_rows] * (files - 1) + [pairs - args.file_rows * (files - 1)]
    row_groups = [[min(65_536, rows - start) for start in range(0, rows, 65_536)]
                  for rows in file_rows]
    chunks = checkpoint.plan_chunks(file_rows, config.checkpoint_rows)
    groups = lookup._groups(plan_read_tasks(chunks, [f"f{i}" for i in range(files)],
                                            row_groups), args.cluster_cpus)
    rows = [sum(t["rows"] for t in g) for g in groups]
    per_bucket = lambda n: [commit_log.Segment(b, 0, 0, n // CACHE_BUCKETS)  # noqa: E731
                            for b in range(CACHE_BUCKETS)]
    key_packs = [(f"keys/g{g}", per_bucket(n)) for g, n in enumerate(rows)]
    night = Record("night", (("packs/night", tuple(per_bucket(pairs))),), pairs, 0.0)
    compacted = Record("compact", tuple(
        (f"packs/c{i}", tuple(s for s in night.packs[0][1] if s.bucket in set(r)))
        for i, r in enumerate(compact._ranges([night], CACHE_BUCKETS))), pairs, 0.0)
    cache = SimpleNamespace(buckets=CACHE_BUCKETS)
    ranges = lookup._probe_ranges(key_packs, cache, [compacted], args.cluster_cpus)
    probe_gets = sum(len(segments_of(key_packs, set(r)))
                     + len(segments_of(compacted.packs, set(r))) for r in ranges)
    split_gets = len(groups) * len(ranges)  # every hits pack holds a segment of each group
    requests = {
        "LIST": 1, "GET (records)": 1,
        "PUT": len(groups) * 4 + len(ranges) + 1,  # keys, misses, hit pack + record; hits; _DONE
        "GET-range": probe_gets + split_gets,
    }
    total = sum(requests.values())
    return {"pairs": pairs, "groups": len(groups), "probe_tasks": len(ranges),
            "requests": requests, "requests_per_million": round(total * 1e6 / pairs, 1),
            "compacted_packs": len(compacted.packs)}


def simulate_corpus(args: argparse.Namespace, row_bytes: float) -> dict[str, Any]:
    """score-corpus of `--corpus-passages` × `--corpus-queries`, top `--top-k`: each
    node's forwarder keeps its node's running top K in memory and passes on what enters
    it; the one committer commits the job's running top K every commit interval, each
    commit replacing its last, through the real records and Progress."""
    memory, fs = counting_fs()
    root = "/out"
    queries, passages, k = args.corpus_queries, args.corpus_passages, args.top_k
    config = RerankConfig(checkpoint_rows=4096)
    per_chunk = corpus_chunk_rows(config.checkpoint_rows, queries, passages)
    files = math.ceil(passages / args.file_rows)
    file_rows = [args.file_rows] * (files - 1) + [passages - args.file_rows * (files - 1)]
    chunks = checkpoint.plan_chunks(file_rows, per_chunk)
    nodes = math.ceil(args.replicas / args.replicas_per_node)
    node_rate = args.rate * args.replicas_per_node / queries  # passages/s a node scores
    step = max(1, int(node_rate * args.commit_seconds))        # passages per commit
    owned = [chunks[n::nodes] for n in range(nodes)]           # the chunks each node scores
    position = {n: 0 for n in range(nodes)}
    seen = {n: 0 for n in range(nodes)}                        # passages a node scored
    covered: list = []
    last, last_rows, peak, commits = None, 0, 0, 0
    while any(position[n] < len(owned[n]) for n in range(nodes)):
        for n in range(nodes):  # one commit interval of every node, forwarded
            while position[n] < len(owned[n]) and seen[n] < step * (commits + 1):
                chunk = owned[n][position[n]]
                covered.append((chunk.id, 0, chunk.rows))
                seen[n] += chunk.rows
                position[n] += 1
        rows = queries * min(k, sum(seen.values()))  # the committer's running top K
        commits += 1
        name = commit_log.commit_name(1, "committer", commits)
        memory.pipe_file(f"/out/_work/scored/{name}.pack", b"")
        memory._count("PUT")
        commit = commit_log.Commit(
            name, 1, tuple(covered), data=f"scored/{name}.pack",
            segments=(commit_log.Segment(0, 0, int(rows * row_bytes), rows),),
            time=float(commits), replaces=last.name if last else "")
        commit_log.write_commit(fs, root, commit)
        peak = max(peak, last_rows + rows)   # before the old one is deleted
        if last is not None:
            commit_log.delete_commits(fs, root, [last])
            memory.rm_file(f"/out/_work/{last.data}")
        last, last_rows = commit, rows
    writer_requests = dict(memory.requests)
    memory.requests.clear()
    progress, pending, _, driver_s, peak_mb = read_log_measured(fs, root, chunks)
    assert not pending and progress.committed_rows() == passages
    bound = queries * k
    # What crosses the network: a node's running top K takes in, over n passages in
    # random order, sum(min(1, k / i) for i ≤ n) = k·(1 + H(n) − H(k)) rows per query.
    forwarded = sum(queries * (min(n, k) + (k * (math.log(n / k)) if n > k else 0))
                    for n in seen.values())
    return {"queries": queries, "passages": passages, "top_k": k, "chunks": len(chunks),
            "passages_per_chunk": per_chunk, "nodes": nodes, "writers": 1,
            "commits": commits, "peak_rows_under_work": peak,
            "peak_over_queries_k": round(peak / bound, 2),
            "forwarded_rows": int(forwarded),
            "forwarded_over_pairs": round(forwarded / (queries * passages), 5),
            "objects_at_end": sum(1 for p in memory.store if p.startswith("/out/_work/")),
            "writer_requests": writer_requests, "driver_requests": dict(memory.requests),
            "driver_peak_mb": round(peak_mb, 1), "driver_s": round(driver_s, 2)}


def cpu() -> str:
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((l.split(":", 1)[1].strip() for l in flags.splitlines()
                  if l.startswith("Model name")), platform.processor())
    units = [u for u in ("avx2", "avx512f", "amx_bf16") if f" {u}" in flags]
    return f"{model} ({', '.join(units)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9])
    parser.add_argument("--replicas", type=int, default=64)
    parser.add_argument("--replicas-per-node", type=int, default=8)
    parser.add_argument("--rate", type=float, default=150_000, help="pairs/s a replica")
    parser.add_argument("--commit-seconds", type=float, default=10.0)
    parser.add_argument("--file-rows", type=int, default=1_000_000, help="rows per input file")
    parser.add_argument("--cluster-cpus", type=float, default=512)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--corpus-queries", type=int, default=6980, help="score-corpus")
    parser.add_argument("--corpus-passages", type=int, default=8_841_823)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--smoke", action="store_true", help="1e5 and 1e6 pairs only")
    parser.add_argument("--report", help="write the results as JSON here")
    args = parser.parse_args()
    sizes = [1e5, 1e6] if args.smoke else args.pairs
    row_bytes = pack_bytes_per_row()
    print(f"## Bookkeeping at scale, no scoring ({cpu()}); {args.replicas} replicas at "
          f"{args.rate:,.0f} pairs/s, {args.replicas_per_node} per node, commits every "
          f"{args.commit_seconds:g} s; packs {row_bytes:.1f} B/row")
    print("| pairs | buckets | commits | objects in _work/ | per M pairs | _work/ requests "
          "per M | driver peak MB | driver s | log read at "
          f"{args.latency_ms:g} ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    results = []
    for pairs in sizes:
        r = simulate(int(pairs), args, row_bytes)
        results.append(r)
        print(f"| {r['pairs']:.0e} | {r['buckets']} | {r['commits']} | "
              f"{r['objects_under_work']} | {r['objects_per_million']} | "
              f"{r['work_requests_per_million']} | {r['driver_peak_mb']} | "
              f"{r['driver_bookkeeping_s']} | {r['log_read_at_latency_s']} s |")
    print(f"\nScore cache lookup, every pair found in a compacted cache of as many entries, "
          f"{args.cluster_cpus:g} CPUs:")
    print("| pairs | groups | probe tasks | requests | per M pairs |")
    print("|---:|---:|---:|---:|---:|")
    caches = []
    for pairs in sizes:
        c = simulate_cache(int(pairs), args)
        caches.append(c)
        print(f"| {c['pairs']:.0e} | {c['groups']} | {c['probe_tasks']} | "
              f"{sum(c['requests'].values()):,} | {c['requests_per_million']} |")
    if args.smoke:
        args.corpus_passages, args.corpus_queries, args.top_k = 100_000, 200, 100
    corpus = [simulate_corpus(args, row_bytes)]
    r = corpus[0]
    print(f"\nscore-corpus {r['queries']} queries × {r['passages']:,} passages, top "
          f"{r['top_k']}: {r['chunks']:,} chunks of {r['passages_per_chunk']} passages; "
          f"{r['nodes']} node(s) forwarding {r['forwarded_rows']:,} rows "
          f"({r['forwarded_over_pairs']:.3%} of the pairs) to one committer, "
          f"{r['commits']:,} commits; peak rows under _work/ "
          f"{r['peak_rows_under_work']:,} = {r['peak_over_queries_k']} × queries × K; "
          f"{r['objects_at_end']} objects at the end; driver {r['driver_peak_mb']} MB, "
          f"{r['driver_s']} s to read the log")
    if args.report:
        with open(args.report, "w") as out:
            json.dump({"cpu": cpu(), "args": vars(args), "results": results,
                       "score_cache": caches, "score_corpus": corpus}, out, indent=2)


if __name__ == "__main__":
    main()
