"""Model assets: the checkpoint, its Fisher diagonal, and the baseline losses of every training item."""

import tempfile
import time
from dataclasses import asdict
from typing import Iterator

import numpy as np
import polars as pl
from dagster import AssetCheckSpec, AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.fisher import fisher_diagonal as estimate_fisher
from tda_assets.attribution.fisher import fisher_summary
from tda_assets.attribution.losses import stream_losses
from tda_assets.defs.checks import losses_complete
from tda_assets.defs.model_step import model_step
from tda_assets.defs.partitions import training_shards
from tda_assets.defs.progress import Progress
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import (
    COMPUTE_PRECISION,
    FEATURES_DIGEST,
    all_features,
    iter_training_batches,
    losses_frame,
    read_features,
    shard_features_digest,
    write_fisher,
)
from tda_assets.io.checkpoints import CheckpointRecord, embedded_checkpoint_id, write_checkpoint_record
from tda_assets.io.registry import TABLES, key
from tda_assets.io.tables import write_table
from tda_assets.models.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser
from tda_assets.models.model_folder import save_model

FISHER_ITEMS = 128


@asset(
    group_name="model",
    deps=[AssetKey("training_features")],
    **GPU,
    description="The model: embedded (trained here on the cached features), a local or s3:// folder, or hf://repo@revision.",
)
def checkpoint(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
) -> MaterializeResult:
    root, source = storage.root(), model_source.model_source()
    if not source.is_embedded:
        resolved = source.resolve()
        record = CheckpointRecord(
            resolved.checkpoint_id,
            "external",
            resolved.source,
            encoder_id=resolved.checkpoint_id,
            revision=resolved.revision,
        )
        write_checkpoint_record(root, record)
        context.log.info(
            f"checkpoint {resolved.checkpoint_id} from {resolved.source}"
            + (f" pinned at commit {resolved.revision}" if resolved.revision else "")
        )
        return MaterializeResult(
            metadata={
                **{k: v for k, v in asdict(record).items() if v is not None},
                "local_folder": str(resolved.folder),
            }
        )
    encoder_id = source.encoder_id()
    data = all_features(root, encoder_id)
    settings = TrainingSettings(steps=source.train_steps, seed=source.train_seed)
    checkpoint_id = embedded_checkpoint_id(root, encoder_id, asdict(settings))
    cmp = compute.compute()
    adapter = EmbeddedAdapter.new(seed=settings.seed).to(cmp.device)
    context.log.info(f"training the embedded denoiser on {len(data)} items for {settings.steps} steps on {cmp.device}")
    start = time.perf_counter()
    curve = train_denoiser(
        adapter,
        data,
        settings,
        cmp,
        progress=lambda s, loss: context.log.info(f"train step {s}/{settings.steps}: loss {loss:.4f}"),
    )
    seconds = time.perf_counter() - start
    folder_key = key("checkpoint_folder", checkpoint_id=checkpoint_id)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(adapter.to("cpu"), tmp, {"training": {**asdict(settings), "items": len(data), "seconds": seconds}})
        root.put_dir(tmp, folder_key)
    record = CheckpointRecord(checkpoint_id, "embedded", "embedded", encoder_id=encoder_id, folder_key=folder_key)
    write_checkpoint_record(root, record)
    return MaterializeResult(
        metadata={
            **{k: v for k, v in asdict(record).items() if v is not None},
            "training_seconds": round(seconds, 1),
            "final_loss": float(np.mean(curve[-100:])),
            "parameters": sum(p.numel() for p in adapter.denoiser.parameters()),
            "uri": MetadataValue.path(root.uri(folder_key)),
        }
    )


@asset(
    group_name="model",
    deps=[AssetKey("checkpoint")],
    **GPU,
    description="Diagonal Fisher over a sample of training items, on all transformer-layer parameters "
    "(every subset is a slice).",
)
def fisher_diagonal(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> MaterializeResult:
    step = model_step(storage, model_source, compute, protocol)
    root, identity = step.root, step.identity
    start = time.perf_counter()
    batches = iter_training_batches(root, step.record.encoder_id, 32)
    fisher = estimate_fisher(step.adapter, batches, step.protocol, "all", step.compute, max_items=FISHER_ITEMS)
    summary = fisher_summary(fisher)  # per tensor: no concatenated copy (4.2 GB at 1 B parameters)
    uri = write_fisher(root, identity, fisher, {"items": str(FISHER_ITEMS), COMPUTE_PRECISION: step.compute.precision})
    context.log.info(f"fisher_diagonal over {summary['parameters']} parameters in {time.perf_counter() - start:.1f}s")
    return MaterializeResult(metadata={**summary, "uri": MetadataValue.path(uri), **identity.keys()})


@asset(
    group_name="model",
    partitions_def=training_shards,
    deps=[AssetKey("checkpoint"), AssetKey("training_features")],
    **GPU,
    check_specs=[
        AssetCheckSpec(
            "losses_finite_and_complete",
            asset="baseline_losses",
            description="every training item of the shard has every protocol draw, all finite",
        )
    ],
    description="L0_ik: the checkpoint's loss on every training item and fixed protocol draw (one shard), "
    "keyed by checkpoint and loss protocol.",
)
def baseline_losses(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    step = model_step(storage, model_source, compute, protocol)
    root, proto, record, identity = step.root, step.protocol, step.record, step.identity
    shard = context.partition_key
    features_key = key("training_features", encoder_id=record.encoder_id, shard=shard)
    item_ids = read_features(root, features_key)[0].item_ids if root.exists(features_key) else []
    progress = Progress(context.log, f"{shard} baseline losses", len(item_ids), proto.draws)
    frames = []
    batches = iter_training_batches(root, record.encoder_id, 32, [shard])
    for ids, losses in stream_losses(step.adapter, batches, proto, step.compute):
        frames.append(losses_frame(ids, losses.loss, losses.loss_masked, losses.t))
        progress.advance(len(ids))
    empty = pl.DataFrame(schema=TABLES["baseline_losses"].polars_schema())  # an empty shard: a typed, empty table
    df = (pl.concat(frames) if frames else empty).with_columns(  # the features they were measured on (DESIGN §3)
        pl.lit(shard_features_digest(root, record.encoder_id, shard), dtype=pl.String).alias(FEATURES_DIGEST)
    )
    uri = write_table(root, "baseline_losses", df, **identity.keys(), shard=shard)
    per_item = df.group_by("item_id").agg(pl.col("loss").mean())["loss"]
    yield MaterializeResult(
        metadata={
            "rows": len(df),
            "items": per_item.len(),
            "loss_mean": float(per_item.mean() or 0.0),
            "loss_median": float(per_item.median() or 0.0),
            "item_draws_per_second": progress.rate(),
            "uri": MetadataValue.path(uri),
            **identity.keys(),
        },
        check_results=[losses_complete("losses_finite_and_complete", df, item_ids, proto.draws)],
    )
