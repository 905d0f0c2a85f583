"""Mild audio transformations for the replication test (DESIGN §1): a transformed training clip must rank itself first."""

from __future__ import annotations

from collections.abc import Callable
from math import gcd

import numpy as np
from scipy.signal import resample_poly


def _mono(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"replication transforms take mono audio [samples], got shape {a.shape}")
    return a


def gain(audio: np.ndarray, sample_rate: int, db: float = -6.0) -> np.ndarray:
    """The clip scaled by `db` decibels (amplitude factor 10^(db/20))."""
    return (_mono(audio) * np.float32(10 ** (db / 20))).astype(np.float32)


def time_shift(audio: np.ndarray, sample_rate: int, seconds: float = 0.05) -> np.ndarray:
    """The clip delayed by round(seconds·sample_rate) samples: zeros in front, the end cut, same length."""
    a = _mono(audio)
    n = min(round(seconds * sample_rate), len(a))
    return np.concatenate([np.zeros(n, dtype=np.float32), a[: len(a) - n]])


def resample_round_trip(audio: np.ndarray, sample_rate: int, via: int = 22050) -> np.ndarray:
    """The clip resampled to `via` Hz and back (polyphase), trimmed or zero-padded to its original length."""
    a = _mono(audio)
    g = gcd(via, sample_rate)
    back = resample_poly(resample_poly(a, via // g, sample_rate // g), sample_rate // g, via // g)
    out = np.zeros(len(a), dtype=np.float32)
    out[: min(len(a), len(back))] = back[: len(a)]
    return out


def add_noise(audio: np.ndarray, sample_rate: int, snr_db: float = 30.0, seed: int = 0) -> np.ndarray:
    """The clip plus seeded white Gaussian noise scaled to exactly `snr_db` below the clip's power."""
    a = _mono(audio)
    noise = np.random.default_rng(seed).standard_normal(len(a))
    power = float(np.mean(a.astype(np.float64) ** 2))
    noise *= np.sqrt(power / 10 ** (snr_db / 10) / np.mean(noise**2))
    return (a + noise).astype(np.float32)


TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "gain_-6db": gain,
    "shift_50ms": time_shift,
    "resample_22k": resample_round_trip,
    "noise_30db": add_noise,
}
