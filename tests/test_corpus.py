"""The embedded synthetic corpus: deterministic, well-formed audio and captions, and audibly distinct artists."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tda_assets.data.corpus import (
    ARTISTS,
    CLIP_SECONDS,
    SAMPLE_RATE,
    generate_corpus,
    render_clip,
    style_caption,
    style_prompt,
)

CLIP_SAMPLES = round(SAMPLE_RATE * CLIP_SECONDS)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> list[dict]:
    """Every artist, a few clips each."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), clips_per_artist=6, seed=0)


def _band_features(x: np.ndarray, n_fft: int = 1024, hop: int = 512, bands: int = 40) -> np.ndarray:
    """Mean and std over time of a log-spaced-band log power spectrum."""
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop] * np.hanning(n_fft)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    edges = np.unique(np.geomspace(2, n_fft // 2 + 1, bands + 1).astype(int))
    logband = np.log(np.stack([power[:, a:b].sum(1) for a, b in zip(edges[:-1], edges[1:])], 1) + 1e-6)
    return np.concatenate([logband.mean(0), logband.std(0)])


def test_generation_is_deterministic_per_seed(tmp_path: Path) -> None:
    a = generate_corpus(tmp_path / "a", clips_per_artist=2, seed=3, artists=2)
    b = generate_corpus(tmp_path / "b", clips_per_artist=2, seed=3, artists=2)
    c = generate_corpus(tmp_path / "c", clips_per_artist=2, seed=4, artists=2)
    assert [r["caption"] for r in a] == [r["caption"] for r in b]
    assert [Path(r["audio_path"]).read_bytes() for r in a] == [Path(r["audio_path"]).read_bytes() for r in b]
    assert all(Path(x["audio_path"]).read_bytes() != Path(y["audio_path"]).read_bytes() for x, y in zip(a, c))


def test_clips_are_16k_mono_exact_length_audible_and_unclipped(small_corpus: list[dict]) -> None:
    for row in small_corpus:
        info = sf.info(row["audio_path"])
        assert (info.samplerate, info.channels, info.frames, info.subtype) == (SAMPLE_RATE, 1, CLIP_SAMPLES, "PCM_16")
        x, _ = sf.read(row["audio_path"], dtype="float32")
        assert np.sqrt(np.mean(x**2)) > 0.02, row["item_id"]
        assert np.abs(x).max() < 0.95, row["item_id"]
        assert row["duration_s"] == pytest.approx(CLIP_SECONDS)
        assert Path(row["audio_path"]).is_absolute() and Path(row["audio_path"]).parent.name == row["artist"]


def test_render_clip_returns_float32_peak_normalized_mono() -> None:
    x = render_clip(ARTISTS[0], seed=11)
    assert x.dtype == np.float32 and x.shape == (CLIP_SAMPLES,)
    assert np.abs(x).max() == pytest.approx(0.9, abs=1e-3)


def test_captions_hide_artist_vary_and_name_tempo_and_mode() -> None:
    for style in ARTISTS:
        rng = random.Random(0)
        captions = {style_caption(style, rng) for _ in range(40)} | {style_prompt(style)}
        assert len(captions) >= 4, style.name
        forbidden = [style.name.lower(), style.nickname.lower(), *style.nickname.lower().split()]
        for caption in captions:
            words = set(re.findall(r"[a-z0-9_]+", caption.lower()))
            assert not any(f in caption.lower() if " " in f or "_" in f else f in words for f in forbidden), caption
            assert f"{style.bpm} bpm" in caption and style.mode in caption, caption


def test_style_prompt_is_deterministic_and_distinct_per_artist() -> None:
    prompts = [style_prompt(s) for s in ARTISTS]
    assert prompts == [style_prompt(s) for s in ARTISTS]
    assert len(set(prompts)) == len(ARTISTS)


def test_at_least_eight_pairwise_distinct_artists() -> None:
    assert len(ARTISTS) >= 8
    assert len({s.name for s in ARTISTS}) == len(ARTISTS)
    assert len({s.program for s in ARTISTS}) == len(ARTISTS)
    assert len({(s.bpm, s.mode, s.register) for s in ARTISTS}) == len(ARTISTS)


def test_item_ids_are_unique_safe_slugs(small_corpus: list[dict]) -> None:
    ids = [r["item_id"] for r in small_corpus]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)


def test_artists_limit_selects_the_first_artists(tmp_path: Path) -> None:
    rows = generate_corpus(tmp_path, clips_per_artist=1, artists=3)
    assert [r["artist"] for r in rows] == [s.name for s in ARTISTS[:3]]


def test_artists_are_distinguishable_by_spectral_nearest_neighbour(small_corpus: list[dict]) -> None:
    feats = np.stack([_band_features(sf.read(r["audio_path"], dtype="float32")[0]) for r in small_corpus])
    feats = feats - feats.mean(0)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    sim = feats @ feats.T
    np.fill_diagonal(sim, -np.inf)
    labels = np.array([r["artist"] for r in small_corpus])
    accuracy = float((labels[sim.argmax(1)] == labels).mean())
    assert accuracy > 0.8, accuracy


def test_builtin_prompts_are_held_out_no_training_caption_equals_one(small_corpus: list[dict]) -> None:
    every_caption = {style_caption(s, random.Random(i)) for s in ARTISTS for i in range(200)}  # all phrasings
    every_caption |= {row["caption"] for row in small_corpus}
    prompts = {style_prompt(s) for s in ARTISTS}
    assert len(every_caption) >= 5 * len(ARTISTS)
    assert prompts.isdisjoint(every_caption)
