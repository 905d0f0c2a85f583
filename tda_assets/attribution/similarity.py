"""Similarity-based (non-counterfactual) attribution: cosine similarity of query and item embeddings."""

from __future__ import annotations

import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .latent_match import latent_map, log_mel_floor, shift_scores
from .losses import expand_draws
from .objective import DiffusionObjective
from .protocol import LossProtocol

EMBEDDINGS = ("audio", "text", "internal", "latent")  # latent: the copy detector's map (latent_match.py)
SHARED_BANK_ID = "#shared-draw-bank"  # seeds the shared bank ('#' is in no safe-slug id)


def audio_embedding(batch: ItemBatch) -> torch.Tensor:
    """Pooled latents of the frozen audio encoder: mean and std over real frames [b, 2C]."""
    z, m = batch.latents.float(), batch.frame_mask
    m = torch.ones(z.shape[0], z.shape[-1]) if m is None else m.float()
    w = (m / m.sum(dim=1, keepdim=True).clamp_min(1)).unsqueeze(1)
    mean = (z * w).sum(-1)
    std = ((z - mean.unsqueeze(-1)).pow(2) * w).sum(-1).sqrt()
    return torch.cat([mean, std], dim=1)


def text_embedding(batch: ItemBatch) -> torch.Tensor:
    """Mean of the frozen text encoder's non-padding token states [b, D]."""
    h = batch.conditioning["encoder_hidden_states"].float()
    nonzero = (h.abs().sum(-1) > 0).float().unsqueeze(-1)
    return (h * nonzero).sum(1) / nonzero.sum(1).clamp_min(1)


def shared_draw_bank(
    protocol_seed: int, n_draws: int, latent_shape: tuple[int, ...], objective: DiffusionObjective
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bank of draws `t` [n] and `ε` [n, *latent_shape] shared by every item, seeded by the protocol seed alone."""
    t, eps = LossProtocol(seed=protocol_seed, draws=n_draws).draws_for([SHARED_BANK_ID], latent_shape, objective)
    return t[0], eps[0]


def internal_embedding(
    adapter: DiTAdapter, batch: ItemBatch, protocol: LossProtocol, compute: Compute, draws: int = 2
) -> torch.Tensor:
    """The denoiser's last-block activations at one shared bank of draws (`shared_draw_bank`), pooled [b, D]."""
    t, eps = shared_draw_bank(protocol.seed, draws, adapter.latent_shape, adapter.objective)
    b = len(batch)
    z, cond, tt, ee, _ = expand_draws(batch, t.expand(b, draws), eps.expand(b, *eps.shape), adapter.device)
    captured: list[torch.Tensor] = []
    hook = adapter.denoiser.transformer_blocks[-1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.no_grad(), compute.loss_autocast(protocol.precision):  # stored per protocol, compared with queries'
            x_t, _, _ = adapter.objective.make(z, ee, tt)
            adapter.predict(x_t, tt, cond)
    finally:
        hook.remove()
    acts = captured[0].float().mean(dim=1)  # [b·draws, D]
    return acts.view(b, draws, -1).mean(dim=1).cpu()


def embeddings(
    adapter: DiTAdapter, batch: ItemBatch, protocol: LossProtocol, compute: Compute
) -> dict[str, torch.Tensor]:
    """Every similarity embedding of a batch, by name (`EMBEDDINGS`): audio, text, internal and latent, each [b, D]
    float32 on CPU."""
    scale = getattr(getattr(adapter, "frontend", None), "scale", None)  # a log-mel front end's scale; a VAE has none
    return {
        "audio": audio_embedding(batch),
        "text": text_embedding(batch),
        "internal": internal_embedding(adapter, batch, protocol, compute),
        "latent": latent_map(batch.latents, batch.frame_mask, log_mel_floor(scale)),
    }


def embedding_scores(query: dict[str, torch.Tensor], items: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores [N] per embedding of a query's embeddings [w, D] against items' [N, D]: the cosine of its windows' mean,
    and for `latent` the best alignment of any window (`latent_match.shift_scores`)."""
    return {
        name: shift_scores(query[name], items[name])
        if name == "latent"
        else cosine_scores(query[name].mean(0), items[name])
        for name in EMBEDDINGS
    }


def cosine_scores(query: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of one query embedding [D] (or [1, D]) with item embeddings [N, D]."""
    q = torch.nn.functional.normalize(query.reshape(1, -1).float(), dim=1)
    return (torch.nn.functional.normalize(items.float(), dim=1) @ q.T).flatten()
