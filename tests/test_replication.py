"""Replication transforms: each changes the clip by exactly the documented amount."""

from __future__ import annotations

import numpy as np
import pytest

from tda_assets.attribution.replication import (
    TRANSFORMS,
    add_noise,
    fade,
    gain,
    resample_round_trip,
    snr_db,
    time_shift,
)
from tda_assets.models.embedded.mel import MelFrontend

SR = 16000


def tone(seconds: float = 1.0) -> np.ndarray:
    """A band-limited test signal (three partials below 5 kHz) with an envelope."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * f * t + p) for f, p in ((220, 0.0), (1250, 1.0), (4700, 2.0)))
    return (0.3 * x * np.hanning(len(t))).astype(np.float32)


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def test_gain_scales_rms_by_minus_6_db():
    x = tone()
    y = gain(x, SR)
    assert y.dtype == np.float32 and abs(rms(y) / rms(x) - 10 ** (-6 / 20)) < 1e-4


def test_time_shift_moves_every_sample_by_50_ms_and_keeps_the_length():
    x = np.random.default_rng(0).standard_normal(SR).astype(np.float32)
    y = time_shift(x, SR)
    n = round(0.05 * SR)
    assert len(y) == len(x) and n == 800
    assert np.all(y[:n] == 0) and np.array_equal(y[n:], x[:-n])
    assert np.array_equal(time_shift(x, 44100)[:2205], np.zeros(2205, np.float32))


def test_resample_round_trip_keeps_a_band_limited_signal():
    x = tone()
    y = resample_round_trip(x, SR)
    assert len(y) == len(x) and y.dtype == np.float32
    assert np.corrcoef(x, y)[0, 1] > 0.99
    assert not np.array_equal(x, y)  # it did go through 22.05 kHz


def test_noise_is_seeded_at_30_db_snr():
    x = tone()
    y = add_noise(x, SR)
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((y - x).astype(np.float64) ** 2))
    assert abs(snr - 30) < 0.5
    assert np.array_equal(y, add_noise(x, SR)) and not np.array_equal(y, add_noise(x, SR, seed=1))


def test_every_transform_keeps_mono_float32_length_and_refuses_stereo():
    x = tone(0.5)
    for name, fn in TRANSFORMS.items():
        y = fn(x, SR)
        assert y.shape == x.shape and y.dtype == np.float32 and not np.array_equal(x, y), name
    with pytest.raises(ValueError, match="mono"):
        gain(np.zeros((2, 100), np.float32), SR)


def test_snr_of_a_gain_only_transform_is_the_hand_computed_value():
    # y = g·x: the difference is (g - 1)·x, so SNR = -20·log10(1 - g) = 6.0412 dB for g = 10^(-6/20)
    x = tone()
    assert snr_db(x, gain(x, SR), SR, (0, 8000)) == pytest.approx(6.0412, abs=1e-3)
    assert snr_db(x, x.copy(), SR, (0, 8000)) == float("inf")


def test_snr_counts_only_the_band():
    rate = 44100
    t = np.arange(rate) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    above = (x + 0.3 * np.sin(2 * np.pi * 12000 * t)).astype(np.float32)  # a change at 12 kHz, outside a 0–8 kHz band
    assert snr_db(x, above, rate, (0, 8000)) > 100
    assert snr_db(x, above, rate, (0, rate / 2)) == pytest.approx(
        0.0, abs=0.01
    )  # equal power: 0 dB over the whole band


def test_a_22k_round_trip_of_a_44k_file_has_finite_snr_below_60_db_in_band():
    rate = 44100
    t = np.arange(2 * rate) / rate
    x = 0.2 * sum(np.sin(2 * np.pi * f * t + p) for f, p in ((220, 0.0), (1250, 1.0), (4700, 2.0), (7500, 0.5)))
    x = x.astype(np.float32)
    snr = snr_db(x, resample_round_trip(x, rate), rate, (0, 8000))
    assert 40 < snr < 60  # measured 54.1: the round trip drops 11–22 kHz, outside the model's band, so little changes


def test_the_fade_changes_the_latents_a_gain_copy_does_not():
    # the embedded front end levels every clip to one peak: a gain copy encodes to its source's latents, a fade does not
    front = MelFrontend()
    x = np.random.default_rng(0).standard_normal(front.window_samples).astype(np.float32) * 0.3

    def latents(a: np.ndarray) -> np.ndarray:
        import torch

        return front.encode(torch.from_numpy(front.level(a)).float()[None])[0][0].numpy()  # [mels, frames]

    source = latents(x)
    assert np.abs(latents(gain(x, front.sample_rate)) - source).max() < 1e-4
    faded = latents(fade(x, front.sample_rate))
    # the last frames are 6 dB down before levelling: log(10^0.6) / 4.6 = 0.30 latent units apart from the first
    shift = faded - source
    assert shift[:, -4:].mean() - shift[:, :4].mean() == pytest.approx(-np.log(10**0.6) / front.scale, abs=0.05)


def test_fade_ramps_from_0_to_minus_6_db():
    x = np.ones(1001, np.float32)
    y = fade(x, SR)
    assert (
        y[0] == pytest.approx(1.0)
        and y[-1] == pytest.approx(10 ** (-6 / 20))
        and y[500] == pytest.approx(10 ** (-3 / 20))
    )


def wav_bytes(x: np.ndarray, rate: int) -> bytes:
    import io

    import soundfile as sf

    buffer = io.BytesIO()
    sf.write(buffer, x, rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def test_a_44k_source_is_transformed_at_its_own_rate_then_resampled_for_the_model():
    from tda_assets.data.audio import check_clip
    from tda_assets.defs.assets.replication import transformed_clip

    rate = 44100
    t = np.arange(2 * rate) / rate
    x = 0.2 * sum(np.sin(2 * np.pi * f * t + p) for f, p in ((220, 0.0), (1250, 1.0), (4700, 2.0), (7500, 0.5)))
    source = check_clip(wav_bytes(x.astype(np.float32), rate), "a-44k-item")
    assert source.sample_rate == rate  # decoded at the file's rate, not the model's
    clip, snr = transformed_clip(source, "resample_22k", 16000)
    assert len(clip) == 2 * 16000 and np.isfinite(snr) and snr < 60  # a real 44.1 → 22.05 → 44.1 kHz round trip
    # white noise at 30 dB over 0–22.05 kHz: 8/22.05 of its power lies in the model's 0–8 kHz band, all of the tones'
    assert transformed_clip(source, "noise_30db", 16000)[1] == pytest.approx(30 + 10 * np.log10(22050 / 8000), abs=0.3)
    assert transformed_clip(source, "shift_50ms", 16000)[1] < 3  # a shifted clip is another signal sample by sample
