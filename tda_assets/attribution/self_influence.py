"""The self-influence protocol (DESIGN §1): diverse training items unlearned as their own queries, and its summary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2


def _unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def choose_targets(embeddings: np.ndarray, item_ids: Sequence[str], n_targets: int, seed: int = 0) -> list[str]:
    """`n_targets` distinct items: seeded k-means++ on the unit-normalised embeddings, the item nearest each centroid."""
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


@dataclass(frozen=True)
class SelfInfluenceSummary:
    """`mean_rank` is R(z_tar) (1.0 = always first); similarities are mean cosines to the target, itself excluded."""

    targets: int
    mean_rank: float
    share_first: float
    top_k_similarity: float | None = None
    bottom_k_similarity: float | None = None


def neighbour_similarity(rank: np.ndarray, embeddings: np.ndarray, target: int, k: int = 10) -> tuple[float, float]:
    """Mean cosine similarity to item `target` of the top-k and bottom-k items of one attribution (`rank` [N], 1 = first)."""
    x = _unit_rows(embeddings)
    order = [i for i in np.argsort(rank, kind="stable") if i != target]
    k = min(k, len(order) // 2)
    if k < 1:
        raise ValueError("neighbour_similarity needs at least two items besides the target")
    sim = x @ x[target]
    return float(sim[order[:k]].mean()), float(sim[order[-k:]].mean())


def summarise(
    ranks_of_self: Sequence[int],
    rankings: Sequence[np.ndarray] | None = None,
    embeddings: np.ndarray | None = None,
    target_indices: Sequence[int] | None = None,
    k: int = 10,
) -> SelfInfluenceSummary:
    """R and the share ranked first; given each target's `rank` array, embeddings and row, the top/bottom-k similarity."""
    r = np.asarray(ranks_of_self, dtype=np.float64)
    if len(r) == 0:
        raise ValueError("summarise needs at least one target")
    top = bottom = None
    if rankings is not None:
        if embeddings is None or target_indices is None or not len(rankings) == len(target_indices) == len(r):
            raise ValueError("rankings need embeddings and one target index per ranking, one per self rank")
        pairs = [neighbour_similarity(rank, embeddings, t, k) for rank, t in zip(rankings, target_indices)]
        top, bottom = (float(np.mean(v)) for v in zip(*pairs))
    return SelfInfluenceSummary(len(r), float(r.mean()), float((r == 1).mean()), top, bottom)
