"""Internal similarity uses one shared bank of draws for the query and every item (DESIGN §1)."""

from __future__ import annotations

import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.attribution.objective import DiffusionObjective
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.similarity import internal_embedding, shared_draw_bank


def test_shared_bank_depends_on_the_protocol_seed_only():
    obj = DiffusionObjective("v")
    t, eps = shared_draw_bank(3, 4, (2, 5), obj)
    assert t.shape == (4,) and eps.shape == (4, 2, 5) and bool(((t >= 0) & (t <= 1)).all())
    t2, eps2 = shared_draw_bank(3, 4, (2, 5), obj)
    assert torch.equal(t, t2) and torch.equal(eps, eps2)
    assert not torch.equal(eps, shared_draw_bank(4, 4, (2, 5), obj)[1])
    assert torch.equal(eps[:2], shared_draw_bank(3, 2, (2, 5), obj)[1])  # draw k does not depend on the bank size


def test_items_with_the_same_content_but_different_ids_embed_identically():
    adapter = EmbeddedAdapter.new(seed=0, layers=1)
    c, frames = adapter.latent_shape
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, c, frames, generator=g)
    cond = {
        "encoder_hidden_states": torch.randn(1, 8, 384, generator=g),
        "global_hidden_states": torch.randn(1, 1, 384, generator=g),
    }
    other = torch.randn(1, c, frames, generator=g)
    batch = ItemBatch(["a", "b", "c"], torch.cat([z, z, other]), {k: v.repeat(3, 1, 1) for k, v in cond.items()})
    emb = internal_embedding(adapter, batch, LossProtocol(seed=0), Compute())
    assert emb.shape == (3, adapter.denoiser.config.num_attention_heads * adapter.denoiser.config.attention_head_dim)
    assert torch.allclose(emb[0], emb[1], atol=1e-6) and not torch.allclose(emb[0], emb[2], atol=1e-3)
    alone = internal_embedding(adapter, ItemBatch(["query-x"], z, cond), LossProtocol(seed=0), Compute())
    assert torch.allclose(alone[0], emb[0], atol=1e-5)  # a query with the same content, alone in its batch
