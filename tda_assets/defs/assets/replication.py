"""Replication detection (DESIGN §1): a training item's own audio after a mild transformation, used as a query with
its caption, must rank that item first. The memorisation case a rights holder cares about most."""

from typing import Iterator

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.attribute import attribute_exact
from tda_assets.attribution.replication import TRANSFORMS
from tda_assets.attribution.self_influence import choose_targets
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.data.audio import decode_audio
from tda_assets.defs.configs import recorded_settings, require_full_exact
from tda_assets.defs.model_step import model_step
from tda_assets.defs.progress import Progress
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import loss_matrix
from tda_assets.io.registry import TABLES
from tda_assets.io.tables import read_table, write_table
from tda_assets.io.uris import read_uri_bytes


class ReplicationConfig(Config):
    """Which configuration, and how many source items (k-means-chosen, as for self-influence)."""

    config_id: str = "default"
    n_sources: int = Field(default=4, description="training items whose transformed audio is used as a query")
    seed: int = 0


@asset(
    group_name="evaluation", **GPU,
    deps=[AssetKey("fisher_diagonal"), AssetDep(AssetKey("baseline_losses"), partition_mapping=AllPartitionMapping()),
          AssetDep(AssetKey("training_gradients"), partition_mapping=AllPartitionMapping())],
    description="Replication detection: each source item's audio after gain −6 dB, a 50 ms shift, a 22.05 kHz round trip "
                "and 30 dB SNR noise, used as a query with its caption; the rank of the source among all items.",
)
def replication(
    context: AssetExecutionContext, config: ReplicationConfig, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> Iterator:
    step = model_step(storage, model_source, compute, protocol)
    store, proto, identity, adapter = step.store, step.protocol, step.identity, step.adapter
    settings = require_full_exact(recorded_settings(store, config.config_id), config.config_id, "replication")
    item_ids, data, baseline = step.training_set()
    l0 = loss_matrix(baseline, item_ids, proto.draws, "loss_masked" if settings.masks_losses else "loss", "baseline_losses")
    fisher = step.fisher()
    sources = choose_targets(audio_embedding(data).numpy(), item_ids, config.n_sources, config.seed)
    manifest = read_table(store, "training_manifest").filter(pl.col("item_id").is_in(sources))
    norms = step.item_norms(settings, item_ids)
    progress = Progress(context.log, "replication", len(sources) * len(TRANSFORMS), len(item_ids) * proto.draws)
    rows = []
    for row in manifest.sort("item_id").iter_rows(named=True):
        audio = decode_audio(read_uri_bytes(row["audio_uri"], store), row["item_id"], adapter.sample_rate)
        for name, transform in TRANSFORMS.items():
            query_id = f"{row['item_id']}~{name}"
            clip = transform(audio, adapter.sample_rate)
            latents, mask = adapter.encode_audio([clip])
            cond = adapter.encode_text([row["caption"]], [query_id], durations=[len(clip) / adapter.sample_rate])
            query = ItemBatch([query_id], latents, cond, mask)
            s, result, _ = attribute_exact(adapter, query, data, l0, fisher, settings, proto, step.compute, norms)
            t = item_ids.index(row["item_id"])
            rows.append({"config_id": config.config_id, "source_item_id": row["item_id"], "transform": name,
                         "rank": int(s["rank"][t]), "score": float(s["score"][t]), "loss_ratio": result.loss_ratio,
                         **identity.keys()})
            progress.advance(1)
    df = pl.DataFrame(rows, schema=TABLES["replication"].polars_schema(with_partitions=True))
    uri = write_table(store, "replication", df, config_id=config.config_id)
    first = df.group_by("transform").agg((pl.col("rank") == 1).mean().alias("share_first")).sort("transform")
    context.log.info("replication, share ranked first: " + ", ".join(f"{t} {v:.0%}" for t, v in first.rows()))
    yield MaterializeResult(metadata={
        "config_id": config.config_id, "sources": MetadataValue.json(sources),
        "share_first": MetadataValue.json(dict(first.rows())), "all_first": bool((df["rank"] == 1).all()),
        "uri": MetadataValue.path(uri), **identity.keys(),
    })
