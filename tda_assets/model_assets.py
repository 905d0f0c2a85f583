"""Model assets: the checkpoint, its Fisher diagonal, and the baseline losses of every training item."""

import hashlib
import json
import tempfile
import time
from typing import Iterator

import numpy as np
import polars as pl
import torch
from dagster import AssetCheckSpec, AssetExecutionContext, MaterializeResult, MetadataValue, asset

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource

from . import tables
from .attribution.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser
from .attribution.fisher import fisher_diagonal as estimate_fisher
from .attribution.losses import stream_losses
from .attribution.model_folder import save_model
from .checks import losses_complete
from .corpus_assets import training_features
from .partitions import SHARD_KEYS, training_shards
from .store import all_features, iter_training_batches, load_checkpoint, losses_frame
from .tags import GPU


@asset(group_name="model", deps=[training_features], **GPU,
       description="The model: embedded (trained here on the cached features), a local or s3:// folder, or hf://repo@revision.")
def checkpoint(
    context: AssetExecutionContext, storage: StorageResource, model_source: ModelSourceResource, compute: ComputeResource
) -> MaterializeResult:
    store = storage.storage()
    if not model_source.is_embedded:
        resolved = model_source.resolve()
        pointer = {"checkpoint_id": resolved.checkpoint_id, "kind": "external", "source": resolved.source,
                   "revision": resolved.revision, "folder_key": None}
        store.write_bytes(tables.checkpoint_pointer(), json.dumps(pointer).encode())
        context.log.info(f"checkpoint {resolved.checkpoint_id} from {resolved.source}"
                         + (f" pinned at commit {resolved.revision}" if resolved.revision else ""))
        return MaterializeResult(metadata={**{k: v for k, v in pointer.items() if v is not None},
                                           "local_folder": str(resolved.folder)})
    data = all_features(store, SHARD_KEYS)
    settings = TrainingSettings(steps=model_source.train_steps, seed=model_source.train_seed)
    checkpoint_id = "embedded-" + hashlib.blake2b(json.dumps([data.item_ids, settings.__dict__]).encode(), digest_size=5).hexdigest()
    cmp = compute.compute()
    adapter = EmbeddedAdapter.new(seed=settings.seed).to(cmp.device)
    context.log.info(f"training the embedded denoiser on {len(data)} items for {settings.steps} steps on {cmp.device}")
    start = time.perf_counter()
    curve = train_denoiser(adapter, data, settings, cmp,
                           progress=lambda s, loss: context.log.info(f"train step {s}/{settings.steps}: loss {loss:.4f}"))
    seconds = time.perf_counter() - start
    folder_key = tables.checkpoint_folder(checkpoint_id)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(adapter.to("cpu"), tmp, {"training": {**settings.__dict__, "items": len(data), "seconds": seconds}})
        store.put_dir(tmp, folder_key)
    pointer = {"checkpoint_id": checkpoint_id, "kind": "embedded", "source": "embedded", "revision": None, "folder_key": folder_key}
    store.write_bytes(tables.checkpoint_pointer(), json.dumps(pointer).encode())
    return MaterializeResult(metadata={
        **{k: v for k, v in pointer.items() if v is not None}, "training_seconds": round(seconds, 1),
        "final_loss": float(np.mean(curve[-100:])), "parameters": sum(p.numel() for p in adapter.denoiser.parameters()),
        "uri": MetadataValue.path(store.uri(folder_key)),
    })


FISHER_ITEMS = 128


@asset(group_name="model", deps=[checkpoint], **GPU,
       description="Diagonal Fisher over a sample of training items, on all transformer-layer parameters (every subset is a slice).")
def fisher_diagonal(
    context: AssetExecutionContext, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> MaterializeResult:
    store, cmp, proto = storage.storage(), compute.compute(), protocol.protocol()
    adapter, pointer = load_checkpoint(store, model_source, cmp.device)
    start = time.perf_counter()
    fisher = estimate_fisher(adapter, iter_training_batches(store, SHARD_KEYS, 32), proto, "all", cmp, max_items=FISHER_ITEMS)
    values = torch.cat([f.flatten() for f in fisher.values()])
    uri = store.write_tensors(tables.fisher(pointer["checkpoint_id"], proto.protocol_id), fisher,
                              {"checkpoint_id": pointer["checkpoint_id"], "items": str(FISHER_ITEMS)})
    context.log.info(f"fisher_diagonal over {values.numel()} parameters in {time.perf_counter() - start:.1f}s")
    return MaterializeResult(metadata={
        "parameters": values.numel(), "mean": float(values.mean()), "median": float(values.median()),
        "max": float(values.max()), "uri": MetadataValue.path(uri),
    })


@asset(group_name="model", partitions_def=training_shards, deps=[checkpoint, training_features], **GPU,
       check_specs=[AssetCheckSpec("losses_finite_and_complete", asset="baseline_losses")],
       description="L0_ik: the checkpoint's loss on every training item and fixed protocol draw (one shard).")
def baseline_losses(
    context: AssetExecutionContext, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> Iterator:
    store, cmp, proto = storage.storage(), compute.compute(), protocol.protocol()
    adapter, pointer = load_checkpoint(store, model_source, cmp.device)
    shard = context.partition_key
    frames, start = [], time.perf_counter()
    for item_ids, losses in stream_losses(adapter, iter_training_batches(store, [shard], 32), proto, cmp):
        frames.append(losses_frame(item_ids, losses.loss, checkpoint_id=pointer["checkpoint_id"], protocol_id=proto.protocol_id)
                      .with_columns(t=pl.Series(losses.t.reshape(-1).numpy()), loss_masked=pl.Series(losses.loss_masked.reshape(-1).numpy())))
    df = pl.concat(frames) if frames else pl.DataFrame(schema=EMPTY_LOSSES)  # an empty shard: a typed, empty table
    seconds = max(time.perf_counter() - start, 1e-9)
    uri = store.write_parquet(tables.baseline_losses(shard), df)
    per_item = df.group_by("item_id").agg(pl.col("loss").mean())["loss"]
    context.log.info(f"{shard}: {len(df)} item-draws in {seconds:.1f}s ({len(df) / seconds:.0f}/s)")
    yield MaterializeResult(metadata={
        "rows": len(df), "items": per_item.len(), "loss_mean": float(per_item.mean() or 0.0),
        "loss_median": float(per_item.median() or 0.0), "item_draws_per_second": round(len(df) / seconds, 1),
        "uri": MetadataValue.path(uri),
    }, check_results=[losses_complete("losses_finite_and_complete", df, per_item.len() * proto.draws)])


EMPTY_LOSSES = {"checkpoint_id": pl.String, "protocol_id": pl.String, "item_id": pl.String, "draw": pl.Int32,
                "loss": pl.Float32, "t": pl.Float32, "loss_masked": pl.Float32}
