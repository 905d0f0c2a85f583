"""The paper's grid search as runs of the asset graph: every configuration of the grid file for every selected query.

One run per (query, configuration) of the three per-configuration assets (`unlearned_model`,
`unlearned_losses`, `attribution_scores`) through the `Runner`, then `consistency_report` once. A run
whose unlearning is too weak fails the blocking `query_loss_raised` check: the grid records it (the
configuration is in `unlearning_runs` with its loss ratio, and has no attribution) and goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import polars as pl
from dagster._core.errors import (
    DagsterAssetCheckFailedError,
)  # raised by a failed blocking check; not in the public API

from tda_assets.data.query_state import MIN_QUERY_LOSS_RATIO
from tda_assets.defs.configs import UnlearningConfig, record_config
from tda_assets.defs.partitions import queries as queries_partitions
from tda_assets.io.artifacts import Identity
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import list_keys, read_table, table_exists

from .runner import Runner


@dataclass
class GridRun:
    """What happened to one (query, configuration) of the grid."""

    query_id: str
    config_id: str
    status: str  # done | skipped | check_failed | skipped_failed | error
    seconds: float = 0.0
    loss_ratio: float | None = None
    message: str = ""


def select_queries(runner: Runner, queries: str | list[str] | None = None) -> list[str]:
    """`None`/`all`: every `queries` partition (sorted); else the given ids, which must be partitions."""
    known = sorted(runner.instance.get_dynamic_partitions(queries_partitions.name))
    if queries is None or queries == "all":
        return known
    wanted = [q.strip() for q in (queries.split(",") if isinstance(queries, str) else queries) if q.strip()]
    unknown = [q for q in wanted if q not in known]
    if unknown:
        raise ValueError(
            f"unknown query id(s) {unknown}: known queries partitions are {known or 'none'} "
            "(add queries with `tda add-query`, then let the sensor or `tda demo` add them)"
        )
    return wanted


def stale_configs(store: Storage, configs: list[UnlearningConfig]) -> set[str]:
    """Configurations whose recorded `unlearning_configs` row differs from the grid file's (their runs are redone)."""
    stale = set()
    for cfg in configs:
        if (
            table_exists(store, "unlearning_configs", config_id=cfg.config_id)
            and read_table(store, "unlearning_configs", config_id=cfg.config_id).to_dicts() != cfg.row().to_dicts()
        ):
            stale.add(cfg.config_id)
    return stale


def recorded_run(store: Storage, query_id: str, config_id: str, identity: Identity) -> dict | None:
    """The pair's `unlearning_runs` row under `identity`, or None when it has not run under it."""
    keys = {**identity.keys(), "query_id": query_id, "config_id": config_id}
    if not table_exists(store, "unlearning_runs", **keys):
        return None
    return {**read_table(store, "unlearning_runs", **keys).row(0, named=True), **identity.keys()}


def loss_ratio(run: dict | None) -> float | None:
    """Query loss after / before unlearning of a recorded run."""
    return None if run is None else float(run["query_loss_after"] / run["query_loss_before"])


def has_current_attribution(store: Storage, query_id: str, config_id: str, identity: Identity) -> bool:
    """Whether the query has an attribution of this configuration computed under `identity`."""
    return table_exists(store, "attribution_scores", **identity.keys(), query_id=query_id, config_id=config_id)


def recorded_status(store: Storage, query_id: str, config_id: str, identity: Identity, run: dict | None) -> str | None:
    """`skipped` when the attribution exists, `skipped_failed` when a failed unlearning is recorded, else None.

    Only runs and attributions of the current checkpoint and protocol count.
    """
    if run is None or (run.get("checkpoint_id"), run.get("protocol_id")) != (
        identity.checkpoint_id,
        identity.protocol_id,
    ):
        return None
    if has_current_attribution(store, query_id, config_id, identity):
        return "skipped"
    return "skipped_failed" if loss_ratio(run) < MIN_QUERY_LOSS_RATIO else None


def ensure_query(runner: Runner, store: Storage, query_id: str) -> None:
    """The query's clip and similarity scores (once per query, whatever the configuration)."""
    if not store.exists(key("query_features", query_id=query_id)):
        runner.run(["query_clips"], query_id)
    if not list_keys(store, "similarity_scores", query_id=query_id):
        runner.run(["similarity_scores"], query_id)


def _forget_attribution(store: Storage, query_id: str, config_id: str, identity: Identity) -> None:
    """After a failed unlearning, drop an older attribution of the pair under `identity` so no table mixes the two."""
    store.delete(key("attribution_scores", **identity.keys(), query_id=query_id, config_id=config_id))


def run_grid(
    runner: Runner,
    configs: list[UnlearningConfig],
    query_ids: list[str],
    force: bool = False,
    report: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[GridRun]:
    """Run every configuration for every query (skipping recorded ones unless `force`), then `consistency_report`."""
    log = log or runner.log
    store = runner.storage
    identity = Identity(
        read_checkpoint_record(store).checkpoint_id, runner.resources["protocol"].protocol().protocol_id
    )
    stale = set() if force else stale_configs(store, configs)
    for cid in sorted(stale):
        log(f"    configuration {cid!r} changed in the grid file since its last run: its runs are redone")
    for cfg in configs:  # every (query × config) partition of the grid shows in the UI, launchable without run config
        record_config(store, cfg)
        for qid in query_ids:
            runner.add_partitions(qid, cfg.config_id)
    results: list[GridRun] = []
    total = len(configs) * len(query_ids)
    for qi, qid in enumerate(query_ids):
        try:
            ensure_query(runner, store, qid)
        except Exception as exc:  # noqa: BLE001 - a broken query must not stop the other queries
            message = (
                f"query_clips/similarity_scores failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            )
            log(f"    grid {qid}: {message}")
            results.extend(GridRun(qid, cfg.config_id, "error", 0.0, None, message) for cfg in configs)
            continue
        for ci, cfg in enumerate(configs):
            n = qi * len(configs) + ci + 1
            cid = cfg.config_id
            recorded = recorded_run(store, qid, cid, identity)
            status = None if force or cid in stale else recorded_status(store, qid, cid, identity, recorded)
            if status:
                results.append(GridRun(qid, cid, status, 0.0, loss_ratio(recorded)))
                continue
            start = time.perf_counter()
            ratio_now = lambda q=qid, c=cid: loss_ratio(recorded_run(store, q, c, identity))  # noqa: E731
            try:
                runner.attribute_config(qid, cfg)
                run = GridRun(qid, cid, "done", time.perf_counter() - start, ratio_now())
            except DagsterAssetCheckFailedError:
                _forget_attribution(store, qid, cid, identity)
                run = GridRun(
                    qid,
                    cid,
                    "check_failed",
                    time.perf_counter() - start,
                    ratio_now(),
                    "unlearning did not raise the query loss enough (blocking check query_loss_raised)",
                )
            except Exception as exc:  # noqa: BLE001 - one broken configuration must not stop the grid
                _forget_attribution(store, qid, cid, identity)
                run = GridRun(
                    qid,
                    cid,
                    "error",
                    time.perf_counter() - start,
                    ratio_now(),
                    f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}",
                )
            results.append(run)
            ratio = f"×{run.loss_ratio:.2f}" if run.loss_ratio is not None else "—"
            log(
                f"    grid {n}/{total} {qid} / {cid}: {run.status} (query loss {ratio}) in {run.seconds:.1f}s"
                + (f" — {run.message}" if run.message else "")
            )
    if report:
        runner.phase("consistency_report", lambda: runner.run(["consistency_report"]))
    return results


def summary(results: list[GridRun]) -> pl.DataFrame:
    """One row per configuration: runs done / skipped / failed, mean loss ratio, mean seconds per run."""
    df = pl.DataFrame(
        [r.__dict__ for r in results],
        schema={
            "query_id": pl.Utf8,
            "config_id": pl.Utf8,
            "status": pl.Utf8,
            "seconds": pl.Float64,
            "loss_ratio": pl.Float64,
            "message": pl.Utf8,
        },
    )
    ran = pl.col("status").is_in(["done", "check_failed", "error"])
    return df.group_by("config_id", maintain_order=True).agg(
        queries=pl.len(),
        done=(pl.col("status") == "done").sum(),
        skipped=pl.col("status").str.starts_with("skipped").sum(),
        check_failed=pl.col("status").is_in(["check_failed", "skipped_failed"]).sum(),
        errors=(pl.col("status") == "error").sum(),
        mean_loss_ratio=pl.col("loss_ratio").mean(),
        seconds_per_run=pl.col("seconds").filter(ran).mean(),
    )
