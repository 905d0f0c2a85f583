"""A data engineer's own corpus, end to end through the CLI, as the README tells it: recordings at 44.1 kHz stereo
of 2–10 s, a manifest, `tda prepare --manifest`, `tda attribute --audio` with a 48 kHz copy of one training item at
another gain, `tda queries`, `tda export`."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import polars as pl
import pytest
import soundfile as sf
from scipy.signal import resample_poly

from tda_assets.cli import main
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, read_tables

RATE, ARTISTS, PER_ARTIST = 44100, 4, 6
COPIED = "rec-a2-03"


def recording(artist: int, take: int, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A stereo melody: the artist fixes the timbre and scale, the take the notes and tempo."""
    harmonics = [
        np.array([1.0, 0.5, 0.3, 0.1]),
        np.array([1.0, 0.05, 0.6, 0.05]),
        np.array([1.0, 0.8, 0.6, 0.5]),
        np.array([1.0, 0.0, 0.0, 0.0]),
    ][artist]
    scale = 220.0 * 2 ** (np.array([0, 2, 4, 7, 9, 12]) / 12 + artist / 4)
    note_s = 0.15 + 0.1 * take
    t = np.arange(int(seconds * RATE)) / RATE
    notes = rng.choice(scale, size=int(np.ceil(seconds / note_s)))
    f = notes[(t / note_s).astype(int)]
    env = np.exp(-((t % note_s) / note_s) * 3)
    mono = sum(a * np.sin(2 * np.pi * (k + 1) * f * t) for k, a in enumerate(harmonics)) * env
    mono = 0.3 * mono / np.abs(mono).max()
    return np.stack([mono, 0.8 * mono], axis=1).astype(np.float32)


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def own_corpus(tmp_path_factory):
    """24 recordings and their manifest made here, a clean storage root and instance; prepare, attribute, export."""
    mp = pytest.MonkeyPatch()
    folder, root_dir, home = (tmp_path_factory.mktemp(n) for n in ("recordings", "storage", "home"))
    rng = np.random.default_rng(7)
    rows = []
    for a in range(ARTISTS):
        for take in range(PER_ARTIST):
            item = f"rec-a{a}-{take:02d}"
            audio = recording(a, take, float(rng.uniform(2, 10)), rng)
            sf.write(folder / f"{item}.wav", audio, RATE, subtype="PCM_16")
            rows.append(
                {
                    "item_id": item,
                    "audio_uri": f"{item}.wav",
                    "caption": f"take {take} in the style of band {a}",
                    "artist": f"band-{a}",
                }
            )
    pl.DataFrame(rows).write_csv(folder / "manifest.csv")
    source, _ = sf.read(folder / f"{COPIED}.wav", dtype="float32")
    copy = (0.5 * resample_poly(source, 160, 147, axis=0)).astype(np.float32)  # 44.1 → 48 kHz, −6 dB
    sf.write(folder / "copy-48k.wav", copy, 48000, subtype="PCM_24")
    for name, value in {"DAGSTER_HOME": str(home), "TDA_STORAGE_URL": str(root_dir), "TDA_TRAIN_STEPS": "60"}.items():
        mp.setenv(name, value)
    times, results = {}, {}
    for name, argv in {
        "prepare": ("prepare", "--manifest", str(folder / "manifest.csv")),
        "attribute": ("attribute", "--audio", str(folder / "copy-48k.wav"), "--id", "the-copy", "-k", "5"),
        "queries": ("queries",),
        "export": ("export", "--query", "the-copy", "--format", "csv", "--out", str(folder / "out" / "the-copy.csv")),
    }.items():
        start = time.perf_counter()
        results[name] = run(*argv)
        times[name] = time.perf_counter() - start
    print("\n[own corpus] wall time: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
    yield Storage(str(root_dir)), folder, results
    mp.undo()


def test_every_command_exits_zero(own_corpus):
    _, _, results = own_corpus
    assert {name: code for name, (code, _) in results.items()} == dict.fromkeys(results, 0), results


def test_recordings_of_any_length_and_rate_become_training_items(own_corpus):
    root, _, _ = own_corpus
    assert read_table(root, "training_manifest").height == ARTISTS * PER_ARTIST


def test_the_48k_copy_at_another_gain_ranks_its_training_item_first(own_corpus):
    root, _, results = own_corpus
    scores = read_tables(root, "attribution_scores", query_id="the-copy", config_id="default")
    assert scores.sort("rank")["item_id"][0] == COPIED
    table = results["attribute"][1].split("Top-5")[1].splitlines()
    first_row = table[next(i for i, line in enumerate(table) if line.startswith("╞")) + 1]
    assert COPIED in first_row and "band-2" in first_row  # printed as rank 1 with its artist


def test_the_query_records_its_source_rate_channels_and_windows(own_corpus):
    root, _, _ = own_corpus
    row = read_table(root, "queries", query_id="the-copy").row(0, named=True)
    assert (row["source_rate"], row["source_channels"]) == (48000, 2)
    assert row["windows"] == max(1, round(row["seconds"] / 4.096 - 0.5 + 1e-9) if row["seconds"] > 4.096 else 1)
    assert row["audio_uri"].endswith("uploads/the-copy.wav")  # copied into the storage root


def test_queries_lists_the_copy_as_attributed(own_corpus):
    _, _, results = own_corpus
    line = next(ln for ln in results["queries"][1].splitlines() if "the-copy" in ln)
    assert "attributed" in line and "default" in line


def test_export_writes_one_row_per_training_item(own_corpus):
    _, folder, results = own_corpus
    df = pl.read_csv(folder / "out" / "the-copy.csv")
    assert df.height == ARTISTS * PER_ARTIST and df["item_id"].n_unique() == ARTISTS * PER_ARTIST
    assert set(df["artist"]) == {f"band-{a}" for a in range(ARTISTS)}
    assert results["export"][1].strip() == f"wrote {ARTISTS * PER_ARTIST} rows to {folder / 'out' / 'the-copy.csv'}"
