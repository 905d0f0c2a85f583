"""Unlearning strength, self-influence and bf16 on the trained test model (16 clips × 8 artists).

Figures in the docstrings were measured on this model (CPU, fp32 unless stated).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tda_assets.attribution.adapter import apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.fisher import normalized_fisher
from tda_assets.attribution.gradients import gradient_store
from tda_assets.attribution.losses import batch_losses, diffusion_loss, expand_draws
from tda_assets.attribution.metrics import jaccard_at_k, spearman
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import attribution_scores
from tda_assets.attribution.self_influence import choose_targets, summarize
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn

DEFAULT = UnlearningSettings(
    lr=100.0, target_ratio=None, score_type="mean_delta"
)  # newton-fixed: the 320-item demo's lr 250 at this corpus's N = 128 (step lr / N)
TARGETED = UnlearningSettings(lr=100.0, target_ratio=1.3)
RESCORE = LossProtocol(seed=0, draws=4)  # the protocol's first 4 draws: rescoring all 128 items stays affordable
BF16 = Compute(device="cpu", autocast_dtype="bfloat16")


@pytest.fixture(scope="module")
def targets(trained) -> list[int]:
    """8 diverse training items: k-means on the pooled-latent audio embedding, the item nearest each centroid."""
    _, batch = trained
    ids = choose_targets(audio_embedding(batch).numpy(), batch.item_ids, 8, seed=0)
    return [batch.item_ids.index(i) for i in ids]


@pytest.fixture(scope="module")
def runs(trained, fisher, protocol, targets) -> dict:
    """Each target unlearned as its own query, at the fixed default lr and at target_ratio 1.3."""
    adapter, batch = trained
    return {
        s.target_ratio: [
            unlearn(adapter, batch.select([i]), fisher, s, protocol, Compute(), n_train=len(batch)) for i in targets
        ]
        for s in (DEFAULT, TARGETED)
    }


def rescore(trained, delta: dict | None, compute: Compute = Compute(), protocol: LossProtocol = RESCORE) -> np.ndarray:
    adapter, batch = trained
    if delta is None:
        return batch_losses(adapter, batch, protocol, compute).loss.numpy()
    with apply_delta(adapter.denoiser, delta):
        return batch_losses(adapter, batch, protocol, compute).loss.numpy()


@pytest.fixture(scope="module")
def baseline4(trained) -> np.ndarray:
    return rescore(trained, None)


@pytest.fixture(scope="module")
def scored(trained, runs, baseline4) -> dict:
    """mean_delta scores of the first 6 targets under both settings."""
    return {
        key: [attribution_scores(baseline4, rescore(trained, r.delta)) for r in results[:6]]
        for key, results in runs.items()
    }


def test_fixed_lr_newton_delta_is_the_previous_formula_bit_for_bit(trained, fisher, protocol):
    adapter, batch = trained
    query = batch.select([3])
    result = unlearn(adapter, query, fisher, DEFAULT, protocol, Compute(), n_train=len(batch))
    params = adapter.parameter_subset("all")
    f_hat = normalized_fisher({n: fisher[n] for n in params})
    gen = torch.Generator().manual_seed(DEFAULT.seed)
    t = adapter.objective.sample_t(DEFAULT.query_draws, gen).view(1, -1)
    eps = torch.randn(1, DEFAULT.query_draws, *adapter.latent_shape, generator=gen)
    z, cond, tt, ee, m = expand_draws(query, t, eps, adapter.device)  # mask_padding 'unlearning': masked gradient
    grads = torch.autograd.grad(diffusion_loss(adapter, z, cond, tt, ee, m).mean(), list(params.values()))
    for (n, p), g in zip(params.items(), grads):
        theta0, step = p.detach(), (DEFAULT.lr / len(batch)) * g / (f_hat[n] + DEFAULT.damping)
        assert torch.equal(result.delta[n], (theta0 + step) - theta0), n
    assert (result.lr_used, result.target_ratio, result.search_ratio, result.probes) == (100.0, None, None, 0)


def test_target_ratio_evens_out_the_query_loss_rise(runs):
    """Measured over 8 k-means targets (2026-12-06): fixed lr 100 gave protocol ratios ×1.14–×1.57 (spread 1.38);
    target 1.3 gave ×1.21–×1.34 (spread 1.11), search ratios on fresh copies of the query within 1.27–1.33, 1–6
    probes, lr 55–183."""
    fixed = np.array([r.loss_ratio for r in runs[None]])
    targeted = np.array([r.loss_ratio for r in runs[1.3]])
    print(
        f"protocol ratios fixed lr: {np.round(fixed, 3)}; target 1.3: {np.round(targeted, 3)}; "
        f"lr used {[round(r.lr_used, 1) for r in runs[1.3]]}; probes {[r.probes for r in runs[1.3]]}"
    )
    low, high = TARGETED.ratio_band()
    assert all(low <= r.search_ratio <= high and 1 <= r.probes <= 12 for r in runs[1.3])
    assert np.all(np.abs(targeted - 1.3) <= 0.5 * 0.3)  # protocol draws differ from the search's: a looser band
    assert targeted.max() / targeted.min() <= 1.3 < fixed.max() / fixed.min()


def test_targeted_step_is_the_fixed_step_at_the_lr_found_and_leaves_the_model_unchanged(trained, fisher, protocol):
    adapter, batch = trained
    query = batch.select([21])
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    found = unlearn(adapter, query, fisher, TARGETED, protocol, Compute(), n_train=len(batch))
    assert all(torch.equal(before[n], p) for n, p in adapter.denoiser.named_parameters())
    at_lr = UnlearningSettings(lr=found.lr_used, target_ratio=None)
    fixed = unlearn(adapter, query, fisher, at_lr, protocol, Compute(), n_train=len(batch))
    a, b = (torch.cat([d[n].flatten() for n in sorted(d)]) for d in (found.delta, fixed.delta))
    assert float((a - b).norm() / b.norm()) < 1e-5  # same draws, same F⁻¹g: only the scale was searched
    assert found.lr_used != TARGETED.lr and found.loss_ratio == pytest.approx(fixed.loss_ratio, rel=1e-4)


def test_self_influence_of_k_means_targets(trained, targets, scored):
    """Measured (these 6 targets, 4 draws): fixed lr self ranks [5, 6, 6, 1, 1, 1] (R 3.33, 3/6 first, top-10
    similarity 0.957 vs bottom-10 0.471), target 1.3 [6, 7, 7, 1, 1, 1] (R 3.83, 3/6, 0.958 vs 0.373; the step size
    searched on fresh copies of the query since 2026-12-06, before on the step's own: [5, 7, 7, 1, 1, 1]). With all 16
    draws and all 8 targets: fixed lr R 1.62 and 5/8 first, target 1.3 R 1.88 and 5/8 (target 1.1: R 1.38, 6/8)."""
    _, batch = trained
    emb = audio_embedding(batch).numpy()
    for key, scores in scored.items():
        ranks = [int(s["rank"][i]) for s, i in zip(scores, targets)]
        summary = summarize(ranks, [s["rank"] for s in scores], emb, targets[:6], k=10)
        print(f"target_ratio {key}: self ranks {ranks}, {summary}")
        assert summary.mean_rank <= 5.0 and summary.share_first >= 2 / 6  # chance: R ≈ 64.5, share 1/128
        assert summary.top_k_similarity > summary.bottom_k_similarity + 0.3


# Jaccard@10 moves in steps of one item: 10 shared items 1.00, 9 shared 0.82, 8 shared 0.67, 7 shared 0.54. Measured
# (docstring below): 10 and 9 shared. The bound sits one item below the worst measured, not at it (0.8 would fail on
# the next near-tie at the 10th place that bf16 rounding swaps), and still fails at 3 of 10 items swapped, which is no
# longer the same answer. The mixed arm's Spearman (measured 0.997-0.9996) keeps a margin of 0.007 and stays above
# the bf16 arm's 0.983-0.989, so the test still tells the two apart; the bf16 arm's 0.97 is 0.013 below its lowest.
# Last measured (`pytest -s tests/test_unlearning_trust.py -k bf16`): bf16 arm Spearman 0.989 / 0.986, Jaccard@10
# 1.00 / 0.82; mixed arm 0.9996 / 0.9973, 1.00 / 1.00.
TOP10_JACCARD_MIN = 8 / 12
MIXED_SPEARMAN_MIN = 0.99


def test_bf16_rankings_match_fp32_at_the_default_configuration(trained, fisher, protocol, targets, baseline4):
    """At the product's default `UnlearningSettings()` (one Newton step sized per query to ×1.1, normalized score; the
    item norms from one fp32 sketched store serve both arms), bf16 (the unlearning under BF16 autocast, every loss
    under the bf16 protocol) against fp32 for these two queries (4 draws; protocol loss ratios ×1.07 and ×1.11):
    Spearman 0.983 and 0.984, Jaccard@10 1.00 and 0.82; the bf16 unlearning rescored in fp32: Spearman 0.999 and
    0.997, Jaccard@10 1.0 (under the skew score: 0.988 / 0.986 and 1.0). On the 320-item embedded default (6
    self-influence targets, 16 draws, normalized): Spearman 0.973–0.992, Jaccard@10 1.00 on 5 queries and 0.82 on one.
    At a weak strength (target ×1.02) bf16 rescoring gave Spearman 0.76–0.87, Jaccard@10 0.82, while a bf16
    unlearning rescored in fp32 gave ≥ 0.998 and 1.0: hence the loss precision is a protocol of its own
    (TDA_LOSS_PRECISION, fp32 by default), checked below to measure exactly the fp32 losses whatever the compute's
    autocast."""
    adapter, batch = trained
    settings = UnlearningSettings()
    assert (settings.target_ratio, settings.score_type) == (1.1, "normalized")
    norms = gradient_store(
        adapter, [batch], RESCORE, "all", Compute(), k=4096, fisher=fisher
    ).item_norms  # fp32, both arms
    bf16, rescore_bf16 = replace(protocol, precision="bf16"), replace(RESCORE, precision="bf16")
    base_bf16 = rescore(trained, None, BF16, rescore_bf16)
    for j in (0, 1):
        query = batch.select([targets[j]])
        r_fp = unlearn(adapter, query, fisher, settings, protocol, Compute(), n_train=len(batch))
        r_bf = unlearn(adapter, query, fisher, settings, bf16, BF16, n_train=len(batch))
        fp = attribution_scores(baseline4, rescore(trained, r_fp.delta), settings.score_type, norms)["score"]
        bf = attribution_scores(
            base_bf16, rescore(trained, r_bf.delta, BF16, rescore_bf16), settings.score_type, norms
        )["score"]
        mixed = attribution_scores(baseline4, rescore(trained, r_bf.delta), settings.score_type, norms)["score"]
        print(
            f"query {batch.item_ids[targets[j]]} (ratio fp32 {r_fp.loss_ratio:.3f}, bf16 {r_bf.loss_ratio:.3f}): "
            f"bf16 vs fp32 Spearman {spearman(fp, bf):.4f}, Jaccard@10 {jaccard_at_k(fp, bf, 10):.2f}; "
            f"bf16 unlearning rescored in fp32 Spearman {spearman(fp, mixed):.4f}, "
            f"Jaccard@10 {jaccard_at_k(fp, mixed, 10):.2f}"
        )
        assert spearman(fp, bf) >= 0.97 and jaccard_at_k(fp, bf, 10) >= TOP10_JACCARD_MIN
        assert spearman(fp, mixed) >= MIXED_SPEARMAN_MIN and jaccard_at_k(fp, mixed, 10) >= TOP10_JACCARD_MIN
    few = batch.select([0, 1])
    fp32 = batch_losses(adapter, few, RESCORE, Compute()).loss
    assert torch.equal(batch_losses(adapter, few, RESCORE, BF16).loss, fp32)  # the compute's autocast does not leak in
    assert not torch.equal(batch_losses(adapter, few, rescore_bf16, Compute()).loss, fp32)
