"""Clips as users have them: any rate, any channel count, MP3; long clips cut into windows by the stated policy."""

import io

import numpy as np
import pytest
import soundfile as sf

from tda_assets.attribution.errors import AttributionInputError
from tda_assets.data.audio import MAX_QUERY_WINDOWS, decode_clip, query_windows


def encoded(samples: np.ndarray, rate: int, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def tone(freq: float, seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    x = (0.4 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples))
    return float(np.fft.rfftfreq(samples.size, 1 / rate)[spectrum.argmax()])


def test_stereo_44k1_is_downmixed_and_resampled_to_the_model_rate():
    clip = decode_clip(encoded(tone(440, 2.0, 44100, channels=2), 44100), "q", 16000)
    assert (clip.source_rate, clip.source_channels, clip.sample_rate) == (44100, 2, 16000)
    assert clip.samples.shape == (32000,)
    assert abs(peak_hz(clip.samples, 16000) - 440) < 1.0
    assert abs(float(np.abs(clip.samples[1000:-1000]).max()) - 0.4) < 0.01  # the gain survives resampling


def test_48k_flac_with_opposite_channels_downmixes_to_their_mean():
    left, right = tone(300, 1.0, 48000), tone(300, 1.0, 48000)
    stereo = np.stack([left, -0.5 * right], axis=1)
    clip = decode_clip(encoded(stereo, 48000, "FLAC", "PCM_24"), "q", 16000)
    assert clip.samples.shape == (16000,)
    assert abs(float(np.abs(clip.samples[500:-500]).max()) - 0.1) < 0.005  # (0.4 − 0.2) / 2


def test_mp3_decodes_at_the_model_rate():
    try:
        data = encoded(tone(660, 1.5, 44100), 44100, "MP3", "MPEG_LAYER_III")
    except (sf.LibsndfileError, TypeError, ValueError) as exc:  # a libsndfile built without LAME cannot write MP3
        pytest.skip(f"this libsndfile cannot write MP3 ({exc})")
    clip = decode_clip(data, "q", 16000)
    assert clip.source_rate == 44100
    assert abs(clip.seconds - 1.5) < 0.1  # encoder padding adds a few ms
    assert abs(peak_hz(clip.samples, 16000) - 660) < 2.0


def test_too_short_clip_is_refused_with_its_length_at_any_rate():
    with pytest.raises(AttributionInputError, match=r"item q: audio is only 100 ms long"):
        decode_clip(encoded(tone(440, 0.1, 44100), 44100), "q", 16000)


def test_silent_stereo_clip_is_refused_with_its_length():
    with pytest.raises(AttributionInputError, match=r"item q: audio is silent \(3.00 s"):
        decode_clip(encoded(np.zeros((3 * 48000, 2), np.float32), 48000), "q", 16000)


def test_a_clip_that_fits_is_one_window():
    assert query_windows(np.zeros(1000), 4096) == [(0, 1000)]
    assert query_windows(np.zeros(4096), 4096) == [(0, 4096)]


def test_a_long_clip_is_cut_into_consecutive_windows_dropping_a_short_tail():
    assert query_windows(np.zeros(10_000), 4096) == [(0, 4096), (4096, 8192)]  # tail 1808 < half a window
    assert query_windows(np.zeros(11_000), 4096) == [(0, 4096), (4096, 8192), (8192, 11_000)]


def test_a_very_long_clip_keeps_evenly_spaced_windows_first_and_last():
    windows = query_windows(np.zeros(100 * 4096), 4096)
    assert len(windows) == MAX_QUERY_WINDOWS
    assert windows[0] == (0, 4096) and windows[-1] == (99 * 4096, 100 * 4096)
    assert all(b - a == 4096 for a, b in windows)
