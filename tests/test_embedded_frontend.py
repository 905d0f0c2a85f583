"""The embedded model's front end is level-invariant: a quieter or louder copy of a clip encodes to the same latents."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import torch

from tda_assets.data.corpus import ARTISTS, render_clip
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.models.model_folder import TDA_MODEL_FILE, load_model, save_model


def _clip() -> np.ndarray:
    return render_clip(ARTISTS[0], seed=3)  # a corpus clip: peak 0.9, exactly one window


def test_a_quieter_and_a_louder_copy_encode_to_the_same_latents():
    adapter = EmbeddedAdapter.new()
    clip = _clip()
    z, _ = adapter.encode_audio([clip, clip * 10 ** (-6 / 20), clip * 1.1])
    assert torch.allclose(z[1], z[0], atol=1e-5) and torch.allclose(z[2], z[0], atol=1e-5)


def test_without_peak_levelling_a_minus_6_db_copy_shifts_the_latents_by_the_log_gain():
    adapter = EmbeddedAdapter.new(frontend=replace(EmbeddedAdapter.new().frontend, peak=None))
    clip = _clip()
    z, _ = adapter.encode_audio([clip, clip * 0.5])
    loud = z[0] > -0.5  # bins far above the log floor, where log(power · 0.25) = log(power) − log 4
    expected = np.log(0.25) / adapter.frontend.scale  # −0.301
    assert abs(float((z[1] - z[0])[loud].median()) - expected) < 0.01


def test_the_corpus_level_is_kept_so_its_latents_do_not_change():
    clip = _clip()
    assert abs(float(np.abs(clip).max()) - 0.9) < 1e-6
    levelled, _ = EmbeddedAdapter.new().encode_audio([clip])
    raw, _ = EmbeddedAdapter.new(frontend=replace(EmbeddedAdapter.new().frontend, peak=None)).encode_audio([clip])
    assert torch.allclose(levelled, raw, atol=1e-5)


def test_a_model_folder_saved_before_peak_levelling_keeps_the_level(tmp_path):
    folder = save_model(EmbeddedAdapter.new(), tmp_path / "model")
    info = json.loads((folder / TDA_MODEL_FILE).read_text())
    assert info["frontend"]["peak"] == 0.9
    assert load_model(folder).frontend.peak == 0.9
    del info["frontend"]["peak"]
    (folder / TDA_MODEL_FILE).write_text(json.dumps(info))
    assert load_model(folder).frontend.peak is None
