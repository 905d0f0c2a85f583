"""The counterfactual verdict on known numbers: the noise floor, the per-query verdict, the check over queries, and the
random removals (engine only, no training)."""

from __future__ import annotations

import math

import pytest

from tda_assets.attribution.counterfactual import (
    Verdict, majority_passes, noise_floor, random_items, random_removals, share_passing, verdict)


def test_noise_floor_is_mean_plus_two_sample_sds():
    # rises 1, 2, 3: mean 2, sample sd 1 (ddof 1; the population sd would be 0.816)
    assert noise_floor([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0, 4.0))
    assert noise_floor([1.0, 2.0, 3.0], sds=3.0)[2] == pytest.approx(5.0)
    # 0.010, 0.014, 0.012: mean 0.012, sd 0.002 → floor 0.016
    assert noise_floor([0.010, 0.014, 0.012]) == pytest.approx((0.012, 0.002, 0.016))


def test_verdict_passes_only_strictly_above_the_floor():
    random = [0.010, 0.014, 0.012]  # floor 0.016
    assert verdict(0.05, random).passed
    assert not verdict(0.015, random).passed  # above every random rise and their mean, but inside the noise
    assert not verdict(0.016, random).passed  # on the floor is not above it
    assert not verdict(-0.2, random).passed
    assert not verdict(float("nan"), random).passed
    v = verdict(0.05, random)
    assert (v.attributed_rise, v.random_mean, v.random_sd, v.floor) == pytest.approx((0.05, 0.012, 0.002, 0.016))


def test_a_wide_noise_floor_fails_a_rise_that_beats_the_mean():
    # the old check (attributed rise > mean random rise) would pass this; the noise says it is not distinguishable
    random = [0.0, 0.1, -0.1]  # mean 0, sd 0.1, floor 0.2
    assert verdict(0.15, random) == Verdict(0.15, 0.0, pytest.approx(0.1), pytest.approx(0.2), False)


def test_noise_floor_refuses_too_few_or_non_finite_rises():
    with pytest.raises(ValueError, match=r"at least 2 random removals, got 1: set random_removals to 3"):
        noise_floor([0.1])
    with pytest.raises(ValueError, match="not finite.*diverged"):
        noise_floor([0.1, float("inf"), 0.2])


def test_the_check_needs_a_strict_majority_of_queries():
    ok, bad = verdict(1.0, [0.0, 0.1, 0.2]), verdict(0.0, [0.0, 0.1, 0.2])
    assert ok.passed and not bad.passed
    assert share_passing([ok, bad, ok]) == pytest.approx(2 / 3) and majority_passes([ok, bad, ok])
    assert share_passing([ok, bad]) == 0.5 and not majority_passes([ok, bad])  # half is not a majority
    assert majority_passes([ok]) and not majority_passes([bad])
    assert math.isnan(share_passing([])) and not majority_passes([])


def test_random_items_avoid_the_excluded_and_are_seeded_per_query():
    ids = [f"i{n:02d}" for n in range(50)]
    assert random_items(ids, 5, 0, "q1") == random_items(ids, 5, 0, "q1")
    assert random_items(ids, 5, 0, "q1") != random_items(ids, 5, 0, "q2")
    top = ids[:45]
    assert sorted(random_items(ids, 5, 3, "q1", exclude=top)) == ids[45:]  # only five are left
    picked = random_items(ids, 5, 1, "q1", exclude=ids[:10])
    assert len(set(picked)) == 5 and not set(picked) & set(ids[:10]) and picked == sorted(picked)


def test_random_removals_are_distinct_sets_with_their_seeds():
    ids = ["a", "b", "c", "d"]
    removals = random_removals(ids, 1, 3, seed=7, query_id="q", exclude=["a"])
    assert sorted(items[0] for _, items in removals) == ["b", "c", "d"]  # three distinct singletons of {b, c, d}
    seeds = [s for s, _ in removals]
    assert seeds[0] == 7 and seeds == sorted(set(seeds))
    many = random_removals([f"i{n}" for n in range(40)], 10, 3, seed=0, query_id="q")
    assert [s for s, _ in many] == [0, 1, 2] and len({tuple(items) for _, items in many}) == 3


def test_random_removals_refuse_a_pool_too_small_for_distinct_sets():
    with pytest.raises(ValueError, match=r"query 'q': 2 items outside the 2 attributed cannot make 3 distinct random "
                                         r"removals of 2: lower k"):
        random_removals(["a", "b", "c", "d"], 2, 3, seed=0, query_id="q", exclude=["a", "b"])
