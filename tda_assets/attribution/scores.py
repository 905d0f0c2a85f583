"""Attribution scores from per-draw losses before (`L0`) and after (`ℓ(θ_u)`) unlearning a query."""

from __future__ import annotations

import numpy as np

from .settings import NORM_FLOOR, SCORE_TYPES

# score_type → the attribution_scores column that ranks (DESIGN §1: a grid dimension, not a belief)
SCORE_COLUMNS = dict(zip(SCORE_TYPES, ("mean_delta", "relative_score", "skew_score", "normalized_score")))


def rank_descending(score: np.ndarray) -> np.ndarray:
    """1-based ranks, rank 1 = highest score; ties broken by position (stable)."""
    order = np.argsort(-score, kind="stable")
    ranks = np.empty(len(score), dtype=np.int64)
    ranks[order] = np.arange(1, len(score) + 1)
    return ranks


def positive_shares(score: np.ndarray) -> np.ndarray:
    """Positive scores renormalized to sum to 1 (credit shares); all zero if no score is positive."""
    pos = np.clip(score, 0.0, None)
    total = pos.sum()
    return pos / total if total > 0 else np.zeros_like(pos)


def ranking_score(scores: dict[str, np.ndarray], score_type: str = "mean_delta") -> np.ndarray:
    """The per-item score that ranks items for a `score_type` (one of SCORE_TYPES), from an `attribution_scores`
    dict."""
    if score_type not in SCORE_COLUMNS:
        raise ValueError(f"unknown score_type {score_type!r}: choose one of {SCORE_TYPES}")
    return scores[SCORE_COLUMNS[score_type]]


LOW_NORM_QUANTILE = 0.1  # the lowest-norm decile, whose share of each top-k is reported beside the normalized score


def norm_divisor(item_norms: np.ndarray, floor: float = NORM_FLOOR) -> np.ndarray:
    """What the normalized score divides by: each item's gradient norm, floored at `floor` (the product: `NORM_FLOOR`)
    × the median norm of all items (DESIGN §1), so a near-zero gradient cannot lift an item by the division alone."""
    norms = np.asarray(item_norms, dtype=np.float64)
    return np.maximum(norms, floor * np.median(norms))


def normalized_score(mean_delta: np.ndarray, item_norms: np.ndarray | None, score_type: str) -> np.ndarray:
    """`mean_delta` divided by each item's gradient norm in the Newton metric, `‖(F̂ + d)^(-1/2) g_i‖`, floored
    (`norm_divisor`); all NaN without norms, which score_type `normalized` refuses.

    To first order `mean_delta_i = (lr/N)·⟨P g_i, P g_q⟩`, so dividing by `‖P g_i‖` ranks items by the cosine of their
    gradient with the query's: an item with large gradients no longer outranks the query's own source (relative
    influence, Barshan et al. 2020). The norms come from the training_gradients store (`GradientStore.item_norms`), one
    per item of `mean_delta` (all items: the floor is a fraction of their median).
    """
    if item_norms is None:
        if score_type == "normalized":
            raise ValueError(
                "score_type 'normalized' needs the items' gradient norms (item_norms): materialize the "
                "configuration's training_gradients store"
            )
        return np.full(len(mean_delta), np.nan)
    norms = np.asarray(item_norms, dtype=np.float64)
    if norms.shape != mean_delta.shape or not (np.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError(f"item_norms must be {len(mean_delta)} finite positive gradient norms, one per item")
    return mean_delta / norm_divisor(norms)


def low_norm_share(rank: np.ndarray, item_norms: np.ndarray | None, k: int = 10) -> float | None:
    """The share of the top-`k` (by `rank`, 1 = first) that lies in the lowest-norm decile of all items; None without
    norms. A high share says the ranking leans on items the division lifts."""
    if item_norms is None:
        return None
    norms = np.asarray(item_norms, dtype=np.float64)
    top = np.argsort(np.asarray(rank), kind="stable")[: min(k, len(norms))]
    return float((norms[top] <= np.quantile(norms, LOW_NORM_QUANTILE)).mean())


def score_columns(
    baseline: np.ndarray,
    score_type: str = "mean_delta",
    item_norms: np.ndarray | None = None,
    *,
    unlearned: np.ndarray | None = None,
    mean_delta: np.ndarray | None = None,
    fallback: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The score columns of one query, whatever the stage or method (DESIGN §1: one function computes them).

    Exact (`unlearned` [N, K], NaN at draws not evaluated, each item's evaluated draws a prefix 0…d−1): `mean_delta`,
    `relative_score`, `skew_score` over the draws used, `draws_used` = d; ranks: full-K items by score, then partially
    rescored items by score, then the rest by `fallback` (lower first; e.g. the mean rank over two-stage's cheap
    signals); shares over the full-K items. First-order (`mean_delta` [N] given, e.g. linearized `g_iᵀδ`): nothing
    rescored, `skew_score` NaN, every item ranked by score. `normalized_score` divides `mean_delta` by the floored item
    norms (`normalized_score`; NaN without norms); `score` is the column of `score_type`, `rank` 1 its highest.
    """
    if (unlearned is None) == (mean_delta is None):
        raise ValueError("score_columns takes either the unlearned losses or a first-order mean_delta")
    n, k = baseline.shape
    if unlearned is None:
        md = np.asarray(mean_delta, dtype=np.float64)
        used = np.zeros(n, dtype=np.int64)
        out = {"mean_delta": md, "relative_score": md / baseline.mean(axis=1), "skew_score": np.full(n, np.nan)}
        full = np.ones(n, dtype=bool)  # every item takes part in the shares
    else:
        if unlearned.shape != baseline.shape:
            raise ValueError(f"loss matrices differ in shape: baseline {baseline.shape}, unlearned {unlearned.shape}")
        done = ~np.isnan(unlearned)
        used = done.sum(axis=1)
        if not (done == (np.arange(k)[None, :] < used[:, None])).all():
            raise ValueError("rescored losses must cover a prefix of the draws for every item (draws 0…d−1)")
        count = np.where(used > 0, used, 1)
        diff = np.where(done, unlearned - baseline, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            md = np.where(used > 0, diff.sum(1) / count, np.nan)
            out = {
                "mean_delta": md,
                "relative_score": md / np.where(used > 0, np.where(done, baseline, 0.0).sum(1) / count, np.nan),
                "skew_score": np.where(
                    used > 0, (diff / np.where(done, unlearned + baseline + 1e-3, 1.0)).sum(1) / count, np.nan
                ),
            }
        full = used == k
    with np.errstate(invalid="ignore"):
        out["normalized_score"] = normalized_score(md, item_norms, score_type)
    score = ranking_score(out, score_type)
    tie = np.zeros(n) if fallback is None else np.asarray(fallback, dtype=np.float64)
    order = np.lexsort((tie, -np.nan_to_num(score, nan=0.0), -used))
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    share = positive_shares(np.where(full, np.nan_to_num(score, nan=0.0), 0.0))
    return {**out, "score": score, "rank": rank, "share": share, "draws_used": used.astype(np.int64)}


def attribution_scores(
    baseline: np.ndarray, unlearned: np.ndarray, score_type: str = "mean_delta", item_norms: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """`score_columns` of a complete rescore (every item at every draw of [N, K] loss matrices): `mean_delta`,
    `relative_score`, `skew_score`, `normalized_score`, and `score`, `rank`, `share`, `draws_used`.

    `score` is the ranking score of `score_type` (so `rank` 1 always has the highest `score`, and `share`
    renormalizes its positive part); `mean_delta` (DESIGN §1's `score_i`) is always kept as its own column.
    `normalized_score` needs the items' gradient norms (`item_norms`; NaN without them).
    """
    if baseline.shape != unlearned.shape:
        raise ValueError(f"loss matrices differ in shape: baseline {baseline.shape}, unlearned {unlearned.shape}")
    if not (np.isfinite(baseline).all() and np.isfinite(unlearned).all()):
        raise ValueError("attribution_scores got non-finite losses")
    return score_columns(baseline, score_type, item_norms, unlearned=unlearned)
