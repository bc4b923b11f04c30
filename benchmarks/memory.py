"""Driver memory does not grow with the input: peak RSS at N and 4N candidate rows.

    python benchmarks/memory.py [--rows 50000]      # runs N and 4N (4N >= 200k)

Each size runs `rstar-batch rerank` as its own process (an embedded local Ray) with
short pairs (--max-length 16) so scoring stays quick; the job records its driver's
peak RSS in _manifest.json. Appends the result to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rstar_batch.testing import make_tiny_model, write_sample_data

HERE = Path(__file__).resolve().parent


def run_job(rows: int, model: str, workdir: str) -> dict:
    candidates = os.path.join(workdir, f"cands-{rows}")
    write_sample_data(candidates, num_queries=rows // 100, candidates_per_query=100,
                      files=max(1, rows // 25000), seed=5)
    out = os.path.join(workdir, f"out-{rows}")
    subprocess.run([sys.executable, "-m", "rstar_batch", "--log-level", "WARNING", "rerank",
                    "--candidates", candidates, "--output", out, "--model", model,
                    "--max-length", "16", "--batch-tokens", "8192"], check=True)
    manifest = json.load(open(os.path.join(out, "_manifest.json")))
    return {"rows": rows, "rss_mb": manifest["driver_peak_rss_mb"],
            "seconds": manifest["summary"]["seconds"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50000, help="N (default 50000)")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; writes nothing")
    args = parser.parse_args()
    rows = 1000 if args.smoke else args.rows
    workdir = tempfile.mkdtemp(prefix="rstar-memory-")
    model = make_tiny_model(os.path.join(workdir, "model"))
    small, large = run_job(rows, model, workdir), run_job(4 * rows, model, workdir)
    growth = large["rss_mb"] / small["rss_mb"] - 1
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join([
        f"## {stamp}: driver memory at N and 4N rows", "",
        f"`python benchmarks/memory.py {' '.join(sys.argv[1:])}`".replace(" `", "`"), "",
        "| candidate rows | driver peak RSS (MB) | job seconds |", "| ---: | ---: | ---: |",
        *[f"| {r['rows']} | {r['rss_mb']:.0f} | {r['seconds']:.0f} |" for r in (small, large)],
        "", f"Growth from N to 4N: {100 * growth:+.1f}% (target: within +20%).", ""])
    print(report)
    if not args.smoke:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
