"""preStop hook of the KubeRay head pod: drain the job drivers running on this node.

Kubernetes stops the head container with SIGTERM, and `ray start --block` then stops
Ray and, with it, the driver at once: nothing drained. This hook runs before that
SIGTERM: it sends each driver of jobs/ (nightly_rerank.py, score_corpus.py) SIGTERM,
which drains it (docs/operations.md, "Spot and preemptible capacity"), then waits
until they have exited, at most --wait seconds (less than the pod's
terminationGracePeriodSeconds, which the hook's time counts against).

    python /app/jobs/stop_drivers.py --wait 40
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

ENTRYPOINTS = ("nightly_rerank.py", "score_corpus.py")


def drivers(names: tuple[str, ...] = ENTRYPOINTS) -> list[int]:
    """Pids of the processes running one of the entrypoints (`python .../NAME ...`)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if len(args) > 1 and os.path.basename(args[1].decode(errors="replace")) in names:
            found.append(int(entry))
    return found


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wait", type=float, default=40.0,
                        help="seconds to wait for the drivers to exit (default: 40)")
    args = parser.parse_args(argv)
    pids = drivers()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    print(f"stop_drivers: SIGTERM sent to {len(pids)} driver(s) {pids}", flush=True)
    deadline = time.monotonic() + args.wait
    while (left := [p for p in pids if os.path.exists(f"/proc/{p}")
                    and not _zombie(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    if left:
        print(f"stop_drivers: {left} still running after {args.wait:g} s", flush=True)
        return 1
    return 0


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
