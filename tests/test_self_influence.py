"""Self-influence helpers: k-means target choice and the summary figures."""

from __future__ import annotations

import numpy as np
import pytest

from tda_assets.attribution.self_influence import choose_targets, neighbour_similarity, summarise


def blobs(n_per: int = 10, seed: int = 0) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Four well-separated blobs on the unit circle's axes in 8-D, with their labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(8)[:4] * 10
    x = np.concatenate([c + rng.normal(0, 0.3, (n_per, 8)) for c in centres])
    return x, [f"item-{i}" for i in range(len(x))], np.repeat(np.arange(4), n_per)


def test_one_target_per_blob_nearest_its_centre():
    x, ids, label = blobs()
    targets = choose_targets(x, ids, 4, seed=0)
    idx = [ids.index(t) for t in targets]
    assert sorted(label[idx].tolist()) == [0, 1, 2, 3]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for i in idx:  # the chosen item is its blob's item nearest the blob's mean direction
        members = np.flatnonzero(label == label[i])
        centre = unit[members].mean(0)
        assert i == members[np.argmin(((unit[members] - centre) ** 2).sum(1))]
    assert choose_targets(x, ids, 4, seed=0) == targets


def test_targets_are_distinct_even_when_there_are_more_targets_than_blobs():
    x, ids, _ = blobs(n_per=3)
    targets = choose_targets(x, ids, 12, seed=1)
    assert len(set(targets)) == 12
    with pytest.raises(ValueError, match="n_targets 13"):
        choose_targets(x, ids, 13)


def test_summary_mean_rank_and_share_first():
    s = summarise([1, 1, 4, 2])
    assert (s.targets, s.mean_rank, s.share_first, s.top_k_similarity) == (4, 2.0, 0.5, None)


def test_neighbour_similarity_of_top_and_bottom_attributed_items_excludes_the_target():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    rank = np.array([1, 2, 3, 4, 5])  # item 0 (the target) first, then its twin, …, its opposite last
    assert neighbour_similarity(rank, emb, target=0, k=2) == pytest.approx((0.8, -0.5))
    s = summarise([1, 2], rankings=[rank, rank[::-1].copy()], embeddings=emb, target_indices=[0, 0], k=1)
    assert s.top_k_similarity == pytest.approx((1.0 + -1.0) / 2) and s.bottom_k_similarity == pytest.approx((-1.0 + 1.0) / 2)
