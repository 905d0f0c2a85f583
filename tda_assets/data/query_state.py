"""Where each query stands in one storage root, read from the root alone: a query is pending when this root has no
result for it, whatever partitions a Dagster instance already knows (a new root, a failed or interrupted run)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import list_keys, read_tables

DEFAULT_CONFIG = "default"
MIN_QUERY_LOSS_RATIO = 1.05  # unlearning must raise the query loss at least this much (blocking check query_loss_raised)
STORAGE_TAG = "tda/storage_root"  # run tags tying a query run to its storage root and step (`clip` or `attribute`)
STEP_TAG = "tda/step"


@dataclass(frozen=True)
class ConfigState:
    """One (query, configuration) in this root: `attributed`, `failed_check` (unlearning too weak), `stale` (results of
    another checkpoint or loss protocol) or `pending` (no result); the loss ratio of its recorded unlearning."""

    query_id: str
    config_id: str
    state: str
    loss_ratio: float | None = None


def has_clip(store: Storage, query_id: str) -> bool:
    """Whether the query's clip (latent and conditioning) is in this root."""
    return store.exists(key("query_features", query_id=query_id))


def config_states(store: Storage, checkpoint_id: str | None, protocol_id: str, min_ratio: float) -> dict[tuple[str, str], ConfigState]:
    """The state of every (query, configuration) that has a recorded unlearning in this root."""
    runs = read_tables(store, "unlearning_runs")
    attributed = {(k["query_id"], k["config_id"]) for k in list_keys(store, "attribution_scores")}
    out = {}
    for r in runs.with_columns((pl.col("query_loss_after") / pl.col("query_loss_before")).alias("ratio")).iter_rows(named=True):
        pair = (r["query_id"], r["config_id"])
        if (r["checkpoint_id"], r["protocol_id"]) != (checkpoint_id, protocol_id):
            state = "stale"
        elif r["ratio"] < min_ratio:
            state = "failed_check"
        else:
            state = "attributed" if pair in attributed else "pending"
        out[pair] = ConfigState(*pair, state, float(r["ratio"]))
    return out


def pending_queries(store: Storage, query_ids: list[str], checkpoint_id: str | None, protocol_id: str, min_ratio: float,
                    config_id: str = DEFAULT_CONFIG) -> tuple[list[str], list[str]]:
    """The queries with no result of `config_id` in this root: `(without a clip, with a clip but no attribution)`.

    A failed check is a result (the run is not repeated); a stale one is not.
    """
    states = config_states(store, checkpoint_id, protocol_id, min_ratio)
    no_clip, no_attribution = [], []
    for qid in sorted(query_ids):
        state = states.get((qid, config_id))
        if state is not None and state.state in ("attributed", "failed_check"):
            continue
        (no_attribution if has_clip(store, qid) else no_clip).append(qid)
    return no_clip, no_attribution
