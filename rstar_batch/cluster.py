"""Which Ray cluster a job runs on, and what its nodes offer.

Order: a Ray already initialised by the caller (the Python API inside a user's
Ray program); else `--address` or RAY_ADDRESS (set by `ray job submit` for its
drivers); else a new local Ray started in-process. The last never joins
whatever cluster /tmp/ray/ray_current_cluster names, which may be long dead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
from typing import Any, Callable, ContextManager, Iterator, Optional

from rstar_batch.base.cores import usable_cores
from rstar_batch.faults import job_env

log = logging.getLogger(__name__)

# Logical CPUs the embedded Ray declares beyond the machine's cores. Ray's CPU counts
# are reservations, not cores: a CPU replica reserves one per torch thread, and the
# tokenizer pool, read and write tasks and Ray Data's own tasks must fit beside it or
# the plan stalls. They are light next to scoring, so on one machine they share the
# cores (2 cores: 8 logical CPUs, as the embedded Ray always had).
EMBEDDED_EXTRA_CPUS = 6
# A node label saying how many cores a node has where its logical CPUs say more
# (the embedded Ray sets it; `ray start --labels rstar-batch/cores=N` may too).
CORES_LABEL = "rstar-batch/cores"


@dataclasses.dataclass(frozen=True)
class Node:
    """What one live Ray node offers: logical CPUs, GPUs, and the cores behind them."""

    cpus: float = 0.0
    gpus: float = 0.0
    cores: Optional[int] = None  # None: as many as its logical CPUs

    @property
    def real_cores(self) -> float:
        return self.cpus if self.cores is None else min(self.cpus, self.cores)


def node_of(info: dict[str, Any]) -> Node:
    """A Node from one entry of `ray.nodes()`."""
    resources, labels = info.get("Resources", {}), info.get("Labels") or {}
    cores = labels.get(CORES_LABEL)
    return Node(cpus=float(resources.get("CPU", 0.0)), gpus=float(resources.get("GPU", 0.0)),
                cores=int(cores) if cores and str(cores).isdigit() else None)


def live_nodes() -> list[Node]:
    """The cluster's live nodes, as the driver sees them when the job starts."""
    import ray

    return [node_of(info) for info in ray.nodes() if info.get("Alive")]


# An embedded Ray's driver flushes its last task events for at most this long (ms).
EMBEDDED_FLUSH_MS = 1000


@contextlib.contextmanager
def _our_signal_handlers_kept() -> Iterator[None]:
    """ray.init installs a SIGTERM handler of its own (sys.exit) before it connects: a
    stop then raised SystemExit wherever the main thread was, and one raised in
    logging's lock release was swallowed ("Exception ignored"): the job went on as if
    never asked (seen once in six SIGTERMs to every process as Ray started). The job's
    own handler (its drain) stays in place instead."""
    import ray._private.utils as ray_utils

    installs = ray_utils.set_sigterm_handler
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        ray_utils.set_sigterm_handler = installs


@contextlib.contextmanager
def ray_session(address: Optional[str] = None,
                starting: Callable[[], ContextManager[None]] = contextlib.nullcontext
                ) -> Iterator[None]:
    """Connect to (or start) Ray for one job; shut down only what we started.
    `starting()` is entered around ray.init (the drain's: a stop leaves it at once)."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:  # what ray.init started is shut down even if ray.init itself is interrupted
        if address:
            log.info("joining Ray cluster at %s", address)
            faults = job_env()  # tests only: unset in production
            with starting(), _our_signal_handlers_kept():
                ray.init(address=address, log_to_driver=True,
                         **({"runtime_env": {"env_vars": faults}} if faults else {}))
        else:
            cores = usable_cores()  # not the machine's: taskset, cpusets and quotas
            cpus = cores + EMBEDDED_EXTRA_CPUS
            log.info("starting a local Ray with %d logical CPUs on %d cores", cpus, cores)
            # ray.shutdown() waits this long to flush task events to a GCS that a signal
            # to every process of the job (systemd) may have ended already: by default it
            # held a drained driver ~8 s, past which its watcher had to report for it.
            os.environ.setdefault("RAY_task_events_shutdown_flush_timeout_ms",
                                  str(EMBEDDED_FLUSH_MS))
            with starting(), _our_signal_handlers_kept():
                ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                         labels={CORES_LABEL: str(cores)}, log_to_driver=True)
        yield
    finally:
        ray.shutdown()
        _reassert_signal_handlers()


def _reassert_signal_handlers() -> None:
    """Install again the Python handlers of SIGTERM and SIGINT (the job's drain).
    ray.shutdown() leaves the process's own disposition of SIGTERM at its default, while
    Python still reports its handler: a SIGTERM as the manifest was written killed the
    job (143) instead of letting it finish."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGINT):
        handler = signal.getsignal(sig)
        if handler is not None:
            signal.signal(sig, handler)


def wait_at_most(seconds: float, what: str, call: Callable[[], Any]) -> None:
    """Run a cleanup call into Ray, waiting for it at most `seconds`.

    Such calls block for good where Ray's own processes are gone: a SIGTERM to every
    process of the job (systemd's default signals the unit's whole cgroup) ends the
    embedded Ray's GCS and raylet together with the driver, whose drain then waited
    forever on its placement group's removal. (A signal to the process group alone no
    longer reaches them: supervise.py.) A placement group, like the rest
    of what the job made, ends with the job's Ray anyway; the call's own errors raise.
    """
    done, errors = threading.Event(), []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # handed to the caller
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name=f"rstar-batch {what}", daemon=True).start()
    if not done.wait(seconds):
        log.warning("%s: Ray did not answer within %g s (are its processes gone?); going on",
                    what, seconds)
    elif errors:
        raise errors[0]
