"""Unlearning one query: the `newton` (Fisher-preconditioned) and `ewc_ascent` recipes of DESIGN §1."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from .adapter import DiTAdapter, ItemBatch, apply_delta
from .devices import Compute
from .errors import AttributionInputError
from .fisher import normalised_fisher
from .losses import batch_losses, diffusion_loss, expand_draws
from .protocol import LossProtocol
from .settings import UnlearningSettings

log = logging.getLogger(__name__)


@dataclass
class UnlearningResult:
    """The weight delta `θ_u − θ0` over the subset, and the query's protocol loss before and after."""

    delta: dict[str, torch.Tensor]
    query_loss_before: float
    query_loss_after: float
    seconds: float

    @property
    def loss_ratio(self) -> float:
        return self.query_loss_after / self.query_loss_before


def query_loss(adapter: DiTAdapter, query: ItemBatch, protocol: LossProtocol, compute: Compute, mask: bool) -> float:
    """The query's mean loss over its fixed protocol draws."""
    return float(batch_losses(adapter, query, protocol, compute).select(mask).mean())


def _random_copies(adapter: DiTAdapter, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    t = adapter.objective.sample_t(n, generator).view(1, n)
    eps = torch.randn(1, n, *adapter.latent_shape, generator=generator)
    return t, eps


def unlearn(
    adapter: DiTAdapter,
    query: ItemBatch,
    fisher: dict[str, torch.Tensor],
    settings: UnlearningSettings,
    protocol: LossProtocol,
    compute: Compute,
    n_train: int,
) -> UnlearningResult:
    """Fine-tune the model to forget `query` (one item) and return the delta; the model is left unchanged."""
    if len(query) != 1:
        raise ValueError(f"unlearn takes one query, got {len(query)}")
    start = time.perf_counter()
    before = query_loss(adapter, query, protocol, compute, settings.masks_losses)
    params = adapter.parameter_subset(settings.param_subset)
    missing = sorted(set(params) - set(fisher))
    if missing:
        raise ValueError(f"the Fisher does not cover parameter subset {settings.param_subset!r} ({missing[0]} …)")
    f_hat = {n: f.to(adapter.device) for n, f in normalised_fisher({n: fisher[n] for n in params}).items()}
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(settings.seed)
    mask = query.frame_mask if settings.masks_unlearning else None
    opt = None
    if settings.recipe == "ewc_ascent":
        cls = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.SGD
        opt = cls(list(params.values()), lr=settings.lr)
    try:
        for step in range(settings.steps):
            t, eps = _random_copies(adapter, settings.query_draws, gen)
            q = ItemBatch(query.item_ids, query.latents, query.conditioning, mask)
            z, cond, tt, ee, m = expand_draws(q, t, eps, adapter.device)
            with compute.autocast():
                loss_q = diffusion_loss(adapter, z, cond, tt, ee, m).mean()
            if not torch.isfinite(loss_q):
                raise AttributionInputError(f"query {query.item_ids[0]}: non-finite loss at unlearning step {step}")
            if settings.recipe == "newton":
                grads = torch.autograd.grad(loss_q, list(params.values()))
                with torch.no_grad():
                    for (n, p), g in zip(params.items(), grads):
                        p.add_((settings.lr / n_train) * g.float() / (f_hat[n] + settings.damping))
            else:
                penalty = sum((f_hat[n] * (p - theta0[n]).pow(2)).sum() for n, p in params.items())
                objective = -loss_q + 0.5 * settings.lambda_ * penalty
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
            log.debug("unlearn step %d: query loss %.4f", step, float(loss_q.detach()))
        delta = {n: (p.detach() - theta0[n]).cpu() for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n])
        adapter.denoiser.zero_grad(set_to_none=True)
    with apply_delta(adapter.denoiser, delta):
        after = query_loss(adapter, query, protocol, compute, settings.masks_losses)
    return UnlearningResult(delta, before, after, time.perf_counter() - start)
