"""The `linearized` method (DESIGN §1): first-order loss change `g_iᵀ δ` of every item for the query's Newton step.

`δ = (lr/N)(F̂ + d)⁻¹ g_q` is exactly what `unlearn` returns for one `newton` step; `g_iᵀ δ ≈ ⟨S P g_i, S P⁻¹ δ⟩` with
the store's CountSketch `S` and preconditioner `P` (identity, or `(F̂ + d)^(-1/2)`, so `P⁻¹ δ = (lr/N) P g_q`), so a
query costs one query gradient (inside `unlearn`) and one [N, k] × [k] product. Any delta works (several steps,
`ewc_ascent`): the score is always the first-order loss change under it.
It is an influence function, not unlearning: agreement with the exact score holds only at a small step.
"""

from __future__ import annotations

import numpy as np
import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .gradients import GradientStore
from .protocol import LossProtocol
from .unlearn import UnlearningResult, UnlearningSettings, unlearn


def linearized_scores(gradients: GradientStore, delta: dict[str, torch.Tensor]) -> np.ndarray:
    """`⟨S P g_i, S P⁻¹ δ⟩` for every stored item: the first-order change of its protocol loss under the weight
    delta."""
    if set(delta) != set(gradients.sizes):
        raise ValueError(f"the delta's parameters are not the gradient store's subset {gradients.param_subset!r}")
    scale = gradients.scale or {}
    rows = {n: d.detach().float().cpu().reshape(1, -1) for n, d in delta.items()}
    rows = {n: r / scale[n].reshape(1, -1) if n in scale else r for n, r in rows.items()}
    s_delta = gradients.sketch.project(rows)
    return (gradients.sketched.float() @ s_delta[0]).numpy().astype(np.float64)


def linearized_query(
    adapter: DiTAdapter,
    query: ItemBatch,
    fisher: dict[str, torch.Tensor],
    settings: UnlearningSettings,
    protocol: LossProtocol,
    compute: Compute,
    n_train: int,
    gradients: GradientStore,
) -> tuple[np.ndarray, UnlearningResult]:
    """Linearized scores of every stored item for one query, and the unlearning step they linearize."""
    if settings.param_subset != gradients.param_subset or settings.masks_losses != gradients.masked:
        raise ValueError(
            f"gradient store is for subset {gradients.param_subset!r} (masked losses: {gradients.masked}), "
            f"settings ask for {settings.param_subset!r} (masked losses: {settings.masks_losses})"
        )
    if gradients.damping is not None and gradients.damping != settings.damping:
        raise ValueError(
            f"gradient store is preconditioned with damping {gradients.damping}, settings use {settings.damping}"
        )
    if gradients.protocol_id != protocol.protocol_id:
        raise ValueError(f"gradient store was built under protocol {gradients.protocol_id}, not {protocol.protocol_id}")
    result = unlearn(adapter, query, fisher, settings, protocol, compute, n_train)
    return linearized_scores(gradients, result.delta), result
