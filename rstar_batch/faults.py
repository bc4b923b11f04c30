"""Test-only fault injection into the score stage and tokenize-corpus's writer.
Unset in production.

RSTAR_BATCH_TEST_FAULT selects the faults, comma-separated (`exit:3,writerexit:1`):
  exit:N        the replica process dies (os._exit) at its N-th batch, once per job
  raise:N       the N-th batch raises once per job (its retry succeeds)
  raise:always  every batch raises (the job must fail, naming the rows)
  slow:S        every batch takes S seconds longer: a heavier model's cost, so that
                scoring is what the pool of replicas scales for
  slowrank:S    every rank-pass task takes S seconds longer (scoring is not slowed): a
                stop signalled once scoring is done lands inside the rank pass
  writerexit:N  a commit writer's process dies (os._exit) at its N-th commit, once per
                job, with the rows it was about to commit (its node lost, in effect)
  sigterm:P     the driver sends itself SIGTERM on reaching phase P (`between_passes`:
                every pair committed, nothing ranked; `rank_pass`: its tasks submitted,
                none awaited; `manifest`: about to write it), moments no signal from
                outside can be timed to hit
  sigtermgroup:P  the same to every process of the job, as systemd stopping a unit
                sends it: the driver's process group (an embedded Ray's processes too)
                and the watcher that started it (supervise.py), if any
"Once per job" is kept by a marker file in RSTAR_BATCH_TEST_FAULT_DIR, which
survives the replica's restart. A job that joins a running cluster carries both
variables to its workers (`job_env`), so tests can share one cluster between jobs
with different faults.
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "RSTAR_BATCH_TEST_FAULT"
DIR_ENV = "RSTAR_BATCH_TEST_FAULT_DIR"


def job_env() -> dict[str, str]:
    """The fault variables this driver was started with, for its job's workers: a
    cluster's workers start from their node's environment, not the driver's."""
    return {k: os.environ[k] for k in (FAULT_ENV, DIR_ENV) if os.environ.get(k)}


class InjectedFault(RuntimeError):
    pass


class FaultHook:
    def __init__(self, spec: str = "", marker_dir: str = "") -> None:
        self.faults = {kind: when for kind, _, when in
                       (part.strip().partition(":") for part in spec.split(",")) if kind}
        self.marker_dir = marker_dir
        self.batches = 0

    @classmethod
    def from_env(cls) -> "FaultHook":
        return cls(os.environ.get(FAULT_ENV, ""), os.environ.get(DIR_ENV, ""))

    def before_batch(self) -> None:
        if "slow" in self.faults:
            time.sleep(float(self.faults["slow"]))
        self.batches += 1
        for kind in ("raise", "exit"):
            when = self.faults.get(kind)
            if when == "always":
                raise InjectedFault("injected fault: every batch fails")
            if when is not None and self.batches >= int(when) and self._claim(kind):
                if kind == "exit":
                    os._exit(17)
                raise InjectedFault(f"injected fault at batch {self.batches}")

    def before_commit(self, commits: int) -> None:
        when = self.faults.get("writerexit")
        if when is not None and commits >= int(when) and self._claim("writerexit"):
            os._exit(17)

    def before_rank(self) -> None:
        if "slowrank" in self.faults:
            time.sleep(float(self.faults["slowrank"]))

    def at_phase(self, phase: str) -> None:
        """The driver reaches `phase` (see sigterm:P above)."""
        if self.faults.get("sigterm") == phase:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.faults.get("sigtermgroup") == phase:
            from rstar_batch.supervise import CHILD_ENV

            if os.environ.get(CHILD_ENV):
                os.kill(os.getppid(), signal.SIGTERM)
            os.killpg(os.getpgrp(), signal.SIGTERM)

    def _claim(self, kind: str) -> bool:
        try:
            os.close(os.open(os.path.join(self.marker_dir, f"fired-{kind}"),
                             os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False
