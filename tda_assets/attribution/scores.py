"""Attribution scores from per-draw losses before (`L0`) and after (`ℓ(θ_u)`) unlearning a query."""

from __future__ import annotations

import numpy as np


def rank_descending(score: np.ndarray) -> np.ndarray:
    """1-based ranks, rank 1 = highest score; ties broken by position (stable)."""
    order = np.argsort(-score, kind="stable")
    ranks = np.empty(len(score), dtype=np.int64)
    ranks[order] = np.arange(1, len(score) + 1)
    return ranks


def positive_shares(score: np.ndarray) -> np.ndarray:
    """Positive scores renormalised to sum to 1 (credit shares); all zero if no score is positive."""
    pos = np.clip(score, 0.0, None)
    total = pos.sum()
    return pos / total if total > 0 else np.zeros_like(pos)


def attribution_scores(baseline: np.ndarray, unlearned: np.ndarray) -> dict[str, np.ndarray]:
    """Per item (rows of [N, K] loss matrices): `score`, `relative_score`, `skew_score`, `rank`, `share`."""
    if baseline.shape != unlearned.shape:
        raise ValueError(f"loss matrices differ in shape: baseline {baseline.shape}, unlearned {unlearned.shape}")
    if not (np.isfinite(baseline).all() and np.isfinite(unlearned).all()):
        raise ValueError("attribution_scores got non-finite losses")
    diff = unlearned - baseline
    score = diff.mean(axis=1)
    return {
        "score": score,
        "relative_score": score / baseline.mean(axis=1),
        "skew_score": (diff / (unlearned + baseline + 1e-3)).mean(axis=1),
        "rank": rank_descending(score),
        "share": positive_shares(score),
    }
