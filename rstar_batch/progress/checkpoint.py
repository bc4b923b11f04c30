"""Chunks, the plan a resume must match, and the resume rules.

The input is cut into *chunks*: fixed row ranges of one file (`checkpoint_rows`
long), a pure function of the input files' row counts, so every run of the same
job cuts the same chunks. What is done is what the commit log (log.py) covers:

    _work/plan.json                         what this output is being built from
    _work/runs/r2.json                      run 2 of the job started then
    _work/commits/r0002-5f3a9c1e-000017.json   a commit: the rows it covers, where they lie
    _work/scored/r0002-5f3a9c1e-000017.pack    its scored rows, by bucket (io/scored.py)

A chunk is done when commits cover all its rows. A kill loses only what was not
committed; the next run reads only the rows no commit covers (a job that writes
whole chunks, tokenize-corpus, redoes the chunks that are not done). If a retried
batch commits overlapping rows, the rank pass keeps each (chunk, row) once.
`status` reads the same records, so it works from any machine that can read the
output, while the job runs and after it died.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Optional

import pyarrow.fs as pafs

from rstar_batch.base import fs as fsio
from rstar_batch.config import RerankConfig

MARKER = "_rstar_batch.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
REJECTED = "_rejected"
PLAN = "plan.json"

# Fields whose change would change the output; the rest (scaling, cluster,
# batch sizes) may differ between a run and its resume.
_SCALING_GROUPS = {"scaling", "cluster"}
# The output is where the progress lives, and the input is compared by its
# fingerprint (resolved paths, sizes, times), so neither is compared as typed.
# The rejected-rows limit only decides whether the job passes, not what it writes;
# how often replicas commit, how long a stop waits and how often the job logs its
# progress decide neither.
_NOT_IN_KEY = {"overwrite", "restart", "address", "output", "candidates", "corpus",
               "queries", "max_rejected_fraction", "commit_seconds", "drain_seconds",
               "progress_seconds"}


class OutputError(ValueError):
    """The output location cannot be used as asked."""


class ResumeError(OutputError):
    """The output holds progress or results of a different job."""


@dataclasses.dataclass(frozen=True)
class Chunk:
    id: int
    file: int      # index into the sorted candidate paths
    start: int     # first row within the file
    rows: int
    # [start, end) row ranges of the chunk already committed, which a resumed run skips
    skip: tuple[tuple[int, int], ...] = ()

    @property
    def todo(self) -> int:
        """Rows of the chunk still to do."""
        return self.rows - sum(end - start for start, end in self.skip)


def plan_chunks(file_rows: list[int], chunk_rows: int) -> list[Chunk]:
    """Cut each file into chunks of `chunk_rows` rows (the last of a file shorter)."""
    chunks: list[Chunk] = []
    for file, rows in enumerate(file_rows):
        for start in range(0, rows, chunk_rows):
            chunks.append(Chunk(len(chunks), file, start, min(chunk_rows, rows - start)))
    return chunks


def run_name(chunk: int, start: int, end: int) -> str:
    """Base name of a run of rows [start, end) of a chunk (a file of tokenize-corpus's)."""
    return f"c{chunk:08d}-{start}-{end}"


def work_dir(root: str) -> str:
    return fsio.join(root, "_work")


def prepared_dir(root: str) -> str:
    """Joined or flattened candidates, written once per job before scoring."""
    return fsio.join(work_dir(root), "prepared")


# -- what the job is ------------------------------------------------------------------

def config_key(config: RerankConfig) -> dict[str, Any]:
    """The config fields that decide the output (hashed into the manifest)."""
    key = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("group") in _SCALING_GROUPS or f.name in _NOT_IN_KEY:
            continue
        key[f.name] = getattr(config, f.name)
    return key


def digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two plans' config keys and inputs."""
    changes = [f"{k}: {old['config'].get(k)!r} → {new['config'].get(k)!r}"
               for k in sorted(set(old["config"]) | set(new["config"]))
               if old["config"].get(k) != new["config"].get(k)]
    if old["model_fingerprint"] != new["model_fingerprint"]:
        changes.append(f"model files: {old['model_fingerprint']} → {new['model_fingerprint']}")
    if old["input"]["digest"] != new["input"]["digest"]:
        before = {f[0]: f[1:] for f in old["input"]["files"]}
        after = {f[0]: f[1:] for f in new["input"]["files"]}
        for path in sorted(set(before) | set(after)):
            if path not in after:
                changes.append(f"input file removed: {path}")
            elif path not in before:
                changes.append(f"input file added: {path}")
            elif before[path] != after[path]:
                changes.append(f"input file changed (size, ETag or modification time): {path}")
    return changes


def runs_dir(root: str) -> str:
    return fsio.join(work_dir(root), "runs")


def list_runs(fs: pafs.FileSystem, root: str) -> dict[int, float]:
    """run number → start time, from the run records."""
    runs = {}
    for info in fsio.list_files(fs, runs_dir(root), recursive=False):
        name = info.path.rsplit("/", 1)[-1]
        if name.startswith("r") and name.endswith(".json"):
            runs[int(name[1:-5])] = fsio.read_json(fs, info.path)["started"]
    return runs


# -- the resume rules -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Opened:
    """What to do with the output: continue as run `run`, or nothing (`finished`)."""

    run: int
    finished: Optional[dict] = None  # the manifest of an identical finished job


def _refuse(uri: str, what: str, changes: list[str]) -> ResumeError:
    listed = "; ".join(changes[:8]) + ("; …" if len(changes) > 8 else "")
    return ResumeError(f"output '{uri}' holds {what} of a different job ({listed}); rerun "
                       "with --restart to discard it, or choose another output")


def open_job(fs: pafs.FileSystem, root: str, uri: str, plan: dict, *,
             overwrite: bool = False, restart: bool = False) -> Opened:
    """Decide between a fresh start, a resume and a no-op; refuse what would mix jobs."""
    existing = fsio.list_top(fs, root)  # one LIST, never the whole of _work/
    if existing and not fsio.exists(fs, fsio.join(root, MARKER)):
        if not overwrite:
            sample = ", ".join(i.path.rsplit("/", 1)[-1] for i in existing[:3])
            raise OutputError(
                f"output '{uri}' already holds {len(existing)} file(s) this tool did not "
                f"write (e.g. {sample}); choose an empty folder or pass --overwrite to "
                "delete them")
    elif existing and not restart:
        if fsio.exists(fs, fsio.join(root, SUCCESS)):
            manifest = fsio.read_json(fs, fsio.join(root, MANIFEST))
            changes = describe_changes(manifest["plan"], plan)
            if changes:
                raise _refuse(uri, "the finished output", changes)
            return Opened(run=0, finished=manifest)
        plan_path = fsio.join(work_dir(root), PLAN)
        if fsio.exists(fs, plan_path):
            changes = describe_changes(fsio.read_json(fs, plan_path), plan)
            if changes:
                raise _refuse(uri, "unfinished progress", changes)
            run = max(list_runs(fs, root), default=0) + 1
            fsio.write_json(fs, fsio.join(runs_dir(root), f"r{run}.json"),
                            {"run": run, "started": now()})
            return Opened(run=run)
    if existing:
        fs.delete_dir_contents(root, missing_dir_ok=True)
    try:
        fs.create_dir(root, recursive=True)
        fsio.write_json(fs, fsio.join(root, MARKER), {"tool": "rstar-batch", "created": now()})
    except FileNotFoundError as exc:  # object stores: a bucket that does not exist
        raise OutputError(f"cannot write to output '{uri}': {exc}; check the bucket name "
                          "(the job does not create buckets)") from None
    fsio.write_json(fs, fsio.join(work_dir(root), PLAN), plan)
    fsio.write_json(fs, fsio.join(runs_dir(root), "r1.json"), {"run": 1, "started": now()})
    return Opened(run=1)


def now() -> float:
    return time.time()
