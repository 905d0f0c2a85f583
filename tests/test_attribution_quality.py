"""The method works on the embedded model: unlearning forgets the query, attribution finds its sources."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tda_assets.attribution.adapter import ItemBatch, apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.data.corpus import ARTISTS, style_prompt
from tda_assets.attribution.losses import batch_losses
from tda_assets.models.sampling import generate_latents
from tda_assets.attribution.scores import attribution_scores
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn

# `newton-fixed`, the earlier default, at this corpus's size: lr 100 on 128 items is lr 250 on the 320-item demo
# (the step is lr / N); the quality figures below were measured with it
FIXED = UnlearningSettings(lr=100.0, target_ratio=None, score_type="mean_delta")


@pytest.fixture(scope="module")
def baseline(trained, protocol) -> np.ndarray:
    adapter, batch = trained
    return batch_losses(adapter, batch, protocol, Compute()).loss.numpy()


def attribute(trained, fisher, protocol, query: ItemBatch, settings: UnlearningSettings = FIXED):
    adapter, batch = trained
    result = unlearn(adapter, query, fisher, settings, protocol, Compute(), n_train=len(batch))
    with apply_delta(adapter.denoiser, result.delta):
        after = batch_losses(adapter, batch, protocol, Compute()).loss.numpy()
    return result, after


# the default's search lands ×1.09–×1.11 on its own unlearning draws; measured on the protocol's draws the ratio moves
# a little around it (a target of ×1.3 gave ×1.19–×1.38 over 8 queries)
@pytest.mark.parametrize(
    "settings, low, high",
    [(FIXED, 1.25, np.inf), (UnlearningSettings(), 1.05, 1.2)],
    ids=["fixed-lr", "default-target-1.1"],
)
def test_unlearning_raises_query_loss_while_median_item_moves_far_less(
    trained, fisher, protocol, baseline, settings, low, high
):
    _, batch = trained
    result, after = attribute(trained, fisher, protocol, batch.select([5]), settings)
    query_rise = result.query_loss_after / result.query_loss_before - 1
    item_rise = after.mean(axis=1) / baseline.mean(axis=1) - 1
    print(f"query loss x{result.loss_ratio:.2f}; median item relative change {np.median(item_rise):+.4f}")
    assert low < result.loss_ratio < high
    assert abs(np.median(item_rise)) < 0.1 * query_rise


def test_unlearning_leaves_the_model_unchanged(trained, fisher, protocol):
    adapter, batch = trained
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    unlearn(adapter, batch.select([0]), fisher, FIXED, protocol, Compute(), n_train=len(batch))
    assert all(torch.equal(before[n], p) for n, p in adapter.denoiser.named_parameters())


def test_self_attribution_ranks_the_query_itself_first(trained, fisher, protocol, baseline):
    _, batch = trained
    picks = np.random.default_rng(0).choice(len(batch), size=10, replace=False)
    ranks = []
    for i in picks:
        _, after = attribute(trained, fisher, protocol, batch.select([int(i)]))
        ranks.append(int(attribution_scores(baseline, after)["rank"][i]))
    print(f"self-attribution ranks: {ranks}")
    assert sum(r == 1 for r in ranks) >= 9


def test_artist_prompts_attribute_to_that_artist(trained, fisher, protocol, baseline, corpus_rows):
    adapter, batch = trained
    artist_of = np.array([r["artist"] for r in corpus_rows])
    shares = []
    for i, style in enumerate(ARTISTS):
        cond = adapter.encode_text([style_prompt(style)], [f"q-{style.name}"])
        latents = generate_latents(adapter, cond, seed=100 + i, compute=Compute(), steps=30)
        query = ItemBatch([f"q-{style.name}"], latents, cond, torch.ones(1, latents.shape[-1]))
        _, after = attribute(trained, fisher, protocol, query)
        top10 = np.argsort(-attribution_scores(baseline, after)["score"])[:10]
        shares.append(float((artist_of[top10] == style.name).mean()))
    chance = 1 / len(ARTISTS)
    print(f"artist precision@10 per artist: {shares}; mean {np.mean(shares):.3f} (chance {chance:.3f})")
    assert np.mean(shares) >= 4 * chance
