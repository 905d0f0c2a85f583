"""The paper's self-influence protocol as an asset (DESIGN §1): diverse training items, each unlearned from its own
latent and caption as the query; per configuration, the rank of the item itself among all items."""

from typing import Iterator

import numpy as np
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
from tda_assets.attribution.attribute import attribute_exact
from tda_assets.attribution.self_influence import choose_targets, neighbour_similarity, summarise
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.defs.configs import recorded_settings, require_full_exact
from tda_assets.defs.model_step import model_step
from tda_assets.defs.progress import Progress
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import loss_matrix
from tda_assets.io.registry import TABLES
from tda_assets.io.tables import write_table


class SelfInfluenceConfig(Config):
    """Which configurations, how many k-means-chosen targets, the k of the top-k / bottom-k similarity."""

    config_ids: list[str] = Field(default=["default"], description="recorded unlearning configurations to judge "
                                                                   "('default' needs no record)")
    n_targets: int = Field(default=16, description="targets: the item nearest each k-means centroid of the audio embedding")
    k: int = 10
    seed: int = Field(default=0, description="seed of the k-means target choice")


@asset(
    group_name="evaluation", **GPU,
    deps=[AssetKey("fisher_diagonal"), AssetDep(AssetKey("baseline_losses"), partition_mapping=AllPartitionMapping()),
          AssetDep(AssetKey("training_gradients"), partition_mapping=AllPartitionMapping())],
    description="Self-influence (the paper's grid protocol): k-means-chosen training items unlearned as their own queries; "
                "per configuration the mean rank R of the item itself, the share ranked first, the embedding similarity "
                "of its top-k and bottom-k, and the median relative loss change of the other items.",
)
def self_influence(
    context: AssetExecutionContext, config: SelfInfluenceConfig, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> Iterator:
    step = model_step(storage, model_source, compute, protocol)
    store, proto, identity = step.store, step.protocol, step.identity
    for cid in config.config_ids:
        require_full_exact(recorded_settings(store, cid), cid, "self_influence")
    item_ids, data, baseline = step.training_set()
    embeddings = audio_embedding(data).numpy()
    targets = choose_targets(embeddings, item_ids, config.n_targets, config.seed)
    fisher = step.fisher()
    rows, summaries = [], {}
    for cid in config.config_ids:
        settings = recorded_settings(store, cid)
        column = "loss_masked" if settings.masks_losses else "loss"
        l0 = loss_matrix(baseline, item_ids, proto.draws, column, "baseline_losses")
        norms = step.item_norms(settings, item_ids)
        progress = Progress(context.log, f"self-influence {cid}", len(targets), len(item_ids) * proto.draws)
        ranks, rankings, indices = [], [], []
        for target in targets:
            t = item_ids.index(target)
            s, result, lu = attribute_exact(step.adapter, data.select([t]), data, l0, fisher, settings, proto, step.compute,
                                           norms)
            others = np.arange(len(item_ids)) != t
            rel = (lu.mean(1) - l0.mean(1)) / l0.mean(1)
            top, bottom = neighbour_similarity(s["rank"], embeddings, t, config.k)
            rows.append({"config_id": cid, "target_item_id": target, "rank": int(s["rank"][t]), "score": float(s["score"][t]),
                         "loss_ratio": result.loss_ratio, "lr_used": result.lr_used, "score_type": settings.score_type,
                         "top_k_similarity": top, "bottom_k_similarity": bottom,
                         "others_median_relative_change": float(np.median(rel[others])), **identity.keys()})
            ranks.append(int(s["rank"][t]))
            rankings.append(s["rank"])
            indices.append(t)
            progress.advance(1)
        summary = summarise(ranks, rankings, embeddings, indices, config.k)
        summaries[cid] = {"R": round(summary.mean_rank, 3), "share_first": round(summary.share_first, 3),
                          "top_k_similarity": round(summary.top_k_similarity, 4),
                          "bottom_k_similarity": round(summary.bottom_k_similarity, 4),
                          "others_median_relative_change": round(float(np.median([r["others_median_relative_change"]
                                                                                  for r in rows if r["config_id"] == cid])), 5)}
        context.log.info(f"self-influence {cid}: R {summary.mean_rank:.2f}, {summary.share_first:.0%} ranked first "
                         f"over {len(targets)} targets")
    df = pl.DataFrame(rows, schema=TABLES["self_influence"].polars_schema(with_partitions=True))
    uris = [write_table(store, "self_influence", df.filter(pl.col("config_id") == cid), config_id=cid) for cid in summaries]
    best = min(summaries, key=lambda c: (summaries[c]["R"], -summaries[c]["share_first"]))
    yield MaterializeResult(metadata={
        "targets": MetadataValue.json(targets), "per_config": MetadataValue.json(summaries), "best_config": best,
        "uris": MetadataValue.json(uris), **identity.keys(),
    })
