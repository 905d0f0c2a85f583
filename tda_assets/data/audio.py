"""Decoding and checking audio clips: each problem raises an error naming the item and the fix."""

from __future__ import annotations

import io

import numpy as np
import soundfile as sf

from tda_assets.attribution.errors import AttributionInputError

SILENCE_RMS = 1e-4
MIN_SECONDS = 0.25  # shorter than a few latent frames: nothing to learn or attribute (often a truncated file)


def decode_audio(data: bytes | None, item_id: str, sample_rate: int) -> np.ndarray:
    """Mono float32 samples from encoded audio bytes (WAV/FLAC/OGG), checked for rate, emptiness and silence."""
    if data is None:
        raise AttributionInputError(f"item {item_id}: audio file is missing; fix its audio_uri in the manifest")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types for unreadable data
        raise AttributionInputError(
            f"item {item_id}: audio cannot be decoded ({exc}); re-export it as WAV or FLAC"
        ) from exc
    if rate != sample_rate:
        raise AttributionInputError(
            f"item {item_id}: audio is {rate} Hz but the model expects {sample_rate} Hz; resample it to {sample_rate} Hz"
        )
    mono = samples.mean(axis=1)
    if mono.size == 0:
        raise AttributionInputError(f"item {item_id}: audio has no samples; replace the file")
    if mono.size < MIN_SECONDS * sample_rate:
        raise AttributionInputError(
            f"item {item_id}: audio is only {1000 * mono.size / sample_rate:.0f} ms long (at least {MIN_SECONDS} s needed); "
            "the file may be truncated: replace it"
        )
    if not np.isfinite(mono).all():
        raise AttributionInputError(f"item {item_id}: audio contains NaN or inf samples; replace the file")
    if float(np.sqrt(np.mean(mono**2))) < SILENCE_RMS:
        raise AttributionInputError(f"item {item_id}: audio is silent (RMS < {SILENCE_RMS}); remove it or replace the file")
    return mono
