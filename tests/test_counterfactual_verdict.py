"""The counterfactual verdicts on known numbers: the noise floor, the per-query verdict against both controls, the check
over queries, the shared random removals and the same-artist control (engine only, no training)."""

from __future__ import annotations

import math

import pytest

from tda_assets.attribution.counterfactual import (
    Verdict,
    majority_passes,
    noise_floor,
    random_items,
    random_removals,
    same_artist_items,
    share_passing,
    verdict,
)


def test_noise_floor_is_mean_plus_two_sample_sds():
    # rises 1, 2, 3: mean 2, sample sd 1 (ddof 1; the population sd would be 0.816)
    assert noise_floor([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0, 4.0))
    assert noise_floor([1.0, 2.0, 3.0], sds=3.0)[2] == pytest.approx(5.0)
    # 0.010, 0.014, 0.012: mean 0.012, sd 0.002 → floor 0.016
    assert noise_floor([0.010, 0.014, 0.012]) == pytest.approx((0.012, 0.002, 0.016))


def test_verdict_passes_only_strictly_above_the_floor():
    random = [0.010, 0.014, 0.012]  # floor 0.016
    assert verdict(0.05, random, 0.0).passed
    assert not verdict(0.015, random, 0.0).passed  # above every random rise and their mean, but inside the noise
    assert not verdict(0.016, random, 0.0).passed  # on the floor is not above it
    assert not verdict(-0.2, random, 0.0).passed
    assert not verdict(float("nan"), random, 0.0).passed
    v = verdict(0.05, random, 0.0)
    assert (v.attributed_rise, v.random_mean, v.random_sd, v.floor) == pytest.approx((0.05, 0.012, 0.002, 0.016))


def test_a_wide_noise_floor_fails_a_rise_that_beats_the_mean():
    # the old check (attributed rise > mean random rise) would pass this; the noise says it is not distinguishable
    random = [0.0, 0.1, -0.1]  # mean 0, sd 0.1, floor 0.2
    assert verdict(0.15, random, 0.0) == Verdict(
        0.15, 0.0, pytest.approx(0.1), pytest.approx(0.2), False, 0.0, pytest.approx(0.2), False
    )


def test_a_same_artist_removal_that_beats_the_attributed_one_fails_item_level_only():
    # random rises 0.010, 0.014, 0.012 (floor 0.016); the artist's other 10 clips raise the loss by 0.06, the top-10 by
    # 0.05: artist-level attribution (above random), not item-level (the artist's other clips matter as much)
    v = verdict(0.05, [0.010, 0.014, 0.012], 0.06)
    assert v.passed and not v.passed_item_level
    assert (v.same_artist_rise, v.item_floor) == pytest.approx((0.06, 0.064))  # 0.06 + 2 · 0.002


def test_item_level_needs_the_same_artist_rise_plus_the_noise_margin():
    random = [0.010, 0.014, 0.012]  # sd 0.002: the item floor is the same-artist rise + 0.004
    assert verdict(0.05, random, 0.03).passed_item_level  # 0.05 > 0.034
    assert not verdict(0.033, random, 0.03).passed_item_level  # above the same-artist rise, inside the noise
    assert not verdict(0.05, random, float("nan")).passed_item_level  # no control, no item-level claim
    # below the random floor fails item level even when the same-artist removal lowered the loss
    below = verdict(0.015, random, -0.2)
    assert not below.passed and not below.passed_item_level and below.item_floor == pytest.approx(-0.196)


def test_noise_floor_refuses_too_few_or_non_finite_rises():
    with pytest.raises(ValueError, match=r"at least 2 random removals, got 1: set random_removals to 3"):
        noise_floor([0.1])
    with pytest.raises(ValueError, match="not finite.*diverged"):
        noise_floor([0.1, float("inf"), 0.2])


def test_the_check_needs_a_strict_majority_of_queries():
    ok, bad = verdict(1.0, [0.0, 0.1, 0.2], 0.0), verdict(0.0, [0.0, 0.1, 0.2], 0.0)
    assert ok.passed and not bad.passed
    assert share_passing([ok, bad, ok]) == pytest.approx(2 / 3) and majority_passes([ok, bad, ok])
    assert share_passing([ok, bad]) == 0.5 and not majority_passes([ok, bad])  # half is not a majority
    assert majority_passes([ok]) and not majority_passes([bad])
    assert math.isnan(share_passing([])) and not majority_passes([])


def test_the_item_level_share_counts_only_queries_above_both_controls():
    random = [0.0, 0.1, 0.2]  # sd 0.1, floor 0.3
    both, artist_only = verdict(1.0, random, 0.1), verdict(1.0, random, 0.9)  # item floors 0.3 and 1.1
    assert both.passed_item_level and artist_only.passed and not artist_only.passed_item_level
    queries = [both, artist_only, artist_only]
    assert share_passing(queries) == 1.0 and majority_passes(queries)
    assert share_passing(queries, item_level=True) == pytest.approx(1 / 3)
    assert not majority_passes(queries, item_level=True)


def test_random_items_avoid_the_excluded_and_are_seeded_per_label():
    ids = [f"i{n:02d}" for n in range(50)]
    assert random_items(ids, 5, 0, "q1") == random_items(ids, 5, 0, "q1")
    assert random_items(ids, 5, 0, "q1") != random_items(ids, 5, 0, "q2")
    top = ids[:45]
    assert sorted(random_items(ids, 5, 3, "q1", exclude=top)) == ids[45:]  # only five are left
    picked = random_items(ids, 5, 1, "q1", exclude=ids[:10])
    assert len(set(picked)) == 5 and not set(picked) & set(ids[:10]) and picked == sorted(picked)


def test_random_removals_are_distinct_sets_with_their_seeds():
    ids = ["a", "b", "c", "d"]
    removals = random_removals(ids, 1, 3, seed=7, exclude=["a"])
    assert sorted(items[0] for _, items in removals) == ["b", "c", "d"]  # three distinct singletons of {b, c, d}
    seeds = [s for s, _ in removals]
    assert seeds[0] == 7 and seeds == sorted(set(seeds))
    many = random_removals([f"i{n}" for n in range(40)], 10, 3, seed=0)
    assert [s for s, _ in many] == [0, 1, 2] and len({tuple(items) for _, items in many}) == 3


def test_random_removals_are_one_set_for_every_query_outside_every_top_k():
    ids = [f"i{n:02d}" for n in range(30)]
    tops = [ids[:10], ids[10:20]]  # two queries' top-10s
    removals = random_removals(ids, 5, 3, seed=0, exclude=tops[0] + tops[1])
    assert all(set(items) <= set(ids[20:]) for _, items in removals)  # only the last ten are outside both
    assert removals == random_removals(ids, 5, 3, seed=0, exclude=tops[1] + tops[0])  # no query order, no query id


def test_random_removals_refuse_a_pool_too_small_for_distinct_sets():
    with pytest.raises(
        ValueError,
        match=r"2 items outside the 2 attributed to the checked queries cannot make 3 distinct "
        r"random removals of 2: lower k",
    ):
        random_removals(["a", "b", "c", "d"], 2, 3, seed=0, exclude=["a", "b"])


def test_same_artist_control_takes_k_of_the_target_artist_outside_the_top_k():
    ids = [f"i{n}" for n in range(8)]
    artists = ["A", "B", "A", "A", "B", "A", "A", None]  # A: i0, i2, i3, i5, i6
    picked = same_artist_items(ids, artists, "A", 2, seed=0, query_id="q", exclude=["i0", "i3"])
    assert len(picked) == 2 and set(picked) <= {"i2", "i5", "i6"} and picked == sorted(picked)
    assert picked == same_artist_items(ids, artists, "A", 2, seed=0, query_id="q", exclude=["i3", "i0"])
    assert same_artist_items(ids, artists, "A", 3, seed=0, query_id="q", exclude=["i0", "i3"]) == ["i2", "i5", "i6"]


def test_same_artist_control_refuses_an_artist_with_too_few_other_items():
    ids, artists = ["a", "b", "c"], ["A", "A", "B"]
    with pytest.raises(
        ValueError,
        match=r"query 'q': artist 'A' has 1 items outside the query's top-2, the same-artist "
        r"control needs 2: lower k",
    ):
        same_artist_items(ids, artists, "A", 2, seed=0, query_id="q", exclude=["a"])
