"""Run the CLI as a separate process that a test can SIGKILL, Ray and all."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Optional


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (the job's driver and every Ray process it started)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.split("/")[2]))
    return pids


class Job:
    """`python -m rstar_batch ARGS` in its own session, with its log in a file."""

    def __init__(self, args: list[str], log: str, env: Optional[dict] = None) -> None:
        self.log = log
        base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
        self.proc = subprocess.Popen([sys.executable, "-m", "rstar_batch", *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env={**base, **(env or {})})

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def output(self) -> str:
        return open(self.log).read()

    def wait_until(self, condition: Callable[[], bool], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                raise AssertionError(f"job ended before the kill point:\n{self.output()[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("kill point not reached in time")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the driver and every process of its session; wait until none is left."""
        sid = self.proc.pid
        deadline = time.monotonic() + 60
        while True:
            pids = session_pids(sid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"processes {pids} of the killed job survive")
            time.sleep(0.1)
        self.proc.wait()


def run(args: list[str], log: str, env: Optional[dict] = None, timeout: float = 300) -> Job:
    job = Job(args, log, env)
    job.wait(timeout)
    return job
