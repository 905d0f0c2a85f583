"""One query attributed exactly against a set of items held in memory (the self-influence and replication protocols)."""

from __future__ import annotations

import numpy as np
import torch

from .adapter import DiTAdapter, ItemBatch
from .devices import Compute
from .multifidelity import unlearned_losses_fn
from .protocol import LossProtocol
from .scores import attribution_scores
from .settings import UnlearningSettings
from .unlearn import UnlearningResult, unlearn


def attribute_exact(
    adapter: DiTAdapter,
    query: ItemBatch,
    items: ItemBatch,
    baseline: np.ndarray,
    fisher: dict[str, torch.Tensor],
    settings: UnlearningSettings,
    protocol: LossProtocol,
    compute: Compute,
    item_norms: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray] | None, UnlearningResult, np.ndarray | None]:
    """Unlearn `query`, rescore every item at every protocol draw, score against `baseline` [N, K] (`item_norms`: the
    items' gradient norms, needed by score_type `normalized`).

    Returns the scores (`attribution_scores`), the unlearning result and the unlearned losses [N, K]. An unlearning
    below the minimum every path applies (`result.passed` false: query-loss ratio under `MIN_QUERY_LOSS_RATIO` on the
    protocol draws) gives no attribution: the scores and losses are None (nothing rescored), the result keeps its ratio.
    """
    result = unlearn(adapter, query, fisher, settings, protocol, compute, n_train=len(items))
    if not result.passed:
        return None, result, None
    rescore = unlearned_losses_fn(adapter, items, result.delta, protocol, compute, settings.masks_losses)
    after = rescore(np.arange(len(items)), 0, protocol.draws)
    return attribution_scores(baseline, after, settings.score_type, item_norms), result, after
