"""A tiny embedded model trained for a few seconds on synthetic latents with artist structure (engine-scale tests)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.models.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.losses import batch_losses
from tda_assets.attribution.protocol import LossProtocol

ARTISTS, PER_ARTIST, TOKENS = 4, 12, 6
PROTOCOL = LossProtocol(seed=0, draws=8)


def synthetic_items(n_per_artist: int, seed: int, prefix: str, shape: tuple[int, int]) -> ItemBatch:
    """Items whose latents and conditioning share an artist template plus item noise; the last 16 frames padded."""
    g = torch.Generator().manual_seed(1234)  # templates are shared by every call
    c, t = shape
    templates = torch.randn(ARTISTS, c, t, generator=g).cumsum(-1) / 8
    cond_t = torch.randn(ARTISTS, TOKENS, 384, generator=g)
    g.manual_seed(seed)
    art = torch.arange(ARTISTS).repeat_interleave(n_per_artist)
    n = len(art)
    z = templates[art] + 0.5 * torch.randn(n, c, t, generator=g)
    h = cond_t[art] + 0.3 * torch.randn(n, TOKENS, 384, generator=g)
    pooled = torch.nn.functional.normalize(h.mean(1), dim=-1).unsqueeze(1)
    mask = torch.ones(n, t)
    mask[n // 2 :, -16:] = 0
    z = z * mask.unsqueeze(1)
    ids = [f"{prefix}{a:02d}-{i:03d}" for i, a in enumerate(art.tolist())]
    return ItemBatch(ids, z, {"encoder_hidden_states": h, "global_hidden_states": pooled}, mask)


@functools.lru_cache(maxsize=1)
def tiny_trained() -> tuple[EmbeddedAdapter, ItemBatch, ItemBatch, dict[str, torch.Tensor], np.ndarray]:
    """(adapter, training items, held-out queries, Fisher on `all`, baseline losses L0 [N, K] under `PROTOCOL`)."""
    adapter = EmbeddedAdapter.new(seed=0, layers=2, heads=2, head_dim=16)
    train = synthetic_items(PER_ARTIST, 0, "t", adapter.latent_shape)
    queries = synthetic_items(1, 99, "q", adapter.latent_shape)
    train_denoiser(adapter, train, TrainingSettings(steps=60, batch_size=24, lr=3e-3, warmup=10, seed=0), Compute())
    fisher = fisher_diagonal(adapter, [train], PROTOCOL, "all", Compute())
    l0 = batch_losses(adapter, train, PROTOCOL, Compute()).loss.numpy().astype(np.float64)
    return adapter, train, queries, fisher, l0
