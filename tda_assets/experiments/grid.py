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

from tda_assets.attribution.settings import query_loss_ratio
from tda_assets.data.query_state import MIN_QUERY_LOSS_RATIO, QueryState, config_states
from tda_assets.defs.configs import UnlearningConfig, record_config
from tda_assets.defs.partitions import queries as queries_partitions
from tda_assets.io.artifacts import Identity
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import list_keys, read_table, table_exists

from .runner import Runner

Log = Callable[[str], None]


@dataclass
class GridRun:
    """One (query, configuration) of the grid: its state after the grid (`attributed`, `failed_check` or `error`),
    and whether the grid ran it now or found its result recorded."""

    query_id: str
    config_id: str
    state: QueryState
    ran: bool = True
    seconds: float = 0.0
    loss_ratio: float | None = None
    message: str = ""

    @property
    def label(self) -> str:
        """The state as the grid prints it: `attributed`, or `attributed (recorded)` when found, not run."""
        return str(self.state) if self.ran else f"{self.state} (recorded)"


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


def stale_configs(root: Storage, configs: list[UnlearningConfig]) -> set[str]:
    """Configurations whose recorded `unlearning_configs` row differs from the grid file's (their runs are redone)."""
    stale = set()
    for cfg in configs:
        if (
            table_exists(root, "unlearning_configs", config_id=cfg.config_id)
            and read_table(root, "unlearning_configs", config_id=cfg.config_id).to_dicts() != cfg.row().to_dicts()
        ):
            stale.add(cfg.config_id)
    return stale


def recorded_run(root: Storage, query_id: str, config_id: str, identity: Identity) -> dict | None:
    """The pair's `unlearning_runs` row under `identity`, or None when it has not run under it."""
    keys = {**identity.keys(), "query_id": query_id, "config_id": config_id}
    if not table_exists(root, "unlearning_runs", **keys):
        return None
    return {**read_table(root, "unlearning_runs", **keys).row(0, named=True), **identity.keys()}


def loss_ratio(run: dict | None) -> float | None:
    """Query loss after / before unlearning of a recorded run."""
    return None if run is None else float(query_loss_ratio(run["query_loss_after"], run["query_loss_before"]))


def has_current_attribution(root: Storage, query_id: str, config_id: str, identity: Identity) -> bool:
    """Whether the query has an attribution of this configuration computed under `identity`."""
    return table_exists(root, "attribution_scores", **identity.keys(), query_id=query_id, config_id=config_id)


def recorded_results(root: Storage, identity: Identity) -> dict[tuple[str, str], GridRun]:
    """The (query, configuration) pairs with a result under `identity` (`attributed` or `failed_check`, as
    `tda queries` shows them): the grid does not run them again."""
    states = config_states(root, identity.checkpoint_id, identity.protocol_id, MIN_QUERY_LOSS_RATIO)
    return {pair: GridRun(*pair, s.state, False, 0.0, s.loss_ratio) for pair, s in states.items() if s.state.is_result}


def ensure_query(runner: Runner, root: Storage, query_id: str) -> None:
    """The query's clip and similarity scores (once per query, whatever the configuration)."""
    if not root.exists(key("query_features", query_id=query_id)):
        runner.run(["query_clips"], query_id)
    if not list_keys(root, "similarity_scores", query_id=query_id):
        runner.run(["similarity_scores"], query_id)


def _forget_attribution(root: Storage, query_id: str, config_id: str, identity: Identity) -> None:
    """After a failed unlearning, drop an older attribution of the pair under `identity` so no table mixes the two."""
    root.delete(key("attribution_scores", **identity.keys(), query_id=query_id, config_id=config_id))


def _first_line(exc: Exception) -> str:
    """An exception as one line: its type and the first line of its message."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"


def grid_identity(runner: Runner) -> Identity:
    """The checkpoint and loss protocol the grid's results are computed and recorded under."""
    protocol_id = runner.resources["protocol"].protocol().protocol_id
    return Identity(read_checkpoint_record(runner.root).checkpoint_id, protocol_id)


def configs_to_redo(root: Storage, configs: list[UnlearningConfig], force: bool, log: Log) -> set[str]:
    """The configurations whose recorded runs do not count (all with `force`, else those changed in the grid file)."""
    if force:
        return {cfg.config_id for cfg in configs}
    stale = stale_configs(root, configs)
    for cid in sorted(stale):
        log(f"    configuration {cid!r} changed in the grid file since its last run: its runs are redone")
    return stale


def register_grid(runner: Runner, configs: list[UnlearningConfig], query_ids: list[str]) -> None:
    """Record every configuration and add every (query × config) partition: the grid shows in the UI, launchable."""
    for cfg in configs:
        record_config(runner.root, cfg)
        for qid in query_ids:
            runner.add_partitions(qid, cfg.config_id)


def run_pair(runner: Runner, identity: Identity, query_id: str, cfg: UnlearningConfig) -> GridRun:
    """Run one (query, configuration): `attributed`, `failed_check` (the blocking check stopped it) or `error`."""
    root, cid, start = runner.root, cfg.config_id, time.perf_counter()
    state, message = QueryState.ATTRIBUTED, ""
    try:
        runner.attribute_config(query_id, cfg)
    except DagsterAssetCheckFailedError:
        state = QueryState.FAILED_CHECK
        message = "unlearning did not raise the query loss enough (blocking check query_loss_raised)"
    except Exception as exc:  # noqa: BLE001 - one broken configuration must not stop the grid
        state, message = QueryState.ERROR, _first_line(exc)
    if state is not QueryState.ATTRIBUTED:
        _forget_attribution(root, query_id, cid, identity)
    ratio = loss_ratio(recorded_run(root, query_id, cid, identity))
    return GridRun(query_id, cid, state, True, time.perf_counter() - start, ratio, message)


def log_run(log: Log, n: int, total: int, run: GridRun) -> None:
    """One line for a run the grid made: its place in the grid, state, loss ratio, seconds and message."""
    ratio = f"×{run.loss_ratio:.2f}" if run.loss_ratio is not None else "—"
    log(
        f"    grid {n}/{total} {run.query_id} / {run.config_id}: {run.state} (query loss {ratio}) in "
        f"{run.seconds:.1f}s" + (f" — {run.message}" if run.message else "")
    )


def prepare_query(runner: Runner, query_id: str, configs: list[UnlearningConfig], log: Log) -> list[GridRun]:
    """Make the query's clip and similarity scores; when that fails, an `error` run for each configuration."""
    try:
        ensure_query(runner, runner.root, query_id)
        return []
    except Exception as exc:  # noqa: BLE001 - a broken query must not stop the other queries
        message = f"query_clips/similarity_scores failed: {_first_line(exc)}"
    log(f"    grid {query_id}: {message}")
    return [GridRun(query_id, cfg.config_id, QueryState.ERROR, True, 0.0, None, message) for cfg in configs]


def run_grid(
    runner: Runner,
    configs: list[UnlearningConfig],
    query_ids: list[str],
    force: bool = False,
    report: bool = True,
    log: Log | None = None,
) -> list[GridRun]:
    """Run every configuration for every query (skipping recorded ones unless `force`), then `consistency_report`."""
    log = log or runner.log
    identity = grid_identity(runner)
    redo = configs_to_redo(runner.root, configs, force, log)
    register_grid(runner, configs, query_ids)
    results: list[GridRun] = []
    for qi, qid in enumerate(query_ids):
        failed = prepare_query(runner, qid, configs, log)
        if failed:
            results += failed
            continue
        recorded = recorded_results(runner.root, identity)
        for ci, cfg in enumerate(configs):
            run = recorded.get((qid, cfg.config_id)) if cfg.config_id not in redo else None
            if run is None:
                run = run_pair(runner, identity, qid, cfg)
                log_run(log, qi * len(configs) + ci + 1, len(configs) * len(query_ids), run)
            results.append(run)
    if report:
        runner.phase("consistency_report", lambda: runner.run(["consistency_report"]))
    return results


GRID_STATES = (QueryState.ATTRIBUTED, QueryState.FAILED_CHECK, QueryState.ERROR)  # where a grid run ends


def summary(results: list[GridRun]) -> pl.DataFrame:
    """One row per configuration: pairs run now and found recorded, how many end in each grid state, the mean loss
    ratio and the mean seconds per run made now."""
    df = pl.DataFrame(
        [{**r.__dict__, "state": r.state.value} for r in results],
        schema={
            "query_id": pl.Utf8,
            "config_id": pl.Utf8,
            "state": pl.Utf8,
            "ran": pl.Boolean,
            "seconds": pl.Float64,
            "loss_ratio": pl.Float64,
            "message": pl.Utf8,
        },
    )
    return df.group_by("config_id", maintain_order=True).agg(
        queries=pl.len(),
        ran=pl.col("ran").sum(),
        recorded=(~pl.col("ran")).sum(),
        **{state.value: (pl.col("state") == state.value).sum() for state in GRID_STATES},
        mean_loss_ratio=pl.col("loss_ratio").mean(),
        seconds_per_run=pl.col("seconds").filter(pl.col("ran")).mean(),
    )
