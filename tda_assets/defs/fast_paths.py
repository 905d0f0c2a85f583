"""What the per-configuration assets read for the fast paths (DESIGN §1): the `linearized` scores of a query from the
stored training gradients, and the cheap signals that choose a `two_stage` configuration's candidates."""

from __future__ import annotations

import numpy as np
import torch

from tda_assets.attribution.gradients import GradientSpec, GradientStore
from tda_assets.attribution.linearized import linearized_scores
from tda_assets.attribution.scores import score_columns
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.io.artifacts import Identity, IdentityError, read_fisher
from tda_assets.io.gradients import missing_gradient_shards, read_gradient_norms, read_gradient_store
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, table_exists

SIGNAL_METHODS = (
    "similarity:internal",
    "similarity:audio",
)  # DESIGN §1: the cheap signals besides the linearized score


def scoring_gradients(
    root: Storage, identity: Identity, settings: UnlearningSettings, encoder_id: str, item_ids: list[str]
) -> GradientStore | None:
    """The configuration's training_gradients store with its rows, in `item_ids` order, read once per step: for the
    `linearized` method (IdentityError naming the fix when missing) and for `two_stage` when it exists (the linearized
    signal); else None (the normalized score alone reads only the stored norms: `item_norms`)."""
    spec = GradientSpec.for_settings(settings)
    optional = settings.stage == "two_stage" and not missing_gradient_shards(root, identity, spec, encoder_id)
    if not (settings.method == "linearized" or optional):
        return None
    return read_gradient_store(root, identity, spec, read_fisher(root, identity), encoder_id, item_ids)


def item_norms(
    root: Storage,
    identity: Identity,
    settings: UnlearningSettings,
    encoder_id: str,
    item_ids: list[str],
    gradients: GradientStore | None = None,
) -> np.ndarray | None:
    """The items' gradient norms score_type `normalized` divides by, from the rows already read (`gradients`) or else
    the store's stored norms (IdentityError naming the fix when the store is missing); None for the other score
    types."""
    if settings.score_type != "normalized":
        return None
    if gradients is not None:
        return gradients.item_norms
    return read_gradient_norms(root, identity, GradientSpec.for_settings(settings), encoder_id, item_ids)


def similarity_signal(root: Storage, identity: Identity, query_id: str, method: str, item_ids: list[str]) -> np.ndarray:
    """The query's `similarity_scores` of `method` in `item_ids` order, of this identity (IdentityError otherwise)."""
    fix = f"materialize similarity_scores for query {query_id!r} (it runs with query_clips)"
    if not table_exists(root, "similarity_scores", query_id=query_id, method=method):
        raise IdentityError(f"two_stage needs the query's {method} scores, and {query_id!r} has none: {fix}")
    df = read_table(root, "similarity_scores", query_id=query_id, method=method)
    got = (df["checkpoint_id"][0], df["protocol_id"][0]) if len(df) else (None, None)
    if got != (identity.checkpoint_id, identity.protocol_id):
        raise IdentityError(
            f"the {method} scores of {query_id!r} are of checkpoint {got[0]}, protocol {got[1]}, not {identity}: {fix}"
        )
    scores = dict(zip(df["item_id"].to_list(), df["score"].to_list()))
    absent = [i for i in item_ids if i not in scores]
    if absent:
        raise IdentityError(
            f"the {method} scores of {query_id!r} lack {len(absent)} training items (e.g. {absent[:3]}): {fix}"
        )
    return np.array([scores[i] for i in item_ids], dtype=np.float64)


def cheap_signals(
    root: Storage,
    identity: Identity,
    query_id: str,
    delta: dict[str, torch.Tensor],
    item_ids: list[str],
    gradients: GradientStore | None,
    baseline: np.ndarray,
    score_type: str,
    norms: np.ndarray | None,
) -> dict[str, np.ndarray]:
    """Internal and audio similarity, plus `linearized` when the configuration's gradient store was read (`gradients`).

    The linearized `g_iᵀδ` estimates `mean_delta`, so it enters as the configuration's own score of it (`score_columns`:
    for `normalized`, divided by the same floored item norms), and the candidates are the items the final score can
    lift. The similarities are cosines already, scale-free in the item, and enter as they are.
    """
    signals = {m: similarity_signal(root, identity, query_id, m, item_ids) for m in SIGNAL_METHODS}
    if gradients is not None:
        first_order = linearized_scores(gradients, delta)
        signals["linearized"] = score_columns(baseline, score_type, norms, mean_delta=first_order)["score"]
    return signals
