"""Per-draw diffusion losses `ℓ_ik(θ)` under a fixed loss protocol, batched into large forward passes."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, NamedTuple

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


def _rows(x: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    return None if x is None else x[lo:hi]


@contextlib.contextmanager
def _memory_hint(rows: int | None, n: int, device: torch.device) -> Iterator[None]:
    """Turn an out-of-memory error of a gradient pass into one that names the rows it held and the setting that lowers
    them (TDA_GRAD_ROWS)."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        text = str(exc)
        if not isinstance(exc, torch.OutOfMemoryError) and "memory" not in text.lower():
            raise
        held = n if rows is None else min(rows, n)
        raise MemoryError(
            f"out of memory on {device} with {held} rows per gradient pass ({n} rows in all; every row holds its "
            f"activations until the backward pass): set TDA_GRAD_ROWS to fewer rows (1 holds one row; at Stable Audio "
            f"Open's shapes a row takes ≈ 2 GB in fp32). The error was: {text.splitlines()[0] if text else exc!r}"
        ) from exc


def mean_loss(adapter: DiTAdapter, draws: tuple, mask: torch.Tensor | None, rows: int | None, autocast) -> torch.Tensor:
    """The mean diffusion loss over `draws` (`expand_draws`' rows), without gradients, `rows` rows per forward pass
    (None: all at once)."""
    z, cond, t, eps, _ = draws
    n = z.shape[0]
    if rows is None or n <= rows:
        with autocast():
            return diffusion_loss(adapter, z, cond, t, eps, mask).mean()
    total = torch.zeros((), device=z.device)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        with autocast():
            part = diffusion_loss(
                adapter, z[lo:hi], {k: v[lo:hi] for k, v in cond.items()}, t[lo:hi], eps[lo:hi], _rows(mask, lo, hi)
            )
        total += part.float().sum()
    return total / n


def mean_loss_grads(
    adapter: DiTAdapter,
    draws: tuple,
    mask: torch.Tensor | None,
    params: list[torch.nn.Parameter],
    rows: int | None,
    autocast,
    consume: Callable[[int, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """The mean diffusion loss over `draws` (detached) and its gradients with respect to `params` (fp32 like them),
    `rows` rows per backward pass (None: all at once, exactly `autograd.grad` of the mean): the gradients accumulate in
    place, so memory holds one pass's activations and one gradient per parameter, whatever the number of rows.

    With `consume`, each parameter's finished gradient goes to `consume(index, gradient)` as the last backward pass
    produces it and is dropped at once (no gradient is returned): the whole gradient is never in memory together
    (4.2 GB at Stable Audio Open's size), for the Fisher's squares and the gradient store's sketch."""
    with _memory_hint(rows, draws[0].shape[0], draws[0].device):
        return _mean_loss_grads(adapter, draws, mask, params, rows, autocast, consume)


def _consumer(index: int, consume: Callable[[int, torch.Tensor], None]) -> Callable[[torch.Tensor], None]:
    def hook(param: torch.Tensor) -> None:
        consume(index, param.grad)
        param.grad = None

    return hook


def _mean_loss_grads(adapter, draws, mask, params, rows, autocast, consume) -> tuple[torch.Tensor, list | None]:
    z, cond, t, eps, _ = draws
    n = z.shape[0]
    step = n if rows is None else rows
    if consume is None and n <= step:
        with autocast():
            loss = diffusion_loss(adapter, z, cond, t, eps, mask).mean()
        return loss.detach(), list(torch.autograd.grad(loss, params))
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    total = torch.zeros((), device=z.device)
    hooks = []
    try:
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            if hi == n and consume is not None:  # the last pass: each gradient is final as it is accumulated
                hooks = [p.register_post_accumulate_grad_hook(_consumer(i, consume)) for i, p in enumerate(params)]
            with autocast():
                part = diffusion_loss(
                    adapter, z[lo:hi], {k: v[lo:hi] for k, v in cond.items()}, t[lo:hi], eps[lo:hi], _rows(mask, lo, hi)
                )
                part = part.mean() if hi - lo == n else part.sum() / n
            torch.autograd.backward(part, inputs=params)  # accumulates into .grad of `params` only, in place
            total += part.detach().float()
        grads = None if consume else [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for h in hooks:
            h.remove()
        for p, g in zip(params, saved):
            p.grad = g
    return total, grads


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
