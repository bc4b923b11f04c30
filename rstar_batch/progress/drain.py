"""Stopping a job cleanly: the first SIGTERM or SIGINT drains, a second one exits.

A spot node's notice, Kubernetes ending a pod, `ray job stop` and Ctrl-C all send
the driver SIGTERM (or SIGINT) and give it a grace period before SIGKILL. On the
first signal the job stops taking new input: the readers emit no more chunks, each
model replica hands over the slice it is scoring and takes no other, the commit
writers commit what they hold, and the driver waits for that, at most
`drain_seconds`, then reports what is committed and exits with `EXIT_STOPPED`. A
rerun resumes as after any kill; it only redoes less.

Writers commit on a clock (io/scored.CommitWriter), so a node lost without any notice
loses about `commit_seconds` of its scoring.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL: the job stopped on request; rerunning it resumes.
EXIT_STOPPED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """The job drained after SIGTERM or SIGINT and stopped before it finished."""

    def __init__(self, message: str, committed: Optional[int] = None,
                 total: Optional[int] = None) -> None:
        super().__init__(message)
        self.committed, self.total = committed, total

    @classmethod
    def on(cls, signal_name: str, done: int, total: int) -> "Stopped":
        return cls(f"stopped on {signal_name}: {done} of {total} pairs are committed; "
                   "rerun the same command to resume", done, total)


class StopFlag:
    """The Ray actor behind `StopSignal`: set once by the driver, read by the workers."""

    def __init__(self) -> None:
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True

    def is_set(self) -> bool:
        return self.stopped


class StopSignal:
    """What readers and replicas hold (it pickles into their tasks): `is_set()` says
    whether the driver asked the job to stop.

    A check never waits long: it asks the flag and waits at most `wait_s` for the
    answer; without one (the flag's actor still starting on a busy node) it keeps the
    last answer, not a stop, and reads the pending answer at the next check. A flag
    that is gone means the driver that owned it is gone, which reads as a stop.
    """

    def __init__(self, actor: Any, wait_s: float = 0.1) -> None:
        self.actor, self.wait_s = actor, wait_s
        self._pending: Any = None
        self._set = False

    def __getstate__(self) -> dict:
        return {"actor": self.actor, "wait_s": self.wait_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["actor"], state["wait_s"])

    def is_set(self) -> bool:
        if self._set:
            return True
        import ray

        if self._pending is None:
            self._pending = self.actor.is_set.remote()
        ready, _ = ray.wait([self._pending], timeout=self.wait_s)
        if ready:
            answer, self._pending = self._pending, None
            try:
                self._set = bool(ray.get(answer))
            except ray.exceptions.RayActorError:  # the driver, and so its flag, is gone
                self._set = True
        return self._set


def stop_requested(stop: Optional[StopSignal]) -> bool:
    return stop is not None and stop.is_set()


# A stop asked before the job's drain watched: (signal name, when), for `Drain.watch`.
_EARLY: list[tuple[str, float]] = []


def watch_from_the_start() -> None:
    """For an entrypoint, once it has parsed its arguments: a SIGTERM or SIGINT that
    comes while the job imports, checks its inputs and model or plans is kept for its
    drain (`Drain.watch`), which then stops it at its first check, before Ray starts,
    with the usual line and exit code 75; without this, the signal's default action
    ended the process with nothing said. A second signal exits at once."""
    def early(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        if _EARLY:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        _EARLY.append((name, time.monotonic()))
        log.warning("%s before the job started: it stops before Ray starts (a second "
                    "signal exits at once)", name)

    if threading.current_thread() is threading.main_thread():
        for sig in _SIGNALS:
            signal.signal(sig, early)


class Drain:
    """The driver's side: signal handlers, the flag the workers read, the deadline.

    `watch()` installs the handlers (again after `ray.init`, which installs its own);
    `attach()` creates the flag once Ray runs. `requested` turns true on the first
    signal, `overdue` once `seconds` have passed since. The handlers only set state,
    so a signal never raises inside Ray; the driver polls (`check`) between waits.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.requested_at: Optional[float] = None
        self.signal_name = ""
        self.flag: Optional[Any] = None
        self.signal: Optional[StopSignal] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    @property
    def overdue(self) -> bool:
        return self.requested and time.monotonic() - self.requested_at > self.seconds

    def left(self) -> float:
        """Seconds left until the deadline of a requested stop (at least one)."""
        return max(1.0, self.seconds - (time.monotonic() - self.requested_at))

    def watch(self) -> None:
        """Handle SIGTERM and SIGINT (only the main thread may; elsewhere: do nothing)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)
        if _EARLY and not self.requested:
            self.signal_name, self.requested_at = _EARLY[0]

    def restore(self) -> None:
        """Put the previous handlers back; end the flag if the caller's Ray lives on."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self.flag is not None:
            import ray

            if ray.is_initialized():
                try:
                    ray.kill(self.flag)
                except Exception as exc:  # noqa: BLE001 - gone with its Ray already
                    log.debug("the stop flag could not be ended: %s", exc)
            self.flag = None

    def attach(self) -> StopSignal:
        """The flag the workers read, in the running Ray (set already if asked before)."""
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # A worker node lost mid-job took a flag placed on it along, which its readers
        # took for a stop: no chunk was read again. So the flag goes to the driver's node
        # and comes back if its node is lost anyway (it starts unset then; a drain that
        # was asked before says so again, `restate`). It dies for good with the driver.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(),
                                              soft=True)
        self.flag = ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(
            StopFlag).options(scheduling_strategy=here).remote()
        self.signal = StopSignal(self.flag)
        if self.requested:
            self.flag.stop.remote()
        return self.signal

    def restate(self) -> None:
        """Tell the flag that a stop was asked (again for a restarted flag, which starts
        unset). Best effort: a Ray that is gone has no readers left to tell."""
        # No flag yet: nothing to tell, and no Ray to import here: as a signal handler
        # this may run in the middle of another import (ray's then failed, circular).
        if not self.requested or self.flag is None:
            return
        import ray

        # after the passes the job's Ray is shut down: a call would start another
        if ray.is_initialized():
            try:
                self.flag.stop.remote()
            except Exception as exc:  # noqa: BLE001
                log.debug("the stop flag did not take the stop again: %s", exc)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log.warning("second signal (%s): exiting now, without draining", name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested_at, self.signal_name = time.monotonic(), name
        log.warning("%s: draining: no new input; scored rows are committed; stopping within "
                    "%g s (a second signal exits at once)", name, self.seconds)
        self.restate()  # the flag may be gone with its Ray (a signal after the passes)

    def check(self, committed: Callable[[], tuple[int, int]]) -> None:
        """Raise `Stopped` if a stop was asked; `committed()` gives (done, total) pairs."""
        if self.requested:
            raise Stopped.on(self.signal_name, *committed())
