"""The diagonal Fisher `F = mean_i (∇θ ℓ_i(θ0))²` over a sample of training items, on a parameter subset."""

from __future__ import annotations

import logging
from typing import Iterable

import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .losses import diffusion_loss, expand_draws
from .protocol import LossProtocol

log = logging.getLogger(__name__)


def fisher_diagonal(
    adapter: DiTAdapter,
    batches: Iterable[ItemBatch],
    protocol: LossProtocol,
    param_subset: str,
    compute: Compute,
    max_items: int | None = None,
) -> dict[str, torch.Tensor]:
    """Empirical diagonal Fisher (fp32, on CPU): per-item gradients of the protocol loss, squared and averaged."""
    params = adapter.parameter_subset(param_subset)
    names = list(params)
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    seen = 0
    for batch in batches:
        t, eps = protocol.draws_for(batch.item_ids, adapter.latent_shape, adapter.objective)
        for i in range(len(batch)):
            if max_items is not None and seen >= max_items:
                break
            item = batch.select([i])
            z, cond, tt, ee, _ = expand_draws(item, t[i : i + 1], eps[i : i + 1], adapter.device)
            with compute.autocast():  # the unlearning step's curvature: the compute's precision, as the step itself
                loss = diffusion_loss(adapter, z, cond, tt, ee).mean()
            grads = torch.autograd.grad(loss, [params[n] for n in names])
            for n, g in zip(names, grads):
                acc[n] += g.detach().float().pow(2)
            seen += 1
        if max_items is not None and seen >= max_items:
            break
    if seen == 0:
        raise ValueError("fisher_diagonal needs at least one training item")
    log.info("fisher_diagonal: %d items, %d parameters (%s)", seen, sum(a.numel() for a in acc.values()), param_subset)
    return {n: (a / seen).cpu() for n, a in acc.items()}


def normalised_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher scaled to mean 1 over the subset, so `λ`, `lr` and damping mean the same on any model."""
    total = sum(f.sum() for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    mean = float(total) / max(count, 1)
    if not mean > 0:
        raise ValueError("the Fisher diagonal is zero everywhere: the parameter subset does not affect the loss")
    return {n: f / mean for n, f in fisher.items()}
