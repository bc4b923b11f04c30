"""How many scored rows a score-corpus job keeps under _work/ at its peak.

Runs `rstar-batch score-corpus` as a user would (the micro model: R*'s tokenizer on one
64-wide BERT layer, so scoring is cheap) over Q queries × P passages with top K, and
polls the commit records every 0.1 s: the rows under _work/ at a moment are the rows
of the packs whose records are there (a pack is written just before its record, and
deleted just after it when a newer commit replaces it). Reports the peak against
|queries| × K, the bound a running top K per writer keeps.

    python benchmarks/corpus_rows.py --queries 300 --passages 2000 --top-k 100
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from rstar_batch.testing import MICRO_ARCHITECTURE, make_candidates, make_tiny_model


def rows_under_work(out: str) -> tuple[int, int]:
    """(rows of the packs whose records are there, records)."""
    rows = records = 0
    for path in glob.glob(os.path.join(out, "_work", "commits", "*.json")):
        try:
            record = json.load(open(path))
        except (OSError, ValueError):
            continue  # replaced between the listing and the read
        records += 1
        rows += sum(segment[3] for segment in record.get("segments", []))
    return rows, records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--smoke", action="store_true", help="30 queries × 200 passages")
    args = parser.parse_args()
    if args.smoke:
        args.queries, args.passages, args.top_k = 30, 200, 10
    work = args.workdir or tempfile.mkdtemp(prefix="corpus-rows-")
    model = make_tiny_model(os.path.join(work, "micro"), architecture=MICRO_ARCHITECTURE)
    texts = make_candidates(max(1, args.passages // 50), 60, seed=3)["passage"].to_pylist()
    texts = [f"{t} (passage {i})" for i, t in enumerate((texts * 2)[:args.passages])]
    queries = make_candidates(args.queries, 1, seed=4)["query"].to_pylist()
    pq.write_table(pa.table({"doc_id": [f"d{i}" for i in range(len(texts))],
                             "passage": texts}), os.path.join(work, "corpus.parquet"))
    pq.write_table(pa.table({"query_id": list(range(len(queries))), "query": queries}),
                   os.path.join(work, "queries.parquet"))
    out = os.path.join(work, "out")
    command = [sys.executable, "-m", "rstar_batch", "score-corpus", "--corpus",
               os.path.join(work, "corpus.parquet"), "--queries",
               os.path.join(work, "queries.parquet"), "--output", out, "--model", model,
               "--top-k", str(args.top_k), "--max-length", "128", "--restart"]
    started = time.monotonic()
    job = subprocess.Popen(command, stdout=open(os.path.join(work, "job.log"), "w"),
                           stderr=subprocess.STDOUT)
    peak = (0, 0)
    while job.poll() is None:
        peak = max(peak, rows_under_work(out))
        time.sleep(0.1)
    seconds = time.monotonic() - started
    if job.returncode != 0:
        print(open(os.path.join(work, "job.log")).read()[-3000:])
        return 1
    written = pq.read_table(out).num_rows
    bound = len(queries) * args.top_k
    print(f"score-corpus {len(queries)} queries × {len(texts)} passages, top {args.top_k}: "
          f"{seconds:.1f} s; peak rows under _work/: {peak[0]:,} in {peak[1]} commit(s) = "
          f"{peak[0] / bound:.2f} × queries × K ({bound:,}); every pair would be "
          f"{len(queries) * len(texts):,}; output {written:,} rows")
    return 0 if written == len(queries) * min(args.top_k, len(texts)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
