"""What loading and encoding a Stable Audio folder holds (issue 21): each weight once, only the components a step
needs (a step that only encodes loads no DiT weights), and the VAE's activations of a chunk, not of a whole window."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from diffusers import StableAudioDiTModel

from tda_assets.attribution.errors import ModelSourceError
from tda_assets.defs.assets.training import encoder_adapter
from tda_assets.io.checkpoints import CheckpointRecord, load_checkpoint_encoders, write_checkpoint_record
from tda_assets.io.storage import Storage
from tda_assets.models.model_folder import load_model, save_model
from tda_assets.models.sources import ModelSource
from tda_assets.models.stable_audio import StableAudioAdapter, _encoder_reach

CAPTIONS = ["slow calm piano", "fast bright drums"]


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM) in bytes, since the last `reset_peak_rss`."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> int:
    """Reset the peak to the current resident memory (Linux clear_refs 5) and return it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss()


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters() if not p.is_meta)


@pytest.fixture(scope="module")
def big_dit() -> StableAudioAdapter:
    """The tiny model with a DiT of ≈ 80 MB: large beside the encoders, as Stable Audio Open's (4.2 GB of 5.3)."""
    tiny = StableAudioAdapter.tiny(seed=2)
    config = {**tiny.denoiser.config, "num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 8}
    return dataclasses.replace(tiny, denoiser=StableAudioDiTModel.from_config(config).eval())


@pytest.fixture(scope="module")
def folder(big_dit, tmp_path_factory):
    return save_model(big_dit, tmp_path_factory.mktemp("stable-audio") / "model")


def test_loading_a_folder_holds_each_weight_once(big_dit, folder):
    """Measured: the loader that kept the memory-mapped file beside copies of it peaked at 2.0× the weights."""
    weights = sum(weight_bytes(m) for m in (big_dit.denoiser, big_dit.vae, big_dit.text_encoder))
    assert weight_bytes(big_dit.denoiser) > 60e6
    before = reset_peak_rss()
    loaded = load_model(folder)
    assert peak_rss() - before < 1.3 * weights
    state = big_dit.denoiser.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.denoiser.state_dict().items())
    for p in loaded.denoiser.parameters():  # each weight in its own memory, not a view into the file's bytes
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size() and p.storage_offset() == 0


def test_an_encoders_only_load_holds_no_dit_weights_and_encodes_as_the_whole_model(big_dit, folder):
    before = reset_peak_rss()
    encoders = load_model(folder, denoiser=False)
    assert peak_rss() - before < 0.3 * weight_bytes(big_dit.denoiser)
    assert not encoders.has_denoiser and weight_bytes(encoders.denoiser) == 0
    assert encoders.latent_shape == big_dit.latent_shape and encoders.window_samples == big_dit.window_samples
    audio = [np.random.default_rng(i).standard_normal(90 + 40 * i).astype(np.float32) for i in range(2)]
    assert torch.equal(encoders.encode_audio(audio)[0], big_dit.encode_audio(audio)[0])
    cond = encoders.encode_text(CAPTIONS)
    assert all(torch.equal(v, big_dit.encode_text(CAPTIONS)[k]) for k, v in cond.items())
    with pytest.raises(ModelSourceError, match="encoders only.*denoiser=False"):
        encoders.predict(torch.zeros(1, *encoders.latent_shape), torch.zeros(1), cond)


def test_the_steps_that_only_encode_load_no_dit(folder, tmp_path):
    source = ModelSource(source=str(folder))
    features_adapter, _ = encoder_adapter(source)  # training_features
    root = Storage(str(tmp_path / "root"))
    record = CheckpointRecord(source.resolve().checkpoint_id, "external", str(folder), "enc-x")
    write_checkpoint_record(root, record)
    query_adapter, read = load_checkpoint_encoders(root, source)  # query_clips for a user's clip
    assert read == record
    assert not features_adapter.has_denoiser and not query_adapter.has_denoiser
    assert str(query_adapter.device) == "cpu"


@pytest.fixture(scope="module")
def long_window() -> StableAudioAdapter:
    """The tiny model with a 96-frame window: several times the VAE encoder's reach (17 frames each side)."""
    tiny = StableAudioAdapter.tiny(seed=3)
    config = {**tiny.denoiser.config, "sample_size": 96}
    return dataclasses.replace(tiny, denoiser=StableAudioDiTModel.from_config(config))


def test_a_long_window_is_encoded_in_chunks_with_the_whole_windows_latents_bit_for_bit(long_window):
    before, after = _encoder_reach(long_window.vae.encoder, long_window.hop_length)
    assert (before, after) == (17, 17)
    audio = [np.random.default_rng(i).standard_normal(n).astype(np.float32) for i, n in enumerate([768, 300, 1000])]
    whole = dataclasses.replace(long_window, encode_chunk_frames=0).encode_audio(audio)[0]
    lengths: list[int] = []
    hook = long_window.vae.encoder.register_forward_pre_hook(lambda _, args: lengths.append(args[0].shape[-1]))
    try:
        for chunk in (1, 7, 40):
            lengths.clear()
            chunked = dataclasses.replace(long_window, encode_chunk_frames=chunk).encode_audio(audio)[0]
            assert torch.equal(chunked, whole)
            assert max(lengths) <= (chunk + before + after) * long_window.hop_length < long_window.window_samples
    finally:
        hook.remove()


def test_a_reach_one_frame_short_changes_the_latents(long_window, monkeypatch):
    """The context is what makes chunks exact: one frame less of it and the edges of a chunk differ."""
    import tda_assets.models.stable_audio as stable_audio

    audio = [np.random.default_rng(0).standard_normal(768).astype(np.float32)]
    whole = dataclasses.replace(long_window, encode_chunk_frames=0).encode_audio(audio)[0]
    reach = stable_audio._encoder_reach
    monkeypatch.setattr(stable_audio, "_encoder_reach", lambda enc, hop: tuple(n - 1 for n in reach(enc, hop)))
    assert not torch.equal(dataclasses.replace(long_window, encode_chunk_frames=7).encode_audio(audio)[0], whole)
