"""What lets Stable Audio Open's shapes fit (issue 21): gradients in passes of TDA_GRAD_ROWS rows, no second copy of the
Fisher, the preconditioner or the weights, a compact CountSketch hash; and the real architecture's constructor."""

from __future__ import annotations

import pytest
import torch

from resources.build import build_resources
from resources.env import Env
from tda_assets.attribution.adapter import ItemBatch, apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.fisher import NormalisedFisher, fisher_diagonal, normalised_fisher
from tda_assets.attribution.losses import diffusion_loss, expand_draws
from tda_assets.attribution.gradients import gradient_store, per_item_gradients, preconditioner
from tda_assets.attribution.protocol import LossProtocol, draw_seed
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.sketch import CountSketch
from tda_assets.attribution.unlearn import unlearn
from tda_assets.models.stable_audio import StableAudioAdapter

PROTOCOL = LossProtocol(draws=6)


@pytest.fixture(scope="module")
def tiny() -> tuple[StableAudioAdapter, ItemBatch]:
    adapter = StableAudioAdapter.tiny(seed=1)
    g = torch.Generator().manual_seed(0)
    cond = adapter.encode_text(["slow piano", "fast drums", "warm synth", "soft guitar", "calm choir"])
    items = ItemBatch(
        [f"i{i}" for i in range(5)],
        torch.randn(5, *adapter.latent_shape, generator=g),
        cond,
        torch.ones(5, adapter.latent_shape[1]),
    )
    return adapter, items


@pytest.fixture(scope="module")
def fisher(tiny) -> dict[str, torch.Tensor]:
    adapter, items = tiny
    return fisher_diagonal(adapter, [items], PROTOCOL, "all", Compute())


def close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4) -> bool:
    scale = max(float(v.abs().max()) for v in b.values())
    return set(a) == set(b) and all(torch.allclose(a[n], b[n], rtol=rtol, atol=rtol * scale) for n in b)


def test_fisher_is_the_mean_squared_per_item_gradient_bit_for_bit(tiny, fisher):
    adapter, items = tiny
    params = adapter.parameter_subset("all")
    t, eps = PROTOCOL.draws_for(items.item_ids, adapter.latent_shape, adapter.objective)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(items)):
        z, cond, tt, ee, _ = expand_draws(items.select([i]), t[i : i + 1], eps[i : i + 1], adapter.device)
        grads = torch.autograd.grad(diffusion_loss(adapter, z, cond, tt, ee).mean(), list(params.values()))
        for n, g in zip(params, grads):
            expected[n] += g.pow(2)
    assert all(torch.equal(fisher[n], expected[n] / len(items)) for n in params)


def test_fisher_in_passes_of_one_row_is_the_one_pass_fisher(tiny, fisher):
    adapter, items = tiny
    in_rows = fisher_diagonal(adapter, [items], PROTOCOL, "all", Compute(grad_rows=1))
    assert close(in_rows, fisher)
    assert not torch.equal(
        in_rows["transformer_blocks.0.attn1.to_q.weight"],
        torch.zeros_like(fisher["transformer_blocks.0.attn1.to_q.weight"]),
    )


def test_item_gradients_in_passes_match_one_pass_and_the_store_sketches_them(tiny, fisher):
    adapter, items = tiny
    params = adapter.parameter_subset("all")
    one = per_item_gradients(adapter, items, PROTOCOL, params, Compute())
    rows = per_item_gradients(adapter, items, PROTOCOL, params, Compute(grad_rows=4))  # 6 draws: passes of 4 and 2
    assert close(rows, one)
    store = gradient_store(adapter, [items], PROTOCOL, "all", Compute(grad_rows=4), k=64, fisher=fisher)
    scale = preconditioner(fisher, params, 0.1)
    sketch = CountSketch({n: p.numel() for n, p in params.items()}, 64)
    expected = sketch.project({n: g * scale[n] for n, g in one.items()})
    assert torch.allclose(store.sketched, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_unlearning_in_passes_gives_the_one_pass_delta_and_leaves_the_model_unchanged(tiny, fisher):
    adapter, items = tiny
    query = items.select([2])
    before = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
    settings = UnlearningSettings(target_ratio=None, lr=50.0, query_draws=16)
    one = unlearn(adapter, query, fisher, settings, PROTOCOL, Compute(), n_train=5)
    rows = unlearn(adapter, query, fisher, settings, PROTOCOL, Compute(grad_rows=3), n_train=5)
    assert close(rows.delta, one.delta) and rows.loss_ratio == pytest.approx(one.loss_ratio, rel=1e-4)
    searched = unlearn(adapter, query, fisher, UnlearningSettings(query_draws=16), PROTOCOL, Compute(grad_rows=3), 5)
    assert searched.probes >= 1 and searched.loss_ratio > 1
    assert set(fisher) == set(adapter.parameter_subset("all"))  # the search frees only what the caller did not keep
    assert all(torch.equal(p, before[n]) for n, p in adapter.denoiser.named_parameters())


def test_apply_delta_adds_in_place_and_restores_theta0_exactly(tiny):
    adapter, _ = tiny
    params = dict(adapter.denoiser.named_parameters())
    name = "transformer_blocks.1.ff.net.0.proj.weight"
    theta0 = params[name].detach().clone()
    delta = {name: torch.full_like(theta0, 1e-3)}
    with apply_delta(adapter.denoiser, delta):
        assert torch.equal(params[name], theta0 + delta[name])
    assert torch.equal(params[name], theta0)


def test_lazy_normalised_fisher_and_preconditioner_are_the_whole_ones_bit_for_bit(fisher):
    whole = normalised_fisher(fisher)
    lazy = NormalisedFisher(fisher)
    assert list(lazy) == list(whole) and all(torch.equal(lazy[n], whole[n]) for n in whole)
    scale = preconditioner(fisher, fisher, 0.1)
    assert all(torch.equal(scale[n], (whole[n] + 0.1).rsqrt()) for n in whole)


def test_compact_sketch_hash_is_the_generators_buckets_and_signs():
    k, numel = 64, 300
    sketch = CountSketch({"w": numel}, k, seed=5)
    g = torch.Generator().manual_seed(draw_seed(5, "countsketch:w", k))
    bucket = torch.randint(0, k, (numel,), generator=g)
    sign = torch.randint(0, 2, (numel,), generator=g, dtype=torch.int8) * 2 - 1
    x = torch.randn(2, numel)
    expected = torch.zeros(2, k)
    for j in range(numel):
        expected[:, bucket[j]] += float(sign[j]) * x[:, j]
    assert torch.allclose(sketch.project({"w": x}), expected, atol=1e-5)
    assert sketch.nbytes() == 2 * numel


def test_grad_rows_is_a_user_setting_and_zero_is_refused(monkeypatch):
    monkeypatch.setenv("TDA_GRAD_ROWS", "2")
    monkeypatch.setenv("TDA_DEVICE", "cpu")
    assert build_resources(Env.read())["compute"].compute().backward_rows == 2
    monkeypatch.delenv("TDA_GRAD_ROWS")
    assert build_resources(Env.read())["compute"].compute().backward_rows is None  # all draws in one pass
    with pytest.raises(ValueError, match="TDA_GRAD_ROWS"):
        Compute(grad_rows=0)


def test_the_real_architecture_is_stable_audio_opens_shapes():
    from tda_assets.models.build_real_size import parameter_counts, real_size_adapter

    adapter = real_size_adapter(device="meta")  # shapes only: no memory, no time
    counts = parameter_counts(adapter)
    assert counts["transformer"] == 1_056_939_136  # diffusers' default StableAudioDiTModel
    assert adapter.latent_shape == (64, 1024) and adapter.sample_rate == 44_100 and adapter.audio_channels == 2
    assert adapter.window_samples == 1024 * 2048 and round(adapter.clip_seconds, 2) == 47.55
    assert adapter.text_encoder.config.d_model == 768 and adapter.text_encoder.config.num_layers == 12
    assert adapter.tokenizer.model_max_length == 128


def test_a_sketch_too_large_to_hold_draws_the_same_hash_per_projection(monkeypatch):
    import tda_assets.attribution.sketch as sketch_module

    sizes = {"a": 120, "b": 30}
    x = {"a": torch.randn(3, 120), "b": torch.randn(3, 30)}
    held = CountSketch(sizes, 16, seed=2)
    monkeypatch.setattr(sketch_module, "HELD_MAX_D", 100)  # 150 coordinates: above it, so nothing is held
    drawn = CountSketch(sizes, 16, seed=2)
    assert held.held and not drawn.held and drawn.nbytes() == 0
    assert torch.equal(drawn.project(x), held.project(x)) and drawn.nbytes() == 0
