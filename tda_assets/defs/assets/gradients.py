"""The training side of the fast paths (DESIGN §1 "Linearised influence"): sketched per-item gradients of one shard.

Needed only by configurations with `method: linearized` (and, when present, as the third cheap signal of
`stage: two_stage`), so it is not a phase of `tda prepare`: the Runner materializes the store a configuration names
on demand (`Runner.ensure_gradients`), and a run launched without it stops with an error naming the config to
materialize.
"""

import time
from dataclasses import fields

from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.gradients import GradientSpec, gradient_store
from tda_assets.defs.configs import config_class
from tda_assets.defs.model_step import model_step
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.defs.partitions import training_shards
from tda_assets.defs.progress import Progress
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import iter_training_batches, read_features, shard_features_digest
from tda_assets.io.gradients import fisher_digest, gradients_key, write_gradient_store
from tda_assets.io.registry import key

_DEFAULT = GradientSpec.for_settings(UnlearningSettings())  # the product default configuration's store


class _TrainingGradientsConfigBase(Config):
    items_per_pass: int = Field(
        default=16,
        description="items whose gradients are sketched together (memory: items_per_pass × parameters × 4 bytes)",
    )

    def spec(self) -> GradientSpec:
        """The engine's spec of the store to build (its fields are this config's, by name)."""
        return GradientSpec(**{f.name: getattr(self, f.name) for f in fields(GradientSpec)})


TrainingGradientsConfig = config_class(
    "TrainingGradientsConfig",
    GradientSpec,
    _TrainingGradientsConfigBase,
    "Which gradient store to build (a configuration reads the one of its param_subset, loss masking, damping, "
    "sketch_k and sketch_seed), and how many items per backward pass.",
    defaults=vars(_DEFAULT),
)


@asset(
    group_name="model",
    partitions_def=training_shards,
    **GPU,
    deps=[AssetKey("checkpoint"), AssetKey("fisher_diagonal"), AssetKey("training_features")],
    description="Sketched, Fisher-preconditioned per-item gradients of one shard's protocol losses at θ0, keyed by "
    "checkpoint, protocol and gradient_id (subset, masking, sketch k and seed, damping): the `linearized` "
    "method's store and a cheap signal of two_stage.",
)
def training_gradients(
    context: AssetExecutionContext,
    config: TrainingGradientsConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> MaterializeResult:
    spec = config.spec()
    step = model_step(storage, model_source, compute, protocol)
    root, identity, shard = step.root, step.identity, context.partition_key
    out_key = gradients_key(identity, spec, shard)
    features_key = key("training_features", encoder_id=step.record.encoder_id, shard=shard)
    meta = {"gradient_id": spec.gradient_id, **identity.keys(), **{f"spec_{k}": v for k, v in vars(spec).items()}}
    if not root.exists(features_key):  # an empty shard: no store, as it has no features
        root.delete(out_key)
        context.log.info(f"{shard}: no training features, so no gradients")
        return MaterializeResult(metadata={"rows": 0, **meta})
    n = len(read_features(root, features_key)[0])
    fisher = step.fisher()
    digest = fisher_digest(root, identity)
    progress = Progress(context.log, f"{shard} gradients {spec.gradient_id}", n, step.protocol.draws)
    start = time.perf_counter()
    gradients = gradient_store(
        step.adapter,
        iter_training_batches(root, step.record.encoder_id, 64, [shard]),
        step.protocol,
        spec.param_subset,
        step.compute,
        k=spec.k,
        seed=spec.seed,
        masked=spec.masked,
        items_per_pass=config.items_per_pass,
        fisher=fisher,
        damping=spec.damping,
        progress=progress.advance,
    )
    uri = write_gradient_store(
        root, identity, spec, shard, gradients, digest, shard_features_digest(root, step.record.encoder_id, shard)
    )
    seconds = time.perf_counter() - start
    context.log.info(
        f"{shard}: {n} items' gradients (D = {sum(gradients.sizes.values())}) sketched to k = {spec.k} in "
        f"{seconds:.1f}s"
    )
    return MaterializeResult(
        metadata={
            "rows": n,
            "parameters": sum(gradients.sizes.values()),
            "bytes_per_item": gradients.bytes_per_item,
            "items_per_second": round(n / max(seconds, 1e-9), 2),
            "uri": MetadataValue.path(uri),
            **meta,
        }
    )
