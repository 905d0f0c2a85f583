"""Materializing the graph phase by phase on a Dagster instance: used by `tda demo`, `tda grid` and the tests."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from dagster import (
    DagsterInstance,
    Definitions,
    RunConfig,
    SensorResult,
    build_sensor_context,
    materialize,
)

from .configs import UNLEARNING_ASSETS, UnlearningConfig, unlearning_run_config
from .definitions import ASSETS, build_definitions
from .partitions import SHARD_KEYS, queries
from .sensors import query_inbox_sensor

QUERY_ASSETS = ["query_clips", *UNLEARNING_ASSETS, "similarity_scores"]


def with_console_level(run_config: RunConfig | dict | None, log_level: str) -> dict:
    """The run config as a dict whose console logger logs at `log_level` unless it sets loggers itself."""
    config = run_config.to_config_dict() if isinstance(run_config, RunConfig) else dict(run_config or {})
    if not config.get("loggers"):  # RunConfig.to_config_dict() gives an empty `loggers`: fill that too
        config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    return config


@dataclass
class Runner:
    """Runs selections of the asset graph with `materialize()` on one instance and one set of resources."""

    instance: DagsterInstance
    defs: Definitions
    log: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    log_level: str = "INFO"

    @classmethod
    def create(cls, instance: DagsterInstance, storage_url: str | None = None, log: Callable[[str], None] = print) -> "Runner":
        return cls(instance, build_definitions(storage_url), log)

    @property
    def resources(self) -> dict:
        return self.defs.resources

    def run(self, selection: list[str], partition_key: str | None = None, run_config: RunConfig | dict | None = None):
        """Materialize `selection` (asset names) for one partition; raises if the run fails, else returns its result."""
        from . import checks

        config = with_console_level(run_config, self.log_level)
        result = materialize(
            ASSETS + [checks.manifest_is_sound], selection=selection, partition_key=partition_key, instance=self.instance,
            resources=self.resources, run_config=config, raise_on_error=True,
        )
        if not result.success:
            raise RuntimeError(f"run of {selection} ({partition_key}) failed")
        return result

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        self.log(f"==> {name}")
        start = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - start
        self.log(f"    {name}: {self.timings[name]:.1f}s")

    def training_side(self, manifest_config: dict | None = None, skip: frozenset[str] = frozenset()) -> None:
        """Manifest, features of every shard, checkpoint, Fisher and baseline losses of every shard (minus `skip`)."""
        cfg = {"ops": {"training_manifest": {"config": manifest_config}}} if manifest_config else None
        phases = {
            "training_manifest": lambda: self.run(["training_manifest"], run_config=cfg),
            "training_features": lambda: [self.run(["training_features"], s) for s in SHARD_KEYS],
            "checkpoint": lambda: self.run(["checkpoint"]),
            "fisher_diagonal": lambda: self.run(["fisher_diagonal"]),
            "baseline_losses": lambda: [self.run(["baseline_losses"], s) for s in SHARD_KEYS],
        }
        for name, fn in phases.items():
            if name not in skip:
                self.phase(name, fn)

    def training_side_if_needed(self, manifest_config: dict | None = None) -> None:
        """The training side, skipping each phase whose outputs already exist under the storage root.

        Once the checkpoint must be (re)built, every later phase runs again (they depend on it).
        """
        from . import tables
        from .store import read_checkpoint_pointer

        store = self.resources["storage"].storage()
        proto = self.resources["protocol"].protocol()
        have_manifest = store.exists(tables.manifest())
        have_features = have_manifest and all(store.exists(tables.features(s)) for s in SHARD_KEYS)
        pointer = read_checkpoint_pointer(store) if have_features and store.exists(tables.checkpoint_pointer()) else None
        have_fisher = pointer is not None and store.exists(tables.fisher(pointer["checkpoint_id"], proto.protocol_id))

        def baseline_current(shard: str) -> bool:
            key = tables.baseline_losses(shard)
            if pointer is None or not store.exists(key):
                return False
            df = store.read_parquet(key).select("checkpoint_id", "protocol_id").unique()
            return df.rows() == [(pointer["checkpoint_id"], proto.protocol_id)]

        have = {"training_manifest": have_manifest, "training_features": have_features, "checkpoint": pointer is not None,
                "fisher_diagonal": have_fisher, "baseline_losses": pointer is not None and all(map(baseline_current, SHARD_KEYS))}
        if all(have.values()):
            self.log(f"==> training side: already materialized (checkpoint {pointer['checkpoint_id']}), skipped")
            return
        self.training_side(manifest_config, skip=frozenset(name for name, done in have.items() if done))

    def sensor_tick(self) -> list[str]:
        """Evaluate the inbox sensor once: add its partitions and return the requested query ids."""
        context = build_sensor_context(instance=self.instance, resources={"storage": self.resources["storage"]})
        result = query_inbox_sensor(context)
        assert isinstance(result, SensorResult)
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(queries.name, list(request.partition_keys))
        return [r.partition_key for r in result.run_requests or []]

    def attribute(self, query_id: str, config: UnlearningConfig | None = None) -> None:
        """The sensor's run for one query: clip, unlearning, losses, attribution, similarity."""
        self.run(QUERY_ASSETS, query_id, unlearning_run_config(config) if config else None)

    def attribute_config(self, query_id: str, config: UnlearningConfig) -> None:
        """Only the per-configuration assets of a query (its clip must exist)."""
        self.run(list(UNLEARNING_ASSETS), query_id, unlearning_run_config(config))

    def grid(self, configs: list[UnlearningConfig], query_ids: list[str], force: bool = False, report: bool = True) -> list:
        """Every configuration for every query (recorded ones skipped unless `force`), then `consistency_report`."""
        from .grid import run_grid

        return run_grid(self, configs, query_ids, force=force, report=report)

    def counterfactual(self, **config: object):
        """The `counterfactual` asset with `CounterfactualConfig` fields (query_ids, k, train_steps, …); returns the run's result."""
        return self.run(["counterfactual"], run_config={"ops": {"counterfactual": {"config": {k: v for k, v in config.items() if v is not None}}}})
