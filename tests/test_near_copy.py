"""The near-copy rule (issue 24): its verdict on constructed scores, its threshold choice, the copy detector's latent
comparison, the calibration's transforms, and the calibration asset on a small trained root read by its view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tda_assets.attribution.latent_match import MAX_SHIFT_FRAMES, latent_map, shift_scores
from tda_assets.attribution.near_copy import NEAR_COPY_SIGNAL, NEAR_COPY_THRESHOLD, choose_threshold, near_copy_verdict
from tda_assets.attribution.replication import (
    NEAR_COPY_TRANSFORMS,
    crop,
    lossy_codec,
    reverb,
    snr_db_aligned,
    speed_change,
)
from tests.trained_roots import SMALL

ITEMS = ["a", "b", "c", "d"]


def scores(latent: list[float]) -> dict[str, np.ndarray]:
    """Scores by embedding as similarity_scores has them; the other signals disagree, to show they do not decide."""
    return {NEAR_COPY_SIGNAL: np.array(latent), "audio": np.array([0.99, 0.1, 0.2, 0.3])}


def test_a_clear_copy_is_a_near_copy_of_its_top_item_with_its_margin_over_the_threshold():
    v = near_copy_verdict(scores([0.2, 0.999, 0.6, 0.5]), ITEMS)
    assert (v.near_copy, v.copy_of, v.signal) == (True, "b", NEAR_COPY_SIGNAL)
    assert v.copy_score == pytest.approx(0.999)
    assert v.margin == pytest.approx(0.999 - NEAR_COPY_THRESHOLD)


def test_a_near_tie_names_the_higher_item_and_a_score_at_the_threshold_is_a_copy():
    t = NEAR_COPY_THRESHOLD
    v = near_copy_verdict(scores([0.1, t - 1e-4, t, 0.2]), ITEMS)
    assert (v.near_copy, v.copy_of, v.margin) == (True, "c", 0.0)
    below = near_copy_verdict(scores([0.1, t - 2e-4, t - 1e-4, 0.2]), ITEMS)
    assert (below.near_copy, below.copy_of) == (False, "c")
    assert below.margin == pytest.approx(-1e-4)


def test_a_non_copy_still_names_its_closest_item_with_a_negative_margin():
    v = near_copy_verdict(scores([0.61, 0.58, 0.64, 0.3]), ITEMS)
    assert (v.near_copy, v.copy_of) == (False, "c")
    assert v.margin == pytest.approx(0.64 - NEAR_COPY_THRESHOLD)


def test_scores_without_the_deciding_signal_or_of_another_length_are_refused():
    with pytest.raises(ValueError, match=f"needs the '{NEAR_COPY_SIGNAL}' similarity scores.*tda prepare"):
        near_copy_verdict({"audio": np.ones(4)}, ITEMS)
    with pytest.raises(ValueError, match="3 'latent' scores for 4 item ids"):
        near_copy_verdict({NEAR_COPY_SIGNAL: np.ones(3)}, ITEMS)


def test_the_threshold_lies_midway_in_the_gap_between_non_copies_and_the_worst_transform():
    # J = 1 between the highest non-copy (0.8) and the lowest copy (0.9): candidates are midpoints of sorted scores
    assert choose_threshold({"a": [0.95, 0.97], "b": [0.9]}, np.array([0.5, 0.8])) == pytest.approx(0.85)


def test_the_threshold_trades_the_worst_transforms_recall_against_false_positives():
    # J at the midpoints: 0.45 → 1 − 2/4 = 0.5; 0.65 → 1 − 1/4 = 0.75; 0.75 → 1/2 − 1/4 = 0.25 (b loses a copy)
    t = choose_threshold({"a": [0.9, 0.95], "b": [0.7, 0.8]}, np.array([0.2, 0.3, 0.6, 0.85]))
    assert t == pytest.approx(0.65)


def random_latents(seed: int, n: int = 1, channels: int = 8, frames: int = 48) -> torch.Tensor:
    """Log-mel-like latents: sparse 'notes' over a floor, so the floor and the alignment matter."""
    g = torch.Generator().manual_seed(seed)
    notes = (torch.rand(n, channels, frames, generator=g) > 0.85).float()
    return -2.0 + 2.0 * notes + 0.05 * torch.randn(n, channels, frames, generator=g)


def test_a_shifted_copy_matches_its_source_and_not_another_clip():
    items = torch.cat([random_latents(1), random_latents(2), random_latents(3)])
    source = items[1:2]
    shifted = torch.roll(source, shifts=MAX_SHIFT_FRAMES // 2, dims=-1)
    shifted[..., : MAX_SHIFT_FRAMES // 2] = -2.0  # silence in front, as a delayed clip
    s = shift_scores(latent_map(shifted, None, floor=2.0), latent_map(items, None, floor=2.0))
    assert int(s.argmax()) == 1
    assert float(s[1]) > 0.9
    assert float(s[[0, 2]].max()) < 0.5


def test_noise_under_the_floor_leaves_the_map_unchanged():
    x = random_latents(4)
    quiet = x + 0.5 * (x < -1.5).float() * torch.rand(x.shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(latent_map(x, None, floor=1.0), latent_map(quiet, None, floor=1.0))


def test_a_clip_cut_short_still_matches_its_source_over_the_frames_it_has():
    items = torch.cat([random_latents(5), random_latents(6)])
    mask = torch.ones(1, 48)
    mask[:, 36:] = 0  # the last quarter of the window is padding
    cut = items[:1].clone()
    cut[..., 36:] = -9.0  # whatever the encoder put there
    s = shift_scores(latent_map(cut, mask, floor=2.0), latent_map(items, None, floor=2.0))
    assert float(s[0]) > 0.95
    assert float(s[1]) < 0.5


def tone(rate: int, seconds: float = 2.0) -> np.ndarray:
    """A seeded melody of decaying partials: something a codec, a room and a speed change alter audibly."""
    t = np.arange(round(rate * seconds)) / rate
    rng = np.random.default_rng(0)
    out = np.zeros_like(t)
    for start in np.arange(0, seconds, 0.25):
        f = 220 * 2 ** (rng.integers(0, 12) / 12)
        on = t >= start
        out += on * np.exp(-4 * (t - start) * on) * (np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t))
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


@pytest.mark.parametrize(
    "name, low, high",
    [
        ("noise_30db", 29.9, 30.1),
        ("noise_40db", 39.9, 40.1),
        ("mp3", 10.0, 45.0),
        ("ogg_vorbis", 10.0, 45.0),
        ("reverb_0.3s", 3.0, 20.0),
    ],
)
def test_each_new_transform_changes_the_audio_by_its_stated_snr_and_is_deterministic(name, low, high):
    x = tone(16000)
    y = NEAR_COPY_TRANSFORMS[name](x, 16000)
    assert np.array_equal(y, NEAR_COPY_TRANSFORMS[name](x, 16000))
    assert len(y) == len(x)
    assert low <= snr_db_aligned(x, y, 16000, (0.0, 8000.0)) <= high  # the whole band: white noise's SNR is exact


def test_crop_drops_a_tenth_at_each_end_and_the_speed_change_shortens_by_its_factor():
    x = tone(16000)
    assert np.array_equal(crop(x, 16000), x[3200:28800])
    y = speed_change(x, 16000, 1.03)
    assert abs(len(y) - len(x) / 1.03) <= 1
    assert snr_db_aligned(x, y, 16000, (0.0, 8000.0)) < 10  # the notes drift off their places: far from the source


def test_reverb_is_seeded_and_a_codec_name_is_checked():
    x = tone(16000)
    assert not np.array_equal(reverb(x, 16000, seed=0), reverb(x, 16000, seed=1))
    with pytest.raises(ValueError, match="codec 'aac' is not one of"):
        lossy_codec(x, 16000, "aac")


@pytest.fixture(scope="module")
def calibrated(trained_roots, tmp_path_factory):
    """A copy of the SMALL root (2 artists × 3 clips) with the calibration run: 3 development and 3 reporting sources,
    one held-out render per artist and target set."""
    mp = pytest.MonkeyPatch()
    runner = trained_roots.runner(SMALL, tmp_path_factory.mktemp("storage"), mp)
    runner.log_level = "WARNING"
    runner.with_config("near_copy_calibration", n_sources=3, heldout_per_artist=1)
    yield runner
    mp.undo()


def test_the_summary_view_reports_each_transform_on_the_reporting_sources_only(calibrated):
    from tda_assets.io.query_engine import QueryEngine

    summary = QueryEngine(calibrated.root).sql("SELECT * FROM near_copy_summary ORDER BY transform")
    assert summary["transform"].to_list() == sorted(NEAR_COPY_TRANSFORMS)
    assert set(summary["n"].to_list()) == {3}  # 3 reporting sources; the 3 development ones are not reported
    assert set(summary["false_positive_n"].to_list()) == {2}  # one held-out render per artist
    easy = summary.filter(summary["transform"].is_in(["noise_40db", "resample_22k", "mp3"]))
    assert easy["recall"].to_list() == [1.0, 1.0, 1.0]
    assert easy["recall_low"].to_list() == pytest.approx([0.4385] * 3, abs=1e-4)  # Wilson lower end of 3 of 3
    noise = summary.filter(summary["transform"] == "noise_30db").row(0, named=True)
    assert noise["mean_snr_db"] == pytest.approx(30.0, abs=0.1)
