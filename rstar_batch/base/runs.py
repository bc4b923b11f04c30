"""Runs: the contiguous row ranges of one chunk that a block's rows form. A run is
what one commit covers (checkpoint.py names it), so every writer splits its
block into runs the same way."""

from __future__ import annotations

import numpy as np


def split_runs(chunks: np.ndarray, rows: np.ndarray) -> list[tuple[int, int, int, np.ndarray]]:
    """(chunk, start, end, indices) for each run of consecutive rows of one chunk."""
    order = np.lexsort((rows, chunks))
    c, r = chunks[order], rows[order]
    breaks = np.flatnonzero((np.diff(c) != 0) | (np.diff(r) != 1)) + 1
    runs = []
    for part in np.split(np.arange(len(order)), breaks):
        if len(part):
            first, last = part[0], part[-1]
            runs.append((int(c[first]), int(r[first]), int(r[last]) + 1, order[part]))
    return runs
