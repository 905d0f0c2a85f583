"""The diagonal Fisher `F = mean_i (∇θ ℓ_i(θ0))²` over a sample of training items, on a parameter subset."""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, Mapping

import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .losses import expand_draws, mean_loss_grads
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
            draws = expand_draws(item, t[i : i + 1], eps[i : i + 1], adapter.device)

            def add_square(index: int, g: torch.Tensor) -> None:
                acc[names[index]] += g.float().pow(2)

            # the unlearning step's curvature: the compute's precision, as the step itself; each parameter's gradient
            # is squared into the sum as backward produces it (the whole gradient is never held beside the sum)
            mean_loss_grads(
                adapter,
                draws,
                None,
                [params[n] for n in names],
                compute.backward_rows,
                compute.autocast,
                consume=add_square,
            )
            seen += 1
        if max_items is not None and seen >= max_items:
            break
    if seen == 0:
        raise ValueError("fisher_diagonal needs at least one training item")
    log.info("fisher_diagonal: %d items, %d parameters (%s)", seen, sum(a.numel() for a in acc.values()), param_subset)
    return {n: a.div_(seen).cpu() for n, a in acc.items()}  # in place: no second copy of the sum


MEDIAN_SAMPLE = 10**7  # the median of a larger Fisher is taken over this many evenly strided values


def fisher_summary(fisher: Mapping[str, torch.Tensor]) -> dict[str, float | int]:
    """`parameters`, `mean`, `median` and `max` of the Fisher, tensor by tensor (no concatenated copy); the median is
    exact up to MEDIAN_SAMPLE values, else that of every ⌈D / MEDIAN_SAMPLE⌉-th value."""
    count = sum(f.numel() for f in fisher.values())
    stride = max(1, -(-count // MEDIAN_SAMPLE))
    sample = (
        torch.cat([f.flatten()[::stride] for f in fisher.values()])
        if stride > 1
        else torch.cat([f.flatten() for f in fisher.values()])
    )
    return {
        "parameters": count,
        "mean": float(sum(f.double().sum() for f in fisher.values()) / max(count, 1)),
        "median": float(sample.median()),
        "max": float(max(f.max() for f in fisher.values())),
    }


def fisher_mean(fisher: Mapping[str, torch.Tensor]) -> float:
    """The Fisher's mean over the given tensors (ValueError when it is not positive)."""
    total, count = 0, 0
    for f in fisher.values():  # one pass: a Fisher read from storage tensor by tensor is read once
        total, count = total + f.sum(), count + f.numel()
    mean = float(total) / max(count, 1)
    if not mean > 0:
        raise ValueError("the Fisher diagonal is zero everywhere: the parameter subset does not affect the loss")
    return mean


def normalized_fisher(fisher: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Fisher scaled to mean 1 over the subset, so `λ`, `lr` and damping mean the same on any model."""
    mean = fisher_mean(fisher)
    return {n: f / mean for n, f in fisher.items()}


class NormalizedFisher(Mapping[str, torch.Tensor]):
    """`normalized_fisher` computed per tensor when read (on `device`), bit for bit the same values: at Stable Audio
    Open's size a second copy of the Fisher is 4.2 GB, so the engine reads it lazily instead of holding both.

    `names` restricts it to a parameter subset; a Fisher that is not a dict (one read from storage tensor by tensor)
    is then viewed, not copied, so it is never whole in memory."""

    def __init__(
        self,
        fisher: Mapping[str, torch.Tensor],
        device: torch.device | str | None = None,
        names: Iterable[str] | None = None,
    ) -> None:
        if names is not None:
            names = list(names)
            fisher = {n: fisher[n] for n in names} if isinstance(fisher, dict) else _Subset(fisher, names)
        self._fisher, self._device, self.mean = fisher, device, fisher_mean(fisher)

    def __getitem__(self, name: str) -> torch.Tensor:
        f = self._fisher[name]
        return (f if self._device is None else f.to(self._device)) / self.mean

    def release(self) -> None:
        """Drop the reference to the Fisher's tensors (freed then unless the caller holds them); reads fail after it."""
        self._fisher = {}

    def __iter__(self) -> Iterator[str]:
        return iter(self._fisher)

    def __len__(self) -> int:
        return len(self._fisher)


class _Subset(Mapping[str, torch.Tensor]):
    """The tensors of `names` in a mapping, read from it when asked for."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], names: list[str]) -> None:
        self._tensors, self._names, self._kept = tensors, names, set(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._kept:
            raise KeyError(name)
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
