"""How fast the host side feeds a GPU: the whole rerank job with a micro model.

    python benchmarks/feed.py                    # 25k and 500k pairs of text
    python benchmarks/feed.py --pairs 200000     # a shorter large run
    python benchmarks/feed.py --smoke            # tiny sizes for CI; writes nothing

The model has R*'s tokenizer but one layer of width 64 (testing.MICRO_ARCHITECTURE),
so scoring costs little and what is timed is everything a GPU would wait on:
reading, normalizing, tokenizing, assembling pairs, shipping blocks between actors,
writing and committing runs, and the rank pass. Each size runs `rstar-batch rerank`
as its own process on an embedded local Ray, with the GPU default --batch-tokens.

Reported beside each other, from one run of this script:
  - the raw tokenizer: `encode_batch(passages, add_special_tokens=False)` on one
    thread over the large run's passages, passages/s;
  - each job end to end (process start to exit) and the marginal rate between the
    two sizes, (large - small pairs) / (large - small seconds), which leaves out the
    fixed start-up (Ray, imports, model load);
  - where the large job's CPU went: CPU seconds per kind of process, sampled from
    /proc while it runs (a Ray worker is named after the task it runs);
  - the job's own phases (start-up, scoring, rank pass) and driver peak RSS, from
    its _manifest.json.
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

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import machine, versions  # noqa: E402

from rstar_batch.testing import MICRO_ARCHITECTURE, make_candidates, make_tiny_model  # noqa: E402

GPU_BATCH_TOKENS = 16384   # Scorer's default on a GPU: the micro model stands in for one
RAW_TOKENIZER = """
import sys, time
import pyarrow.parquet as pq
from transformers import AutoTokenizer
passages = pq.read_table(sys.argv[2], columns=["passage"])["passage"].to_pylist()
backend = AutoTokenizer.from_pretrained(sys.argv[1]).backend_tokenizer
backend.encode_batch(passages[:1000], add_special_tokens=False)
started = time.perf_counter()
backend.encode_batch(passages, add_special_tokens=False)
print(len(passages) / (time.perf_counter() - started))
"""


def raw_tokenizer_rate(model: str, candidates: str) -> float:
    """Passages/s of the bare Rust tokenizer on one thread, in a process of its own."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RAW_TOKENIZER, model, candidates],
                         env=env, check=True, capture_output=True, text=True)
    return float(out.stdout.split()[-1])


def _kind(cmdline: str, job_pid: int, pid: int) -> str:
    """Which part of the job a process (or the task it runs now) is."""
    if pid == job_pid:
        return "driver"
    for part, label in (("Tokenize", "tokenize"), ("Score", "score"), ("ReadChunks", "read"),
                        ("WriteRuns", "write runs"), ("rank_bucket", "rank pass"),
                        ("join_bucket", "join"), ("Bucketize", "join")):
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


def run_job(model: str, candidates: str, out: str, extra: list[str]) -> dict:
    """One `rstar-batch rerank` process: its wall seconds, CPU by part, manifest."""
    command = [sys.executable, "-m", "rstar_batch", "--log-level", "WARNING", "rerank",
               "--candidates", candidates, "--output", out, "--model", model,
               "--batch-tokens", str(GPU_BATCH_TOKENS), "--restart", "--overwrite", *extra]
    started = time.perf_counter()
    process = subprocess.Popen(command)
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
            "tokenizers": manifest["replicas"]["tokenizers"]}


def write_candidates(folder: str, pairs: int, seed: int) -> str:
    """`pairs` candidate rows, 100 per query, every passage its own text."""
    if not os.path.isdir(folder):
        table = make_candidates(max(1, pairs // 100), min(100, pairs), seed=seed)
        os.makedirs(folder)
        step = 100_000
        for i in range(0, table.num_rows, step):
            pq.write_table(table.slice(i, step), os.path.join(folder, f"part-{i // step:05d}.parquet"))
    return folder


def render(args, raw: float, small: dict, large: dict) -> str:
    marginal = (large["pairs"] - small["pairs"]) / (large["seconds"] - small["seconds"])
    cores = os.cpu_count() or 1
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {stamp}: feed (host side), {machine('cpu')}", "",
             f"`python benchmarks/feed.py {' '.join(sys.argv[1:])}`".replace(" `", "`")
             + f"; {versions()}; micro model (R*'s tokenizer, 1 layer, hidden 64), "
             f"--batch-tokens {GPU_BATCH_TOKENS}; candidates from text, 100 per query.", "",
             "| what | pairs | seconds | pairs/s | × raw tokenizer |",
             "| --- | ---: | ---: | ---: | ---: |",
             f"| raw tokenizer, `encode_batch`, one thread (passages) | | | {raw:.0f} | 1.00 |"]
    for label, run in (("job, small", small), ("job, large", large)):
        rate = run["pairs"] / run["seconds"]
        lines.append(f"| {label}, end to end | {run['pairs']} | {run['seconds']:.1f} | "
                     f"{rate:.0f} | {rate / raw:.2f} |")
    lines += [f"| **job, marginal** (large − small) | {large['pairs'] - small['pairs']} | "
              f"{large['seconds'] - small['seconds']:.1f} | **{marginal:.0f}** | "
              f"**{marginal / raw:.2f}** |", "",
              f"Per CPU core ({cores}): marginal {marginal / cores:.0f} pairs/s. "
              f"Tokenizer actors (most): {large['tokenizers']}. Driver peak RSS: "
              f"{small['rss_mb']:.0f} MB small, {large['rss_mb']:.0f} MB large "
              f"({100 * (large['rss_mb'] / small['rss_mb'] - 1):+.1f}%).", "",
              "Large job's phases (s): " + ", ".join(
                  f"{k} {v:.1f}" for k, v in large["phases"].items()) + ".", "",
              "Where the large job's CPU went (CPU seconds, share of all):", "",
              "| part | CPU s | share |", "| --- | ---: | ---: |"]
    total = sum(large["cpu"].values())
    for kind, used in sorted(large["cpu"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {kind} | {used:.1f} | {100 * used / total:.0f}% |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=500_000, help="large run (default 500k)")
    parser.add_argument("--small", type=int, default=25_000, help="small run (default 25k)")
    parser.add_argument("--workdir", help="keep data and model here between runs")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes for CI; writes nothing")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    parser.add_argument("job_options", nargs="*", help="more rerank options, after --")
    args = parser.parse_args()
    if args.smoke:
        args.pairs, args.small = 2000, 500
    workdir = args.workdir or tempfile.mkdtemp(prefix="rstar-feed-")
    model = make_tiny_model(os.path.join(workdir, "micro"), architecture=MICRO_ARCHITECTURE)
    large_in = write_candidates(os.path.join(workdir, f"text-{args.pairs}"), args.pairs, 7)
    small_in = write_candidates(os.path.join(workdir, f"text-{args.small}"), args.small, 8)
    raw = raw_tokenizer_rate(model, os.path.join(large_in, "part-00000.parquet"))
    small = run_job(model, small_in, os.path.join(workdir, "out-small"), args.job_options)
    large = run_job(model, large_in, os.path.join(workdir, "out-large"), args.job_options)
    report = render(args, raw, small, large)
    print(report)
    if not args.smoke:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + report)
        print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
