"""Bad input raises one clear error that names the item and the fix."""

import io

import numpy as np
import pytest
import soundfile as sf
import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.data.audio import decode_audio
from tda_assets.attribution.devices import Compute
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.models.embedded.text import encode_captions
from tda_assets.attribution.errors import AttributionInputError
from tda_assets.attribution.losses import batch_losses
from tda_assets.attribution.protocol import LossProtocol


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


TONE = (0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)


def test_good_audio_decodes_to_mono_float():
    out = decode_audio(wav_bytes(TONE), "a00-0001", 16000)
    assert out.dtype == np.float32 and out.shape == (16000,) and abs(out.max() - 0.5) < 1e-3


def test_silent_audio_is_refused_with_its_length():
    with pytest.raises(AttributionInputError, match=r"item a00-0002: audio is silent \(1.00 s"):
        decode_audio(wav_bytes(np.zeros(16000, np.float32)), "a00-0002", 16000)


def test_corrupt_audio_is_refused():
    with pytest.raises(AttributionInputError, match="item a00-0003: audio cannot be decoded"):
        decode_audio(b"RIFF\x00\x00not really a wav", "a00-0003", 16000)


def test_missing_audio_is_refused():
    with pytest.raises(AttributionInputError, match="item a00-0004: audio file is missing"):
        decode_audio(None, "a00-0004", 16000)


def test_truncated_audio_is_refused_with_its_length():
    data = wav_bytes(TONE)
    truncated = data[: 44 + 2 * 800]  # the header and the first 800 samples (50 ms) of a 1 s file
    with pytest.raises(AttributionInputError, match=r"item a00-0006: audio is only 50 ms long .* may be truncated"):
        decode_audio(truncated, "a00-0006", 16000)


def test_empty_caption_names_item():
    with pytest.raises(AttributionInputError, match="item a00-0005: empty caption"):
        encode_captions(["a calm melody", "   "], ["a00-0004", "a00-0005"])


def test_nan_loss_names_item():
    adapter = EmbeddedAdapter.new()
    latents = torch.zeros(2, *adapter.latent_shape)
    latents[1, 0, 0] = float("nan")
    cond = {"encoder_hidden_states": torch.zeros(2, 4, 384), "global_hidden_states": torch.zeros(2, 1, 384)}
    batch = ItemBatch(["ok-item", "nan-item"], latents, cond, torch.ones(2, adapter.latent_shape[1]))
    with pytest.raises(AttributionInputError, match=r"non-finite diffusion loss for item\(s\) \['nan-item'\]"):
        batch_losses(adapter, batch, LossProtocol(draws=2), Compute())
