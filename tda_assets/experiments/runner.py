"""Materializing the graph phase by phase on a Dagster instance: used by the CLI (`tda demo`, `grid`, `evaluate`) and
tests."""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable

import polars as pl
from dagster import (
    AssetKey,
    DagsterInstance,
    Definitions,
    RunConfig,
    RunRequest,
    SensorResult,
    build_sensor_context,
    execute_job,
    materialize,
)
from dagster._core.definitions.reconstruct import (
    ReconstructableRepository,
)  # no public equivalent for a module's Definitions

from resources.env import Env
from tda_assets.definitions import build_definitions
from tda_assets.defs.run_health import process_tags, release_dead_runs
from tda_assets.defs.configs import UNLEARNING_ASSETS, UnlearningConfig, unlearning_run_config
from tda_assets.defs.partitions import SHARD_KEYS, configs, queries, query_config_key
from tda_assets.defs.query_runs import run_tags
from tda_assets.defs.sensors import (
    BATCH_ASSETS,
    CLIP_ASSETS,
    attribute_config_job,
    queries_of,
    query_batch_job,
    query_clip_job,
    query_inbox_sensor,
    query_of,
)
from tda_assets.data.query_state import MIN_QUERY_LOSS_RATIO, partition_tag, pending_queries
from tda_assets.attribution.gradients import GradientSpec
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.io.artifacts import (
    COMPUTE_PRECISION,
    Identity,
    embeddings_key,
    embeddings_match_features,
    manifest_digest,
    read_features,
    stale_baseline_shards,
)
from tda_assets.io.gradients import stale_gradient_shards
from tda_assets.io.checkpoints import embedded_checkpoint_id, read_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.io.legacy_layout import migrate_legacy_results
from tda_assets.io.tables import read_table, read_tables, table_exists
from tda_assets.models.embedded.model import TrainingSettings
from tda_assets.models.sources import ModelSource

from .supervise import SlotWaitTimeout, supervised

CODE_LOCATION = ReconstructableRepository.for_module(
    "tda_assets.definitions", "from_environment"
)  # rebuilt per process
ASSET_JOB = "__ASSET_JOB"  # the code location's implicit job of every asset, subset per run
TRAINING_PHASES = (
    "training_manifest",
    "training_features",
    "checkpoint",
    "fisher_diagonal",
    "baseline_losses",
    "training_embeddings",
    "training_gradients",
)
DEFAULT_GRADIENTS = GradientSpec.for_settings(UnlearningSettings())  # the store the default configuration's score reads


PHASE_NEEDS = {  # the training phases each phase reads: it runs again whenever one of them does
    "training_manifest": (),
    "training_features": ("training_manifest",),
    "checkpoint": ("training_features",),
    "fisher_diagonal": ("checkpoint",),
    "baseline_losses": ("training_features", "checkpoint"),
    "training_embeddings": ("training_features", "checkpoint"),
    "training_gradients": ("training_features", "checkpoint", "fisher_diagonal"),
}


def gradients_run_config(spec: GradientSpec) -> dict:
    """The run config of a training_gradients run that builds the store `spec` names."""
    return {"ops": {"training_gradients": {"config": vars(spec)}}}


def phases_to_run(have: dict[str, bool]) -> set[str]:
    """The training phases to run: those not current (`have`) and every phase downstream of one that runs."""
    run: set[str] = set()
    for name in TRAINING_PHASES:  # in dependency order
        if not have[name] or any(need in run for need in PHASE_NEEDS[name]):
            run.add(name)
    return run


def with_console_level(run_config: RunConfig | dict | None, log_level: str) -> dict:
    """The run config as a dict whose console logger logs at `log_level` unless it sets loggers itself."""
    config = run_config.to_config_dict() if isinstance(run_config, RunConfig) else dict(run_config or {})
    if not config.get("loggers"):  # RunConfig.to_config_dict() gives an empty `loggers`: fill that too
        config["loggers"] = {"console": {"config": {"log_level": log_level}}}
    return config


def current_training_phases(
    root: Storage, source: ModelSource, protocol_id: str, compute_precision: str | None = None
) -> dict[str, bool]:
    """Which training phases' outputs exist under the storage root *with the identity they would have now*.

    Features must come from the current encoders and the current manifest rows; the checkpoint must be the one
    the model source names (for the embedded model: trained on these features with these settings); the Fisher,
    every shard's baseline losses and every shard's training embeddings (made from its current features) must be of
    that checkpoint and protocol, and so must the default configuration's gradient store (built with the stored Fisher).
    """
    have = dict.fromkeys(TRAINING_PHASES, False)
    if not table_exists(root, "training_manifest"):
        return have
    have["training_manifest"] = True
    manifest = read_table(root, "training_manifest")
    encoder_id = source.encoder_id()

    def features_current(shard: str) -> bool:
        rows = manifest.filter(pl.col("shard") == shard)
        k = key("training_features", encoder_id=encoder_id, shard=shard)
        if rows.is_empty():
            return not root.exists(k)
        return root.exists(k) and read_features(root, k)[1].get("manifest_digest") == manifest_digest(rows)

    have["training_features"] = all(map(features_current, SHARD_KEYS))
    if not have["training_features"] or not root.exists(key("checkpoint_record")):
        return have
    record = read_checkpoint_record(root)
    if source.is_embedded:
        settings = TrainingSettings(steps=source.train_steps, seed=source.train_seed)
        wanted = embedded_checkpoint_id(root, encoder_id, asdict(settings))
        have["checkpoint"] = record.kind == "embedded" and record.checkpoint_id == wanted
    else:
        have["checkpoint"] = record.kind == "external" and record.checkpoint_id == source.resolve().checkpoint_id
    if not have["checkpoint"]:
        return have
    identity = Identity(record.checkpoint_id, protocol_id)
    fisher_key = key("fisher_diagonal", **identity.keys())
    # a Fisher estimated in another compute precision than this step's is re-estimated (read_fisher refuses it)
    have["fisher_diagonal"] = root.exists(fisher_key) and (
        not compute_precision
        or root.read_tensors_metadata(fisher_key).get(COMPUTE_PRECISION) in (None, compute_precision)
    )
    have["baseline_losses"] = all(
        table_exists(root, "baseline_losses", **identity.keys(), shard=s) for s in SHARD_KEYS
    ) and not stale_baseline_shards(root, read_tables(root, "baseline_losses", **identity.keys()), encoder_id)

    def embeddings_current(shard: str) -> bool:
        k = embeddings_key(identity, encoder_id, shard)
        if not root.exists(key("training_features", encoder_id=encoder_id, shard=shard)):  # empty: nothing to embed
            return not root.exists(k)
        return root.exists(k) and embeddings_match_features(root, root.read_tensors_metadata(k), encoder_id, shard)

    have["training_embeddings"] = all(map(embeddings_current, SHARD_KEYS))
    have["training_gradients"] = not stale_gradient_shards(root, identity, DEFAULT_GRADIENTS, encoder_id)
    return have


MAX_TICKS = 1000


@dataclass
class InboxDrain:
    """What draining the inbox did: ticks, queries attributed, and (query, error) of failed runs."""

    ticks: int = 0
    attributed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def partition_tags(partition_key: str | None) -> dict[str, str]:
    """The run tags that name a partition (and each dimension of a multi-partition), as a sensor's run carries them."""
    if not partition_key:
        return {}
    dims = getattr(partition_key, "keys_by_dimension", {})
    return {partition_tag(): str(partition_key), **{partition_tag(d): v for d, v in dims.items()}}


@dataclass
class Runner:
    """Runs selections of the asset graph with `materialize()` on one instance and one set of resources."""

    instance: DagsterInstance
    defs: Definitions
    log: Callable[[str], None] = print
    timings: dict[str, float] = field(default_factory=dict)
    log_level: str = "INFO"

    @classmethod
    def create(
        cls, instance: DagsterInstance, storage_url: str | None = None, log: Callable[[str], None] = print
    ) -> "Runner":
        return cls(instance, build_definitions(storage_url), log)

    @property
    def resources(self) -> dict:
        return self.defs.resources

    @property
    def root(self) -> Storage:
        return self.resources["storage"].root()

    @property
    def executor(self) -> str:
        """The name of the code location's executor (`in_process`, `multiprocess`, `k8s`)."""
        return self.defs.resolve_implicit_global_asset_job_def().executor_def.name

    def run(
        self,
        selection: list[str] | tuple[str, ...],
        partition_key: str | None = None,
        run_config: RunConfig | dict | None = None,
        tags: dict[str, str] | None = None,
    ):
        """Materialize `selection` (asset names) for one partition with the configured executor; raises if the run
        fails, else returns its result.

        In process: `materialize` with this Runner's resources. Any other executor: the code location's job (the
        sensor's for a query's clip or attribution, else the implicit asset job, subset), which every process rebuilds
        from `tda_assets.definitions` and the environment, so steps run where the executor places them (processes,
        k8s pods); that needs a persistent instance (DAGSTER_HOME).
        """
        config = with_console_level(run_config, self.log_level)
        launch_id = uuid.uuid4().hex
        tags = {**process_tags(launch_id), **(tags or {})}

        def execute():
            if self.executor == "in_process":
                return materialize(
                    [*self.defs.assets, *self.defs.asset_checks],
                    selection=list(selection),
                    partition_key=partition_key,
                    instance=self.instance,
                    resources=self.resources,
                    run_config=config,
                    raise_on_error=True,
                    tags=tags,
                )
            job = {
                tuple(CLIP_ASSETS): query_clip_job.name,
                tuple(UNLEARNING_ASSETS): attribute_config_job.name,
                tuple(BATCH_ASSETS): query_batch_job.name,
            }.get(tuple(selection), ASSET_JOB)
            with execute_job(
                CODE_LOCATION.get_reconstructable_job(job),
                self.instance,
                run_config=config,
                tags={**tags, **partition_tags(partition_key)},
                raise_on_error=True,
                asset_selection=None if job != ASSET_JOB else [AssetKey(name) for name in selection],
            ) as result:
                return result

        if self.instance.is_persistent:  # a run that outlives its process can wedge only a persistent instance
            env = Env.read()
            release_dead_runs(self.instance, env.run_stale_s, self.log)
            result = supervised(self.instance, launch_id, execute, self.log, env.slot_wait_s, env.run_stale_s)
        else:
            result = execute()
        if not result.success:
            raise RuntimeError(f"run of {list(selection)} ({partition_key}) failed")
        return result

    def phase(self, name: str, fn: Callable[[], None]) -> None:
        self.log(f"==> {name}")
        start = time.perf_counter()
        fn()
        self.timings[name] = time.perf_counter() - start
        self.log(f"    {name}: {self.timings[name]:.1f}s")

    def training_side(self, manifest_config: dict | None = None, skip: frozenset[str] = frozenset()) -> None:
        """Manifest, features of every shard, checkpoint, Fisher, baseline losses, training embeddings and the default
        configuration's training gradients of every shard (minus `skip`)."""
        cfg = {"ops": {"training_manifest": {"config": manifest_config}}} if manifest_config else None
        phases = {
            "training_manifest": lambda: self.run(["training_manifest"], run_config=cfg),
            "training_features": lambda: [self.run(["training_features"], s) for s in SHARD_KEYS],
            "checkpoint": lambda: self.run(["checkpoint"]),
            "fisher_diagonal": lambda: self.run(["fisher_diagonal"]),
            "baseline_losses": lambda: [self.run(["baseline_losses"], s) for s in SHARD_KEYS],
            "training_embeddings": lambda: [self.run(["training_embeddings"], s) for s in SHARD_KEYS],
            "training_gradients": lambda: [
                self.run(["training_gradients"], s, run_config=gradients_run_config(DEFAULT_GRADIENTS))
                for s in SHARD_KEYS
            ],
        }
        for name in TRAINING_PHASES:
            if name not in skip:
                self.phase(name, phases[name])

    def training_side_if_needed(self, manifest_config: dict | None = None) -> None:
        """The training side, skipping the phases whose outputs exist with their current identity.

        A given manifest config is always read again (its file may have changed); once a phase must run, every
        phase that depends on it runs too (`PHASE_NEEDS`), and no other. Result files of the layout before identity keys
        are first moved under the identity their rows record (`tda prepare` is the fix their error names).
        """
        for table, n in migrate_legacy_results(self.root).items():
            self.log(
                f"==> moved {n} {table} file(s) of the layout before identity keys under their checkpoint and protocol"
            )
        if manifest_config:
            self.training_side(manifest_config, skip=frozenset(TRAINING_PHASES[1:]))
        source = self.resources["model_source"].model_source()
        have = current_training_phases(
            self.root,
            source,
            self.resources["protocol"].protocol().protocol_id,
            self.resources["compute"].compute().precision,
        )
        if all(have.values()):
            self.log(
                f"==> training side: already materialized "
                f"(checkpoint {read_checkpoint_record(self.root).checkpoint_id}), skipped"
            )
            return
        self.training_side(manifest_config, skip=frozenset(TRAINING_PHASES) - phases_to_run(have))

    def sensor_tick(self) -> list[RunRequest]:
        """Evaluate the inbox sensor once: add its partitions and return its run requests."""
        context = build_sensor_context(
            instance=self.instance,
            resources={
                "storage": self.resources["storage"],
                "inbox": self.resources["inbox"],
                "protocol": self.resources["protocol"],
            },
        )
        result = query_inbox_sensor(context)
        if not isinstance(result, SensorResult):  # a SkipReason: nothing to do
            return []
        for request in result.dynamic_partitions_requests or []:
            self.instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
        return list(result.run_requests or [])

    def execute(self, request: RunRequest, config: UnlearningConfig | None = None) -> None:
        """Run one of the sensor's requests here: a clip, an attribution (under `config`, which must be `default`), or a
        batch of queries."""
        if request.job_name == query_clip_job.name:
            self.run(CLIP_ASSETS, request.partition_key, tags=request.tags)
        elif request.job_name == query_batch_job.name:
            self.run(BATCH_ASSETS, request.partition_key, tags=request.tags)
        else:
            self.run(
                UNLEARNING_ASSETS,
                request.partition_key,
                unlearning_run_config(config) if config else None,
                tags=request.tags,
            )

    def drain_inbox(self, config: UnlearningConfig | None = None) -> InboxDrain:
        """Tick the sensor and run what it requests until a tick requests nothing (every inbox query attributed, failed
        its check, or given up after repeated failures); a failed run is logged and counted, never fatal."""
        drain = InboxDrain()
        while drain.ticks < MAX_TICKS:
            requests = self.sensor_tick()
            if not requests:
                break
            drain.ticks += 1
            self.log(
                f"==> inbox tick {drain.ticks}: {len(requests)} runs "
                f"({sum(r.job_name == query_clip_job.name for r in requests)} clips)"
            )
            for request in requests:
                qid = query_of(request)
                start = time.perf_counter()
                try:
                    self.execute(request, config)
                except SlotWaitTimeout:  # the pool stays blocked for every other query too
                    raise
                except Exception as exc:  # noqa: BLE001 - one broken query must not stop the others
                    message = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                    if request.job_name == query_batch_job.name:
                        self._batch_done(drain, request, start, message)
                        continue
                    drain.failed.append((qid, message))
                    self.log(f"    {qid}: {request.tags.get('tda/step')} run failed: {drain.failed[-1][1]}")
                    continue
                if request.job_name == query_batch_job.name:
                    self._batch_done(drain, request, start)
                    continue
                step = "clip" if request.job_name == query_clip_job.name else "attribution"
                self.log(f"    {qid}: {step} in {time.perf_counter() - start:.1f}s")
                if step == "attribution":
                    drain.attributed.append(qid)
        return drain

    def _batch_done(self, drain: InboxDrain, request: RunRequest, start: float, error: str | None = None) -> None:
        """Count a batch run's queries: those with a result now are done, the others of a failed run failed."""
        ids = queries_of(request)
        record = read_checkpoint_record(self.root)
        protocol_id = self.resources["protocol"].protocol().protocol_id
        no_clip, no_attribution = pending_queries(
            self.root, ids, record.checkpoint_id, protocol_id, MIN_QUERY_LOSS_RATIO
        )
        pending = {*no_clip, *no_attribution}
        drain.attributed += [q for q in ids if q not in pending]
        if error:
            drain.failed += [(q, f"its batch run {request.partition_key} failed: {error}") for q in sorted(pending)]
        self.log(
            f"    {request.partition_key}: {len(ids) - len(pending)} of {len(ids)} queries done in "
            f"{time.perf_counter() - start:.1f}s" + (f"; the run failed: {error}" if error else "")
        )

    def add_partitions(self, query_id: str, config_id: str | None = None) -> None:
        """The query's partition, and the configuration's, on this instance (no-ops when present)."""
        if not self.instance.has_dynamic_partition(queries.name, query_id):
            self.instance.add_dynamic_partitions(queries.name, [query_id])
        if config_id and not self.instance.has_dynamic_partition(configs.name, config_id):
            self.instance.add_dynamic_partitions(configs.name, [config_id])

    def clip(self, query_id: str) -> None:
        """The query's clip and similarity scores."""
        self.add_partitions(query_id)
        self.run(CLIP_ASSETS, query_id, tags=run_tags("clip", self.root.url))

    def requested_queries(self) -> list[str]:
        """The queries one sensor tick requests runs for (and adds as partitions)."""
        return [q for r in self.sensor_tick() for q in queries_of(r)]

    def attribute(self, query_id: str, config: UnlearningConfig | None = None):
        """A query end to end, as the sensor's runs do: its clip, then its attribution under `config` (default:
        default)."""
        self.clip(query_id)
        return self.attribute_config(query_id, config or UnlearningConfig())

    def attribute_config(self, query_id: str, config: UnlearningConfig):
        """Only the per-configuration assets of a query (its clip must exist), in its (query × config) partition; first
        the gradient store the configuration reads, when missing (`ensure_gradients`)."""
        self.ensure_gradients(config)
        self.add_partitions(query_id, config.config_id)
        return self.run(
            UNLEARNING_ASSETS,
            query_config_key(query_id, config.config_id),
            unlearning_run_config(config),
            tags=run_tags("attribute", self.root.url),
        )

    def ensure_gradients(self, config: UnlearningConfig) -> list[str]:
        """For a configuration that reads a gradient store (`linearized`, score_type `normalized`), `training_gradients`
        of its store on every shard that lacks it or whose store predates the Fisher (the training side builds the
        default configuration's). Returns the shards run.

        A `two_stage` configuration uses the store as a cheap signal when it exists, and does without otherwise.
        """
        settings = config.settings()
        if not settings.needs_gradients:
            return []
        spec = GradientSpec.for_settings(settings)
        record = read_checkpoint_record(self.root)
        identity = Identity(record.checkpoint_id, self.resources["protocol"].protocol().protocol_id)
        missing = stale_gradient_shards(self.root, identity, spec, record.encoder_id)
        if missing:
            self.phase(
                f"training_gradients {spec.gradient_id}",
                lambda: [
                    self.run(["training_gradients"], shard, run_config=gradients_run_config(spec)) for shard in missing
                ],
            )
        return missing

    def with_config(self, asset: str, **config: object):
        """One unpartitioned asset with its launch config's fields (unset ones left to their defaults)."""
        return self.run(
            [asset], run_config={"ops": {asset: {"config": {k: v for k, v in config.items() if v is not None}}}}
        )

    def counterfactual(self, **config: object):
        """The `counterfactual` asset with `CounterfactualConfig` fields (query_ids, k, train_steps, …); returns the
        run's result."""
        return self.with_config("counterfactual", **config)
