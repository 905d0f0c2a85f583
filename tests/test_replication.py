"""Replication transforms: each changes the clip by exactly the documented amount."""

from __future__ import annotations

import numpy as np
import pytest

from tda_assets.attribution.replication import TRANSFORMS, add_noise, gain, resample_round_trip, time_shift

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
