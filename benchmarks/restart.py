"""What survives a kill, and how soon a run commits: the spot-capacity numbers.

    python benchmarks/restart.py                 # 4,000 pairs, R*'s architecture
    python benchmarks/restart.py --before DIR    # also an older checkout, same data
    python benchmarks/restart.py --smoke         # tiny sizes for CI; writes nothing

For each checkout, every run is `rstar-batch rerank` in its own process (an embedded
local Ray, default options but `--checkpoint-rows 256`), watched by polling the output's
commit records:
  1. a fresh run to the end: seconds from launch to its first commit, and to exit; and
     how far its log's progress lines trail the commit records (what `rstar-batch
     status` reads), sampled every second: for each sample, the seconds until a
     progress line (or the summary) says at least as much;
  2. three runs in a row, each SIGKILLed N s after its launch (a node preempted every N
     s; N: the fresh run's first commit plus half its scoring, or --kill-after), then one
     to the end: pairs committed after each kill, each resumed run's
     seconds from launch to its first new commit, and whether the final output equals
     run 1's;
  3. a run sent SIGTERM once half the pairs are committed, then one to the end: seconds
     from the signal to exit, its exit code, and pairs scored twice across the two.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import machine, versions  # noqa: E402

from rstar_batch.testing import make_tiny_model, write_sample_data  # noqa: E402

CHECKPOINT_ROWS = 256


class Launch:
    """One `rstar-batch rerank` process (its own session) and its commits as they land."""

    def __init__(self, source: Optional[str], args: list[str], out: str, log: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        if source:
            env["PYTHONPATH"] = source
        self.out, self.started = out, time.monotonic()
        self.before = set(self.commits())
        self.first_commit: Optional[float] = None
        self.samples: Optional[list[tuple[float, int]]] = None  # set to a list to sample
        self.proc = subprocess.Popen([sys.executable, "-m", "rstar_batch", "rerank", *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=source or None)

    def commits(self) -> list[str]:
        """Commit records (this version's `*.json`; older checkouts' `c*` markers)."""
        folder = os.path.join(self.out, "_work", "commits")
        return glob.glob(os.path.join(folder, "*.json")) + glob.glob(os.path.join(folder, "c*"))

    def poll(self) -> None:
        if self.first_commit is None and set(self.commits()) - self.before:
            self.first_commit = time.monotonic() - self.started
        now = time.time()
        if self.samples is not None and now - (self.samples[-1][0] if self.samples else 0) >= 1:
            self.samples.append((now, committed(self.out)))

    def wait(self, until=lambda: False, timeout: float = 1800) -> float:
        """Poll until the process exits or `until()`; return seconds since launch."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and not until() and time.monotonic() < deadline:
            self.poll()
            time.sleep(0.1)
        self.poll()
        return time.monotonic() - self.started

    def kill(self) -> None:
        """SIGKILL every process of its session (the embedded Ray's workers are in other
        process groups: a replica left alive would go on committing), until none is left."""
        kill_session(self.proc.pid)
        self.proc.wait()


def kill_session(sid: int) -> None:
    while pids := [int(p.split("/")[2]) for p in glob.glob("/proc/[0-9]*/stat")
                   if _session(p) == sid]:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


def _session(stat: str) -> Optional[int]:
    try:
        fields = open(stat).read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[3])


def committed(out: str) -> int:
    """Pairs the output's commit records cover (older checkouts: their `c*` markers)."""
    if glob.glob(os.path.join(out, "_work", "commits", "*.json")):
        from rstar_batch.base import fs as fsio
        from rstar_batch.progress.log import read_progress

        return read_progress(*fsio.resolve(out)).committed_rows()
    rows = 0
    for path in glob.glob(os.path.join(out, "_work", "commits", "c*")):
        _, start, end = os.path.basename(path).split(".")[0].split("-")
        rows += int(end) - int(start)
    return rows


def progress_lag(log: str, samples: list[tuple[float, int]]) -> tuple[int, float]:
    """The progress lines the log holds, and the most seconds any sample of the commit
    records waited for a line (a progress line or the final summary) saying as much."""
    lines = []
    for line in open(log):
        found = re.match(r"(\S+ \S+) INFO rstar_batch\.(driver: progress: (\d+)/|manifest: "
                         r"rstar-batch: (\d+) pairs)", line)
        if found:
            at = datetime.datetime.strptime(found[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            lines.append((at, int(found[3] or found[4]), found[3] is not None))
    worst = 0.0
    for t, pairs in samples:
        said = [at for at, n, _ in lines if n >= pairs]
        if pairs and said:
            worst = max(worst, min(said) - t)
    return sum(1 for *_, progress in lines if progress), worst


def ranked(out: str) -> dict:
    table = pq.read_table(out, columns=["query_id", "doc_id", "rank", "score"])
    order = np.lexsort((table["rank"].to_numpy(), table["query_id"].to_numpy()))
    return {k: table[k].to_numpy()[order] for k in table.column_names}


def same_output(a: dict, b: dict) -> bool:
    return (all(np.array_equal(a[k], b[k]) for k in ("query_id", "doc_id", "rank"))
            and bool(np.allclose(a["score"], b["score"], atol=1e-6)))


def measure(source: Optional[str], candidates: str, model: str, work: str, total: int,
            kill_after: float, kills: int) -> dict:
    args = lambda out: ["--candidates", candidates, "--output", out, "--model", model,  # noqa: E731
                        "--checkpoint-rows", str(CHECKPOINT_ROWS), "--dtype", "float32"]
    result: dict = {}
    # 1. fresh, to the end
    out = os.path.join(work, "fresh")
    run = Launch(source, args(out), out, out + ".log")
    run.samples = []
    result["fresh_seconds"] = run.wait()
    result["fresh_first_commit"] = run.first_commit
    result["progress_lines"], result["progress_lag"] = progress_lag(out + ".log", run.samples)
    assert run.proc.returncode == 0, open(out + ".log").read()[-2000:]
    result["fresh_phases"] = json.load(open(os.path.join(out, "_manifest.json")))[
        "seconds_by_phase"]
    reference = ranked(out)
    if kill_after is None:  # mid-scoring, whatever this machine's speed
        kill_after = round(result["fresh_first_commit"] + 0.5 * result["fresh_phases"]["scoring"])
    result["kill_after"] = kill_after
    # 2. SIGKILL kill_after s into each of `kills` runs, then to the end
    out = os.path.join(work, "killed")
    result["after_kills"], result["resume_first_commit"] = [], []
    for i in range(kills):
        run = Launch(source, args(out), out, f"{out}.{i}.log")
        run.wait(until=lambda: time.monotonic() - run.started >= kill_after)
        run.kill()
        result["after_kills"].append(committed(out))
        if i:
            result["resume_first_commit"].append(run.first_commit)
    run = Launch(source, args(out), out, out + ".final.log")
    result["final_seconds"] = run.wait()
    result["final_first_commit"] = run.first_commit
    assert run.proc.returncode == 0, open(out + ".final.log").read()[-2000:]
    result["killed_equals_fresh"] = same_output(ranked(out), reference)
    # 3. SIGTERM at half way, then to the end
    out = os.path.join(work, "sigterm")
    run = Launch(source, args(out), out, out + ".log")
    run.wait(until=lambda: committed(out) >= total // 2)
    sent = time.monotonic()
    run.proc.send_signal(signal.SIGTERM)
    try:
        run.proc.wait(120)
    except subprocess.TimeoutExpired:
        pass
    result["sigterm_exit_seconds"] = round(time.monotonic() - sent, 1)
    result["sigterm_exit_code"] = run.proc.poll()
    run.kill()  # whatever is left of its session
    result["committed_at_sigterm"] = committed(out)
    run = Launch(source, args(out), out, out + ".final.log")
    run.wait()
    assert run.proc.returncode == 0, open(out + ".final.log").read()[-2000:]
    per_run = json.load(open(os.path.join(out, "_manifest.json")))["pairs_scored_per_run"]
    result["scored_twice_after_sigterm"] = sum(per_run.values()) - total
    result["sigterm_equals_fresh"] = same_output(ranked(out), reference)
    return result


def _s(value: Optional[float]) -> str:
    return "none" if value is None else f"{value:.1f}"


def report(results: dict[str, dict], total: int) -> str:
    lines = [f"| | {' | '.join(results)} |", f"| --- |{' ---: |' * len(results)}"]
    rows = [
        ("fresh run: launch → first commit, s", lambda r: _s(r["fresh_first_commit"])),
        ("fresh run: launch → exit, s", lambda r: _s(r["fresh_seconds"])),
        ("fresh run: progress lines logged", lambda r: str(r["progress_lines"])),
        ("fresh run: most seconds the log trailed the commit records",
         lambda r: _s(r["progress_lag"])),
        ("fresh run: its manifest's start-up, scoring and rank phases, s",
         lambda r: " / ".join(_s(r["fresh_phases"].get(k)) for k in ("startup", "scoring",
                                                                      "rank"))),
        ("pairs committed after SIGKILLs N s into each run",
         lambda r: f"{' → '.join(str(c) for c in r['after_kills'])} (N = {r['kill_after']:g})"),
        ("resumed runs: launch → first new commit, s",
         lambda r: ", ".join(_s(s) for s in r["resume_first_commit"])),
        ("final run after the kills: launch → first commit, s",
         lambda r: _s(r["final_first_commit"])),
        ("final run after the kills: launch → exit, s", lambda r: _s(r["final_seconds"])),
        ("killed and resumed output = uninterrupted", lambda r: str(r["killed_equals_fresh"])),
        (f"SIGTERM at half way ({total // 2} pairs): seconds to exit",
         lambda r: f"{r['sigterm_exit_seconds']} (exit code {r['sigterm_exit_code']})"),
        ("pairs committed at the SIGTERM", lambda r: str(r["committed_at_sigterm"])),
        ("pairs scored twice, SIGTERMed run + rerun",
         lambda r: str(r["scored_twice_after_sigterm"])),
        ("SIGTERMed and resumed output = uninterrupted", lambda r: str(r["sigterm_equals_fresh"])),
    ]
    for name, cell in rows:
        lines.append(f"| {name} | {' | '.join(cell(r) for r in results.values())} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4000)
    parser.add_argument("--kill-after", type=float, default=None,
                        help="seconds into each killed run (default: the fresh run's "
                        "first commit plus half its scoring)")
    parser.add_argument("--before", help="an older checkout to measure the same way")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    args = parser.parse_args()
    total, kill_after, kills = args.pairs, args.kill_after, 3
    if args.smoke:
        total, kill_after, kills = 200, 15.0, 1
    with tempfile.TemporaryDirectory(prefix="rstar-restart-") as work:
        candidates = os.path.join(work, "candidates")
        write_sample_data(candidates, num_queries=total // 40, candidates_per_query=40,
                          files=2, seed=5)
        model = make_tiny_model(os.path.join(work, "model"))
        results = {}
        for name, source in (("this checkout", None), ("--before", args.before)):
            if name == "--before" and not source:
                continue
            folder = os.path.join(work, name.strip("-").replace(" ", "-"))
            os.makedirs(folder)
            results[name] = measure(source and os.path.abspath(source), candidates, model,
                                    folder, total, kill_after, kills)
    print(f"## Restart and drain ({datetime.date.today()}; {machine('cpu')})\n")
    print(f"{total} pairs, R*'s architecture (random weights), `--checkpoint-rows "
          f"{CHECKPOINT_ROWS} --dtype float32` (scores equal run to run; bfloat16's differ "
          f"with the batches' padding), other options default; {versions()}.\n")
    print(report(results, total))


if __name__ == "__main__":
    main()
