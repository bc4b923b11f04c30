"""How many cores this process may use: what the embedded Ray declares and what a CPU
replica runs torch threads on when nothing else says.

`os.cpu_count()` counts the machine's cores. A job pinned to some of them (`taskset`,
a cpuset, a benchmark that measures "2 cores" on a bigger node) or held to a share by
a CFS quota (`docker --cpus`, a Kubernetes CPU limit on a plain container) can use
fewer, and threads or logical CPUs planned on the machine's count would crowd onto
those few. Here: the CPU affinity, capped by the quota rounded up (a quota of 1.5
CPUs still runs two threads at once, part of the time).
"""

from __future__ import annotations

import math
import os
from typing import Optional

CGROUP_ROOT = "/sys/fs/cgroup"


def usable_cores(cgroup_root: str = CGROUP_ROOT) -> int:
    """The cores this process may run on: its affinity, capped by a CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity outside Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_quota(cgroup_root: str = CGROUP_ROOT) -> Optional[float]:
    """CPUs the CFS quota of this process's cgroup allows, as a container sees its own
    cgroup at the mount's root (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us` over
    `cpu.cfs_period_us`); None where there is no quota or no file says."""
    v2 = _read(os.path.join(cgroup_root, "cpu.max"))
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            return _ratio(fields[0], fields[1])
        return None
    for folder in ("cpu", "cpu,cpuacct"):
        quota = _read(os.path.join(cgroup_root, folder, "cpu.cfs_quota_us"))
        period = _read(os.path.join(cgroup_root, folder, "cpu.cfs_period_us"))
        if quota is not None and period is not None:
            return _ratio(quota, period)
    return None


def _ratio(quota: str, period: str) -> Optional[float]:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return q / p if q > 0 and p > 0 else None  # v1 writes -1 for no quota


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
