"""How fast the host side feeds a GPU: the whole rerank job with a micro model.

    python benchmarks/feed.py                    # text: 25k and 500k pairs; a tokenized
                                                 # corpus: 25k and 1M id-only pairs
    python benchmarks/feed.py --before DIR       # also an older checkout's job, same data
    python benchmarks/feed.py --smoke            # tiny sizes for CI; writes nothing
    python benchmarks/feed.py --rounds 1         # each text case once (default 3)
    python benchmarks/feed.py --cores 2          # on 2 of a bigger node's cores (a GPU node)

The model has R*'s tokenizer but one layer of width 64 (testing.MICRO_ARCHITECTURE),
so scoring costs little and what is timed is everything a GPU would wait on:
reading, normalizing, tokenizing, assembling pairs, shipping blocks between actors,
writing and committing runs, and the rank pass. Each size runs `rstar-batch rerank`
as its own process on an embedded local Ray, with a GPU's default --batch-tokens and
--replica-batch-rows. Without a GPU the micro model's forward runs on the same CPUs
as everything else; on a GPU node (`--cores 2` pins this script and its jobs to two
cores, so the targets' "2 cores" hold there) it runs on the GPU, and the host side
is then every process of the job, the replica's own CPU (padding, copies) included.

Reported beside each other, from one run of this script:
  - the raw tokenizer: `encode_batch(passages, add_special_tokens=False)` on one
    thread over the large run's passages, passages/s;
  - each job end to end (process start to exit) and the marginal rate between the
    two sizes, (large - small pairs) / (large - small seconds), which leaves out the
    fixed start-up (Ray, imports, model load); the text cases run --rounds times,
    taking turns, and report their median round (start-up moves by ±0.5 s from run
    to run, one marginal rate by ±15%);
  - the same job with its replica shaped as a GPU's (one process and one torch
    thread, as a GPU replica holds one CPU; float32, the micro model's cheapest
    forward on CPUs with AMX, where --dtype auto picks bfloat16): on a CPU-only
    machine, the nearest this script gets to the setting it stands for;
  - where the large job's CPU went: CPU seconds per kind of process, sampled from
    /proc while it runs (a Ray worker is named after the task it runs);
  - the job's own phases (start-up, scoring, rank pass) and driver peak RSS, from
    its _manifest.json;
  - the same for id-only candidates joined with a corpus that `tokenize-corpus`
    tokenized once (timed too), so that only the queries are tokenized.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import machine, versions  # noqa: E402

from rstar_batch.base.cores import usable_cores  # noqa: E402
from rstar_batch.testing import MICRO_ARCHITECTURE, make_candidates, make_tiny_model  # noqa: E402

GPU_BATCH_TOKENS = 16384   # Scorer's default on a GPU: the micro model stands in for one
GPU_BATCH_ROWS = 32768     # and the replica call's (replicas.GPU_BATCH_ROWS)
GPU_SHAPED = ["--cpus-per-replica", "1", "--max-replicas", "1", "--dtype", "float32"]
RAW_TOKENIZER = """
import sys, time
import pyarrow.parquet as pq
from transformers import AutoTokenizer
passages = pq.read_table(sys.argv[2], columns=["passage"])["passage"].to_pylist()
backend = AutoTokenizer.from_pretrained(sys.argv[1]).backend_tokenizer
if sys.argv[3] == "nanotoken":  # the fast path's own call (stages/fast_tokens.py)
    import nanotoken
    fast = nanotoken.Tokenizer.from_json(backend.to_str())
    encode = lambda texts: fast.encode_batch(texts, add_special_tokens=False, parallel=False)
else:
    encode = lambda texts: backend.encode_batch(texts, add_special_tokens=False)
encode(passages[:1000])
started = time.perf_counter()
encode(passages)
print(len(passages) / (time.perf_counter() - started))
"""


def raw_tokenizer_rate(model: str, candidates: str, library: str = "tokenizers") -> float:
    """Passages/s of the bare Rust tokenizer (`tokenizers`, Hugging Face's, or
    `nanotoken`, the fast path's) on one thread, in a process of its own."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RAW_TOKENIZER, model, candidates, library],
                         env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def _kind(cmdline: str, job_pid: int, pid: int) -> str:
    """Which part of the job a process (or the task it runs now) is."""
    # the command the user ran watches a child that runs the same command (supervise.py):
    # that child is the driver
    if pid == job_pid or " -m rstar_batch " in f" {cmdline} ":
        return "driver"
    # the replica actor (ReplicaCommits) scores and hands slices to its node's commit
    # writer (CommitWriter; older checkouts wrote and committed in WriteRuns)
    for part, label in (("Tokenize", "tokenize"), ("ReplicaCommits", "score"),
                        ("Score", "score"), ("ReadChunks", "read"),
                        ("CommitWriter", "write runs"), ("WriteRuns", "write runs"),
                        ("rank_bucket", "rank pass"),
                        ("join_bucket", "join"), ("Bucketize", "join"),
                        ("ReadParquet", "join"), ("Write", "join")):
        if part in cmdline:
            return label
    return "ray system" if "ray" in cmdline else "other"


class CpuSampler(threading.Thread):
    """CPU seconds per kind of process on this machine while a job runs."""

    def __init__(self, job_pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.job_pid, self.every = job_pid, every
        self.seconds: dict[str, float] = {}
        self.last: dict[int, int] = {}
        self.done = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.sample()               # what ran before the job does not count
        self.seconds.clear()

    def run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()
        self.sample()

    def sample(self) -> None:
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            pid = int(name)
            try:
                stat = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
                cmdline = open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
            except OSError:
                continue
            ticks = int(stat[11]) + int(stat[12])
            used = ticks - self.last.get(pid, 0)   # a process new since the last sample: all
            self.last[pid] = ticks
            if pid == os.getpid() or used <= 0:
                continue
            kind = _kind(cmdline, self.job_pid, pid)
            self.seconds[kind] = self.seconds.get(kind, 0.0) + used / self.tick


def run_job(model: str, inputs: list[str], out: str, extra: list[str],
            source: Optional[str] = None) -> dict:
    """One `rstar-batch rerank` process: its wall seconds, CPU by part, manifest.
    `source`: run the rstar_batch package found there instead (an older checkout)."""
    command = [sys.executable, "-m", "rstar_batch", "--log-level", "WARNING", "rerank",
               *inputs, "--output", out, "--model", model,
               "--batch-tokens", str(GPU_BATCH_TOKENS),
               "--replica-batch-rows", str(GPU_BATCH_ROWS), "--restart", "--overwrite", *extra]
    env = {**os.environ, "PYTHONPATH": source} if source else None
    started = time.perf_counter()
    # not from the checkout: `python -m` puts the working directory first on sys.path
    process = subprocess.Popen(command, env=env, cwd=os.path.dirname(out))
    sampler = CpuSampler(process.pid)
    sampler.start()
    if process.wait() != 0:
        raise SystemExit(f"the job failed: {' '.join(command)}")
    seconds = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    return {"pairs": manifest["summary"]["pairs"], "seconds": seconds, "cpu": sampler.seconds,
            "phases": manifest.get("seconds_by_phase", {}),
            "rss_mb": manifest["driver_peak_rss_mb"],
            "tokenizers": manifest["replicas"]["tokenizers"],
            "device": manifest["replicas"].get("device", "cpu")}


def marginal_rate(small: dict, large: dict) -> float:
    return (large["pairs"] - small["pairs"]) / (large["seconds"] - small["seconds"])


def interleaved(model: str, text: dict[int, str], small: int, large: int, workdir: str,
                variants: list[tuple[str, str, list[str], Optional[str]]], rounds: int
                ) -> list[tuple[str, dict, dict, list[float]]]:
    """Each variant's small and large job, `rounds` times, the variants taking turns, so
    that what the machine does meanwhile falls on all of them alike. A job's fixed
    start-up moves by ±0.5 s from run to run, which moves one marginal rate by ±15%:
    each case reports the round with the median marginal rate, and every round's."""
    done: dict[str, list[tuple[dict, dict]]] = {label: [] for label, *_ in variants}
    for _ in range(rounds):
        for label, name, extra, source in variants:
            runs = [run_job(model, ["--candidates", text[size]],
                            os.path.join(workdir, f"out-{name}-{size}"), extra, source)
                    for size in (small, large)]
            done[label].append((runs[0], runs[1]))
    cases = []
    for label, pairs in done.items():
        ordered = sorted(pairs, key=lambda p: marginal_rate(*p))
        middle = ordered[(len(ordered) - 1) // 2]
        cases.append((label, middle[0], middle[1], [marginal_rate(*p) for p in pairs]))
    return cases


def write_candidates(folder: str, pairs: int, seed: int) -> str:
    """`pairs` candidate rows, 100 per query, every passage its own text."""
    if not os.path.isdir(folder):
        table = make_candidates(max(1, pairs // 100), min(100, pairs), seed=seed)
        _write_parts(table, folder)
    return folder


def _write_parts(table: pa.Table, folder: str, step: int = 100_000) -> None:
    os.makedirs(folder)
    for i in range(0, table.num_rows, step):
        pq.write_table(table.slice(i, step), os.path.join(folder, f"part-{i // step:05d}.parquet"))


def write_id_only(folder: str, pairs: int, corpus: str, seed: int) -> tuple[str, str]:
    """Id-only candidates (query_id, doc_id), 100 doc ids of `corpus` per query drawn at
    random, and their queries' texts; (candidates folder, queries file)."""
    queries = os.path.join(folder, "queries.parquet")
    if not os.path.isdir(folder):
        doc_ids = pq.read_table(corpus, columns=["doc_id"])["doc_id"]
        n = max(1, pairs // 100)
        texts = make_candidates(n, 1, seed=seed).select(["query_id", "query"])
        rng = np.random.default_rng(seed)
        picks = np.concatenate([rng.choice(len(doc_ids), min(100, pairs), replace=False)
                                for _ in range(n)])
        _write_parts(pa.table({"query_id": np.repeat(texts["query_id"].to_numpy(),
                                                     min(100, pairs)),
                               "doc_id": doc_ids.take(pa.array(picks))}),
                     os.path.join(folder, "candidates"))
        pq.write_table(texts, queries)
    return os.path.join(folder, "candidates"), queries


def tokenize_corpus(model: str, corpus: str, out: str) -> dict:
    """`rstar-batch tokenize-corpus` once: wall seconds and passages."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "rstar_batch", "--log-level", "WARNING",
                    "tokenize-corpus", "--corpus", corpus, "--output", out, "--model", model,
                    "--restart", "--overwrite"], check=True)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    return {"seconds": time.perf_counter() - started, "passages": manifest["summary"]["pairs"]}


def case_rows(label: str, small: dict, large: dict, raw: float,
              rounds: list[float]) -> list[str]:
    marginal = marginal_rate(small, large)
    rows = []
    for size, run in (("small", small), ("large", large)):
        rate = run["pairs"] / run["seconds"]
        rows.append(f"| {label}: {size}, end to end | {run['pairs']} | {run['seconds']:.1f} | "
                    f"{rate:.0f} | {rate / raw:.2f} |")
    every = (f"; rounds: {', '.join(f'{r:.0f} ({r / raw:.2f}×)' for r in rounds)}"
             if len(rounds) > 1 else "")
    rows.append(f"| **{label}: marginal** (large − small{', the median round' if every else ''}"
                f"{every}) | {large['pairs'] - small['pairs']} | "
                f"{large['seconds'] - small['seconds']:.1f} | **{marginal:.0f}** | "
                f"**{marginal / raw:.2f}** |")
    return rows


def cpu_table(label: str, small: dict, run: dict) -> list[str]:
    """Each part's CPU seconds in both runs, and its marginal cost per pair: the
    difference leaves out what a part spends starting (imports, model load)."""
    pairs = run["pairs"] - small["pairs"]
    total = sum(run["cpu"].values())
    phases = ", ".join(f"{k} {run['phases'][k]:.1f} ({small['phases'].get(k, 0):.1f})"
                       for k in ("startup", "scoring", "rank") if k in run["phases"])
    lines = ["", f"{label}: the large job's phases (s; the small job's in brackets): "
             + (phases or "not recorded by this version")
             + f"; tokenizer actors (most): {run['tokenizers']}; where the CPU went:", "",
             "| part | CPU s, large | CPU s, small | share of large | marginal µs per pair |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for kind, used in sorted(run["cpu"].items(), key=lambda kv: -kv[1]):
        before = small["cpu"].get(kind, 0.0)
        lines.append(f"| {kind} | {used:.1f} | {before:.1f} | {100 * used / total:.0f}% | "
                     f"{1e6 * (used - before) / pairs:.1f} |")
    marginal = 1e6 * (total - sum(small["cpu"].values())) / pairs
    lines.append(f"| all | {total:.1f} | {sum(small['cpu'].values()):.1f} | 100% | "
                 f"{marginal:.1f} |")
    host = host_side_us(small, run)
    feeds = f"~{1e6 / host:.0f}" if host > 0 else "(too few pairs to tell)"
    which = "every part of the job" if run["device"] == "cuda" else \
        "every part but the model's actor"
    lines += ["", f"Host side ({which}; not processes outside the "
              f"job): {host:.1f} µs of CPU per pair, so one core feeds a GPU {feeds} "
              "pairs/s."]
    return lines


def host_side_us(small: dict, large: dict) -> float:
    """Marginal CPU per pair of what a GPU would wait on: every process of the job, the
    driver included ('other' is not the job's), but on CPU the Score actor, whose CPU is
    then the micro model's forward, which a GPU does."""
    left_out = ("other",) if large["device"] == "cuda" else ("score", "other")

    def host(run: dict) -> float:
        return sum(v for k, v in run["cpu"].items() if k not in left_out)
    return 1e6 * (host(large) - host(small)) / (large["pairs"] - small["pairs"])


def render(raw: float, cases: list[tuple[str, dict, dict, list[float]]],
           corpus_run: Optional[dict],
           fast: Optional[float] = None) -> str:
    cores = usable_cores()
    device = cases[0][2]["device"] if cases else "cpu"  # the machine's name: GPU or CPU
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {stamp}: feed (host side), {machine(device)}", "",
             f"`python benchmarks/feed.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f"; {versions()}; micro model (R*'s tokenizer, 1 layer, hidden 64), "
             f"--batch-tokens {GPU_BATCH_TOKENS} --replica-batch-rows {GPU_BATCH_ROWS} (a GPU's "
             "defaults); 100 candidates per query.", "",
             "| what | pairs | seconds | pairs/s | × raw tokenizer |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| raw tokenizer, `encode_batch`, one thread (passages) | | | {raw:.0f} | 1.00 |"]
    if fast is not None:
        lines.append(f"| raw nanotoken (the fast path), one thread (passages) | | | "
                     f"{fast:.0f} | {fast / raw:.2f} |")
    for label, small, large, rounds in cases:
        lines += case_rows(label, small, large, raw, rounds)
    if corpus_run:
        rate = corpus_run["passages"] / corpus_run["seconds"]
        lines.append(f"| tokenize-corpus, once (passages), end to end | "
                     f"{corpus_run['passages']} | {corpus_run['seconds']:.1f} | {rate:.0f} | "
                     f"{rate / raw:.2f} |")
    lines += ["", f"Marginal rates per CPU core ({cores} cores): " + "; ".join(
        f"{label} {marginal_rate(s, l) / cores:.0f}"
        for label, s, l, _ in cases) + " pairs/s. Driver peak RSS, small → large: " + "; ".join(
        f"{label} {s['rss_mb']:.0f} → {l['rss_mb']:.0f} MB "
        f"({100 * (l['rss_mb'] / s['rss_mb'] - 1):+.1f}%)" for label, s, l, _ in cases) + "."]
    for label, small, large, _ in cases:
        lines += cpu_table(label, small, large)
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=500_000,
                        help="large run from text (default 500k)")
    parser.add_argument("--id-pairs", type=int, default=1_000_000,
                        help="large id-only run with a tokenized corpus (default 1M)")
    parser.add_argument("--small", type=int, default=25_000, help="small runs (default 25k)")
    parser.add_argument("--before", metavar="DIR",
                        help="also time the text runs with the rstar_batch package in DIR")
    parser.add_argument("--skip", nargs="*", default=[], choices=["text", "tokenized"])
    parser.add_argument("--rounds", type=int, default=3,
                        help="text runs per case, the cases taking turns; the median round "
                             "is reported (default 3)")
    parser.add_argument("--workdir", help="keep data and model here between runs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; writes nothing")
    parser.add_argument("--cores", type=int,
                        help="run on this many of the cores this process may use (e.g. 2 "
                             "on a GPU node); the jobs plan on those alone")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.cores:
        # inherited by the raw tokenizer's process, the jobs and their Ray processes
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.cores])
    if args.smoke:
        args.pairs, args.id_pairs, args.small, args.rounds = 2000, 2000, 500, 1
    workdir = args.workdir or tempfile.mkdtemp(prefix="rstar-feed-")
    model = make_tiny_model(os.path.join(workdir, "micro"), architecture=MICRO_ARCHITECTURE)
    text = {size: write_candidates(os.path.join(workdir, f"text-{size}"), size, seed)
            for size, seed in ((args.small, 8), (args.pairs, 7))}
    raw = raw_tokenizer_rate(model, os.path.join(text[args.pairs], "part-00000.parquet"))
    fast = raw_tokenizer_rate(model, os.path.join(text[args.pairs], "part-00000.parquet"),
                              "nanotoken")
    cases, corpus_run = [], None
    if "text" not in args.skip:
        variants = [("from text", "text", [], None),
                    # the same job with the Hugging Face tokenizer (what every run did before)
                    ("from text, --tokenizer-backend hf", "text-hf",
                     ["--tokenizer-backend", "hf"], None),
                    # the replica shaped as a GPU's: one process, one thread (a GPU replica
                    # holds one CPU), in the micro model's cheapest dtype on this CPU
                    (f"from text, replica as a GPU's ({' '.join(GPU_SHAPED)})", "text-gpu-shaped",
                     GPU_SHAPED, None)]
        if args.before:
            variants.append(("from text, before", "before", [], args.before))
        cases += interleaved(model, text, args.small, args.pairs, workdir, variants, args.rounds)
    if "tokenized" not in args.skip:
        corpus = os.path.join(text[args.pairs], "part-00000.parquet")   # ≤ 100k passages
        tokens = os.path.join(workdir, "tokenized-corpus")
        corpus_run = tokenize_corpus(model, corpus, tokens)
        runs = {}
        for size, seed in ((args.small, 9), (args.id_pairs, 10)):
            candidates, queries = write_id_only(os.path.join(workdir, f"ids-{size}"), size,
                                                corpus, seed)
            runs[size] = run_job(model, ["--candidates", candidates, "--queries", queries,
                                         "--corpus", tokens],
                                 os.path.join(workdir, f"out-ids-{size}"), [])
        cases.append(("tokenized corpus", runs[args.small], runs[args.id_pairs], []))
    report = render(raw, cases, corpus_run, fast)
    print(report)
    if not args.smoke:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + report)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
