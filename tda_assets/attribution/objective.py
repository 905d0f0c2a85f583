"""The model's own training objective: how `x_t`, the target and the weight follow from `z`, `ε`, `t`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DiffusionObjective:
    """Continuous-time objective on t ∈ [0, 1] with the cosine schedule α = cos(πt/2), σ = sin(πt/2).

    `prediction` is `v` (Stable Audio Open: target α·ε − σ·z), `epsilon` (target ε) or `flow`
    (rectified flow: x_t = (1−t)·z + t·ε, target ε − z). Timesteps are drawn uniformly on [t_min, t_max].
    """

    prediction: str = "v"
    t_min: float = 0.0
    t_max: float = 1.0

    def __post_init__(self) -> None:
        if self.prediction not in ("v", "epsilon", "flow"):
            raise ValueError(f"unknown prediction type {self.prediction!r}: use 'v', 'epsilon' or 'flow'")

    def sample_t(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` timesteps from the objective's timestep distribution (uniform on [t_min, t_max])."""
        u = torch.rand(n, generator=generator)
        return self.t_min + (self.t_max - self.t_min) * u

    def make(
        self, z: torch.Tensor, eps: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return `(x_t, target, weight)` for latents `z` [n, C, T], noise `eps` and timesteps `t` [n]."""
        tt = t.to(z.dtype).view(-1, *([1] * (z.dim() - 1)))
        if self.prediction == "flow":
            return (1 - tt) * z + tt * eps, eps - z, torch.ones_like(t)
        alpha, sigma = torch.cos(tt * math.pi / 2), torch.sin(tt * math.pi / 2)
        x_t = alpha * z + sigma * eps
        target = alpha * eps - sigma * z if self.prediction == "v" else eps
        return x_t, target, torch.ones_like(t)
