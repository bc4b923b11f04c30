"""Sweep the scorer's token budget per forward pass (the --batch-tokens default).

    python benchmarks/batch_tokens.py [--pairs 1000] [--device cpu]

Prints pairs/s of our in-process scorer for each budget, same pairs, one run.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import machine, ours  # noqa: E402

from rstar_batch.testing import make_candidates, make_tiny_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    args = parser.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = make_tiny_model(os.path.join(tempfile.mkdtemp(prefix="rstar-sweep-"), "model"))
    table = make_candidates(max(1, args.pairs // 100), 100, seed=3)
    dtype = "float32" if args.device == "cpu" else "auto"
    print(f"{machine(args.device)}; {table.num_rows} pairs")
    print("| --batch-tokens | pairs/s |\n| ---: | ---: |")
    for budget in args.budgets:
        scores, seconds = ours(model, table, args.device, dtype, batch_tokens=budget)
        print(f"| {budget} | {len(scores) / seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
