"""The Stable Audio Open adapter on a tiny randomly initialised model: encoders, engine functions, folder round trip."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))  # as tests/conftest.py

from tda_assets.attribution.adapter import ItemBatch  # noqa: E402
from tda_assets.attribution.devices import Compute  # noqa: E402
from tda_assets.attribution.errors import AttributionInputError, ModelSourceError  # noqa: E402
from tda_assets.attribution.fisher import fisher_diagonal  # noqa: E402
from tda_assets.attribution.losses import batch_losses  # noqa: E402
from tda_assets.models.model_folder import load_model  # noqa: E402
from tda_assets.attribution.protocol import LossProtocol  # noqa: E402
from tda_assets.models.stable_audio import StableAudioAdapter  # noqa: E402
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

CAPTIONS = [
    "slow piano",
    "fast techno beat with drums",
    "calm ambient strings",
    "loud rock guitar",
    "soft jazz bass",
    "bright pop synth melody",
]
IDS = [f"item-{i}" for i in range(len(CAPTIONS))]
PROTOCOL = LossProtocol(seed=0, draws=4)


def clips(adapter: StableAudioAdapter) -> list[np.ndarray]:
    """Tones of different pitch; one clip longer than the window, two shorter (padded)."""
    n = adapter.window_samples
    lengths = [n, n // 2, 2 * n, n, n // 4, n]
    t = np.arange(2 * n) / adapter.sample_rate
    return [(0.5 * np.sin(2 * np.pi * (3 + 2 * i) * t[:ln])).astype(np.float32) for i, ln in enumerate(lengths)]


@pytest.fixture(scope="module")
def adapter() -> StableAudioAdapter:
    return StableAudioAdapter.tiny(seed=0)


@pytest.fixture(scope="module")
def batch(adapter) -> ItemBatch:
    latents, mask = adapter.encode_audio(clips(adapter), IDS)
    return ItemBatch(IDS, latents, adapter.encode_text(CAPTIONS, IDS), mask)


@pytest.fixture(scope="module")
def saved(adapter, tmp_path_factory):
    return adapter.save_pretrained(tmp_path_factory.mktemp("stable_audio") / "model")


def test_encoders_give_the_shapes_the_dit_expects_and_predict_keeps_the_latent_shape(adapter, batch):
    cfg, b = adapter.denoiser.config, len(IDS)
    assert batch.latents.shape == (b, *adapter.latent_shape) == (b, cfg.in_channels, cfg.sample_size)
    assert batch.frame_mask.tolist()[1] == [1.0] * 8 + [0.0] * 8  # half a window of audio: half the frames are real
    assert batch.frame_mask[[0, 2, 3]].eq(1).all() and batch.frame_mask[4].sum() == 4
    tokens = adapter.tokenizer.model_max_length
    assert batch.conditioning["encoder_hidden_states"].shape == (b, tokens + 2, cfg.cross_attention_input_dim)
    assert batch.conditioning["global_hidden_states"].shape == (b, 1, cfg.global_states_input_dim)
    with torch.no_grad():
        out = adapter.predict(batch.latents, torch.linspace(0.1, 0.9, b), batch.conditioning)
    assert out.shape == batch.latents.shape and torch.isfinite(out).all()
    assert adapter.clip_seconds == pytest.approx(cfg.sample_size * adapter.vae.hop_length / adapter.sample_rate)


def test_mono_audio_is_duplicated_to_the_vae_channels_and_long_audio_is_cut(adapter):
    n = adapter.window_samples
    mono = clips(adapter)[2]  # two windows long
    stereo = np.stack([mono[:n], mono[:n]])
    z_mono, mask = adapter.encode_audio([mono])
    z_stereo, _ = adapter.encode_audio([stereo])
    assert adapter.audio_channels == 2
    assert torch.equal(z_mono, z_stereo) and mask.eq(1).all()


def test_conditioning_is_what_the_diffusers_pipeline_feeds_the_transformer(adapter):
    seen: dict = {}
    forward = adapter.denoiser.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return forward(*args, **kwargs)

    pipe = adapter.pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter.denoiser.forward = spy
    try:
        pipe(["slow piano"], num_inference_steps=2, guidance_scale=1.0, audio_end_in_s=1.5, output_type="latent")
    finally:
        del adapter.denoiser.forward
    cond = adapter.encode_text(["slow piano"], seconds_end=1.5)
    assert torch.equal(seen["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert torch.equal(seen["global_hidden_states"], cond["global_hidden_states"])
    cos, sin = adapter._rotary(adapter.denoiser.config.sample_size, torch.device("cpu"))
    assert torch.equal(seen["rotary_embedding"][0], cos) and torch.equal(seen["rotary_embedding"][1], sin)


def test_training_items_are_conditioned_on_their_own_duration_capped_at_the_window(adapter):
    window = adapter.clip_seconds
    by_duration = adapter.encode_text(["a", "b"], ["i1", "i2"], durations=[0.5, window + 10.0])
    explicit = adapter.encode_text(["a", "b"], ["i1", "i2"], seconds_end=[0.5, window])
    assert torch.equal(by_duration["global_hidden_states"], explicit["global_hidden_states"])
    default = adapter.encode_text(["a"], ["i1"])
    assert not torch.equal(by_duration["global_hidden_states"][:1], default["global_hidden_states"])


@pytest.mark.parametrize("rows_per_pass", [PROTOCOL.draws, 256])
def test_batch_losses_are_finite_and_do_not_depend_on_batch_order(adapter, batch, rows_per_pass):
    compute = Compute(batch_size=rows_per_pass)
    losses = batch_losses(adapter, batch, PROTOCOL, compute)
    assert losses.loss.shape == (len(IDS), PROTOCOL.draws) and torch.isfinite(losses.loss).all()
    assert (losses.loss > 0).all() and not torch.equal(losses.loss, losses.loss_masked)  # padded items differ
    order = [3, 1, 5, 0, 4, 2]
    again = batch_losses(adapter, batch.select(order), PROTOCOL, compute)
    if rows_per_pass == PROTOCOL.draws:  # one item per forward pass: bit-identical
        assert torch.equal(again.loss, losses.loss[order]) and torch.equal(again.loss_masked, losses.loss_masked[order])
    else:  # rows at other positions of a multi-threaded matmul: identical up to float rounding
        torch.testing.assert_close(again.loss, losses.loss[order], rtol=1e-6, atol=1e-7)


def test_fisher_on_cross_attention_kv_covers_only_the_key_value_projections(adapter, batch):
    fisher = fisher_diagonal(adapter, [batch], PROTOCOL, "cross_attention_kv", Compute())
    expected = {n for n, _ in adapter.denoiser.named_parameters() if ".attn2.to_k." in n or ".attn2.to_v." in n}
    assert set(fisher) == expected and len(expected) == 2 * adapter.denoiser.config.num_layers
    assert all(torch.isfinite(f).all() for f in fisher.values())
    assert all(f.shape == adapter.denoiser.get_parameter(n).shape for n, f in fisher.items())
    assert sum(int((f > 0).sum()) for f in fisher.values()) > 0


@pytest.mark.parametrize(
    "settings",
    [
        UnlearningSettings(recipe="newton", lr=6.0, steps=1, query_draws=16, param_subset="all"),
        UnlearningSettings(
            recipe="ewc_ascent", lr=1e-2, steps=3, query_draws=16, param_subset="attention", target_ratio=None
        ),
    ],
    ids=["newton", "ewc_ascent"],
)
def test_unlearning_raises_the_query_loss_and_leaves_the_model_unchanged(adapter, batch, settings):
    fisher = fisher_diagonal(adapter, [batch], PROTOCOL, settings.param_subset, Compute())
    query = batch.select([0])
    query = ItemBatch(["query-0"], query.latents, query.conditioning, query.frame_mask)
    before = {k: v.clone() for k, v in adapter.denoiser.state_dict().items()}
    result = unlearn(adapter, query, fisher, settings, PROTOCOL, Compute(), n_train=len(IDS))
    assert result.query_loss_after > result.query_loss_before
    assert set(result.delta) == set(adapter.parameter_subset(settings.param_subset))
    assert any(bool(d.abs().max() > 0) for d in result.delta.values())
    after = adapter.denoiser.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_save_pretrained_and_load_model_round_trip_with_identical_losses(adapter, batch, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableAudioPipeline"
    loaded = load_model(saved)
    assert isinstance(loaded, StableAudioAdapter) and loaded.folder_config() == adapter.folder_config()
    latents, mask = loaded.encode_audio(clips(loaded), IDS)
    cond = loaded.encode_text(CAPTIONS, IDS)
    assert torch.equal(latents, batch.latents) and torch.equal(mask, batch.frame_mask)
    assert all(torch.equal(cond[k], batch.conditioning[k]) for k in batch.conditioning)
    compute = Compute(batch_size=PROTOCOL.draws)
    assert torch.equal(
        batch_losses(loaded, batch, PROTOCOL, compute).loss, batch_losses(adapter, batch, PROTOCOL, compute).loss
    )


def test_folder_without_transformer_raises_naming_it(saved, tmp_path):
    broken = tmp_path / "no-transformer"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(ModelSourceError, match="transformer/") as err:
        load_model(broken)
    assert str(broken) in str(err.value)


def test_folder_of_another_pipeline_class_raises(saved, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(saved, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelSourceError, match="StableDiffusionPipeline"):
        load_model(other)
    with pytest.raises(ModelSourceError, match="StableDiffusionPipeline"):
        StableAudioAdapter.from_pretrained(other)


def test_empty_caption_raises_naming_the_item(adapter):
    with pytest.raises(AttributionInputError, match="item-7"):
        adapter.encode_text(["slow piano", "   "], ["item-6", "item-7"])
