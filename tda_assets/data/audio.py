"""Decoding clips as users have them: any rate and channel count libsndfile reads (WAV, FLAC, OGG, MP3, …),
downmixed to mono and resampled to the model's rate; each problem raises an error naming the item and the fix."""

from __future__ import annotations

import io
from dataclasses import dataclass
from math import gcd

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from tda_assets.attribution.errors import AttributionInputError

SILENCE_RMS = 1e-4
MIN_SECONDS = 0.25  # shorter than a few latent frames: nothing to learn or attribute (often a truncated file)
MAX_QUERY_WINDOWS = 8  # a longer query clip is attributed on this many evenly spaced windows
LONG_CLIP_POLICY = (
    "a query clip longer than the model window is cut into consecutive windows of the model's length (a last part "
    "shorter than half a window is dropped; at most {max} windows, evenly spaced); the query is all its windows: "
    "unlearning raises their mean loss, so the model forgets the whole clip, at the rescore cost of one query. "
    "Training items longer than the window contribute their first window, as the model was trained."
)


@dataclass(frozen=True)
class Clip:
    """Mono float32 samples at the model's rate, with what the file was."""

    samples: np.ndarray
    sample_rate: int
    source_rate: int
    source_channels: int

    @property
    def seconds(self) -> float:
        return self.samples.size / self.sample_rate


def decode_clip(data: bytes | None, item_id: str, sample_rate: int) -> Clip:
    """Decode, downmix and resample to `sample_rate`; refuse missing, undecodable, short, non-finite or silent audio."""
    if data is None:
        raise AttributionInputError(f"item {item_id}: audio file is missing; fix its audio_uri in the manifest")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable data
        raise AttributionInputError(
            f"item {item_id}: audio cannot be decoded ({exc}); re-export it as WAV, FLAC, OGG or MP3"
        ) from exc
    mono = samples.mean(axis=1)
    if mono.size == 0:
        raise AttributionInputError(f"item {item_id}: audio has no samples; replace the file")
    seconds = mono.size / rate
    if seconds < MIN_SECONDS:
        raise AttributionInputError(
            f"item {item_id}: audio is only {1000 * seconds:.0f} ms long (at least {MIN_SECONDS} s needed); "
            "the file may be truncated: replace it"
        )
    if not np.isfinite(mono).all():
        raise AttributionInputError(f"item {item_id}: audio contains NaN or inf samples; replace the file")
    if float(np.sqrt(np.mean(mono**2))) < SILENCE_RMS:
        raise AttributionInputError(
            f"item {item_id}: audio is silent ({seconds:.2f} s with RMS < {SILENCE_RMS}); remove it or replace the file"
        )
    if rate != sample_rate:
        g = gcd(rate, sample_rate)
        mono = resample_poly(mono, sample_rate // g, rate // g).astype(np.float32)
    return Clip(mono, sample_rate, rate, samples.shape[1])


def as_query_clip(samples: np.ndarray, rate: int, name: str, model_rate: int) -> np.ndarray:
    """Audio at `rate` as a query clip reaches the model: written as a file, decoded and resampled (`decode_clip`)."""
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format="WAV", subtype="FLOAT")
    return decode_clip(buffer.getvalue(), name, model_rate).samples


def check_clip(data: bytes | None, item_id: str) -> Clip:
    """A clip decoded at its own rate (no resampling): refused at once for what `decode_clip` would refuse in a run."""
    try:
        rate = sf.info(io.BytesIO(data)).samplerate if data is not None else 1
    except Exception:  # noqa: BLE001 - undecodable: decode_clip names it
        rate = 1
    return decode_clip(data, item_id, rate)


def decode_audio(data: bytes | None, item_id: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples at `sample_rate` (see `decode_clip`)."""
    return decode_clip(data, item_id, sample_rate).samples


def query_windows(samples: np.ndarray, window: int, max_windows: int = MAX_QUERY_WINDOWS) -> list[tuple[int, int]]:
    """`(start, end)` sample ranges of a query clip under `LONG_CLIP_POLICY`: one range for a clip that fits."""
    n = samples.size
    if n <= window:
        return [(0, n)]
    starts = list(range(0, n - window // 2, window))
    if len(starts) > max_windows:  # evenly spaced over the clip, first and last kept
        idx = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        starts = [starts[i] for i in idx]
    return [(s, min(s + window, n)) for s in starts]
