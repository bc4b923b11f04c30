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


def named_runs(chunks: np.ndarray, starts: np.ndarray, ends: np.ndarray
               ) -> list[tuple[int, int, int, np.ndarray]]:
    """(chunk, start, end, indices) for rows that name their run themselves."""
    keys = np.stack([chunks, starts, ends], axis=1)
    unique, inverse = np.unique(keys, axis=0, return_inverse=True)
    order = np.argsort(inverse.reshape(-1), kind="stable")
    groups = np.split(order, np.cumsum(np.bincount(inverse.reshape(-1)))[:-1])
    return [(int(c), int(s), int(e), rows) for (c, s, e), rows in zip(unique, groups)]
