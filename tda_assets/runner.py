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

from .configs import UnlearningConfig, unlearning_run_config
from .definitions import ASSETS, build_definitions
from .partitions import SHARD_KEYS, queries
from .sensors import query_inbox_sensor

QUERY_ASSETS = ["query_clips", "unlearned_model", "unlearned_losses", "attribution_scores", "similarity_scores"]
UNLEARNING_ASSETS = ["unlearned_model", "unlearned_losses", "attribution_scores"]


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

    def run(self, selection: list[str], partition_key: str | None = None, run_config: RunConfig | dict | None = None) -> None:
        """Materialize `selection` (asset names) for one partition; raises if the run fails."""
        from . import checks

        config = run_config.to_config_dict() if isinstance(run_config, RunConfig) else dict(run_config or {})
        config.setdefault("loggers", {"console": {"config": {"log_level": self.log_level}}})
        result = materialize(
            ASSETS + [checks.manifest_is_sound], selection=selection, partition_key=partition_key, instance=self.instance,
            resources=self.resources, run_config=config, raise_on_error=True,
        )
        if not result.success:
            raise RuntimeError(f"run of {selection} ({partition_key}) failed")

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        self.log(f"==> {name}")
        start = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - start
        self.log(f"    {name}: {self.timings[name]:.1f}s")

    def training_side(self, manifest_config: dict | None = None) -> None:
        """Manifest, features of every shard, checkpoint, Fisher and baseline losses of every shard."""
        cfg = {"ops": {"training_manifest": {"config": manifest_config}}} if manifest_config else None
        self.phase("training_manifest", lambda: self.run(["training_manifest"], run_config=cfg))
        self.phase("training_features", lambda: [self.run(["training_features"], s) for s in SHARD_KEYS])
        self.phase("checkpoint", lambda: self.run(["checkpoint"]))
        self.phase("fisher_diagonal", lambda: self.run(["fisher_diagonal"]))
        self.phase("baseline_losses", lambda: [self.run(["baseline_losses"], s) for s in SHARD_KEYS])

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
        self.run(UNLEARNING_ASSETS, query_id, unlearning_run_config(config))
