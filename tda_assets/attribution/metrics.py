"""Consistency metrics between two attributions of the same items: Jaccard@k, Spearman, Pearson, self-attribution."""

from __future__ import annotations

import numpy as np
from scipy import stats


def top_k(score: np.ndarray, k: int) -> set[int]:
    """Indices of the k highest scores (ties broken by position; NaN, an item not rescored, after every score)."""
    return set(np.argsort(-np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf), kind="stable")[:k].tolist())


def jaccard_at_k(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|."""
    ta, tb = top_k(a, k), top_k(b, k)
    return len(ta & tb) / len(ta | tb)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors over the same items."""
    return float(stats.spearmanr(a, b).statistic)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two score vectors over the same items."""
    return float(stats.pearsonr(a, b).statistic)


def self_attribution_rate(ranks_of_self: list[int] | np.ndarray, top: int = 1) -> float:
    """Share of queries (training items unlearned as their own query) whose own rank is ≤ `top`."""
    r = np.asarray(ranks_of_self)
    return float((r <= top).mean()) if len(r) else float("nan")


def compare(a: np.ndarray, b: np.ndarray, ks: tuple[int, ...] = (10, 50, 100)) -> list[tuple[str, int | None, float]]:
    """All consistency rows `(metric, k, value)` between two score vectors (k capped at the item count)."""
    rows: list[tuple[str, int | None, float]] = [("jaccard", k, jaccard_at_k(a, b, min(k, len(a)))) for k in ks]
    both = np.isfinite(a) & np.isfinite(b)  # a two_stage attribution scores its rescored items only
    enough = both.sum() >= 3
    rows.append(("spearman", None, spearman(a[both], b[both]) if enough else float("nan")))
    rows.append(("pearson", None, pearson(a[both], b[both]) if enough else float("nan")))
    return rows
