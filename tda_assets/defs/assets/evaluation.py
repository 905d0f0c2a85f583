"""Evaluation assets: the counterfactual ground-truth check, possible only on the embedded default (DESIGN §1).

For a few queries, retrain the embedded model from scratch (same seed, same `TrainingSettings`) on the
cached training features without the query's top-k attributed items, and `random_removals` times (distinct
seeded sets) without k random items that are not among them, and measure the query's protocol loss under
each. A query passes when its attributed rise is above the noise floor of its random rises (mean + 2 sd,
`tda_assets.attribution.counterfactual`); the check passes when a majority of the checked queries pass.
Cost: `1 + random_removals` retrains per query, plus one for the full model when the steps differ from the
checkpoint's.

The full model. `query_loss_full` is the loss under a model trained with exactly the same settings on all
items. When the retraining settings equal the checkpoint's own (steps, seed and the other
`TrainingSettings`, same items), the checkpoint *is* that model and is used as is (training is seeded
and deterministic); otherwise (e.g. fewer retraining steps to fit a time budget) the full model is
retrained too, so the three models of a comparison differ only in their data. `full_model` says which.
"""

import time
from dataclasses import asdict, replace
from typing import Iterator, List, Optional

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
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
from tda_assets.attribution.counterfactual import FLOOR_SDS, majority_passes, random_removals, share_passing, verdict
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.errors import ModelSourceError
from tda_assets.attribution.settings import settings_from_row
from tda_assets.attribution.unlearn import query_loss
from tda_assets.defs import plots
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import Identity, all_features, query_batch
from tda_assets.io.checkpoints import load_checkpoint, local_model_folder
from tda_assets.io.registry import key
from tda_assets.io.tables import list_keys, read_table, table_exists, write_table
from tda_assets.models.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser
from tda_assets.models.model_folder import read_model_info

CHECK = "attributed_removal_raises_query_loss_more"


class CounterfactualConfig(Config):
    """Which queries, how many items to remove, how long to retrain."""

    query_ids: Optional[List[str]] = Field(
        default=None, description="queries to check; default: the first `n_queries` (by id) that have a target_artist "
                                  "and an attribution of `config_id`")
    n_queries: int = 3
    k: int = Field(default=10, description="items removed: the query's top-k attributed, or k random items")
    config_id: str = Field(default="default", description="the unlearning configuration whose top-k is removed")
    train_steps: Optional[int] = Field(default=None, description="retraining steps; default: the model source's train_steps "
                                                              "(the checkpoint's own, so the checkpoint is the full model)")
    random_removals: int = Field(default=3, ge=3, description="random removals per query (distinct sets, seeds `seed`, "
                                                               "`seed + 1`, …): their spread is the noise floor; each is a retrain")
    floor_sds: float = Field(default=FLOOR_SDS, description="the noise floor is the random rises' mean + floor_sds "
                                                            "sample standard deviations")
    seed: int = Field(default=0, description="seed of the first random removal (mixed with the query id)")
    query_draws: int = Field(default=64, description="protocol draws of the query loss (the first ones are the protocol's own)")


def default_queries(store, config_id: str, n: int) -> list[str]:
    """The first `n` queries (sorted) with a target artist and an attribution of `config_id`."""
    out = []
    for qid in sorted(k["query_id"] for k in list_keys(store, "queries")):
        if (table_exists(store, "attribution_scores", query_id=qid, config_id=config_id)
                and read_table(store, "queries", query_id=qid)["target_artist"][0]):
            out.append(qid)
    return out[:n]


def without(data: ItemBatch, removed: set[str]) -> ItemBatch:
    """The training batch minus the removed items (order kept)."""
    return data.select([i for i, item in enumerate(data.item_ids) if item not in removed])


def retrain(data: ItemBatch, settings: TrainingSettings, template: EmbeddedAdapter, compute: Compute) -> EmbeddedAdapter:
    """A fresh embedded model (the checkpoint's front end, seeded init) trained from scratch on `data`."""
    adapter = EmbeddedAdapter.new(seed=settings.seed, frontend=template.frontend).to(compute.device)
    adapter.objective = template.objective
    train_denoiser(adapter, data, settings, compute)
    return adapter


def markdown_table(df: pl.DataFrame) -> str:
    """A small frame as a markdown table (floats to 4 decimals)."""
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.rows()]
    return "\n".join(lines)


def checkpoint_is_full_model(info: dict, settings: TrainingSettings, n_items: int) -> bool:
    """Whether the checkpoint was trained with exactly these settings on the same number of items."""
    recorded = info.get("training") or {}
    return all(recorded.get(k) == v for k, v in asdict(settings).items()) and recorded.get("items") == n_items


@asset(
    group_name="evaluation", **GPU,
    deps=[AssetDep(AssetKey("attribution_scores"), partition_mapping=AllPartitionMapping()), AssetKey("checkpoint")],
    check_specs=[AssetCheckSpec(CHECK, asset="counterfactual",
                                description="per query, removing the top-k attributed items raises the query loss above the noise "
                                            "floor of removing k random items (mean + 2 sd of `random_removals` retrains); passes "
                                            "when more than half of the checked queries pass (one query: it must pass)")],
    description="Counterfactual ground truth (embedded default only): retrain without the top-k attributed items and, "
                "several times, without k random other items; per query, the attributed rise must clear the random "
                "rises' noise floor.",
)
def counterfactual(
    context: AssetExecutionContext, config: CounterfactualConfig, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> Iterator:
    source = model_source.model_source()
    if not source.is_embedded:
        raise ModelSourceError(f"the counterfactual check retrains the model from scratch: only possible on the embedded "
                               f"default, not on {source.source!r}")
    store, cmp, proto = storage.storage(), compute.compute(), protocol.protocol()
    start = time.perf_counter()
    query_ids = config.query_ids or default_queries(store, config.config_id, config.n_queries)
    if not query_ids:
        raise FileNotFoundError(f"no query with a target_artist and an attribution of config {config.config_id!r}: "
                                "materialize attribution_scores first (e.g. `tda demo`)")
    has_config = table_exists(store, "unlearning_configs", config_id=config.config_id)
    masked = has_config and settings_from_row(
        read_table(store, "unlearning_configs", config_id=config.config_id).row(0, named=True)).masks_losses
    q_proto = replace(proto, draws=max(config.query_draws, proto.draws))  # the protocol's seed and precision, more draws

    ckpt, record = load_checkpoint(store, source, cmp.device)
    identity = Identity(record.checkpoint_id, proto.protocol_id)
    data = all_features(store, record.encoder_id)
    settings = TrainingSettings(steps=config.train_steps or source.train_steps, seed=source.train_seed)
    info = read_model_info(local_model_folder(store, record, source))
    use_checkpoint = checkpoint_is_full_model(info, settings, len(data))
    manifest = read_table(store, "training_manifest").select("item_id", "artist")
    artist_of = dict(zip(manifest["item_id"], manifest["artist"]))
    queries = {q: query_batch(store, q, record.encoder_id) for q in query_ids}
    plan = {}  # query → its removals, every attribution checked before the first (expensive) retrain
    for qid in query_ids:
        if not table_exists(store, "attribution_scores", query_id=qid, config_id=config.config_id):
            raise FileNotFoundError(f"query {qid!r} has no attribution of config {config.config_id!r}: run it first")
        scores = read_table(store, "attribution_scores", query_id=qid, config_id=config.config_id).sort("rank")
        if (scores["checkpoint_id"][0], scores["protocol_id"][0]) != (identity.checkpoint_id, identity.protocol_id):
            raise FileNotFoundError(f"the attribution of {qid!r}/{config.config_id!r} was computed under checkpoint "
                                    f"{scores['checkpoint_id'][0]}, protocol {scores['protocol_id'][0]}, not the current "
                                    f"{identity}: run the query again")
        attributed = scores.head(config.k)["item_id"].to_list()
        plan[qid] = [("attributed", None, attributed)] + [
            ("random", seed, items) for seed, items in
            random_removals(data.item_ids, config.k, config.random_removals, config.seed, qid, exclude=attributed)]

    retrain_seconds: list[float] = []

    def trained_without(removed: set[str], label: str) -> EmbeddedAdapter:
        t0 = time.perf_counter()
        adapter = retrain(without(data, removed), settings, ckpt, cmp)
        retrain_seconds.append(time.perf_counter() - t0)
        context.log.info(f"retrained {label} ({len(data) - len(removed)} items, {settings.steps} steps) in {retrain_seconds[-1]:.0f}s")
        return adapter

    if use_checkpoint:
        full_model, full_kind = ckpt, "checkpoint"
    else:
        full_model, full_kind = trained_without(set(), "full model"), "retrained"
    full_loss = {q: query_loss(full_model, b, q_proto, cmp, masked) for q, b in queries.items()}

    rows, verdicts = [], {}
    for qid, qbatch in queries.items():
        target = (read_table(store, "queries", query_id=qid)["target_artist"][0]
                  if table_exists(store, "queries", query_id=qid) else None)
        query_rows = []
        for removal, seed, items in plan[qid]:
            label = f"{qid} without {config.k} {removal} items" + (f" (seed {seed})" if seed is not None else "")
            model = trained_without(set(items), label)
            removed_loss = query_loss(model, qbatch, q_proto, cmp, masked)
            query_rows.append({
                "query_id": qid, "removal": removal, "removal_seed": seed, "k": config.k, "query_loss_full": full_loss[qid],
                "query_loss_removed": removed_loss, "loss_rise": removed_loss - full_loss[qid],
                "relative_rise": (removed_loss - full_loss[qid]) / full_loss[qid],
                "removed_of_target_artist": sum(artist_of.get(i) == target for i in items) if target else None,
                "removed_items": ",".join(items), "config_id": config.config_id, "train_steps": settings.steps,
                "full_model": full_kind, "query_draws": q_proto.draws, **identity.keys(),
            })
            context.log.info(f"{label}: query loss {full_loss[qid]:.4f} → {removed_loss:.4f}")
        v = verdict(query_rows[0]["loss_rise"], [r["loss_rise"] for r in query_rows[1:]], config.floor_sds)
        verdicts[qid] = v
        rows += [{**r, "random_rise_mean": v.random_mean, "random_rise_sd": v.random_sd, "noise_floor": v.floor,
                  "floor_sds": config.floor_sds, "passed": v.passed} for r in query_rows]
        context.log.info(f"{qid}: attributed rise {v.attributed_rise:+.4f} vs noise floor {v.floor:+.4f} (random "
                         f"{v.random_mean:+.4f} ± {v.random_sd:.4f}): {'PASS' if v.passed else 'FAIL'}")
    df = pl.DataFrame(rows, schema_overrides={"removal_seed": pl.Int64})
    uri = write_table(store, "counterfactual", df)
    means = {r: float(df.filter(pl.col("removal") == r)["loss_rise"].mean()) for r in ("attributed", "random")}
    share, passed = share_passing(verdicts.values()), majority_passes(verdicts.values())
    per_query = [{"query_id": q, "attributed_rise": round(v.attributed_rise, 6), "random_rise_mean": round(v.random_mean, 6),
                  "random_rise_sd": round(v.random_sd, 6), "noise_floor": round(v.floor, 6), "passed": v.passed}
                 for q, v in verdicts.items()]
    seconds = time.perf_counter() - start
    title = (f"counterfactual: query loss rise after removing k={config.k} items ({settings.steps} training steps; "
             f"floor = random mean + {config.floor_sds:g} sd)")
    plot = plots.write_png(store, key("plot", kind="counterfactual", name="loss_rise"), plots.counterfactual_bars(df, title), title)
    verdict_meta = {"queries_passing": sum(v.passed for v in verdicts.values()), "queries_checked": len(verdicts),
                    "share_passing": share, "random_removals": config.random_removals, "floor_sds": config.floor_sds,
                    "verdicts": MetadataValue.json(per_query),
                    "mean_loss_rise_attributed": means["attributed"], "mean_loss_rise_random": means["random"]}
    yield MaterializeResult(
        metadata={
            "queries": MetadataValue.json(list(query_ids)), "k": config.k, "config_id": config.config_id,
            "train_steps": settings.steps, "full_model": full_kind, "retrains": len(retrain_seconds),
            "seconds": round(seconds, 1), "seconds_per_retrain": round(float(np.mean(retrain_seconds)), 1),
            **verdict_meta, "uri": MetadataValue.path(uri), **plot,
            "table": MetadataValue.md(markdown_table(df.select("query_id", "removal", "removal_seed", "k", "query_loss_full",
                                                                 "query_loss_removed", "loss_rise", "noise_floor", "passed"))),
        },
        check_results=[AssetCheckResult(
            check_name=CHECK, passed=passed, metadata=verdict_meta,
            description=None if passed else (
                f"{verdict_meta['queries_passing']} of {len(verdicts)} queries' attributed removal raised the query loss above "
                f"the noise floor of {config.random_removals} random removals; more than half must: the attribution of "
                f"{config.config_id!r} does not find the items the query depends on (or retrain longer: train_steps)"),
        )],
    )
