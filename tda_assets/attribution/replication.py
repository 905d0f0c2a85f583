"""Mild audio transformations for the replication test (DESIGN §1): a transformed training clip must rank itself first.

Each transform takes mono audio at the source file's own rate (a 22.05 kHz round trip of a 44.1 kHz file really drops
its content above 11 kHz); the query is then decoded and resampled to the model's rate like any clip. `snr_db` measures
what a transform changed in the model's band, so one that changes nothing there (that round trip, ~55 dB on a 16 kHz
model) is visible as such. A plain gain is not among
them: the embedded front end levels every clip to one peak, so a gain copy encodes to its source's own latents; the
fade (a gain that changes over the clip) survives that levelling. `NEAR_COPY_TRANSFORMS` adds the harder edits the
near-copy calibration uses (lossy codecs, reverb, a crop, a speed change, noise at 40 dB SNR)."""

from __future__ import annotations

import io
from collections.abc import Callable
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import fftconvolve, resample_poly


def _mono(audio: np.ndarray) -> np.ndarray:
    a = np.asarray(audio, dtype=np.float32)
    if a.ndim != 1:
        raise ValueError(f"replication transforms take mono audio [samples], got shape {a.shape}")
    return a


def gain(audio: np.ndarray, sample_rate: int, db: float = -6.0) -> np.ndarray:
    """The clip scaled by `db` decibels (amplitude factor 10^(db/20))."""
    return (_mono(audio) * np.float32(10 ** (db / 20))).astype(np.float32)


def fade(audio: np.ndarray, sample_rate: int, db: float = -6.0) -> np.ndarray:
    """The clip under a gain ramping linearly in decibels from 0 dB at its start to `db` at its end."""
    a = _mono(audio)
    ramp = np.linspace(0.0, db, len(a)) if len(a) > 1 else np.zeros(len(a))
    return (a * (10 ** (ramp / 20))).astype(np.float32)


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


def snr_db(source: np.ndarray, transformed: np.ndarray, sample_rate: int, band: tuple[float, float]) -> float:
    """The transformed clip's SNR against its source in `band` Hz (both at `sample_rate`, same length): the source's
    power over the difference's, from their spectra's bins in the band; +inf when they agree there."""
    x, y = _mono(source).astype(np.float64), _mono(transformed).astype(np.float64)
    if len(x) != len(y):
        raise ValueError(f"snr_db compares clips of one length, got {len(x)} and {len(y)} samples")
    freqs = np.fft.rfftfreq(len(x), 1.0 / sample_rate)
    keep = (freqs >= band[0]) & (freqs <= band[1])
    sx, sd = np.fft.rfft(x)[keep], np.fft.rfft(y - x)[keep]
    signal, noise = float(np.sum(np.abs(sx) ** 2)), float(np.sum(np.abs(sd) ** 2))
    if signal == 0.0:
        raise ValueError(f"snr_db: the source has no power in the band {band[0]:g}–{band[1]:g} Hz")
    return float("inf") if noise == 0.0 else 10 * np.log10(signal / noise)


def latent_change(source: np.ndarray, query: np.ndarray, frames: np.ndarray | None = None) -> float:
    """The relative RMS change `‖query − source‖ / ‖source‖` of a query's latents [C, T] against its source's, over the
    frames `frames` [T] marks (all when None): 0 when the model sees the source itself."""
    x, y = np.asarray(source, dtype=np.float64), np.asarray(query, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"latent_change compares latents of one shape, got {x.shape} and {y.shape}")
    keep = np.ones(x.shape[-1], bool) if frames is None else np.asarray(frames) > 0
    x, y = x[..., keep], y[..., keep]
    return float(np.sqrt(np.sum((y - x) ** 2) / max(np.sum(x**2), 1e-30)))


TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "fade_-6db": fade,
    "shift_50ms": time_shift,
    "resample_22k": resample_round_trip,
    "noise_30db": add_noise,
}


def _fit(audio: np.ndarray, n: int) -> np.ndarray:
    """`audio` cut or zero-padded at its end to `n` samples (float32)."""
    out = np.zeros(n, dtype=np.float32)
    out[: min(n, len(audio))] = audio[:n]
    return out


def lossy_codec(audio: np.ndarray, sample_rate: int, codec: str = "mp3", quality: float = 0.5) -> np.ndarray:
    """The clip encoded by libsndfile's lossy `codec` (`mp3`: MPEG layer III; `ogg`: Vorbis) at compression level
    `quality` (0 best … 1 smallest) and decoded back, trimmed or zero-padded to its original length."""
    formats = {"mp3": ("MP3", "MPEG_LAYER_III"), "ogg": ("OGG", "VORBIS")}
    if codec not in formats:
        raise ValueError(f"lossy_codec: codec {codec!r} is not one of {sorted(formats)}")
    fmt, subtype = formats[codec]
    if fmt not in sf.available_formats():
        raise RuntimeError(f"lossy_codec: this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    a = _mono(audio)
    buffer = io.BytesIO()
    sf.write(buffer, a, sample_rate, format=fmt, subtype=subtype, compression_level=quality)
    buffer.seek(0)
    decoded, _ = sf.read(buffer, dtype="float32", always_2d=True)
    return _fit(decoded.mean(axis=1), len(a))


def reverb(audio: np.ndarray, sample_rate: int, rt60: float = 0.3, wet: float = 0.3, seed: int = 0) -> np.ndarray:
    """The clip through a light synthetic room: the dry signal plus `wet` × a seeded white-noise impulse response
    decaying exponentially by 60 dB in `rt60` seconds (unit energy), same length."""
    a = _mono(audio)
    n = max(1, round(rt60 * sample_rate))
    t = np.arange(n) / sample_rate
    ir = np.random.default_rng(seed).standard_normal(n) * 10 ** (-3 * t / rt60)
    ir /= np.sqrt(np.sum(ir**2))
    tail = fftconvolve(a.astype(np.float64), ir)[: len(a)]
    return (a + wet * tail).astype(np.float32)


def crop(audio: np.ndarray, sample_rate: int, head: float = 0.1, tail: float = 0.1) -> np.ndarray:
    """The clip without its first `head` and last `tail` shares of samples (shorter: 80% of it by default)."""
    a = _mono(audio)
    return a[round(head * len(a)) : len(a) - round(tail * len(a))].copy()


def speed_change(audio: np.ndarray, sample_rate: int, factor: float = 1.025) -> np.ndarray:
    """The clip played `factor` times faster by resampling (tempo and pitch both change: +2.5% is ≈ +0.4 semitone),
    so it lasts 1/factor as long."""
    a = _mono(audio)
    up = 1000
    down = round(factor * up)
    g = gcd(up, down)
    return resample_poly(a, up // g, down // g).astype(np.float32)


def snr_db_aligned(source: np.ndarray, transformed: np.ndarray, sample_rate: int, band: tuple[float, float]) -> float:
    """`snr_db` of a transform that may change the clip's length (a crop, a speed change): the transformed clip is laid
    from the start of the source's span, as the model's window sees it, cut or zero-padded to the source's length."""
    return snr_db(source, _fit(_mono(transformed), len(_mono(source))), sample_rate, band)


# Every transform of the near-copy calibration (issue 24): the replication transforms and the harder ones. Each
# takes mono audio at the source file's own rate and is deterministic (seeded where it draws). The lossy codecs are
# libsndfile's own (soundfile 0.14, libsndfile 1.2.2 here: MP3 = MPEG layer III, Ogg Vorbis), at
# compression level 0.5.
NEAR_COPY_TRANSFORMS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    **TRANSFORMS,
    "noise_40db": lambda a, sr: add_noise(a, sr, snr_db=40.0),
    "mp3": lambda a, sr: lossy_codec(a, sr, "mp3", 0.5),
    "ogg_vorbis": lambda a, sr: lossy_codec(a, sr, "ogg", 0.5),
    "reverb_0.3s": reverb,
    "crop_10pct": crop,
    "tempo_+2.5pct": speed_change,  # midway between two of the copy detector's stretches (latent_match.STRETCHES)
}
