"""The paper's self-influence protocol as an asset (DESIGN §1): diverse training items, each unlearned from its own
latent and caption as the query; per configuration, the rank of the item itself among all items. The targets are the
development set (what tuned the defaults) or the reporting set chosen outside it (`target_set`, recorded on every row);
the best configuration is chosen by `best_config`'s stated rule, never by the order of `config_ids`."""

from typing import Iterator

import numpy as np
import polars as pl
from dagster import (
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.attribute import attribute_exact
from tda_assets.attribution.self_influence import (
    TARGET_SETS,
    Standing,
    best_config,
    neighbour_similarity,
    summarise,
    targets_of,
    wilson_lower,
)
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.defs.configs import recorded_settings, require_full_exact
from tda_assets.defs.model_step import TRAINING_SIDE_DEPS, model_step
from tda_assets.defs.progress import Progress
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import loss_matrix
from tda_assets.io.registry import TABLES
from tda_assets.io.tables import write_replacing


class SelfInfluenceConfig(Config):
    """Which configurations, how many k-means-chosen targets, the k of the top-k / bottom-k similarity."""

    config_ids: list[str] = Field(
        default=["default"], description="recorded unlearning configurations to judge ('default' needs no record)"
    )
    n_targets: int = Field(
        default=16,
        description="reporting targets: the item nearest each k-means centroid of the audio "
        "embedding, among the items outside the development targets",
    )
    target_set: str = Field(
        default="reporting",
        description="`reporting` (n_targets chosen outside the development "
        "targets: what figures are reported on) or `development` "
        "(choose_targets(16, seed 0), which tuned the defaults)",
    )
    k: int = 10
    seed: int = Field(default=0, description="seed of the k-means target choice")


@asset(
    group_name="evaluation",
    **GPU,
    deps=TRAINING_SIDE_DEPS,
    description="Self-influence (the paper's grid protocol): k-means-chosen training items unlearned as their own "
    "queries; per configuration the mean rank R of the item itself, the share ranked first, the embedding similarity "
    "of its top-k and bottom-k, and the median relative loss change of the other items.",
)
def self_influence(
    context: AssetExecutionContext,
    config: SelfInfluenceConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    step = model_step(storage, model_source, compute, protocol)
    store, proto, identity = step.store, step.protocol, step.identity
    for cid in config.config_ids:
        require_full_exact(recorded_settings(store, cid), cid, "self_influence")
    item_ids, data, baseline = step.training_set()
    embeddings = audio_embedding(data).numpy()
    if config.target_set not in TARGET_SETS:
        raise ValueError(f"target_set {config.target_set!r} is not one of {TARGET_SETS}")
    targets = targets_of(config.target_set, embeddings, item_ids, config.n_targets, config.seed)
    fisher = step.fisher()
    rows, summaries, standings = [], {}, []
    for cid in config.config_ids:
        settings = recorded_settings(store, cid)
        column = "loss_masked" if settings.masks_losses else "loss"
        l0 = loss_matrix(baseline, item_ids, proto.draws, column, "baseline_losses")
        norms = step.item_norms(settings, item_ids)
        progress = Progress(context.log, f"self-influence {cid}", len(targets), len(item_ids) * proto.draws)
        ranks, rankings, indices = [], [], []
        for target in targets:
            t = item_ids.index(target)
            s, result, lu = attribute_exact(
                step.adapter, data.select([t]), data, l0, fisher, settings, proto, step.compute, norms
            )
            if s is None:  # below the minimum ratio: recorded as failed (rank null, with its ratio), not ranked
                rows.append(
                    {
                        "config_id": cid,
                        "target_item_id": target,
                        "loss_ratio": result.loss_ratio,
                        "lr_used": result.lr_used,
                        "score_type": settings.score_type,
                        **identity.keys(),
                    }
                )
                context.log.warning(
                    f"self-influence {cid}: target {target} unlearned only ×{result.loss_ratio:.3f}: failed, not ranked"
                )
                progress.advance(1)
                continue
            others = np.arange(len(item_ids)) != t
            rel = (lu.mean(1) - l0.mean(1)) / l0.mean(1)
            top, bottom = neighbour_similarity(s["rank"], embeddings, t, config.k)
            rows.append(
                {
                    "config_id": cid,
                    "target_item_id": target,
                    "rank": int(s["rank"][t]),
                    "score": float(s["score"][t]),
                    "loss_ratio": result.loss_ratio,
                    "lr_used": result.lr_used,
                    "score_type": settings.score_type,
                    "top_k_similarity": top,
                    "bottom_k_similarity": bottom,
                    "others_median_relative_change": float(np.median(rel[others])),
                    **identity.keys(),
                }
            )
            ranks.append(int(s["rank"][t]))
            rankings.append(s["rank"])
            indices.append(t)
            progress.advance(1)
        failed = len(targets) - len(ranks)
        if not ranks:
            summaries[cid] = {"R": None, "share_first": None, "failed": failed}
            context.log.warning(f"self-influence {cid}: every target's unlearning failed the minimum ratio")
            continue
        summary = summarise(ranks, rankings, embeddings, indices, config.k)
        ratios = [r["loss_ratio"] for r in rows if r["config_id"] == cid]
        standings.append(
            Standing(cid, summary.mean_rank, wilson_lower(ranks.count(1), len(targets)), max(ratios) / min(ratios))
        )
        summaries[cid] = {
            "R": round(summary.mean_rank, 3),
            "share_first": round(summary.share_first, 3),
            "failed": failed,
            "share_first_low": round(standings[-1].share_first_low, 3),
            "loss_ratio_spread": round(standings[-1].loss_ratio_spread, 4),
            "top_k_similarity": round(summary.top_k_similarity, 4),
            "bottom_k_similarity": round(summary.bottom_k_similarity, 4),
            "others_median_relative_change": round(
                float(np.median([r["others_median_relative_change"] for r in rows if r["config_id"] == cid])), 5
            ),
        }
        context.log.info(
            f"self-influence {cid}: R {summary.mean_rank:.2f}, {summary.share_first:.0%} ranked first "
            f"over {len(ranks)} targets ({failed} failed the minimum ratio)"
        )
    df = pl.DataFrame(rows, schema=TABLES["self_influence"].polars_schema(with_partitions=True)).with_columns(
        target_set=pl.lit(config.target_set)
    )
    uris = [
        write_replacing(
            store,
            "self_influence",
            df.filter(pl.col("config_id") == cid),
            "target_set",
            **identity.keys(),
            config_id=cid,
        )
        for cid in summaries
    ]
    best = best_config(standings) if standings else None
    yield MaterializeResult(
        metadata={
            "target_set": config.target_set,
            "targets": MetadataValue.json(targets),
            "per_config": MetadataValue.json(summaries),
            "best_config": best,
            "best_config_rule": "lowest R; a tie: the higher share-first lower end, then the smaller loss-ratio "
            "spread, then the config id",
            "uris": MetadataValue.json(uris),
            **identity.keys(),
        }
    )
