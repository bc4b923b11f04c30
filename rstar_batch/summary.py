"""What a finished job did, and the checks it must pass before it may say so."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Optional

from rstar_batch.base import fs as fsio
from rstar_batch.config import RerankConfig
from rstar_batch.progress import checkpoint
from rstar_batch.progress.log import Progress


@dataclasses.dataclass(frozen=True)
class JobSummary:
    """What a finished job did; printed as one line and stored in the manifest."""

    output: str
    pairs: int
    scored: int
    written: int
    pairs_this_run: int
    queries: int
    rejected: dict[str, int]
    seconds: float
    already_done: bool = False
    reused: int = 0   # of `scored`, pairs whose score came from the score cache

    @property
    def pairs_per_second(self) -> float:
        """Pairs this run processed (the rest were done by earlier runs) per second."""
        return self.pairs_this_run / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        if self.already_done:
            return (f"rstar-batch: already done, nothing to do ({self.pairs} pairs, "
                    f"{self.queries} queries → {self.output})")
        rejected = sum(self.rejected.values())
        detail = ", ".join(f"{k}={v}" for k, v in sorted(self.rejected.items()))
        resumed = (f" ({self.pairs_this_run} in this run)"
                   if self.pairs_this_run != self.pairs else "")
        reused = f" ({self.reused} from the score cache)" if self.reused else ""
        return (f"rstar-batch: {self.pairs} pairs{resumed}, {self.queries} queries, "
                f"{self.scored} scored{reused}, {rejected} rejected"
                f"{f' ({detail})' if detail else ''}, "
                f"{self.seconds:.1f} s, {self.pairs_per_second:.1f} pairs/s → {self.output}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "JobSummary":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields.pop("already_done")
        return {**fields, "pairs_per_second": round(self.pairs_per_second, 2)}


def merge_rejected(*counts: Iterable[dict[str, int]]) -> dict[str, int]:
    """Rejected rows by reason, summed over parts (each a {reason: count})."""
    merged: dict[str, int] = {}
    for group in counts:
        for part in group:
            for reason, count in part.items():
                merged[reason] = merged.get(reason, 0) + count
    return merged


class TooManyRejectedError(ValueError):
    """More rows were rejected than --max-rejected-fraction allows."""


def check_rejected(summary: JobSummary, config: RerankConfig,
                   rows: Optional[int] = None) -> None:
    """Fail if more than --max-rejected-fraction of the input's `rows` were rejected."""
    rows = summary.pairs if rows is None else rows
    rejected = sum(summary.rejected.values())
    if rejected > config.max_rejected_fraction * rows:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(summary.rejected.items()))
        share = 100.0 * rejected / rows
        raise TooManyRejectedError(
            f"{rejected} of {rows} rows were rejected ({share:.2f}% > "
            f"--max-rejected-fraction {config.max_rejected_fraction}): {reasons}; see "
            f"{fsio.join(config.output, checkpoint.REJECTED)}/ (a wrong column mapping?). "
            "Rerun with a higher --max-rejected-fraction to accept them")


def check_all_committed(progress: Progress, chunks: list[checkpoint.Chunk]) -> None:
    """Fail unless every chunk of the job was committed."""
    done = progress.done_chunks(chunks)
    missing = [c for c in chunks if c.id not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} chunk(s) were not committed after scoring (first: "
                           f"chunk {missing[0].id}); rerun the same command to finish them")
