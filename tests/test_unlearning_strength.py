"""Unlearning-strength settings, the step-size search (`search_lr`) on synthetic ratio curves, the search decided out of
sample on the tiny model, and the one minimum ratio (`attribute_exact` reports a weak unlearning as failed)."""

from __future__ import annotations

import math

import pytest
import torch

from tda_assets.attribution.adapter import apply_delta
from tda_assets.attribution.exact import attribute_exact
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.errors import AttributionInputError, UnlearningStrengthError
from tda_assets.attribution.losses import diffusion_loss, expand_draws
from tda_assets.attribution.settings import MIN_QUERY_LOSS_RATIO
from tda_assets.attribution.unlearn import UnlearningSettings, random_copies, search_lr, unlearn, unlearning_passed
from tda_assets.data.query_state import MIN_QUERY_LOSS_RATIO as STATE_MINIMUM
from tests.tiny_model import PROTOCOL, tiny_trained


def counted(curve):
    calls = []

    def ratio_at(lr: float) -> float:
        calls.append(lr)
        return curve(lr)

    return ratio_at, calls


def test_ratio_band_is_target_plus_minus_tolerance_of_the_excess():
    assert UnlearningSettings(target_ratio=1.3, ratio_tolerance=0.1).ratio_band() == pytest.approx((1.27, 1.33))
    assert UnlearningSettings(target_ratio=3.0, ratio_tolerance=0.25).ratio_band() == pytest.approx((2.5, 3.5))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target_ratio": 1.0}, "target_ratio 1.0 must be > 1"),
        ({"target_ratio": 0.8}, "target_ratio 0.8 must be > 1"),
        ({"target_ratio": float("nan")}, "target_ratio nan must be > 1"),
        ({"target_ratio": 1.3, "recipe": "ewc_ascent"}, "needs recipe 'newton'"),
        ({"target_ratio": 1.3, "steps": 2}, "steps=2"),
        ({"ratio_tolerance": 1.0}, "ratio_tolerance 1.0"),
        ({"lr_min": 10.0, "lr_max": 1.0}, r"lr_min 10.0 and lr_max 1.0 must satisfy"),
        ({"lr_min": 0.0, "lr_max": 1.0}, "0 < lr_min < lr_max"),
        ({"score_type": "median"}, "unknown score_type 'median'"),
    ],
)
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
    lr, ratio, _ = search_lr(
        lambda lr: math.nan if lr > 1000 else 1 + lr / 1000, UnlearningSettings(target_ratio=1.5, lr=5000.0), "q"
    )
    assert 1.45 <= ratio <= 1.55 and lr == pytest.approx(500, rel=0.1)


def test_an_unreachable_target_names_the_ratio_at_the_bound_and_the_fix():
    weak = UnlearningSettings(target_ratio=2.0, lr_min=1.0, lr_max=1e4)
    with pytest.raises(
        UnlearningStrengthError, match=r"query q7: .*only ×1\.1000 at the largest lr 10000 .*raise lr_max"
    ):
        search_lr(lambda lr: 1 + 0.1 * min(lr, 10.0) / 10.0, weak, "q7")
    with pytest.raises(UnlearningStrengthError, match=r"×5\.0000 already at the smallest lr 1 .*lower lr_min"):
        search_lr(lambda lr: 5.0, weak, "q7")
    assert issubclass(UnlearningStrengthError, AttributionInputError)


def test_the_minimum_ratio_is_one_value_tested_in_one_place():
    assert MIN_QUERY_LOSS_RATIO == 1.05 and STATE_MINIMUM is MIN_QUERY_LOSS_RATIO  # the check and the sensors reuse it
    assert unlearning_passed(1.05) and not unlearning_passed(1.0499) and not unlearning_passed(math.nan)


def ratio_curve(adapter, query, delta, lr_used: float, copies) -> callable:
    """The query-loss ratio on `copies` (expanded draws) at any lr along the Newton direction of `delta` (found at
    `lr_used`: the step is linear in lr)."""
    z, cond, t, eps, _ = copies
    with torch.no_grad():
        base = float(diffusion_loss(adapter, z, cond, t, eps, None).mean())

    def at(lr: float) -> float:
        with apply_delta(adapter.denoiser, {n: d * (lr / lr_used) for n, d in delta.items()}), torch.no_grad():
            return float(diffusion_loss(adapter, z, cond, t, eps, None).mean()) / base

    return at


def test_the_search_decides_on_fresh_copies_where_the_in_sample_ratio_would_pass_a_weak_step():
    """Tiny model, query 0, 2 copies a step. Measured: the lr the in-sample ratio accepts (×1.095 on the step's copies,
    lr 119) gives ×1.032 on fresh copies, below even the ×1.05 minimum; the search's lr 238 gives ×1.099 on the fresh
    copies and ×1.138 on the protocol draws."""
    adapter, train, queries, fisher, _ = tiny_trained()
    settings = UnlearningSettings(lr=50.0, query_draws=2, target_ratio=1.1)
    query = queries.select([0])
    result = unlearn(adapter, query, fisher, settings, PROTOCOL, Compute(), n_train=len(train))
    gen = torch.Generator().manual_seed(settings.seed)  # the copies unlearn draws: the step's first, then fresh ones
    step, fresh = (expand_draws(query, *random_copies(adapter, 2, gen, 1), adapter.device) for _ in range(2))
    in_sample, out_of_sample = (ratio_curve(adapter, query, result.delta, result.lr_used, c) for c in (step, fresh))
    low, high = settings.ratio_band()
    assert result.search_ratio == pytest.approx(out_of_sample(result.lr_used), rel=1e-6)
    assert low <= result.search_ratio <= high and result.passed
    lr_in, ratio_in, _ = search_lr(in_sample, settings, "q")  # what a search on the step's own copies would accept
    assert low <= ratio_in <= high and lr_in < 0.75 * result.lr_used
    assert out_of_sample(lr_in) < MIN_QUERY_LOSS_RATIO  # in sample ×1.1, out of sample a failed unlearning


def test_attribute_exact_reports_an_unlearning_below_the_minimum_as_failed_and_ranks_nothing():
    adapter, train, queries, fisher, l0 = tiny_trained()
    weak = UnlearningSettings(lr=1e-3, target_ratio=None, score_type="mean_delta")
    scores, result, after = attribute_exact(adapter, queries.select([1]), train, l0, fisher, weak, PROTOCOL, Compute())
    assert scores is None and after is None and not result.passed
    assert 0.99 < result.loss_ratio < 1.01  # the ratio is kept: a failure is reported with it
    strong = UnlearningSettings(lr=50.0, target_ratio=1.3, score_type="mean_delta")
    scores, result, after = attribute_exact(
        adapter, queries.select([1]), train, l0, fisher, strong, PROTOCOL, Compute()
    )
    assert result.passed and result.loss_ratio >= 1.05 and after.shape == l0.shape
    assert sorted(scores["rank"]) == list(range(1, len(train) + 1))
