"""Self-influence helpers: k-means target choice and the summary figures."""

from __future__ import annotations

import numpy as np
import pytest

from tda_assets.attribution.self_influence import (
    DEVELOPMENT_TARGETS,
    Standing,
    best_config,
    choose_targets,
    development_targets,
    neighbour_similarity,
    summarize,
    targets_of,
    wilson_lower,
)


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
        center = unit[members].mean(0)
        assert i == members[np.argmin(((unit[members] - center) ** 2).sum(1))]
    assert choose_targets(x, ids, 4, seed=0) == targets


def test_targets_are_distinct_even_when_there_are_more_targets_than_blobs():
    x, ids, _ = blobs(n_per=3)
    targets = choose_targets(x, ids, 12, seed=1)
    assert len(set(targets)) == 12
    with pytest.raises(ValueError, match="n_targets 13"):
        choose_targets(x, ids, 13)


def test_summary_mean_rank_and_share_first():
    s = summarize([1, 1, 4, 2])
    assert (s.targets, s.mean_rank, s.share_first, s.top_k_similarity) == (4, 2.0, 0.5, None)


def test_neighbour_similarity_of_top_and_bottom_attributed_items_excludes_the_target():
    emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])
    rank = np.array([1, 2, 3, 4, 5])  # item 0 (the target) first, then its twin, …, its opposite last
    assert neighbour_similarity(rank, emb, target=0, k=2) == pytest.approx((0.8, -0.5))
    s = summarize([1, 2], rankings=[rank, rank[::-1].copy()], embeddings=emb, target_indices=[0, 0], k=1)
    assert s.top_k_similarity == pytest.approx((1.0 + -1.0) / 2) and s.bottom_k_similarity == pytest.approx(
        (-1.0 + 1.0) / 2
    )


def test_development_targets_are_choose_targets_16_seed_0():
    x, ids, _ = blobs(n_per=20)
    assert DEVELOPMENT_TARGETS == 16
    assert development_targets(x, ids) == choose_targets(x, ids, 16, 0)
    assert targets_of("development", x, ids, 5) == choose_targets(x, ids, 16, 0)  # n_targets is for reporting


def test_reporting_targets_never_intersect_the_development_targets():
    x, ids, _ = blobs(n_per=20)  # 80 items
    development = set(choose_targets(x, ids, 16, 0))
    for n, seed in ((8, 0), (32, 0), (16, 3), (64, 1)):
        reporting = targets_of("reporting", x, ids, n, seed)
        assert len(set(reporting)) == n and not set(reporting) & development


def test_reporting_targets_refuse_more_than_the_items_outside_development():
    x, ids, _ = blobs(n_per=5)  # 20 items: 10 development (half), 10 left
    assert len(development_targets(x, ids)) == 10
    with pytest.raises(
        ValueError, match="11 reporting targets asked, but only 10 items lie outside the 10 development"
    ):
        targets_of("reporting", x, ids, 11)
    with pytest.raises(ValueError, match="target_set 'holdout' is not one of"):
        targets_of("holdout", x, ids, 3)


def test_wilson_lower_ends_by_hand():
    assert wilson_lower(6, 6) == pytest.approx(0.6097, abs=1e-4)  # 6 of 6 first shows at least 0.61
    assert wilson_lower(2, 2) == pytest.approx(1 / (1 + 1.959964**2 / 2), abs=1e-9)
    assert wilson_lower(31, 32) == pytest.approx(0.8426, abs=1e-4)
    assert wilson_lower(0, 4) == pytest.approx(0.0, abs=1e-12)


def test_a_tie_in_r_goes_to_the_higher_share_lower_bound_then_the_smaller_spread_never_list_order():
    a = Standing("default", 1.0, wilson_lower(6, 6), 1.03)
    b = Standing("newton-target", 1.0, wilson_lower(6, 6), 1.05)
    assert best_config([a, b]) == best_config([b, a]) == "default"  # equal R and share: the smaller spread
    wider = Standing("wide", 1.0, wilson_lower(5, 5), 1.01)  # same R, fewer targets: a lower share bound loses
    assert best_config([wider, b]) == "newton-target"
    assert best_config([Standing("worse", 1.2, 0.9, 1.0), b]) == "newton-target"  # R first
    assert best_config([Standing("z", 1.0, 0.6, 1.0), Standing("a", 1.0, 0.6, 1.0)]) == "a"  # a full tie: the id
