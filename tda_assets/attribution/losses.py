"""Per-draw diffusion losses `ℓ_ik(θ)` under a fixed loss protocol, batched into large forward passes."""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .errors import AttributionInputError
from .protocol import LossProtocol


def frame_errors(
    adapter: DiTAdapter,
    latents: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    t: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Per-row, per-frame error `w(t)·‖target − f_θ(x_t, t, h)‖²` averaged over channels: [n, T]."""
    x_t, target, weight = adapter.objective.make(latents, eps, t)
    pred = adapter.predict(x_t, t, conditioning).float()
    return weight.float().view(-1, 1) * (pred - target.float()).pow(2).mean(dim=1)


def reduce_frames(err: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over frames, over the real (unpadded) frames only when a mask is given."""
    if frame_mask is None:
        return err.mean(dim=1)
    m = frame_mask.to(err.dtype)
    return (err * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def diffusion_loss(
    adapter: DiTAdapter,
    latents: torch.Tensor,
    conditioning: dict[str, torch.Tensor],
    t: torch.Tensor,
    eps: torch.Tensor,
    frame_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row diffusion loss [n] (differentiable); padded frames excluded when `frame_mask` is given."""
    return reduce_frames(frame_errors(adapter, latents, conditioning, t, eps), frame_mask)


def expand_draws(batch: ItemBatch, t: torch.Tensor, eps: torch.Tensor, device: torch.device):
    """Flatten a batch of b items × K draws into b·K rows on `device`."""
    b, k = t.shape
    rep = lambda x: x.to(device).repeat_interleave(k, dim=0)  # noqa: E731
    z = rep(batch.latents)
    cond = {name: rep(v) for name, v in batch.conditioning.items()}
    mask = None if batch.frame_mask is None else rep(batch.frame_mask)
    return z, cond, t.reshape(b * k).to(device), eps.reshape(b * k, *eps.shape[2:]).to(device), mask


class DrawLosses(NamedTuple):
    """Per-draw losses [b, K] over all frames and over real frames only, and the draws' timesteps [b, K]."""

    loss: torch.Tensor
    loss_masked: torch.Tensor
    t: torch.Tensor

    def select(self, mask_padding: bool) -> torch.Tensor:
        return self.loss_masked if mask_padding else self.loss


def batch_losses(adapter: DiTAdapter, batch: ItemBatch, protocol: LossProtocol, compute: Compute) -> DrawLosses:
    """Per-draw losses of one batch of items in large forward passes, at the protocol's precision (not the compute's
    autocast); raises on a non-finite loss, naming the item."""
    t, eps = protocol.draws_for(batch.item_ids, adapter.latent_shape, adapter.objective)
    z, cond, tt, ee, mask = expand_draws(batch, t, eps, adapter.device)
    rows = z.shape[0]
    full, masked = torch.empty(rows), torch.empty(rows)
    with torch.no_grad(), compute.loss_autocast(protocol.precision):
        for lo in range(0, rows, compute.batch_size):
            hi = min(rows, lo + compute.batch_size)
            sub_cond = {k: v[lo:hi] for k, v in cond.items()}
            err = frame_errors(adapter, z[lo:hi], sub_cond, tt[lo:hi], ee[lo:hi]).float()
            full[lo:hi] = reduce_frames(err, None).cpu()
            masked[lo:hi] = reduce_frames(err, None if mask is None else mask[lo:hi]).cpu()
    shape = (len(batch), protocol.draws)
    out = DrawLosses(full.view(shape), masked.view(shape), t)
    bad = ~(torch.isfinite(out.loss).all(dim=1) & torch.isfinite(out.loss_masked).all(dim=1))
    if bad.any():
        names = [batch.item_ids[i] for i in bad.nonzero().flatten().tolist()]
        raise AttributionInputError(
            f"non-finite diffusion loss for item(s) {names[:5]}: check their audio/latents for NaN or inf "
            "and the checkpoint for diverged weights"
        )
    return out


def stream_losses(
    adapter: DiTAdapter, batches: Iterable[ItemBatch], protocol: LossProtocol, compute: Compute
) -> Iterator[tuple[list[str], DrawLosses]]:
    """Yield `(item_ids, DrawLosses)` batch by batch; memory stays bounded by one batch."""
    for batch in batches:
        yield batch.item_ids, batch_losses(adapter, batch, protocol, compute)


def rebatch(batches: Iterable[ItemBatch], size: int) -> Iterator[ItemBatch]:
    """Split batches into sub-batches of at most `size` items."""
    for batch in batches:
        for lo in range(0, len(batch), size):
            yield batch.select(slice(lo, lo + size))
