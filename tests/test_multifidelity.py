"""Protocol draw windows and two-stage (multi-fidelity) exact scoring against the full exact rescore."""

import numpy as np
import pytest
import torch

from tda_assets.attribution.devices import Compute
from tda_assets.attribution.gradients import gradient_store
from tda_assets.attribution.linearized import linearized_query
from tda_assets.attribution.multifidelity import candidates, two_stage, unlearned_losses_fn
from tda_assets.attribution.objective import DiffusionObjective
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import attribution_scores, rank_descending
from tda_assets.attribution.similarity import audio_embedding, cosine_scores
from tda_assets.attribution.unlearn import UnlearningSettings
from tests.tiny_model import PROTOCOL, tiny_trained


def test_a_window_is_the_same_draws_as_the_slice_of_the_full_protocol():
    p = LossProtocol(seed=4, draws=8)
    ids, shape = ["a", "b", "c"], (3, 5)
    t, e = p.draws_for(ids, shape, DiffusionObjective())
    tw, ew = p.window(2, 7).draws_for(ids, shape, DiffusionObjective())
    assert torch.equal(t[:, 2:7], tw) and torch.equal(e[:, 2:7], ew)
    assert p.window(0, 8) == p and p.protocol_id == "s4-k8" and p.window(2, 7).protocol_id == "s4-k5-from2"
    with pytest.raises(ValueError):
        p.window(6, 9)


def fake_losses(after: np.ndarray, calls: list):
    def fn(idx, start, stop):
        calls.append((tuple(idx), start, stop))
        return after[idx, start:stop]

    return fn


def test_two_stage_halving_ranks_and_draw_accounting():
    rng = np.random.default_rng(0)
    n, k = 40, 8
    base = rng.random((n, k))
    after = base + rng.normal(0, 0.1, (n, k)) + np.linspace(0, 1, n)[:, None]
    signal = np.linspace(0, 1, n) + rng.normal(0, 0.05, n)
    calls = []
    res = two_stage(
        base, fake_losses(after, calls), {"a": signal, "b": -signal}, top=6, first_draws=2, keep=0.5, min_keep=3
    )
    cand = candidates({"a": signal, "b": -signal}, 6)
    assert len(cand) == 12 and set(np.flatnonzero(res.rescored)) == set(cand)
    assert [c[1:] for c in calls] == [(0, 2), (2, 8)] and len(calls[1][0]) == 6  # no draw evaluated twice
    assert res.item_draws == 12 * 2 + 6 * 6
    full = np.flatnonzero(res.draws_used == k)
    assert np.allclose(res.score[full], (after - base)[full].mean(1))
    assert np.isnan(res.score[~res.rescored]).all()
    assert (
        res.rank[full].max()
        < res.rank[res.draws_used == 2].min()
        <= res.rank[res.draws_used == 2].max()
        < res.rank[~res.rescored].min()
    )
    assert sorted(res.rank) == list(range(1, n + 1))


def test_two_stage_ranks_survivors_by_the_configured_score_type():
    rng = np.random.default_rng(1)
    n, k = 30, 8
    base = rng.random((n, k)) * np.linspace(0.2, 5, n)[:, None]  # losses of very different sizes: skew ≠ mean delta
    after = base * (1 + rng.normal(0.05, 0.05, (n, k)))
    signal = rng.random(n)
    for score_type in ("mean_delta", "skew"):
        everything = two_stage(
            base, fake_losses(after, []), {"a": signal}, top=1.0, first_draws=k, score_type=score_type
        )
        exact = attribution_scores(base, after, score_type)
        assert np.allclose(everything.score, exact["score"]) and np.array_equal(everything.rank, exact["rank"])
    skew, mean = (
        two_stage(base, fake_losses(after, []), {"a": signal}, top=1.0, first_draws=k, score_type=t).rank
        for t in ("skew", "mean_delta")
    )
    assert not np.array_equal(skew, mean)


@pytest.fixture(scope="module")
def model():
    return tiny_trained()


def test_two_stage_on_the_tiny_model(model):
    adapter, train, queries, fisher, l0 = model
    n = len(train)
    settings = UnlearningSettings(lr=50.0, query_draws=16)
    gradients = gradient_store(adapter, [train], PROTOCOL, "all", Compute(), k=4096, fisher=fisher)
    jaccards = []
    for q in (1, 2):
        query = queries.select([q])
        lin, result = linearized_query(adapter, query, fisher, settings, PROTOCOL, Compute(), n, gradients)
        fn = unlearned_losses_fn(adapter, train, result.delta, PROTOCOL, Compute())
        exact = attribution_scores(l0, fn(np.arange(n), 0, PROTOCOL.draws))["score"]
        everything = two_stage(l0, fn, {"linearized": lin}, top=1.0, first_draws=PROTOCOL.draws)
        assert np.array_equal(everything.score, exact) and np.array_equal(everything.rank, rank_descending(exact))
        audio = cosine_scores(audio_embedding(query), audio_embedding(train)).numpy()
        staged = two_stage(l0, fn, {"linearized": lin, "audio": audio}, top=0.25, first_draws=2, keep=0.5)
        top_exact, top_staged = set(np.argsort(-exact)[:10]), set(np.argsort(staged.rank)[:10])
        jaccards.append(len(top_exact & top_staged) / len(top_exact | top_staged))
        assert staged.item_draws < 0.5 * n * PROTOCOL.draws
    assert np.mean(jaccards) >= 0.6, jaccards
