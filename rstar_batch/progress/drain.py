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

import contextlib
import logging
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

log = logging.getLogger(__name__)

# sysexits' EX_TEMPFAIL: the job stopped on request; rerunning it resumes.
EXIT_STOPPED = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The same signal again this soon is the same stop, not a second one: systemd (and a
# cgroup kill) signals every process of the unit, so a watched driver gets SIGTERM
# from it and again through its watcher (rstar_batch/supervise.py). They arrive within
# milliseconds, but Python runs a handler only between bytecodes: a driver inside a
# call into Ray (a wait, a shutdown) ran the second 0.75 s after the first. A person's
# second Ctrl-C, or a scheduler's second SIGTERM, comes later.
ECHO_S = 2.0


def _echo(signum: int, first: tuple[str, float]) -> bool:
    """Whether `signum` repeats the first stop `(name, when)` within ECHO_S."""
    name, at = first
    return signal.Signals(signum).name == name and time.monotonic() - at < ECHO_S


class StartInterrupted(BaseException):
    """A stop asked while Ray starts (`Drain.while_starting`): ray.init is left at once.
    A signal to every process of the job kills the Ray being started under it, and
    ray.init then waited ~30 s for a GCS that was gone. A BaseException, as
    KeyboardInterrupt is: ray.init's own `except Exception` (it logs and goes on) must
    not catch it."""


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


class StopSignal:
    """What readers and replicas hold (it pickles into their tasks): `is_set()` says
    whether the driver asked the job to stop.

    The flag is a key in the Ray cluster's own key-value store (the GCS's), which the
    driver writes once and every worker reads with one call: no actor to start (it
    was one, a process costing ~0.8 s of CPU in every job, and it had to be kept on the
    driver's node and restarted when a node was lost), and it lives as long as the
    cluster. A check that cannot reach the store keeps the last answer, not a stop.
    """

    NAMESPACE = "rstar_batch"

    def __init__(self, key: str) -> None:
        self.key = key
        self._set = False

    def __getstate__(self) -> dict:
        return {"key": self.key}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["key"])

    def is_set(self) -> bool:
        if not self._set:
            from ray.experimental.internal_kv import _internal_kv_exists

            try:
                self._set = bool(_internal_kv_exists(self.key, namespace=self.NAMESPACE))
            except Exception as exc:  # noqa: BLE001 - a busy GCS: ask again next time
                log.debug("the stop flag could not be read: %s", exc)
        return self._set

    def set(self) -> None:
        """The driver's side: ask every reader to stop."""
        from ray.experimental.internal_kv import _internal_kv_put

        _internal_kv_put(self.key, b"1", namespace=self.NAMESPACE)

    def remove(self) -> None:
        """The driver's side, at the end: the key leaves a cluster that lives on."""
        from ray.experimental.internal_kv import _internal_kv_del

        _internal_kv_del(self.key, namespace=self.NAMESPACE)


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
        if _EARLY and _echo(signum, _EARLY[0]):
            return
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
        self.signal: Optional[StopSignal] = None
        self._previous: dict[int, Any] = {}
        self._starting = False

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
        """Put the previous handlers back; remove the flag if the caller's Ray lives on."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self.signal is not None:
            import ray

            if ray.is_initialized():
                try:
                    self.signal.remove()
                except Exception as exc:  # noqa: BLE001 - gone with its Ray already
                    log.debug("the stop flag could not be removed: %s", exc)
            self.signal = None

    def attach(self) -> StopSignal:
        """The flag the workers read, in the running Ray (set already if asked before)."""
        import uuid

        self.signal = StopSignal(f"stop-{uuid.uuid4().hex}")
        if self.requested:
            self.signal.set()
        return self.signal

    def tell_workers(self) -> None:
        """Set the flag of a stop asked while the job runs (the driver's loop calls this:
        a signal handler makes no call into Ray, which may be gone with the signal, or
        half imported). Best effort: a Ray that is gone has no readers left to tell."""
        if not self.requested or self.signal is None:
            return
        import ray

        # after the passes the job's Ray is shut down: a call would start another
        if ray.is_initialized():
            try:
                self.signal.set()
            except Exception as exc:  # noqa: BLE001
                log.debug("the stop flag could not be set: %s", exc)

    @contextlib.contextmanager
    def while_starting(self) -> Iterator[None]:
        """Around ray.init: a stop asked meanwhile raises StartInterrupted there."""
        if self.requested:
            raise StartInterrupted(self.signal_name)
        self._starting = True
        try:
            yield
        finally:
            self._starting = False

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested and _echo(signum, (self.signal_name, self.requested_at)):
            log.info("%s again within %g s: the same stop", name, ECHO_S)
            return
        if self.requested:
            log.warning("second signal (%s): exiting now, without draining", name)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.requested_at, self.signal_name = time.monotonic(), name
        log.warning("%s: draining: no new input; scored rows are committed; stopping within "
                    "%g s (a second signal exits at once)", name, self.seconds)
        if self._starting:
            self._starting = False
            raise StartInterrupted(name)

    def check(self, committed: Callable[[], tuple[int, int]]) -> None:
        """Raise `Stopped` if a stop was asked; `committed()` gives (done, total) pairs."""
        if self.requested:
            raise Stopped.on(self.signal_name, *committed())
