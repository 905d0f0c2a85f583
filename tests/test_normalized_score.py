"""The `normalized` score type: mean ΔL over the item's gradient norm in the Newton metric (the product default).

Figures in the docstrings were measured on the trained test model (16 clips × 8 artists, CPU, fp32).
"""

from __future__ import annotations

import numpy as np
import pytest

from tda_assets.attribution.adapter import apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.gradients import gradient_store
from tda_assets.attribution.losses import batch_losses
from tda_assets.attribution.multifidelity import staged_scores, two_stage
from tda_assets.attribution.scores import attribution_scores, low_norm_share, norm_divisor, score_columns
from tda_assets.attribution.self_influence import choose_targets
from tda_assets.attribution.settings import NORM_FLOOR, UnlearningSettings
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.attribution.unlearn import unlearn

BASE = np.array([[10.0, 10.0], [1.0, 1.0], [2.0, 2.0]])
AFTER = np.array([[11.0, 11.0], [1.5, 1.5], [2.0, 2.0]])  # mean ΔL 1.0, 0.5, 0.0


def test_normalized_score_divides_mean_delta_by_the_item_norms_and_ranks_by_it():
    s = attribution_scores(BASE, AFTER, "normalized", item_norms=np.array([4.0, 1.0, 1.0]))
    np.testing.assert_allclose(s["normalized_score"], [0.25, 0.5, 0.0])
    np.testing.assert_allclose(s["mean_delta"], [1.0, 0.5, 0.0])
    assert np.array_equal(s["score"], s["normalized_score"]) and s["rank"].tolist() == [2, 1, 3]
    np.testing.assert_allclose(s["share"], [1 / 3, 2 / 3, 0.0])


MD_BASE = np.ones((4, 2))
MD_AFTER = MD_BASE + np.array([1.0, 0.5, 0.02, 0.3])[:, None]  # mean ΔL 1.0, 0.5, 0.02, 0.3
NORMS = np.array([4.0, 1.0, 0.01, 2.0])  # median 1.5: item 2's gradient is near zero


def test_the_floor_keeps_a_near_zero_gradient_from_lifting_its_item_to_the_top():
    """Unfloored, item 2 scores 0.02 / 0.01 = 2.0 and ranks first; floored at NORM_FLOOR (0.5) × median 1.5 = 0.75 it
    scores 0.0267 and ranks last. Item 1's norm 1.0 is above the floor and keeps its 0.5."""
    assert NORM_FLOOR == 0.5
    s = attribution_scores(MD_BASE, MD_AFTER, "normalized", item_norms=NORMS)
    np.testing.assert_allclose(s["normalized_score"], [0.25, 0.5, 0.02 / 0.75, 0.15])
    assert s["rank"].tolist() == [2, 1, 4, 3]
    np.testing.assert_allclose(norm_divisor(NORMS), [4.0, 1.0, 0.75, 2.0])


def test_two_stage_floors_at_the_median_of_all_items_not_of_its_candidates():
    """Only items 2 and 3 are candidates (their median norm 1.005 would floor at 0.5025); the floor is the full one."""
    signal = np.array([0.0, 0.1, 1.0, 0.9])
    res = two_stage(
        MD_BASE,
        lambda idx, a, b: MD_AFTER[idx, a:b],
        {"a": signal},
        top=2,
        first_draws=2,
        score_type="normalized",
        item_norms=NORMS,
    )
    assert res.rescored.tolist() == [False, False, True, True]
    np.testing.assert_allclose(res.score[2:], [0.02 / 0.75, 0.15])
    assert res.rank.tolist() == [4, 3, 2, 1]  # rescored first (by score), then the rest by their signal rank


def test_the_share_of_a_top_10_in_the_lowest_norm_decile():
    norms = np.arange(1.0, 21.0)  # 20 items: the lowest decile is items 0 and 1
    rank = np.argsort(np.argsort(-norms)) + 1  # the largest norms first
    assert low_norm_share(rank, norms, 10) == 0.0
    rank[[1, 19]] = rank[[19, 1]]  # item 1 (lowest decile) takes rank 1
    assert low_norm_share(rank, norms, 10) == 0.1 and low_norm_share(rank, None) is None


def test_first_order_scores_rank_every_item_and_rescore_none():
    s = score_columns(BASE, "normalized", np.array([4.0, 1.0, 1.0]), mean_delta=np.array([1.0, 0.5, 0.0]))
    np.testing.assert_allclose(s["normalized_score"], [0.25, 0.5, 0.0])
    np.testing.assert_allclose(s["relative_score"], [0.1, 0.5, 0.0])
    assert s["rank"].tolist() == [2, 1, 3] and s["draws_used"].tolist() == [0, 0, 0] and np.isnan(s["skew_score"]).all()


def test_other_score_types_keep_their_ranking_and_leave_normalized_empty_without_norms():
    s = attribution_scores(BASE, AFTER, "mean_delta")
    assert s["rank"].tolist() == [1, 2, 3] and np.isnan(s["normalized_score"]).all()


def test_normalized_without_norms_or_with_bad_norms_is_refused():
    with pytest.raises(ValueError, match="score_type 'normalized' needs the items' gradient norms"):
        attribution_scores(BASE, AFTER, "normalized")
    for bad in ([1.0, 0.0, 1.0], [1.0, np.nan, 1.0], [1.0, 1.0]):
        with pytest.raises(ValueError, match="finite positive gradient norms"):
            attribution_scores(BASE, AFTER, "normalized", item_norms=np.array(bad))


def test_staged_scores_of_a_complete_rescore_equal_the_full_normalized_scores():
    norms = np.array([4.0, 1.0, 2.0])
    full = attribution_scores(BASE, AFTER, "normalized", norms)
    staged = staged_scores(BASE, AFTER, fallback=np.zeros(3), score_type="normalized", item_norms=norms)
    for column in ("normalized_score", "score", "rank", "share"):
        np.testing.assert_allclose(staged[column], full[column])


def test_settings_say_which_configurations_read_the_gradient_store():
    assert UnlearningSettings().score_type == "normalized" and UnlearningSettings().needs_gradients
    assert not UnlearningSettings(score_type="skew").needs_gradients
    assert UnlearningSettings(method="linearized", score_type="mean_delta").needs_gradients


@pytest.fixture(scope="module")
def stores(trained, fisher, protocol):
    """The items' preconditioned gradients, unsketched (exact norms) and CountSketched to k = 4096 (the default
    store)."""
    adapter, batch = trained
    return (
        gradient_store(adapter, [batch], protocol, "all", Compute(), k=None, fisher=fisher),
        gradient_store(adapter, [batch], protocol, "all", Compute(), k=4096, fisher=fisher),
    )


def test_sketched_item_norms_estimate_the_exact_preconditioned_norms(stores):
    """Measured: relative error mean 1.0%, max 3.1% over the 128 items (a CountSketch's sd is at most sqrt(2/k) on
    the squared norm, 2.2% at k = 4096, so about 1.1% on the norm)."""
    exact, sketched = (s.item_norms for s in stores)
    err = np.abs(sketched / exact - 1)
    print(f"sketched vs exact item norms: relative error mean {err.mean():.4f}, max {err.max():.4f}")
    assert err.mean() < 0.02 and err.max() < 0.06
    assert np.ptp(np.log(exact)) > 0.3  # the norms differ between items, so dividing by them can change a ranking


def test_normalized_ranks_the_self_query_first_at_least_as_often_as_mean_delta(trained, fisher, protocol, stores):
    """Self-influence at the default configuration (×1.1, its step size searched on fresh copies of the query), 8
    k-means targets, all 16 draws. Measured self ranks: normalized [1, 1, 4, 1, 1, 1, 1, 1] (7 first, R 1.38), mean ΔL
    [2, 2, 3, 1, 1, 1, 1, 2] (4, R 1.62), skew [1, 1, 3, 1, 1, 1, 1, 2] (6, R 1.38)."""
    adapter, batch = trained
    targets = [
        batch.item_ids.index(i) for i in choose_targets(audio_embedding(batch).numpy(), batch.item_ids, 8, seed=0)
    ]
    l0 = batch_losses(adapter, batch, protocol, Compute()).loss.numpy()
    norms = stores[1].item_norms
    ranks: dict[str, list[int]] = {"normalized": [], "mean_delta": [], "skew": []}
    for t in targets:
        result = unlearn(
            adapter, batch.select([t]), fisher, UnlearningSettings(), protocol, Compute(), n_train=len(batch)
        )
        with apply_delta(adapter.denoiser, result.delta):
            lu = batch_losses(adapter, batch, protocol, Compute()).loss.numpy()
        for score_type, r in ranks.items():
            r.append(int(attribution_scores(l0, lu, score_type, norms)["rank"][t]))
    print(f"self ranks: {ranks}")
    first = {k: sum(x == 1 for x in r) for k, r in ranks.items()}
    assert first["normalized"] >= first["mean_delta"] and np.mean(ranks["normalized"]) <= np.mean(ranks["mean_delta"])
    assert first["normalized"] >= 6  # chance: 1/128 per target
