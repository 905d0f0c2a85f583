"""The near-copy verdict as a user meets it (issue 24): a table `near_copies` with one row for the whole clip and one
per window of a long clip, the verdict line above `tda attribute`'s top 10, a column of `tda queries` and `tda export`,
and `tda attribute --per-window`: a medley of five lightly transformed training clips, joined into one MP3 and added
with no prompt, names its sources window by window."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import polars as pl
import pytest
import soundfile as sf
import torch
from scipy.signal import resample_poly

from tda_assets.attribution.latent_match import latent_map
from tda_assets.attribution.near_copy_segments import window_query_id, window_verdicts
from tda_assets.attribution.similarity import EMBEDDINGS
from tda_assets.cli import main
from tda_assets.data.audio import decode_audio
from tda_assets.io.slugs import check_query_id
from tda_assets.io.tables import read_table, read_tables
from tests.trained_roots import SMALL

RATE = 16000  # the embedded corpus's rate
NOISY_SOURCE = "a01-0002"
MEDLEY = ["a00-0000", "a01-0000", "a00-0001", "a01-0001", "a00-0002"]  # 5 different items, the root's 2 artists in turn
OUT_RATE = 44100  # the medley as users have files: 44.1 kHz stereo MP3


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def with_noise(audio: np.ndarray, snr_db: float, seed: int) -> np.ndarray:
    """White noise added at `snr_db` below the clip's power."""
    noise = np.random.default_rng(seed).normal(size=audio.shape)
    scale = np.sqrt(np.mean(audio**2) / np.mean(noise**2) / 10 ** (snr_db / 10))
    return (audio + scale * noise).astype(np.float32)


def light_transforms(audio: np.ndarray, i: int) -> np.ndarray:
    """A light, different change per clip: a gain, white noise at 40 dB SNR, or both."""
    gain = (0.7, 1.0, 0.5, 1.0, 0.8)[i]
    return with_noise(gain * audio, 40.0, seed=i) if i % 2 else (gain * audio).astype(np.float32)


@pytest.fixture(scope="module")
def near_copies(trained_roots, tmp_path_factory):
    """A copy of the SMALL trained root (2 artists × 3 items), and through the CLI: a noisy copy attributed, the medley
    attributed with `--per-window`, then `tda queries` and `tda export`."""
    mp = pytest.MonkeyPatch()
    root_dir = tmp_path_factory.mktemp("storage")
    root = trained_roots.runner(SMALL, root_dir, mp).root
    folder = tmp_path_factory.mktemp("clips")
    manifest = read_table(root, "training_manifest")
    path = {
        i: trained_roots.in_copy(SMALL, uri, root_dir) for i, uri in zip(manifest["item_id"], manifest["audio_uri"])
    }
    source = {i: decode_audio(open(path[i], "rb").read(), i, RATE) for i in {NOISY_SOURCE, *MEDLEY}}
    sf.write(folder / "noisy.wav", with_noise(source[NOISY_SOURCE], 30.0, seed=9), RATE, subtype="PCM_16")
    medley = np.concatenate([light_transforms(source[item], i) for i, item in enumerate(MEDLEY)])
    stereo = resample_poly(medley, 441, 160)[:, None] * np.array([[1.0, 0.8]])
    sf.write(folder / "medley.mp3", (0.9 * stereo / np.abs(stereo).max()).astype(np.float32), OUT_RATE, format="MP3")
    mp.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("home")))
    mp.setenv("TDA_STORAGE_URL", str(root_dir))
    results = {
        "noisy": run("attribute", "--audio", str(folder / "noisy.wav"), "--id", "noisy-copy"),
        "medley": run("attribute", "--audio", str(folder / "medley.mp3"), "--id", "medley", "-k", "3", "--per-window"),
        "queries": run("queries"),
        "export": run("export", "--query", "noisy-copy", "--out", str(folder / "noisy.csv")),
    }
    yield root, folder, results
    mp.undo()


def test_every_command_exits_zero(near_copies):
    _, _, results = near_copies
    assert {name: code for name, (code, _) in results.items()} == dict.fromkeys(results, 0), results


def test_a_long_query_has_one_clip_row_and_one_row_per_window(near_copies):
    root, _, _ = near_copies
    seconds = read_table(root, "queries", query_id="medley")["seconds"][0]
    rows = read_tables(root, "near_copies", query_id="medley").sort("segment", "segment_start_s")
    assert rows["segment"].to_list() == ["clip"] + ["window"] * 5  # 5 × 4.096 s, every window of the clip
    clip = rows.row(0, named=True)
    assert (clip["segment_start_s"], clip["segment_end_s"]) == (0.0, pytest.approx(seconds))
    windows = rows.filter(pl.col("segment") == "window")
    assert windows["segment_start_s"].to_list() == pytest.approx([4.096 * i for i in range(5)], abs=1e-3)
    assert windows["segment_end_s"].to_list() == pytest.approx([4.096 * (i + 1) for i in range(5)], abs=1e-3)


def test_a_short_query_has_its_clip_row_only(near_copies):
    root, _, _ = near_copies
    assert read_tables(root, "near_copies", query_id="noisy-copy")["segment"].to_list() == ["clip"]


def test_attribute_prints_the_verdict_above_the_top_10_naming_the_copied_item(near_copies):
    _, _, results = near_copies
    out = results["noisy"][1]
    verdict = next((line for line in out.splitlines() if line.startswith("near-copy:")), "")
    assert verdict.startswith(f"near-copy: yes — copy of {NOISY_SOURCE} ("), out
    assert out.index(verdict) < out.index("Top-10 training items")


def test_the_medley_windows_name_at_least_four_of_its_five_sources(near_copies):
    root, _, _ = near_copies
    windows = read_tables(root, "near_copies", query_id="medley").filter(pl.col("segment") == "window")
    windows = windows.sort("segment_start_s")
    named = [
        (source, row["copy_of"], row["near_copy"], round(row["copy_score"], 4))
        for source, row in zip(MEDLEY, windows.iter_rows(named=True))
    ]
    print(f"\n[medley] window verdicts (source, copy_of, near_copy, score): {named}")
    assert sum(copy_of == source and flagged for source, copy_of, flagged, _ in named) >= 4, named


def test_per_window_attributes_each_flagged_window_as_its_own_two_stage_query(near_copies):
    root, _, results = near_copies
    out = results["medley"][1]
    flagged = read_tables(root, "near_copies", query_id="medley").filter(
        (pl.col("segment") == "window") & pl.col("near_copy")
    )
    assert flagged.height >= 1
    for start, copy_of in flagged.select("segment_start_s", "copy_of").rows():
        child = window_query_id("medley", start)
        scores = read_tables(root, "attribution_scores", query_id=child, config_id="two-stage")
        assert scores.height == 6, child  # one row per training item
        assert f"query {child!r}" in out
        section = out.split(f"query {child!r}")[1]
        assert "Top-3 training items for this window (two-stage)" in section
        assert copy_of in section.split("Top-3")[0]  # the window's own verdict names the item its parent row names


def test_queries_lists_the_verdict_as_a_column(near_copies):
    _, _, results = near_copies
    line = next(ln for ln in results["queries"][1].splitlines() if "noisy-copy" in ln)
    assert f"yes: {NOISY_SOURCE}" in line


def test_export_carries_the_whole_clip_verdict_on_every_row(near_copies):
    _, folder, _ = near_copies
    df = pl.read_csv(folder / "noisy.csv")
    assert df.height == 6
    assert set(df["near_copy"]) == {True} and set(df["copy_of"]) == {NOISY_SOURCE}
    assert df["copy_score"].n_unique() == 1 and df["near_copy_signal"].n_unique() == 1


def test_each_window_is_judged_on_its_own_embeddings_not_the_pooled_clip():
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn(4, 32, 64, generator=rng)  # three items and one clip like none of them
    items = {n: torch.randn(3, 16, generator=rng) for n in EMBEDDINGS if n != "latent"}
    items["latent"] = latent_map(latents[:3], None, None)
    windows = {n: torch.cat([e[[0, 2]], torch.randn(1, e.shape[1], generator=rng)]) for n, e in items.items()}
    windows["latent"] = latent_map(latents[[0, 2, 3]], None, None)  # a copy of item 0, then of item 2, then neither
    verdicts = window_verdicts(windows, items, ["x0", "x1", "x2"])
    assert [(v.near_copy, v.copy_of) for v in verdicts[:2]] == [(True, "x0"), (True, "x2")]
    assert [v.copy_score for v in verdicts[:2]] == pytest.approx([1.0, 1.0], abs=1e-4)
    assert not verdicts[2].near_copy


def test_a_window_query_id_is_a_safe_slug_naming_its_start_second():
    assert window_query_id("medley", 8.192) == "medley-at8s"
    long = window_query_id("x" * 64, 176.128)
    assert long.endswith("-at176s") and check_query_id(long) == long
