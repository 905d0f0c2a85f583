"""Training embeddings: every training item's audio, text and internal embedding, computed once per shard and identity,
so a query's similarity attribution is one query embedding and one matrix product per embedding."""

import time

import torch
from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.similarity import embeddings as embed
from tda_assets.defs.model_step import model_step
from tda_assets.defs.partitions import training_shards
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import Embeddings, embeddings_key, read_features, write_embeddings
from tda_assets.io.registry import key

EMBED_BATCH = 64  # items per forward pass of the internal embedding


@asset(
    group_name="model",
    partitions_def=training_shards,
    deps=[AssetKey("checkpoint"), AssetKey("training_features")],
    **GPU,
    description="Audio, text and internal (denoiser at the protocol's shared draws) embeddings of one shard's "
    "training items, keyed by checkpoint, protocol and encoders: similarity_scores reads them.",
)
def training_embeddings(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> MaterializeResult:
    step = model_step(storage, model_source, compute, protocol)
    root, record, identity = step.root, step.record, step.identity
    shard = context.partition_key
    out_key = embeddings_key(identity, record.encoder_id, shard)
    features_key = key("training_features", encoder_id=record.encoder_id, shard=shard)
    ids = {**identity.keys(), "encoder_id": record.encoder_id}
    if not root.exists(
        features_key
    ):  # an empty shard (or every item skipped as bad): nothing to embed, nothing to read
        root.delete(out_key)
        context.log.info(
            f"{shard}: no training features of encoders {record.encoder_id} (an empty shard); no embeddings "
            "written (if the shard has items, materialize training_features for it first)"
        )
        return MaterializeResult(metadata={"rows": 0, **ids})
    start = time.perf_counter()
    batch, features_meta = read_features(root, features_key)
    parts = [
        embed(step.adapter, batch.select(slice(lo, lo + EMBED_BATCH)), step.protocol, step.compute)
        for lo in range(0, len(batch), EMBED_BATCH)
    ]
    matrices = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    uri = write_embeddings(
        root,
        out_key,
        Embeddings(batch.item_ids, matrices),
        {**ids, "shard": shard, "manifest_digest": features_meta.get("manifest_digest", "")},
    )
    seconds = time.perf_counter() - start
    context.log.info(f"{shard}: embedded {len(batch)} items in {seconds:.1f}s")
    return MaterializeResult(
        metadata={
            "rows": len(batch),
            "dimensions": MetadataValue.json({n: int(m.shape[1]) for n, m in matrices.items()}),
            "seconds": round(seconds, 2),
            "uri": MetadataValue.path(uri),
            **ids,
        }
    )
