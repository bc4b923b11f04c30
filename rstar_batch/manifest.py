"""The job's plan (what a resume must match) and its manifest (what a finished job wrote).

checkpoint.py owns the rules that read them; this module builds and writes them.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from rstar_batch.base import fs as fsio
from rstar_batch.config import RerankConfig
from rstar_batch.io.sources import CandidateFiles
from rstar_batch.progress import checkpoint
from rstar_batch.summary import JobSummary

log = logging.getLogger(__name__)

PAIRS_PER_BUCKET = 2_000_000


def bucket_count(config: RerankConfig, rows: int, most: int = 4096) -> int:
    """Output files: --rank-partitions, else one per ~2M rows the rank pass reads."""
    return config.rank_partitions or max(1, min(most, math.ceil(rows / PAIRS_PER_BUCKET)))


def job_plan(config: RerankConfig, sources: list[CandidateFiles], fingerprint: str) -> dict:
    """What the output is built from (the first source's rows are the job's, then any
    others it reads, e.g. corpus and queries); a resume must match it exactly."""
    key = checkpoint.config_key(config)
    rows = sources[0].num_rows
    prints = [s.fingerprint() for s in sources]
    files = [f for p in prints for f in p["files"]]
    return {"config": key, "config_hash": checkpoint.digest(key),
            "model_fingerprint": fingerprint,
            "input": {"files": files, "rows": prints[0]["rows"],
                      "digest": checkpoint.digest(files)},
            "total_rows": rows,
            "buckets": bucket_count(config, rows)}


def finish_job(fs: Any, root: str, config: RerankConfig, summary: JobSummary, plan: dict,
               details: dict[str, Any]) -> None:
    """Write the manifest, then _SUCCESS; drop the work folder."""
    fsio.write_json(fs, fsio.join(root, checkpoint.MANIFEST), {
        "summary": summary.to_dict(), "plan": plan, "config": config.to_dict(),
        "config_hash": plan["config_hash"], **details, "versions": _versions(),
        "driver_peak_rss_mb": round(_peak_rss_mb(), 1), "finished": time.time(),
    })
    fsio.write_bytes(fs, fsio.join(root, checkpoint.SUCCESS), b"")
    fsio.delete(fs, checkpoint.work_dir(root))
    log.info(summary.line())


def package_version() -> str:
    """rstar-batch's version, from the installed package's metadata."""
    from importlib import metadata

    try:
        return metadata.version("rstar-batch")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0+unknown"


def _versions() -> dict[str, str]:
    import pyarrow
    import ray
    import torch
    import transformers

    return {"rstar_batch": package_version(), "ray": ray.__version__,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pyarrow.__version__}


def _peak_rss_mb() -> float:
    """This (driver) process's peak resident memory.

    Linux's VmHWM, not getrusage's ru_maxrss: the latter carries over the parent's
    resident size at fork, so a job launched from a large process looked large.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024
