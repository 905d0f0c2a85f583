"""Unlearning one query: the `newton` (Fisher-preconditioned) and `ewc_ascent` recipes of DESIGN §1."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .adapter import DiTAdapter, ItemBatch, apply_delta, shifted_parameters
from .devices import Compute
from .errors import AttributionInputError, UnlearningStrengthError
from .fisher import NormalizedFisher
from .losses import batch_losses, diffusion_loss, expand_draws, mean_loss, mean_loss_grads
from .memory import require_memory
from .protocol import LossProtocol
from .settings import MIN_QUERY_LOSS_RATIO, UnlearningSettings, query_loss_ratio

log = logging.getLogger(__name__)
MAX_PROBES = 40  # step-size probes of one `target_ratio` search (bracketing, then bisection in log-lr)
BRACKET_FACTOR = 4.0  # lr is multiplied or divided by this until the target ratio is bracketed


@dataclass
class UnlearningResult:
    """The weight delta `θ_u − θ0` over the subset, the query's protocol loss before and after, and the lr used.

    With a `target_ratio`, `search_ratio` is the ratio the search reached on fresh copies of the query (not the copies
    the gradient was averaged over) and `probes` the number of loss evaluations it took; `loss_ratio` (on the fixed
    protocol draws) can differ slightly. `passed`: `loss_ratio` reached `MIN_QUERY_LOSS_RATIO` (else no attribution).
    """

    delta: dict[str, torch.Tensor]
    query_loss_before: float
    query_loss_after: float
    seconds: float
    lr_used: float
    target_ratio: float | None = None
    search_ratio: float | None = None
    probes: int = 0

    @property
    def loss_ratio(self) -> float:
        return query_loss_ratio(self.query_loss_after, self.query_loss_before)

    @property
    def passed(self) -> bool:
        """Whether the unlearning is strong enough to attribute from (DESIGN §1: one minimum, every path)."""
        return unlearning_passed(self.loss_ratio)


def unlearning_passed(loss_ratio: float) -> bool:
    """The one test of the minimum: a query-loss ratio on the protocol draws of at least `MIN_QUERY_LOSS_RATIO`."""
    return bool(loss_ratio >= MIN_QUERY_LOSS_RATIO)


def query_loss(adapter: DiTAdapter, query: ItemBatch, protocol: LossProtocol, compute: Compute, mask: bool) -> float:
    """The query's mean loss over its fixed protocol draws, at the protocol's precision."""
    return float(batch_losses(adapter, query, protocol, compute).select(mask).mean())


def random_copies(
    adapter: DiTAdapter, n: int, generator: torch.Generator, rows: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` random `(t, ε)` copies, the same for each of the query's `rows` windows: `t` [rows, n], `ε` [rows, n, …]."""
    t = adapter.objective.sample_t(n, generator).view(1, n)
    eps = torch.randn(1, n, *adapter.latent_shape, generator=generator)
    return t.expand(rows, n), eps.expand(rows, *eps.shape[1:])


def search_lr(
    ratio_at: Callable[[float], float], settings: UnlearningSettings, query_id: str
) -> tuple[float, float, int]:
    """`(lr, ratio, probes)`: bracket the target by factors of 4 from `settings.lr`, then bisect in log-lr."""
    low, high = settings.ratio_band()
    lr_min, lr_max = settings.lr_min, settings.lr_max
    lr = min(max(settings.lr, lr_min), lr_max)
    below = above = None  # the closest lrs known to give a ratio below / above the band
    for probes in range(1, MAX_PROBES + 1):
        ratio = ratio_at(lr)
        log.debug("query %s: lr %.4g gives query-loss ratio %.4f", query_id, lr, ratio)
        if low <= ratio <= high:
            return lr, ratio, probes
        if ratio < low:  # a NaN or inf ratio counts as too strong
            below = lr
        else:
            above = lr
        if below is not None and above is not None:
            lr = math.sqrt(below * above)
        elif above is None and lr >= lr_max:
            raise UnlearningStrengthError(
                f"query {query_id}: the query loss rose only ×{ratio:.4f} at the largest lr {lr_max:g} (target "
                f"×{settings.target_ratio}): raise lr_max, choose a larger param_subset, or lower target_ratio"
            )
        elif below is None and lr <= lr_min:
            raise UnlearningStrengthError(
                f"query {query_id}: the query loss rose ×{ratio:.4f} already at the smallest lr {lr_min:g} (target "
                f"×{settings.target_ratio}): lower lr_min or raise target_ratio"
            )
        else:
            lr = min(lr * BRACKET_FACTOR, lr_max) if above is None else max(lr / BRACKET_FACTOR, lr_min)
    raise UnlearningStrengthError(
        f"query {query_id}: no lr between {below} and {above} gave a query-loss ratio within "
        f"{low:.4f}–{high:.4f} after "
        f"{MAX_PROBES} probes (the ratio is not monotone in lr here): widen ratio_tolerance or use a fixed lr"
    )


def _fixed_lr_delta(adapter, query, params, f_hat, settings, compute, n_train, gen) -> dict[str, torch.Tensor]:
    """`settings.steps` steps of the recipe at the fixed `settings.lr`."""
    theta0 = {n: p.detach().clone() for n, p in params.items()}
    mask = query.frame_mask if settings.masks_unlearning else None
    opt = None
    if settings.recipe == "ewc_ascent":
        cls = torch.optim.Adam if settings.optimizer == "adam" else torch.optim.SGD
        opt = cls(list(params.values()), lr=settings.lr)
    try:
        for step in range(settings.steps):
            t, eps = random_copies(adapter, settings.query_draws, gen, len(query))
            q = ItemBatch(query.item_ids, query.latents, query.conditioning, mask)
            z, cond, tt, ee, m = expand_draws(q, t, eps, adapter.device)
            if settings.recipe == "newton":
                loss_q, grads = mean_loss_grads(
                    adapter, (z, cond, tt, ee, m), m, list(params.values()), compute.backward_rows, compute.autocast
                )
            else:
                with compute.autocast():
                    loss_q = diffusion_loss(adapter, z, cond, tt, ee, m).mean()
            if not torch.isfinite(loss_q):
                raise AttributionInputError(f"query {query.item_ids[0]}: non-finite loss at unlearning step {step}")
            if settings.recipe == "newton":
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
        return {n: (p.detach() - theta0[n]).cpu() for n, p in params.items()}
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(theta0[n])
        adapter.denoiser.zero_grad(set_to_none=True)


def _targeted_newton_delta(
    adapter, query, params, f_hat, settings, compute, n_train, gen
) -> tuple[dict, float, float, int]:
    """One Newton step whose lr is searched (`search_lr`) on fresh copies of the query: `(delta, lr, ratio, probes)`.

    The direction `F⁻¹g` is computed once, on `query_draws` random copies; each probe scales it and evaluates the query
    loss (padding masked as for the reported loss) on `query_draws` further copies drawn after them, so the ratio that
    decides a probe is out of sample (an in-sample ratio is optimistic: DESIGN §1).
    """
    step = expand_draws(query, *random_copies(adapter, settings.query_draws, gen, len(query)), adapter.device)
    fresh = expand_draws(query, *random_copies(adapter, settings.query_draws, gen, len(query)), adapter.device)
    loss_mask = fresh[4] if settings.masks_losses else None

    def loss_on(draws: tuple, mask: torch.Tensor | None) -> torch.Tensor:
        # the step and its search on random copies of the query: the compute's autocast (not protocol losses)
        return mean_loss(adapter, draws, mask, compute.backward_rows, compute.autocast)

    # the gradient in passes of compute.backward_rows rows; each parameter's is divided by F̂ + d in place as backward
    # finishes it (the Fisher read one tensor at a time): direction, gradient and Fisher are never held side by side
    names, direction = list(params), {}

    def precondition(index: int, g: torch.Tensor) -> None:
        direction[names[index]] = g.float().div_(f_hat[names[index]] + settings.damping)

    loss_q, _ = mean_loss_grads(
        adapter,
        step,
        step[4] if settings.masks_unlearning else None,
        list(params.values()),
        compute.backward_rows,
        compute.autocast,
        consume=precondition,
    )
    if not torch.isfinite(loss_q):
        raise AttributionInputError(f"query {query.item_ids[0]}: non-finite loss at unlearning step 0")
    direction = {  # a parameter the loss does not reach has a zero gradient, as autograd.grad's materialized one
        n: direction.pop(n) if n in direction else torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()
    }
    f_hat.release()  # the Fisher is not needed for the search: freed here when the caller passed it without keeping it
    with torch.no_grad():
        base = float(loss_on(fresh, loss_mask))
        # each probe reads the weights as θ0 + (lr / N)·direction when a forward uses them: no saved θ0, no moved model
        with shifted_parameters(adapter.denoiser, direction) as shifts:

            def ratio_at(lr: float) -> float:
                for shift in shifts.values():
                    shift.scale = lr / n_train
                return float(loss_on(fresh, loss_mask)) / base

            lr, ratio, probes = search_lr(ratio_at, settings, query.item_ids[0])
    return {n: d.mul_(lr / n_train).cpu() for n, d in direction.items()}, lr, ratio, probes


def model_sized_sets(settings: UnlearningSettings) -> int:
    """Sets of tensors the size of the parameter subset that unlearning adds to the loaded model: the direction (newton
    with a target_ratio: the gradient is divided in place and the weights are read shifted, never copied); with a fixed
    lr the saved θ0 and the gradient, and for ewc_ascent with adam its two moment estimates."""
    if settings.target_ratio is not None:
        return 1
    return 4 if settings.recipe == "ewc_ascent" and settings.optimizer == "adam" else 2


def unlearn(
    adapter: DiTAdapter,
    query: ItemBatch,
    fisher: Mapping[str, torch.Tensor],
    settings: UnlearningSettings,
    protocol: LossProtocol,
    compute: Compute,
    n_train: int,
) -> UnlearningResult:
    """Fine-tune the model to forget `query` and return the delta; the model is left unchanged.

    `query` is one clip: one row, or the windows of a long clip (all rows share the query's id), whose mean loss rises.

    With `settings.target_ratio` the lr is searched per query on fresh random copies of it; the reported
    `loss_ratio` is measured on the fixed protocol draws and can differ slightly from the target (`passed` says whether
    it reached the minimum every path applies).
    """
    if len(set(query.item_ids)) != 1:
        raise ValueError(f"unlearn takes one query (its windows share one id), got ids {sorted(set(query.item_ids))}")
    start = time.perf_counter()
    params = adapter.parameter_subset(settings.param_subset)
    missing = sorted(set(params) - set(fisher))
    if missing:
        raise ValueError(f"the Fisher does not cover parameter subset {settings.param_subset!r} ({missing[0]} …)")
    require_memory(
        adapter.device,
        model_sized_sets(settings),
        sum(p.numel() * 4 for p in params.values()),  # fp32 gradients, direction, saved weights
        f"unlearning query {query.item_ids[0]} (recipe {settings.recipe}, param_subset {settings.param_subset!r})",
        "choose a smaller param_subset in the configuration (attention, cross_attention, cross_attention_kv) or a "
        "recipe with a target_ratio (newton, one set), or free memory; TDA_GRAD_ROWS lowers the activations on top",
    )
    before = query_loss(adapter, query, protocol, compute, settings.masks_losses)
    # per tensor when read (from storage too, when `fisher` is read lazily): no second copy, never the whole Fisher
    f_hat = NormalizedFisher(fisher, adapter.device, names=params)
    del fisher  # only f_hat refers to it now (a caller that passes `step.fisher()` inline lets the search free it)
    gen = torch.Generator().manual_seed(settings.seed)
    lr, search_ratio, probes = settings.lr, None, 0
    if settings.target_ratio is None:
        delta = _fixed_lr_delta(adapter, query, params, f_hat, settings, compute, n_train, gen)
    else:
        delta, lr, search_ratio, probes = _targeted_newton_delta(
            adapter, query, params, f_hat, settings, compute, n_train, gen
        )
    with apply_delta(adapter.denoiser, delta):
        after = query_loss(adapter, query, protocol, compute, settings.masks_losses)
    return UnlearningResult(
        delta, before, after, time.perf_counter() - start, lr, settings.target_ratio, search_ratio, probes
    )
