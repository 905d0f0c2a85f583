"""Scores from loss matrices and the consistency metrics."""

import numpy as np
import pytest

from tda_assets.attribution.metrics import (
    compare,
    cross_query_overlap,
    jaccard,
    jaccard_at_k,
    spearman,
)
from tda_assets.attribution.scores import attribution_scores, rank_descending, ranking_score


def test_score_is_mean_loss_change_and_rank_one_is_the_largest():
    base = np.array([[1.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    after = np.array([[1.5, 1.5], [2.0, 2.2], [1.0, 3.0]])
    s = attribution_scores(base, after)
    np.testing.assert_allclose(s["score"], [0.5, 0.1, 0.0])
    np.testing.assert_allclose(s["relative_score"], [0.5, 0.05, 0.0])
    assert s["rank"].tolist() == [1, 2, 3]


def test_shares_are_positive_scores_renormalized():
    base = np.zeros((3, 1)) + 1.0
    after = base + np.array([[0.3], [0.1], [-0.4]])
    np.testing.assert_allclose(attribution_scores(base, after)["share"], [0.75, 0.25, 0.0])


def test_skew_score_is_bounded_per_draw():
    base = np.array([[100.0], [0.1]])
    after = np.array([[110.0], [0.2]])
    s = attribution_scores(base, after)
    assert s["score"][0] > s["score"][1] and s["skew_score"][1] > s["skew_score"][0]


def test_non_finite_losses_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        attribution_scores(np.ones((2, 2)), np.array([[1.0, np.nan], [1.0, 1.0]]))


def test_ties_rank_by_position():
    assert rank_descending(np.array([1.0, 2.0, 2.0])).tolist() == [3, 1, 2]


def test_jaccard_counts_top_k_overlap():
    a = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    b = np.array([5.0, 1.0, 4.0, 2.0, 3.0])
    assert jaccard_at_k(a, b, 2) == pytest.approx(1 / 3)
    assert jaccard_at_k(a, a, 3) == 1.0


def test_spearman_of_reversed_ranking_is_minus_one():
    a = np.arange(10.0)
    assert spearman(a, a[::-1]) == pytest.approx(-1.0)


def test_compare_caps_k_at_item_count():
    rows = compare(np.arange(20.0), np.arange(20.0))
    assert ("jaccard", 100, 1.0) in rows and ("spearman", None, pytest.approx(1.0)) in rows


@pytest.mark.parametrize(
    "score_type, key, ranks",
    [
        ("mean_delta", "mean_delta", [1, 2, 3]),
        ("relative", "relative_score", [2, 1, 3]),
        ("skew", "skew_score", [2, 1, 3]),
    ],
)
def test_score_type_chooses_the_score_and_rank_follows_it(score_type, key, ranks):
    base = np.array([[10.0, 10.0], [1.0, 1.0], [2.0, 2.0]])
    after = np.array([[11.0, 11.0], [1.5, 1.5], [2.0, 2.0]])  # item 0 rises most in absolute terms, item 1 relatively
    s = attribution_scores(base, after, score_type=score_type)
    np.testing.assert_allclose(s["mean_delta"], [1.0, 0.5, 0.0])
    assert np.array_equal(s["score"], s[key]) and np.array_equal(ranking_score(s, score_type), s[key])
    assert s["rank"].tolist() == ranks
    np.testing.assert_allclose(s["share"], np.clip(s[key], 0, None) / np.clip(s[key], 0, None).sum())


def test_unknown_score_type_is_refused():
    with pytest.raises(ValueError, match="unknown score_type 'median'"):
        attribution_scores(np.ones((2, 2)), np.ones((2, 2)), score_type="median")


def test_cross_query_overlap_averages_only_pairs_of_different_target_artists():
    top = {
        "qa1": ["i1", "i2", "i3", "i4"],
        "qa2": ["i1", "i2", "i3", "i4"],  # artist A twice: identical, not counted
        "qb": ["i3", "i4", "i5", "i6"],  # vs each A query: 2 shared of 6 → 1/3
        "qc": ["i7", "i8", "i9", "i10"],  # shares nothing: 0 with every other
        "user": ["i1", "i2", "i3", "i4"],
    }  # no target artist: left out
    group = {"qa1": "A", "qa2": "A", "qb": "B", "qc": "C", "user": None}
    mean, pairs = cross_query_overlap(top, group)
    # pairs: qa1-qb 1/3, qa2-qb 1/3, qa1-qc 0, qa2-qc 0, qb-qc 0 → mean 2/15
    assert pairs == 5 and mean == pytest.approx(2 / 15)
    same = cross_query_overlap({q: ["x", "y"] for q in top}, group)
    assert same == (pytest.approx(1.0), 5)  # every query gets the same items: the "generally influential" case


def test_cross_query_overlap_without_a_pair_is_nan():
    mean, pairs = cross_query_overlap({"q1": ["a"], "q2": ["b"]}, {"q1": "A", "q2": "A"})
    assert np.isnan(mean) and pairs == 0
    assert jaccard(["a", "b"], ["b", "c"]) == pytest.approx(1 / 3) and jaccard([], []) == 1.0
