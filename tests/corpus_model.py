"""The embedded model trained on the tests' generated corpus: the session model of tests/conftest.py (`trained`) and
the one tests/benchmarks/bench_norm_floor.py measures on, built by one function."""

from __future__ import annotations

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.data.audio import decode_audio
from tda_assets.models.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser

CLIPS_PER_ARTIST, STEPS = 16, 500  # 16 clips × 8 artists, the figures in the tests' docstrings were measured on


def train_on_corpus(rows: list[dict], steps: int = STEPS) -> tuple[EmbeddedAdapter, ItemBatch]:
    """The embedded model (seed 0) trained `steps` steps on the corpus `rows`, and the corpus as one encoded batch."""
    adapter = EmbeddedAdapter.new(seed=0)
    ids = [r["item_id"] for r in rows]
    audio = [decode_audio(open(r["audio_path"], "rb").read(), r["item_id"], adapter.sample_rate) for r in rows]
    latents, mask = adapter.encode_audio(audio)
    batch = ItemBatch(ids, latents, adapter.encode_text([r["caption"] for r in rows], ids), mask)
    train_denoiser(adapter, batch, TrainingSettings(steps=steps, seed=0), Compute())
    return adapter, batch
