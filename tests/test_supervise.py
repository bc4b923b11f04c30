"""The watcher of a job that starts its own Ray (rstar_batch/supervise.py), with
stand-in children: what it passes on, what it reports, and that its child dies
with it. The real job under a group SIGTERM is in test_resume.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.jobs import job_pids, kill_until_gone

# The stand-in job: says it is ready, then waits; on SIGTERM it exits with the code
# given (75: drained; 1: killed by Ray's core worker mid-drain, say).
CHILD = """
import os, signal, sys, time
code = int(sys.argv[1])
signal.signal(signal.SIGTERM, signal.SIG_IGN if code < 0 else lambda *_: os._exit(code))
print("ready", os.getpid(), os.getsid(0), flush=True)
time.sleep(60)
"""
WATCHER = """
import sys
from rstar_batch import supervise
def stopped(name):
    print("reported", name, flush=True)
    return 75
supervise.STOP_GRACE_S = 0.5
drain_s = float(sys.argv[3]) if len(sys.argv) > 3 else None
sys.exit(supervise.watch(stopped, argv=["-c", sys.argv[1], sys.argv[2]],
                         drain_s=lambda: drain_s))
"""


def _start(exit_on_term: int, *drain_s: str) -> tuple[subprocess.Popen, int, int]:
    """The watcher in a session of its own; the child's pid and session once ready."""
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, CHILD, str(exit_on_term),
                                *drain_s],
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    ready = watcher.stdout.readline().split()
    assert ready[0] == "ready", ready
    return watcher, int(ready[1]), int(ready[2])


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().split(")")[-1].split()[0] == "Z":
                    return True  # a zombie: exited, waiting to be reaped
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("exit_on_term,code,reported", [(75, 75, False), (0, 0, False),
                                                        (1, 75, True)])
def test_a_group_sigterm_reaches_the_child_once_and_a_lost_driver_is_reported(
        exit_on_term, code, reported):
    watcher, child, child_session = _start(exit_on_term)
    try:
        assert child_session == child != watcher.pid  # its own session: no group signal
        os.killpg(watcher.pid, signal.SIGTERM)  # systemd, Slurm, kill -- -PGID
        out, _ = watcher.communicate(timeout=20)
        assert watcher.returncode == code
        assert ("reported SIGTERM" in out) == reported
    finally:
        kill_until_gone(job_pids(watcher.pid), "the watcher")


def test_a_child_that_does_not_stop_in_time_is_ended_and_reported():
    """A driver stuck where no handler runs (Ray's C++ connect to a killed GCS): the
    watcher ends it drain_s + STOP_GRACE_S after the stop and reports for it."""
    watcher, child, _ = _start(-1, "0.5")  # -1: the stand-in ignores SIGTERM
    try:
        sent = time.monotonic()
        os.killpg(watcher.pid, signal.SIGTERM)
        out, _ = watcher.communicate(timeout=20)
        assert watcher.returncode == 75 and "reported SIGTERM" in out
        assert 0.9 < time.monotonic() - sent < 5 and _gone(child)
    finally:
        kill_until_gone(job_pids(watcher.pid), "the watcher")


def test_a_child_that_dies_unasked_gives_its_code_and_no_report():
    watcher, child, _ = _start(75)
    try:
        os.kill(child, signal.SIGKILL)
        out, _ = watcher.communicate(timeout=20)
        assert watcher.returncode == 128 + signal.SIGKILL and "reported" not in out
    finally:
        kill_until_gone(job_pids(watcher.pid), "the watcher")


def test_the_child_dies_with_its_watcher():
    watcher, child, _ = _start(75)
    try:
        os.kill(watcher.pid, signal.SIGKILL)
        assert _gone(child), "the child outlived its watcher"
    finally:
        kill_until_gone(job_pids(watcher.pid), "the watcher")
