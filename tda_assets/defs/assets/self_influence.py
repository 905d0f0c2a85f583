"""The paper's self-influence protocol as an asset (DESIGN §1): diverse training items, each unlearned from its own
latent and caption as the query; per configuration, the rank of the item itself among all items. The targets are the
development set (what tuned the defaults) or the reporting set chosen outside it (`target_set`, recorded on every row);
the best configuration is chosen by `best_config`'s stated rule, never by the order of `config_ids`."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import polars as pl
import torch
from dagster import (
    AssetExecutionContext,
    DagsterLogManager,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.exact import attribute_exact
from tda_assets.attribution.self_influence import (
    TARGET_SETS,
    Standing,
    best_config,
    neighbour_similarity,
    summarize,
    targets_of,
    wilson_lower,
)
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.defs.configs import recorded_settings, require_full_exact
from tda_assets.defs.model_step import TRAINING_SIDE_DEPS, ModelStep, model_step
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
    for cid in config.config_ids:
        require_full_exact(recorded_settings(step.root, cid), cid, "self_influence")
    if config.target_set not in TARGET_SETS:
        raise ValueError(f"target_set {config.target_set!r} is not one of {TARGET_SETS}")
    side = training_side(step)
    targets = targets_of(config.target_set, side.embeddings, side.item_ids, config.n_targets, config.seed)
    rows, summaries, standings = [], {}, []
    for cid in config.config_ids:
        judged = judge_config(side, cid, targets, config.k, context.log)
        rows += judged.rows
        summaries[cid], standing = summarize_config(cid, judged, side.embeddings, len(targets), config.k, context.log)
        standings += [standing] if standing else []
    uris = write_results(step, rows, list(summaries), config.target_set)
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
            **step.identity.keys(),
        }
    )


@dataclass(frozen=True)
class TrainingSide:
    """What every configuration is judged on: the step, the items with baseline losses (ids, features, losses),
    their audio embeddings and the Fisher diagonal."""

    step: ModelStep
    item_ids: list[str]
    data: ItemBatch
    baseline: pl.DataFrame
    embeddings: np.ndarray
    fisher: Mapping[str, torch.Tensor]


def training_side(step: ModelStep) -> TrainingSide:
    """Read the training side of the step's identity once, for every configuration."""
    item_ids, data, baseline = step.training_set()
    return TrainingSide(step, item_ids, data, baseline, audio_embedding(data).numpy(), step.fisher())


@dataclass
class Judged:
    """One configuration's targets: a row each, and the rank, full ranking and item index of each one ranked."""

    rows: list[dict] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    rankings: list[np.ndarray] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)


def judge_config(side: TrainingSide, cid: str, targets: list[str], k: int, log: DagsterLogManager) -> Judged:
    """Unlearn every target as its own query under configuration `cid`; a target whose unlearning misses the minimum
    ratio is recorded as failed (rank null, with its ratio), not ranked."""
    step, settings = side.step, recorded_settings(side.step.root, cid)
    proto = step.protocol
    column = "loss_masked" if settings.masks_losses else "loss"
    l0 = loss_matrix(side.baseline, side.item_ids, proto.draws, column, "baseline_losses")
    norms = step.item_norms(settings, side.item_ids)
    progress = Progress(log, f"self-influence {cid}", len(targets), len(side.item_ids) * proto.draws)
    judged = Judged()
    for target in targets:
        t = side.item_ids.index(target)
        s, result, lu = attribute_exact(
            step.adapter, side.data.select([t]), side.data, l0, side.fisher, settings, proto, step.compute, norms
        )
        row = {
            "config_id": cid,
            "target_item_id": target,
            "loss_ratio": result.loss_ratio,
            "lr_used": result.lr_used,
            "score_type": settings.score_type,
            **step.identity.keys(),
        }
        if s is None:
            log.warning(
                f"self-influence {cid}: target {target} unlearned only ×{result.loss_ratio:.3f}: failed, not ranked"
            )
        else:
            row.update(ranked_columns(s, t, lu, l0, side.embeddings, k))
            judged.ranks.append(int(s["rank"][t]))
            judged.rankings.append(s["rank"])
            judged.indices.append(t)
        judged.rows.append(row)
        progress.advance(1)
    return judged


def ranked_columns(
    s: dict[str, np.ndarray], t: int, lu: np.ndarray, l0: np.ndarray, embeddings: np.ndarray, k: int
) -> dict:
    """A ranked target's rank and score, the embedding similarity of its top-k and bottom-k, and the median relative
    loss change of the other items."""
    others = np.arange(len(l0)) != t
    rel = (lu.mean(1) - l0.mean(1)) / l0.mean(1)
    top, bottom = neighbour_similarity(s["rank"], embeddings, t, k)
    return {
        "rank": int(s["rank"][t]),
        "score": float(s["score"][t]),
        "top_k_similarity": top,
        "bottom_k_similarity": bottom,
        "others_median_relative_change": float(np.median(rel[others])),
    }


def summarize_config(
    cid: str, judged: Judged, embeddings: np.ndarray, n_targets: int, k: int, log: DagsterLogManager
) -> tuple[dict, Standing | None]:
    """The configuration's summary (R, share ranked first and its lower end, loss-ratio spread, similarities, the
    others' change) and its standing for `best_config` (None when no target was ranked)."""
    failed = n_targets - len(judged.ranks)
    if not judged.ranks:
        log.warning(f"self-influence {cid}: every target's unlearning failed the minimum ratio")
        return {"R": None, "share_first": None, "failed": failed}, None
    summary = summarize(judged.ranks, judged.rankings, embeddings, judged.indices, k)
    ratios = [r["loss_ratio"] for r in judged.rows]
    standing = Standing(
        cid, summary.mean_rank, wilson_lower(judged.ranks.count(1), n_targets), max(ratios) / min(ratios)
    )
    others = [r["others_median_relative_change"] for r in judged.rows if "rank" in r]  # the ranked targets'
    log.info(
        f"self-influence {cid}: R {summary.mean_rank:.2f}, {summary.share_first:.0%} ranked first "
        f"over {len(judged.ranks)} targets ({failed} failed the minimum ratio)"
    )
    return {
        "R": round(summary.mean_rank, 3),
        "share_first": round(summary.share_first, 3),
        "failed": failed,
        "share_first_low": round(standing.share_first_low, 3),
        "loss_ratio_spread": round(standing.loss_ratio_spread, 4),
        "top_k_similarity": round(summary.top_k_similarity, 4),
        "bottom_k_similarity": round(summary.bottom_k_similarity, 4),
        "others_median_relative_change": round(float(np.median(others)), 5),
    }, standing


def write_results(step: ModelStep, rows: list[dict], config_ids: list[str], target_set: str) -> list[str]:
    """One table per configuration under the step's identity, replacing its rows of `target_set` (others kept)."""
    df = pl.DataFrame(rows, schema=TABLES["self_influence"].polars_schema(with_partitions=True)).with_columns(
        target_set=pl.lit(target_set)
    )
    return [
        write_replacing(
            step.root,
            "self_influence",
            df.filter(pl.col("config_id") == cid),
            "target_set",
            **step.identity.keys(),
            config_id=cid,
        )
        for cid in config_ids
    ]
