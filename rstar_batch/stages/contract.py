"""What a stage promises, checked on every batch it maps.

As in ray.data.llm's stages: a stage declares the columns it reads and the columns it
writes, and whether each input row comes out exactly once, in order. `Stage.__call__`
checks all three around the stage's own `process`, so a missing column fails with the
stage's name, the columns and what the batch has (not a bare KeyError deep inside),
and a stage that drops, repeats or reorders rows fails at once instead of
surfacing as a wrong count at the end of the job. The checks look at column names and
compare the (chunk, row) columns: microseconds against a batch's tokenizing or scoring.
"""

from __future__ import annotations

import pyarrow as pa

from rstar_batch.base import columns as C


class StageError(RuntimeError):
    """A batch a stage cannot take, or a stage that broke its own contract."""


class Stage:
    """Base of the `map_batches` stages: subclasses set `reads`/`writes` (class
    attributes, or in `__init__` when they follow the config) and implement `process`."""

    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    one_row_per_row = True   # False: the stage selects rows (score-corpus's top K)

    def process(self, batch: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        name = type(self).__name__
        missing = [c for c in self.reads if c not in batch.column_names]
        if missing:
            raise StageError(f"{name} needs column(s) {missing}, but its input batch has "
                             f"{batch.column_names}: the stage before it did not write them")
        out = self.process(batch)
        unwritten = [c for c in self.writes if c not in out.column_names]
        if unwritten:
            raise StageError(f"{name} did not write column(s) {unwritten} it promises")
        if self.one_row_per_row:
            check_same_rows(batch, out, name)
        return out


def check_same_rows(batch: pa.Table, out: pa.Table, stage: str) -> None:
    """Every input row comes out exactly once, in input order (by its (chunk, row) tags
    where the batch has them)."""
    if out.num_rows != batch.num_rows:
        raise StageError(f"{stage} returned {out.num_rows} rows for {batch.num_rows}: every "
                         "input row must come out exactly once")
    for tag in (C.CHUNK, C.ROW):
        if tag in batch.column_names and (tag not in out.column_names
                                          or not out[tag].equals(batch[tag])):
            raise StageError(f"{stage} dropped, repeated or reordered rows (its output's "
                             f"{tag} differs from its input's): every input row must come "
                             "out exactly once, in order")
