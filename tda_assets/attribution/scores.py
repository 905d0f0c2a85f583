"""Attribution scores from per-draw losses before (`L0`) and after (`ℓ(θ_u)`) unlearning a query."""

from __future__ import annotations

import numpy as np

from .settings import SCORE_TYPES

# score_type → the attribution_scores column that ranks (DESIGN §1: a grid dimension, not a belief)
SCORE_COLUMNS = dict(zip(SCORE_TYPES, ("mean_delta", "relative_score", "skew_score", "normalized_score")))


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


def ranking_score(scores: dict[str, np.ndarray], score_type: str = "mean_delta") -> np.ndarray:
    """The per-item score that ranks items for a `score_type` (one of SCORE_TYPES), from an `attribution_scores` dict."""
    if score_type not in SCORE_COLUMNS:
        raise ValueError(f"unknown score_type {score_type!r}: choose one of {SCORE_TYPES}")
    return scores[SCORE_COLUMNS[score_type]]


def normalized_score(mean_delta: np.ndarray, item_norms: np.ndarray | None, score_type: str) -> np.ndarray:
    """`mean_delta` divided by each item's gradient norm in the Newton metric, `‖(F̂ + d)^(-1/2) g_i‖`; all NaN without
    norms, which score_type `normalized` refuses.

    To first order `mean_delta_i = (lr/N)·⟨P g_i, P g_q⟩`, so dividing by `‖P g_i‖` ranks items by the cosine of their
    gradient with the query's: an item with large gradients no longer outranks the query's own source (relative
    influence, Barshan et al. 2020). The norms come from the training_gradients store (`GradientStore.item_norms`).
    """
    if item_norms is None:
        if score_type == "normalized":
            raise ValueError("score_type 'normalized' needs the items' gradient norms (item_norms): materialize the "
                             "configuration's training_gradients store")
        return np.full(len(mean_delta), np.nan)
    norms = np.asarray(item_norms, dtype=np.float64)
    if norms.shape != mean_delta.shape or not (np.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError(f"item_norms must be {len(mean_delta)} finite positive gradient norms, one per item")
    return mean_delta / norms


def attribution_scores(baseline: np.ndarray, unlearned: np.ndarray, score_type: str = "mean_delta",
                       item_norms: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per item (rows of [N, K] loss matrices): `mean_delta`, `relative_score`, `skew_score`, `normalized_score`, and
    `score`, `rank`, `share`.

    `score` is the ranking score of `score_type` (so `rank` 1 always has the highest `score`, and `share`
    renormalises its positive part); `mean_delta` (DESIGN §1's `score_i`) is always kept as its own column.
    `normalized_score` needs the items' gradient norms (`item_norms`; NaN without them).
    """
    if baseline.shape != unlearned.shape:
        raise ValueError(f"loss matrices differ in shape: baseline {baseline.shape}, unlearned {unlearned.shape}")
    if not (np.isfinite(baseline).all() and np.isfinite(unlearned).all()):
        raise ValueError("attribution_scores got non-finite losses")
    diff = unlearned - baseline
    mean_delta = diff.mean(axis=1)
    out = {
        "mean_delta": mean_delta,
        "relative_score": mean_delta / baseline.mean(axis=1),
        "skew_score": (diff / (unlearned + baseline + 1e-3)).mean(axis=1),
        "normalized_score": normalized_score(mean_delta, item_norms, score_type),
    }
    score = ranking_score(out, score_type)
    return {**out, "score": score, "rank": rank_descending(score), "share": positive_shares(score)}
