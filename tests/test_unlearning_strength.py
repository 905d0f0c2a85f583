"""Unlearning-strength settings and the step-size search (`search_lr`) on synthetic ratio curves."""

from __future__ import annotations

import math

import pytest

from tda_assets.attribution.errors import AttributionInputError, UnlearningStrengthError
from tda_assets.attribution.unlearn import UnlearningSettings, search_lr


def counted(curve):
    calls = []

    def ratio_at(lr: float) -> float:
        calls.append(lr)
        return curve(lr)

    return ratio_at, calls


def test_ratio_band_is_target_plus_minus_tolerance_of_the_excess():
    assert UnlearningSettings(target_ratio=1.3, ratio_tolerance=0.1).ratio_band() == pytest.approx((1.27, 1.33))
    assert UnlearningSettings(target_ratio=3.0, ratio_tolerance=0.25).ratio_band() == pytest.approx((2.5, 3.5))


@pytest.mark.parametrize("kwargs, match", [
    ({"target_ratio": 1.0}, "target_ratio 1.0 must be > 1"),
    ({"target_ratio": 0.8}, "target_ratio 0.8 must be > 1"),
    ({"target_ratio": float("nan")}, "target_ratio nan must be > 1"),
    ({"target_ratio": 1.3, "recipe": "ewc_ascent"}, "needs recipe 'newton'"),
    ({"target_ratio": 1.3, "steps": 2}, "steps=2"),
    ({"ratio_tolerance": 1.0}, "ratio_tolerance 1.0"),
    ({"lr_min": 10.0, "lr_max": 1.0}, r"lr_min 10.0 and lr_max 1.0 must satisfy"),
    ({"lr_min": 0.0, "lr_max": 1.0}, "0 < lr_min < lr_max"),
    ({"score_type": "median"}, "unknown score_type 'median'"),
])
def test_bad_strength_settings_are_refused_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UnlearningSettings(**kwargs)


def test_search_finds_an_lr_in_band_on_a_convex_curve_and_counts_its_probes():
    ratio_at, calls = counted(lambda lr: 1 + (lr / 1000) ** 1.5)  # ×35 at lr 10⁴·…: far from the start lr 250
    s = UnlearningSettings(target_ratio=1.3, lr=250.0)
    lr, ratio, probes = search_lr(ratio_at, s, "q")
    assert 1.27 <= ratio <= 1.33 and ratio == ratio_at(lr)
    assert 1000 * 0.27 ** (2 / 3) <= lr <= 1000 * 0.33 ** (2 / 3)
    assert probes == len(calls) - 1 and calls[0] == 250.0  # starts at settings.lr


def test_search_brackets_downward_from_a_too_strong_start():
    ratio_at, calls = counted(lambda lr: 1 + lr / 10.0)  # lr 250 gives ×26; target ×1.02 needs lr 0.2
    lr, ratio, probes = search_lr(ratio_at, UnlearningSettings(target_ratio=1.02, lr=250.0), "q")
    assert 1.018 <= ratio <= 1.022 and lr == pytest.approx(0.2, rel=0.1)
    assert calls[1] == 250.0 / 4 and probes <= 15


def test_a_non_finite_ratio_counts_as_too_strong():
    lr, ratio, _ = search_lr(lambda lr: math.nan if lr > 1000 else 1 + lr / 1000, UnlearningSettings(target_ratio=1.5, lr=5000.0), "q")
    assert 1.45 <= ratio <= 1.55 and lr == pytest.approx(500, rel=0.1)


def test_an_unreachable_target_names_the_ratio_at_the_bound_and_the_fix():
    weak = UnlearningSettings(target_ratio=2.0, lr_min=1.0, lr_max=1e4)
    with pytest.raises(UnlearningStrengthError, match=r"query q7: .*only ×1\.1000 at the largest lr 10000 .*raise lr_max"):
        search_lr(lambda lr: 1 + 0.1 * min(lr, 10.0) / 10.0, weak, "q7")
    with pytest.raises(UnlearningStrengthError, match=r"×5\.0000 already at the smallest lr 1 .*lower lr_min"):
        search_lr(lambda lr: 5.0, weak, "q7")
    assert issubclass(UnlearningStrengthError, AttributionInputError)
