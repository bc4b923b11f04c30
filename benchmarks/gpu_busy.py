"""How busy the GPU is while a job runs: nvidia-smi sampled in a thread.

    with GpuBusy() as busy:
        run_the_job()
    busy.summary()   # {"samples": 212, "median": 94.0, "mean": 88.1} or None without a GPU

The median of utilization samples stands for the steady state: start-up
(Ray, model loading) and the rank pass are a minority of a long job's samples.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from typing import Optional

import numpy as np

QUERY = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]


class GpuBusy:
    """Context manager sampling GPU 0's utilization (percent) every `every_s` seconds."""

    def __init__(self, every_s: float = 0.2) -> None:
        self.every_s = every_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "GpuBusy":
        if shutil.which(QUERY[0]):
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                out = subprocess.run(QUERY, capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                continue

    def summary(self) -> Optional[dict]:
        """Sample count, median and mean; None when nothing was sampled (no GPU)."""
        if not self.samples:
            return None
        values = np.array(self.samples)
        return {"samples": len(values), "median": float(np.median(values)),
                "mean": float(values.mean())}
