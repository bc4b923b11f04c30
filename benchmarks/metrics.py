"""Score drift between two scorings of the same pairs (for dtype and option choices)."""

from __future__ import annotations

import numpy as np


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x))
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties ordered by position; scores are continuous)."""
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def top_k_overlap(a: np.ndarray, b: np.ndarray, groups: np.ndarray, k: int = 10) -> float:
    """Mean over groups of |top-k by a ∩ top-k by b| / min(k, group size)."""
    overlaps = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        n = min(k, len(idx))
        top_a = set(idx[np.argsort(-a[idx], kind="stable")[:n]])
        top_b = set(idx[np.argsort(-b[idx], kind="stable")[:n]])
        overlaps.append(len(top_a & top_b) / n)
    return float(np.mean(overlaps))


def drift(base: np.ndarray, other: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    return {"max_abs": float(np.abs(base - other).max()), "spearman": spearman(base, other),
            "top10_overlap": top_k_overlap(base, other, groups)}
