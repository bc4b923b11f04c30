"""Which Ray cluster a job runs on.

Order: a Ray already initialised by the caller (the Python API inside a user's
Ray program); else `--address` or RAY_ADDRESS (set by `ray job submit` for its
drivers); else a new local Ray started in-process. The last never joins
whatever cluster /tmp/ray/ray_current_cluster names, which may be long dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

log = logging.getLogger(__name__)

# Logical CPUs the embedded Ray declares at least. Ray's CPU counts are
# reservations, not cores: tokenizer actors, a CPU scorer, read and write tasks
# and Ray Data's own actors must all fit at once or the plan stalls; the torch
# threads of the scorer decide how many cores actually do the work.
EMBEDDED_MIN_CPUS = 8


@contextlib.contextmanager
def ray_session(address: Optional[str] = None) -> Iterator[None]:
    """Connect to (or start) Ray for one job; shut down only what we started."""
    import ray

    if ray.is_initialized():
        yield
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        log.info("joining Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        cpus = max(EMBEDDED_MIN_CPUS, os.cpu_count() or 1)
        log.info("starting a local Ray with %d logical CPUs", cpus)
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()
