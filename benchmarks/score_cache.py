"""What the score cache saves a nightly job: the issue-30 numbers.

    python benchmarks/score_cache.py            # 4,000 pairs with R*'s architecture, then
                                                # the micro model at 50k and 400k pairs
    python benchmarks/score_cache.py --smoke    # tiny sizes for CI
    (--only night|micro runs one part; --report FILE writes the JSON printed)

Every job is `rstar_batch.rerank` on one embedded Ray started once (a job joining a
running cluster, as `ray job submit` jobs do), default options but --dtype float32:

  1. night 2 (R*'s architecture, random weights; night 1's 4,000 pairs with 10% of
     the pairs replaced by new ones and 1% of the passages edited under the same
     doc_id), without the cache and with the cache night 1 filled: wall seconds, pairs
     scored by the model, and whether the two outputs hold the same rows in the same
     files with scores within float32's 1e-5 (a reused score was computed in other
     batches than tonight's: the last float bits may differ, as between two runs);
  2. the micro model (R*'s tokenizer, one 64-wide layer) on 50k and 400k fresh pairs
     (both large enough that the lookup runs two tasks per core: at 25k it runs one
     task, on a worker process already started, so the two sizes' fixed costs differ):
     filling an empty cache (every pair a miss), then ROUNDS rounds of plain (no cache)
     and cached (every pair found) in turn; each the fastest of its rounds (the first
     round of a size also starts the Ray worker processes its tasks need, ~1 s each
     on 2 cores: reported beside it), marginal pairs/s between the two sizes;
  3. `score_dataset` (the streaming lookup: cache/shards.py) on the same two sizes with
     the micro model: the dataset consumed to the end without the cache, filling an
     empty one, and with every pair cached; the same rounds and marginal rates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import machine, versions  # noqa: E402

from rstar_batch.testing import MICRO_ARCHITECTURE, make_candidates, make_tiny_model  # noqa: E402


ROUNDS = 3


def night_two(table: pa.Table, new: float, edited: float, seed: int = 3) -> pa.Table:
    """`table` with a `new` fraction of its pairs replaced by unseen ones and an
    `edited` fraction of its passages changed under the same doc_id."""
    rows = table.to_pylist()
    rng = np.random.default_rng(seed)
    n_new, n_edit = int(len(rows) * new), int(len(rows) * edited)
    picked = rng.choice(len(rows), n_new + n_edit, replace=False)
    for i in picked[:n_new]:
        rows[i] = {**rows[i], "doc_id": f"new-{i}",
                   "passage": f"an unseen passage {i} about {rows[i]['query']}"}
    for i in picked[n_new:]:
        rows[i] = {**rows[i], "passage": rows[i]["passage"] + " (edited)"}
    return pa.Table.from_pylist(rows, schema=table.schema)


def write(table: pa.Table, folder: str, files: int = 4) -> str:
    os.makedirs(folder)
    step = -(-table.num_rows // files)
    for i in range(files):
        pq.write_table(table.slice(i * step, step), os.path.join(folder, f"part-{i:05d}.parquet"))
    return folder


def job(candidates: str, out: str, model: str, cache: str | None = None) -> dict:
    import rstar_batch

    started = time.perf_counter()
    summary = rstar_batch.rerank(candidates=[candidates], output=out, model=model,
                                 dtype="float32", score_cache=cache)
    seconds = time.perf_counter() - started
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    return {"seconds": seconds, "pairs": summary.pairs, "reused": summary.reused,
            "scored_by_model": sum(manifest["pairs_scored_per_run"].values()),
            "phases": manifest["seconds_by_phase"]}


def rows(out: str) -> dict:
    found = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet"):
            for r in pq.read_table(os.path.join(out, name)).to_pylist():
                found[(name, r["query_id"], r["doc_id"])] = r["score"]
    return found


def same_output(a: str, b: str) -> tuple[bool, float]:
    mine, theirs = rows(a), rows(b)
    if mine.keys() != theirs.keys():
        return False, float("inf")
    worst = max((abs(mine[k] - theirs[k]) for k in mine), default=0.0)
    return worst <= 1e-5, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; write nothing")
    parser.add_argument("--pairs", type=int, default=4000, help="night 1's pairs (R*)")
    parser.add_argument("--sizes", type=int, nargs=2, default=[50_000, 400_000],
                        help="the micro model's small and large night")
    parser.add_argument("--only", choices=["night", "micro", "dataset"], default=None,
                        help="run only part 1 (night), 2 (micro) or 3 (dataset)")
    parser.add_argument("--report", default=None, help="also write the report (JSON) here")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.sizes = 400, [400, 1200]
    import ray

    from rstar_batch.base.cores import usable_cores
    from rstar_batch.cluster import CORES_LABEL

    work = tempfile.mkdtemp(prefix="rstar-cache-bench-")
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False,
                 labels={CORES_LABEL: str(usable_cores())})
        r_star = make_tiny_model(os.path.join(work, "r-star"))
        micro = make_tiny_model(os.path.join(work, "micro"), architecture=MICRO_ARCHITECTURE)
        report = {"machine": machine("cpu"), "versions": versions(),
                  "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}

        if args.only in (None, "night"):
            night_part(args, work, r_star, report)
        if args.only in (None, "micro"):
            micro_part(args, work, micro, report)
        if args.only in (None, "dataset"):
            dataset_part(args, work, micro, report)
        print(json.dumps(report, indent=1))
        if args.report:
            Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
            print(f"wrote {args.report}")
        assert report.get("night2_same_output", True), "night 2 with the cache wrote other rows"
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


def night_part(args: argparse.Namespace, work: str, r_star: str, report: dict) -> None:
    """1. night 2 with and without the cache (R*'s architecture)."""
    first = make_candidates(args.pairs // 50, 50, seed=11)
    night1 = write(first, os.path.join(work, "night1"))
    night2 = write(night_two(first, 0.10, 0.01), os.path.join(work, "night2"))
    cache = os.path.join(work, "cache-r-star")
    report["night1_filling_cache"] = job(night1, os.path.join(work, "o1"), r_star, cache)
    report["night2_plain"] = job(night2, os.path.join(work, "o2-plain"), r_star)
    report["night2_cached"] = job(night2, os.path.join(work, "o2-cached"), r_star, cache)
    same, worst = same_output(os.path.join(work, "o2-cached"),
                              os.path.join(work, "o2-plain"))
    report["night2_same_output"], report["night2_worst_score_difference"] = same, worst
    report["night2_speedup"] = (report["night2_plain"]["seconds"]
                                / report["night2_cached"]["seconds"])


def micro_part(args: argparse.Namespace, work: str, micro: str, report: dict) -> None:
    """2. the micro model: marginal pairs/s plain, filling, all cached."""
    for size in args.sizes:
        folder = write(make_candidates(size // 50, 50, seed=size),
                       os.path.join(work, f"m{size}"))
        cache = os.path.join(work, f"cache-{size}")
        report[f"micro_{size}_filling"] = job(folder, os.path.join(work, f"m{size}-fill"),
                                              micro, cache)

        def one(name: str, round_: int) -> dict:
            out = os.path.join(work, f"m{size}-{name}-{round_}")
            found = job(folder, out, micro, cache if name == "cached" else None)
            shutil.rmtree(out)
            return found

        best_of_rounds(report, f"micro_{size}", 1 if args.smoke else ROUNDS, one)
    marginal_rates(report, "micro", args.sizes, "")


def dataset_part(args: argparse.Namespace, work: str, micro: str, report: dict) -> None:
    """3. score_dataset: marginal pairs/s plain, filling, all cached."""
    import ray

    from rstar_batch import score_dataset

    def consume(folder: str, cache: str | None) -> dict:
        started = time.perf_counter()
        ds = score_dataset(ray.data.read_parquet(folder), model=micro, dtype="float32",
                           score_cache=cache)
        rows = sum(len(batch["score"]) for batch in ds.iter_batches(batch_format="pyarrow"))
        return {"seconds": time.perf_counter() - started, "rows": rows}

    for size in args.sizes:
        folder = os.path.join(work, f"m{size}")
        if not os.path.exists(folder):
            write(make_candidates(size // 50, 50, seed=size), folder)
        cache = os.path.join(work, f"dcache-{size}")
        report[f"dataset_{size}_filling"] = consume(folder, cache)
        best_of_rounds(report, f"dataset_{size}", 1 if args.smoke else ROUNDS,
                       lambda name, _: consume(folder, cache if name == "cached" else None))
    marginal_rates(report, "dataset", args.sizes, "dataset_")


def best_of_rounds(report: dict, prefix: str, rounds: int, run: Any) -> None:
    """`run(name, round)` for plain and cached in turn, `rounds` times; the fastest of
    each (with every round's seconds) under `prefix_name`."""
    runs: dict[str, list] = {"plain": [], "cached": []}
    for round_ in range(rounds):
        for name in runs:
            runs[name].append(run(name, round_))
    for name, found in runs.items():
        report[f"{prefix}_{name}"] = {**min(found, key=lambda r: r["seconds"]),
                                      "rounds_s": [round(r["seconds"], 3) for r in found]}


def marginal_rates(report: dict, prefix: str, sizes: list[int], into: str) -> None:
    """Marginal pairs/s of plain, filling and cached between the two sizes, and the
    cached rate over the plain one."""
    small, large = sizes
    for name in ("plain", "filling", "cached"):
        dt = (report[f"{prefix}_{large}_{name}"]["seconds"]
              - report[f"{prefix}_{small}_{name}"]["seconds"])
        report[f"{into}marginal_{name}_pairs_per_s"] = (large - small) / dt if dt > 0 else None
    plain = report[f"{into}marginal_plain_pairs_per_s"]
    cached = report[f"{into}marginal_cached_pairs_per_s"]
    report[f"{into}lookup_vs_scoring"] = cached / plain if plain and cached else None


if __name__ == "__main__":
    main()
