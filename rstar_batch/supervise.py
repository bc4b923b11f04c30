"""A job that starts its own Ray runs in a child process, in a session of its own,
watched by the process the user started.

systemd, Slurm and `kill -- -PGID` signal every process of the job's process group,
and an embedded Ray's GCS, raylet and workers are in it: they ended together with
the driver's drain, and Ray's core worker then ends the driver itself (exit 1, no
Python cleanup) the moment it touches the object store it lost. So the watcher runs
the same command again in a child whose session holds the driver and its Ray, and
passes each SIGTERM or SIGINT it gets to the driver alone: the drain runs with Ray
alive. Should the driver die anyway after a stop (systemd signals a whole cgroup;
the kernel's OOM killer), the watcher reports what is committed, read from the
output as `rstar-batch status` does, and exits 75 as a drained job would. The child
dies with the watcher (PR_SET_PDEATHSIG), and the embedded Ray with the child.

A job that joins a cluster (`--address`, `RAY_ADDRESS`: `ray job submit` sets it)
runs where it was started: a signal to its group reaches no Ray process.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional

from rstar_batch.progress.drain import EXIT_STOPPED

log = logging.getLogger(__name__)

CHILD_ENV = "RSTAR_BATCH_WATCHED"  # set in the child: it runs the job itself


def wanted(address: Optional[str]) -> bool:
    """Whether this command, about to start a Ray of its own, should run in a child."""
    return (sys.platform.startswith("linux") and not address
            and not os.environ.get("RAY_ADDRESS") and not os.environ.get(CHILD_ENV))


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the watcher dies, as Ray's own processes
    are bound to their parent."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


# How long past its drain a driver may take to exit after a stop before the watcher
# ends it: one whose embedded Ray was killed while ray.init connected to it sat ~30 s in
# Ray's C++ connect, where no Python handler runs (seen in 2 of 6 tries).
STOP_GRACE_S = 5.0


def watch(stopped: Callable[[str], int], argv: Optional[list[str]] = None,
          drain_s: Callable[[], Optional[float]] = lambda: None) -> int:
    """Run this process's command line (`argv`: the interpreter's arguments, by
    default as this process was started) in a child of its own session; return its
    exit code, or `stopped(signal name)` when it died without finishing after a stop
    was asked. A child ended by a signal returns 128 + the signal, as a shell says.
    With `drain_s()` (the job's drain bound, read from its config; None where the
    config does not parse: the job itself says why), a child still running that +
    STOP_GRACE_S after the first stop is killed, its Ray with it, and reported."""
    try:
        bound = drain_s()
    except Exception:  # noqa: BLE001 - the child reports the bad config
        bound = None
    command = [sys.executable, *(sys.orig_argv[1:] if argv is None else argv)]
    child = subprocess.Popen(command, env={**os.environ, CHILD_ENV: "1"},
                             start_new_session=True, preexec_fn=_die_with_parent)
    asked: list[str] = []
    first: list[float] = []

    def forward(signum: int, _frame) -> None:
        asked.append(signal.Signals(signum).name)
        first.append(time.monotonic())
        try:
            child.send_signal(signum)  # the driver alone: a second one exits at once
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                code = child.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if bound is not None and first and \
                        time.monotonic() - first[0] > bound + STOP_GRACE_S:
                    log.warning("the job did not stop within %g s of %s; ending it",
                                bound + STOP_GRACE_S, asked[0])
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child.pid, signal.SIGKILL)  # its session: its Ray too
                    code = child.wait()
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if asked and code not in (0, 2, EXIT_STOPPED):
        return stopped(asked[0])
    return 128 - code if code < 0 else code
