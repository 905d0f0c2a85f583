"""The self-influence protocol (DESIGN §1): diverse training items unlearned as their own queries, and its summary.

Targets come in two disjoint sets (recorded as `target_set`): the *development* targets, `choose_targets(16, seed 0)`,
which tuned the shipped defaults, and the *reporting* targets, chosen the same way among the other items, on which the
figures are reported. Replication draws its sources the same way."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def choose_targets(embeddings: np.ndarray, item_ids: Sequence[str], n_targets: int, seed: int = 0) -> list[str]:
    """`n_targets` distinct items: seeded k-means++ on the unit-normalized embeddings, the item nearest each
    centroid."""
    x = _unit_rows(embeddings)
    if len(x) != len(item_ids):
        raise ValueError(f"{len(x)} embeddings for {len(item_ids)} item ids")
    if not 1 <= n_targets <= len(x):
        raise ValueError(f"n_targets {n_targets} must be between 1 and the number of items ({len(x)})")
    centroids, _ = kmeans2(x, n_targets, minit="++", rng=np.random.default_rng(seed))
    dist = ((centroids[:, None, :] - x[None, :, :]) ** 2).sum(-1)  # [k, N]
    chosen: list[int] = []
    for row in dist:  # greedy: the nearest item not already chosen (an empty cluster may share a nearest item)
        chosen.append(next(i for i in np.argsort(row, kind="stable") if i not in chosen))
    return [item_ids[i] for i in chosen]


DEVELOPMENT_TARGETS, DEVELOPMENT_SEED = 16, 0  # choose_targets(16, seed 0): the targets that tuned the defaults
TARGET_SETS = ("development", "reporting")
Z_95 = 1.959964  # the two-sided 95% normal quantile (sql/views.sql `share_lower` uses the same)


def development_targets(embeddings: np.ndarray, item_ids: Sequence[str]) -> list[str]:
    """The development targets: `choose_targets(16, seed 0)` (at most half the items, so a tiny corpus keeps some to
    report on)."""
    return choose_targets(embeddings, item_ids, min(DEVELOPMENT_TARGETS, len(item_ids) // 2), DEVELOPMENT_SEED)


def targets_of(
    target_set: str, embeddings: np.ndarray, item_ids: Sequence[str], n_targets: int, seed: int = 0
) -> list[str]:
    """The development targets, or `n_targets` reporting targets: `choose_targets` on the items outside the development
    set, so a figure is never reported on a target that tuned it."""
    development = development_targets(embeddings, item_ids)
    if target_set == "development":
        return development
    if target_set != "reporting":
        raise ValueError(f"target_set {target_set!r} is not one of {TARGET_SETS}")
    excluded = set(development)
    keep = [i for i, item in enumerate(item_ids) if item not in excluded]
    if n_targets > len(keep):
        raise ValueError(
            f"{n_targets} reporting targets asked, but only {len(keep)} items lie outside the "
            f"{len(development)} development targets: lower n_targets"
        )
    return choose_targets(np.asarray(embeddings)[keep], [item_ids[i] for i in keep], n_targets, seed)


def wilson_lower(k: int, n: int, z: float = Z_95) -> float:
    """The lower end of the 95% Wilson score interval of the share `k / n` (NaN for n = 0)."""
    if n == 0:
        return float("nan")
    p = k / n
    center = p + z * z / (2 * n)
    margin = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float((center - margin) / (1 + z * z / n))


@dataclass(frozen=True)
class Standing:
    """What a configuration is chosen on: R (lower is better), then the lower end of its share-first interval
    (higher), then its loss-ratio spread max / min (lower)."""

    config_id: str
    mean_rank: float
    share_first_low: float
    loss_ratio_spread: float


def best_config(standings: Sequence[Standing]) -> str:
    """The configuration with the lowest R; a tie broken by the higher share-first lower bound, then the smaller
    loss-ratio spread, then the config id (never by the order the configurations were given in)."""
    if not standings:
        raise ValueError("best_config needs at least one configuration with a ranked target")
    return min(standings, key=lambda s: (s.mean_rank, -s.share_first_low, s.loss_ratio_spread, s.config_id)).config_id


@dataclass(frozen=True)
class SelfInfluenceSummary:
    """`mean_rank` is R(z_tar) (1.0 = always first); similarities are mean cosines to the target, itself excluded."""

    targets: int
    mean_rank: float
    share_first: float
    top_k_similarity: float | None = None
    bottom_k_similarity: float | None = None


def neighbour_similarity(rank: np.ndarray, embeddings: np.ndarray, target: int, k: int = 10) -> tuple[float, float]:
    """Mean cosine similarity to item `target` of the top-k and bottom-k items of one attribution (`rank` [N], 1 =
    first)."""
    x = _unit_rows(embeddings)
    order = [i for i in np.argsort(rank, kind="stable") if i != target]
    k = min(k, len(order) // 2)
    if k < 1:
        raise ValueError("neighbour_similarity needs at least two items besides the target")
    sim = x @ x[target]
    return float(sim[order[:k]].mean()), float(sim[order[-k:]].mean())


def summarize(
    ranks_of_self: Sequence[int],
    rankings: Sequence[np.ndarray] | None = None,
    embeddings: np.ndarray | None = None,
    target_indices: Sequence[int] | None = None,
    k: int = 10,
) -> SelfInfluenceSummary:
    """R and the share ranked first; given each target's `rank` array, embeddings and row, the top/bottom-k
    similarity."""
    r = np.asarray(ranks_of_self, dtype=np.float64)
    if len(r) == 0:
        raise ValueError("summarize needs at least one target")
    top = bottom = None
    if rankings is not None:
        if embeddings is None or target_indices is None or not len(rankings) == len(target_indices) == len(r):
            raise ValueError("rankings need embeddings and one target index per ranking, one per self rank")
        pairs = [neighbour_similarity(rank, embeddings, t, k) for rank, t in zip(rankings, target_indices)]
        top, bottom = (float(np.mean(v)) for v in zip(*pairs))
    return SelfInfluenceSummary(len(r), float(r.mean()), float((r == 1).mean()), top, bottom)
