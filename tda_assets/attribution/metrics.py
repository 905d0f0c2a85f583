"""Consistency metrics between two attributions of the same items (Jaccard@k, Spearman, Pearson, self-attribution), and
the overlap of one ranking's top-k across queries."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping

import numpy as np
from scipy import stats


def top_k(score: np.ndarray, k: int) -> set[int]:
    """Indices of the k highest scores (ties broken by position; NaN, an item not rescored, after every score)."""
    return set(np.argsort(-np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf), kind="stable")[:k].tolist())


def jaccard_at_k(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """|top_k(a) ∩ top_k(b)| / |top_k(a) ∪ top_k(b)|."""
    ta, tb = top_k(a, k), top_k(b, k)
    return len(ta & tb) / len(ta | tb)


def jaccard(a: Collection[str], b: Collection[str]) -> float:
    """|a ∩ b| / |a ∪ b| of two item sets (1.0 for two empty sets)."""
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def cross_query_overlap(top: Mapping[str, Collection[str]], group: Mapping[str, str | None]) -> tuple[float, int]:
    """`(mean Jaccard, pairs)` between the top-k item sets of every two queries whose groups differ (DESIGN §1:
    queries with different target artists). A query without a group (a user's query) is left out; `(nan, 0)` when no
    pair is left. High: the ranking returns the same "generally influential" items whatever the query."""
    queries = sorted(q for q in top if group.get(q) is not None)
    values = [jaccard(top[a], top[b]) for a, b in itertools.combinations(queries, 2) if group[a] != group[b]]
    return (float(np.mean(values)) if values else float("nan")), len(values)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two score vectors over the same items."""
    return float(stats.spearmanr(a, b).statistic)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two score vectors over the same items."""
    return float(stats.pearsonr(a, b).statistic)


def compare(a: np.ndarray, b: np.ndarray, ks: tuple[int, ...] = (10, 50, 100)) -> list[tuple[str, int | None, float]]:
    """All consistency rows `(metric, k, value)` between two score vectors (k capped at the item count)."""
    rows: list[tuple[str, int | None, float]] = [("jaccard", k, jaccard_at_k(a, b, min(k, len(a)))) for k in ks]
    both = np.isfinite(a) & np.isfinite(b)  # a two_stage attribution scores its rescored items only
    enough = both.sum() >= 3
    rows.append(("spearman", None, spearman(a[both], b[both]) if enough else float("nan")))
    rows.append(("pearson", None, pearson(a[both], b[both]) if enough else float("nan")))
    return rows
