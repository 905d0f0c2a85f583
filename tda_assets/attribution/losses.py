"""Per-draw diffusion losses `ℓ_ik(θ)` under a fixed loss protocol, batched into large forward passes."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .errors import AttributionInputError
from .protocol import LossProtocol


def diffusion_loss(
    adapter: DiTAdapter,
    latents: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    t: torch.Tensor,
    eps: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row loss `w(t)·‖target − f_θ(x_t, t, h)‖²` (mean over channels and, if masked, over real frames only)."""
    x_t, target, weight = adapter.objective.make(latents, eps, t)
    pred = adapter.predict(x_t, t, conditioning).float()
    err = (pred - target.float()).pow(2).mean(dim=1)  # [n, T]
    if frame_mask is None:
        per_row = err.mean(dim=1)
    else:
        m = frame_mask.to(err.dtype)
        per_row = (err * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)
    return weight.to(per_row) * per_row


def expand_draws(batch: ItemBatch, t: torch.Tensor, eps: torch.Tensor, device: torch.device):
    """Flatten a batch of b items × K draws into b·K rows on `device`."""
    b, k = t.shape
    rep = lambda x: x.to(device).repeat_interleave(k, dim=0)  # noqa: E731
    z = rep(batch.latents)
    cond = {name: rep(v) for name, v in batch.conditioning.items()}
    mask = None if batch.frame_mask is None else rep(batch.frame_mask)
    return z, cond, t.reshape(b * k).to(device), eps.reshape(b * k, *eps.shape[2:]).to(device), mask


def batch_losses(
    adapter: DiTAdapter, batch: ItemBatch, protocol: LossProtocol, compute: Compute, mask_padding: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(losses, t)`, each [b, K] on CPU, for one batch of items; raises on a non-finite loss, naming the item."""
    t, eps = protocol.draws_for(batch.item_ids, adapter.latent_shape, adapter.objective)
    z, cond, tt, ee, mask = expand_draws(batch, t, eps, adapter.device)
    if not mask_padding:
        mask = None
    rows = z.shape[0]
    out = torch.empty(rows)
    with torch.no_grad(), compute.autocast():
        for lo in range(0, rows, compute.batch_size):
            hi = min(rows, lo + compute.batch_size)
            sub_cond = {k: v[lo:hi] for k, v in cond.items()}
            sub_mask = None if mask is None else mask[lo:hi]
            out[lo:hi] = diffusion_loss(adapter, z[lo:hi], sub_cond, tt[lo:hi], ee[lo:hi], sub_mask).float().cpu()
    losses = out.view(len(batch), protocol.draws)
    bad = ~torch.isfinite(losses).all(dim=1)
    if bad.any():
        names = [batch.item_ids[i] for i in bad.nonzero().flatten().tolist()]
        raise AttributionInputError(
            f"non-finite diffusion loss for item(s) {names[:5]}: check their audio/latents for NaN or inf "
            "and the checkpoint for diverged weights"
        )
    return losses, t


def stream_losses(
    adapter: DiTAdapter,
    batches: Iterable[ItemBatch],
    protocol: LossProtocol,
    compute: Compute,
    mask_padding: bool = False,
) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor]]:
    """Yield `(item_ids, losses [b, K], t [b, K])` batch by batch; memory stays bounded by one batch."""
    for batch in batches:
        losses, t = batch_losses(adapter, batch, protocol, compute, mask_padding)
        yield batch.item_ids, losses, t


def rebatch(batches: Iterable[ItemBatch], size: int) -> Iterator[ItemBatch]:
    """Split batches into sub-batches of at most `size` items."""
    for batch in batches:
        for lo in range(0, len(batch), size):
            yield batch.select(slice(lo, lo + size))
