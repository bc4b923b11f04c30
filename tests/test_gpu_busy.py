"""The benchmark's GPU-busy sampler, with a stand-in nvidia-smi (no GPU here)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from gpu_busy import GpuBusy  # noqa: E402


def test_samples_nvidia_smi_while_the_job_runs(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    counter = tmp_path / "n"
    fake.write_text(f"#!/bin/sh\nn=$(cat {counter} 2>/dev/null || echo 0)\n"
                    f"echo $((n + 1)) > {counter}\n"
                    "if [ $n -lt 2 ]; then echo 10; else echo 95; fi\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    with GpuBusy(every_s=0.02) as busy:
        deadline = time.monotonic() + 5
        while len(busy.samples) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
    summary = busy.summary()
    assert summary["samples"] >= 8 and summary["median"] == 95.0
    assert summary["mean"] < 95.0  # the two start-up samples pull the mean down


def test_without_nvidia_smi_there_is_no_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with GpuBusy(every_s=0.01) as busy:
        time.sleep(0.05)
    assert busy.samples == [] and busy.summary() is None
