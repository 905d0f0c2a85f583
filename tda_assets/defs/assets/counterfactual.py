"""Evaluation assets: the counterfactual ground-truth check, possible only on the embedded default (DESIGN §1).

For a few queries, retrain the embedded model from scratch (same seed, same `TrainingSettings`) on the
cached training features without the query's top-k attributed items, without k other items of its target
artist (the item-level control), and `random_removals` times (distinct seeded sets, shared by every query:
one retrained model measured on every query) without k random items outside every checked query's top-k,
and measure each query's protocol loss under each model. Verdicts against both controls are the pure
functions of `tda_assets.attribution.counterfactual`; the check passes when more than half of the checked
queries pass against both. Cost: `random_removals + 2 · queries` retrains, plus one for the full model when
the steps differ from the checkpoint's.

The full model. `query_loss_full` is the loss under a model trained with exactly the same settings on all
items. When the retraining settings equal the checkpoint's own (steps, seed and the other
`TrainingSettings`, same items), the checkpoint *is* that model and is used as is (training is seeded
and deterministic); otherwise (e.g. fewer retraining steps to fit a time budget) the full model is
retrained too, so the models of a comparison differ only in their data. `full_model` says which.
"""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
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
from tda_assets.attribution.counterfactual import (
    FLOOR_SDS,
    REMOVALS,
    Verdict,
    majority_passes,
    random_removals,
    same_artist_items,
    share_passing,
    verdict,
)
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.errors import ModelSourceError
from tda_assets.attribution.settings import settings_from_row
from tda_assets.attribution.unlearn import query_loss
from tda_assets.defs import plots
from tda_assets.defs.markdown import markdown_table
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import Identity, all_features, query_batch, require
from tda_assets.io.checkpoints import CheckpointRecord, load_checkpoint, local_model_folder, read_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.tables import list_keys, read_table, table_exists, write_table
from tda_assets.models.embedded.model import EmbeddedAdapter, TrainingSettings, train_denoiser
from tda_assets.models.model_folder import read_model_info
from tda_assets.models.sources import ModelSource

CHECK = "attributed_removal_raises_query_loss_more"


class CounterfactualConfig(Config):
    """Which queries, how many items to remove, how long to retrain."""

    query_ids: Optional[List[str]] = Field(
        default=None,
        description="queries to check; default: the first `n_queries` (by id) that have a target_artist "
        "and an attribution of `config_id`",
    )
    n_queries: int = Field(
        default=4,
        description="queries checked when query_ids is not given; each costs 2 retrains "
        "(its top-k, its same-artist control), the random removals are shared",
    )
    k: int = Field(
        default=10,
        description="items removed: the query's top-k attributed, k of its target artist outside "
        "them, or k random items",
    )
    config_id: str = Field(default="default", description="the unlearning configuration whose top-k is removed")
    train_steps: Optional[int] = Field(
        default=None,
        description="retraining steps; default: the model source's train_steps "
        "(the checkpoint's own, so the checkpoint is the full model)",
    )
    random_removals: int = Field(
        default=3,
        ge=3,
        description="random removals, shared by every query (distinct sets, "
        "seeds `seed`, `seed + 1`, …): their spread is the noise floor; "
        "each is a retrain",
    )
    floor_sds: float = Field(
        default=FLOOR_SDS,
        description="the noise floor is the random rises' mean + floor_sds sample standard deviations",
    )
    seed: int = Field(
        default=0,
        description="seed of the first random removal and of each same-artist control (mixed with the query id)",
    )
    query_draws: int = Field(
        default=64, description="protocol draws of the query loss (the first ones are the protocol's own)"
    )


def default_queries(root, config_id: str, n: int, identity: Identity) -> list[str]:
    """The first `n` queries (sorted) with a target artist and an attribution of `config_id` under `identity`."""
    out = []
    for qid in sorted(k["query_id"] for k in list_keys(root, "queries")):
        if (
            table_exists(root, "attribution_scores", **identity.keys(), query_id=qid, config_id=config_id)
            and read_table(root, "queries", query_id=qid)["target_artist"][0]
        ):
            out.append(qid)
    return out[:n]


def without(data: ItemBatch, removed: set[str]) -> ItemBatch:
    """The training batch minus the removed items (order kept)."""
    return data.select([i for i, item in enumerate(data.item_ids) if item not in removed])


def retrain(
    data: ItemBatch, settings: TrainingSettings, template: EmbeddedAdapter, compute: Compute
) -> EmbeddedAdapter:
    """A fresh embedded model (the checkpoint's front end, seeded init) trained from scratch on `data`."""
    adapter = EmbeddedAdapter.new(seed=settings.seed, frontend=template.frontend).to(compute.device)
    adapter.objective = template.objective
    train_denoiser(adapter, data, settings, compute)
    return adapter


def checkpoint_is_full_model(info: dict, settings: TrainingSettings, n_items: int) -> bool:
    """Whether the checkpoint was trained with exactly these settings on the same number of items."""
    recorded = info.get("training") or {}
    return all(recorded.get(k) == v for k, v in asdict(settings).items()) and recorded.get("items") == n_items


@dataclass(frozen=True)
class Removals:
    """What the check retrains without: per query its top-k and its same-artist control (seeded by `seed`), and the
    random sets `(seed, items)` every query shares."""

    attributed: dict[str, list[str]]
    same_artist: dict[str, list[str]]
    random: list[tuple[int, list[str]]]
    seed: int


def plan_removals(
    root,
    config: CounterfactualConfig,
    query_ids: list[str],
    identity: Identity,
    item_ids: list[str],
    artists: list[str | None],
) -> Removals:
    """Every query's top-k (of the current identity), its same-artist control and the shared random removals, all
    checked before the first (expensive) retrain."""
    attributed, same_artist = {}, {}
    for qid in query_ids:
        require(
            root,
            "attribution_scores",
            identity,
            f"run query {qid!r} with config {config.config_id!r} first",
            query_id=qid,
            config_id=config.config_id,
        )  # this identity's, or an error naming the ones present
        scores = read_table(
            root, "attribution_scores", **identity.keys(), query_id=qid, config_id=config.config_id
        ).sort("rank")
        target = (
            read_table(root, "queries", query_id=qid)["target_artist"][0]
            if table_exists(root, "queries", query_id=qid)
            else None
        )
        if not target:
            raise ValueError(
                f"query {qid!r} has no target_artist: the item-level control removes k other items of the "
                "query's target artist; check queries that have one (the built-in ones do)"
            )
        attributed[qid] = scores.head(config.k)["item_id"].to_list()
        same_artist[qid] = same_artist_items(item_ids, artists, target, config.k, config.seed, qid, attributed[qid])
    every_top_k = sorted(set().union(*attributed.values()))
    random = random_removals(item_ids, config.k, config.random_removals, config.seed, exclude=every_top_k)
    return Removals(attributed, same_artist, random, config.seed)


@dataclass
class Retrainer:
    """Retrains the embedded model from scratch (the checkpoint's front end and settings) without some items, timed."""

    data: ItemBatch
    settings: TrainingSettings
    template: EmbeddedAdapter
    compute: Compute
    log: Callable[[str], None]
    seconds: list[float] = field(default_factory=list)

    def without(self, removed: list[str], label: str) -> EmbeddedAdapter:
        t0 = time.perf_counter()
        adapter = retrain(without(self.data, set(removed)), self.settings, self.template, self.compute)
        self.seconds.append(time.perf_counter() - t0)
        self.log(
            f"retrained without {label} ({len(self.data) - len(removed)} items, {self.settings.steps} steps) in "
            f"{self.seconds[-1]:.0f}s"
        )
        return adapter


Measured = tuple[str, str, int | None, list[str], float]  # query, removal, removal seed, removed items, query loss


def measure_removals(
    plan: Removals, retrainer: Retrainer, loss_of: Callable[[EmbeddedAdapter, str], float]
) -> list[Measured]:
    """The query loss under every removal's retrained model: each shared random model on every query, each query's
    attributed and same-artist models on that query."""
    out: list[Measured] = []
    for seed, items in plan.random:
        model = retrainer.without(items, f"{len(items)} random items (seed {seed})")
        out += [(q, "random", seed, items, loss_of(model, q)) for q in plan.attributed]
    for q in plan.attributed:
        for removal, seed, items in (
            ("attributed", None, plan.attributed[q]),
            ("same_artist", plan.seed, plan.same_artist[q]),
        ):
            out.append((q, removal, seed, items, loss_of(retrainer.without(items, f"{q}'s {removal} items"), q)))
    return out


def verdict_rows(
    measured: list[Measured],
    full_loss: dict[str, float],
    floor_sds: float,
    artist_of: dict[str, str],
    target_of: dict[str, str],
    common: dict,
) -> tuple[list[dict], dict[str, Verdict]]:
    """One row per (query, removal) with the query's verdict against both controls on each, and the verdicts."""
    rows, verdicts = [], {}
    for q, full in full_loss.items():
        mine = sorted((m for m in measured if m[0] == q), key=lambda m: (REMOVAL_ORDER[m[1]], m[2] or 0))
        rises = [(removal, loss - full) for _, removal, _, _, loss in mine]
        v = verdict(
            next(r for removal, r in rises if removal == "attributed"),
            [r for removal, r in rises if removal == "random"],
            next(r for removal, r in rises if removal == "same_artist"),
            floor_sds,
        )
        verdicts[q] = v
        rows += [
            {
                "query_id": q,
                "removal": removal,
                "removal_seed": seed,
                "query_loss_full": full,
                "query_loss_removed": loss,
                "loss_rise": loss - full,
                "relative_rise": (loss - full) / full,
                "removed_of_target_artist": sum(artist_of.get(i) == target_of[q] for i in items),
                "removed_items": ",".join(items),
                "random_rise_mean": v.random_mean,
                "random_rise_sd": v.random_sd,
                "noise_floor": v.floor,
                "floor_sds": floor_sds,
                "passed": v.passed,
                "same_artist_rise": v.same_artist_rise,
                "item_floor": v.item_floor,
                "passed_item_level": v.passed_item_level,
                **common,
            }
            for _, removal, seed, items, loss in mine
        ]
    return rows, verdicts


REMOVAL_ORDER = {removal: i for i, removal in enumerate(REMOVALS)}


def verdict_metadata(verdicts: dict[str, Verdict], config: CounterfactualConfig) -> dict:
    """The check's metadata: both shares, their counts and each query's verdict."""
    per_query = [
        {
            "query_id": q,
            "attributed_rise": round(v.attributed_rise, 6),
            "random_rise_mean": round(v.random_mean, 6),
            "random_rise_sd": round(v.random_sd, 6),
            "noise_floor": round(v.floor, 6),
            "passed": v.passed,
            "same_artist_rise": round(v.same_artist_rise, 6),
            "item_floor": round(v.item_floor, 6),
            "passed_item_level": v.passed_item_level,
        }
        for q, v in verdicts.items()
    ]
    return {
        "queries_passing": sum(v.passed for v in verdicts.values()),
        "queries_passing_item_level": sum(v.passed_item_level for v in verdicts.values()),
        "queries_checked": len(verdicts),
        "share_passing": share_passing(verdicts.values()),
        "share_passing_item_level": share_passing(verdicts.values(), item_level=True),
        "random_removals": config.random_removals,
        "floor_sds": config.floor_sds,
        "verdicts": MetadataValue.json(per_query),
    }


@asset(
    group_name="evaluation",
    **GPU,
    deps=[AssetDep(AssetKey("attribution_scores"), partition_mapping=AllPartitionMapping()), AssetKey("checkpoint")],
    check_specs=[
        AssetCheckSpec(
            CHECK,
            asset="counterfactual",
            description="per query, removing the top-k attributed items raises the query loss above the noise "
            "floor of k random items (mean + 2 sd of `random_removals` shared retrains) and above "
            "the rise of k other items of its target artist by the same margin (item level); "
            "passes when more than half of the checked queries pass item-level",
        )
    ],
    description="Counterfactual ground truth (embedded default only): retrain without each query's top-k attributed "
    "items, without k other items of its target artist, and several times without k random items (shared "
    "by every query); per query, the attributed rise must clear both controls.",
)
def counterfactual(
    context: AssetExecutionContext,
    config: CounterfactualConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    source = model_source.model_source()
    require_embedded(source)
    root, cmp, proto = storage.root(), compute.compute(), protocol.protocol()
    start = time.perf_counter()
    identity = Identity(read_checkpoint_record(root).checkpoint_id, proto.protocol_id)
    query_ids = checked_queries(root, config, identity)
    q_proto = replace(proto, draws=max(config.query_draws, proto.draws))  # the protocol's seed, precision; more draws
    retrainer, record, use_checkpoint = make_retrainer(root, source, cmp, config, context.log.info)
    loss_of = query_loss_of(root, config, query_ids, record, q_proto, cmp)
    item_ids = retrainer.data.item_ids
    artist_of = item_artists(root)
    plan = plan_removals(root, config, query_ids, identity, item_ids, [artist_of.get(i) for i in item_ids])
    full, full_kind = full_model(retrainer, use_checkpoint)
    full_loss = {q: loss_of(full, q) for q in query_ids}
    measured = measure_removals(plan, retrainer, loss_of)
    common = {
        "k": config.k,
        "config_id": config.config_id,
        "train_steps": retrainer.settings.steps,
        "full_model": full_kind,
        "query_draws": q_proto.draws,
        **identity.keys(),
    }
    target_of = target_artists(root, query_ids)
    rows, verdicts = verdict_rows(measured, full_loss, config.floor_sds, artist_of, target_of, common)
    log_verdicts(context.log.info, verdicts)
    df = pl.DataFrame(rows, schema_overrides={"removal_seed": pl.Int64})
    uri = write_table(root, "counterfactual", df, **identity.keys())
    seconds = time.perf_counter() - start
    yield counterfactual_result(
        df, verdicts, config, retrainer.settings.steps, full_kind, retrainer.seconds, seconds, uri, root
    )


def require_embedded(source: ModelSource) -> None:
    """Refuses a model source the check cannot retrain from scratch: only the embedded default can be."""
    if not source.is_embedded:
        raise ModelSourceError(
            f"the counterfactual check retrains the model from scratch: only possible on the embedded "
            f"default, not on {source.source!r}"
        )


def checked_queries(root, config: CounterfactualConfig, identity: Identity) -> list[str]:
    """The config's queries, else the first `n_queries` with a target artist and an attribution (an error when none)."""
    query_ids = config.query_ids or default_queries(root, config.config_id, config.n_queries, identity)
    if not query_ids:
        raise FileNotFoundError(
            f"no query with a target_artist and an attribution of config {config.config_id!r} "
            f"under {identity}: materialize attribution_scores first (e.g. `tda demo`)"
        )
    return query_ids


def masks_losses(root, config_id: str) -> bool:
    """Whether the configuration's recorded settings mask the losses (an unrecorded configuration does not)."""
    if not table_exists(root, "unlearning_configs", config_id=config_id):
        return False
    row = read_table(root, "unlearning_configs", config_id=config_id).row(0, named=True)
    return settings_from_row(row).masks_losses


def make_retrainer(
    root, source: ModelSource, compute: Compute, config: CounterfactualConfig, log: Callable[[str], None]
) -> tuple[Retrainer, CheckpointRecord, bool]:
    """The retrainer of the checkpoint (every training item, the retraining settings), the checkpoint's record, and
    whether the checkpoint itself is the full model (trained with exactly these settings on the same items)."""
    ckpt, record = load_checkpoint(root, source, compute.device)
    data = all_features(root, record.encoder_id)
    settings = TrainingSettings(steps=config.train_steps or source.train_steps, seed=source.train_seed)
    info = read_model_info(local_model_folder(root, record, source))
    return Retrainer(data, settings, ckpt, compute, log), record, checkpoint_is_full_model(info, settings, len(data))


def query_loss_of(
    root, config: CounterfactualConfig, query_ids: list[str], record: CheckpointRecord, proto, compute: Compute
) -> Callable[[EmbeddedAdapter, str], float]:
    """`loss_of(model, query_id)`: a checked query's protocol loss under a model, masked as the configuration is."""
    masked = masks_losses(root, config.config_id)
    queries = {q: query_batch(root, q, record.encoder_id, record.checkpoint_id) for q in query_ids}
    return lambda model, q: query_loss(model, queries[q], proto, compute, masked)


def full_model(retrainer: Retrainer, use_checkpoint: bool) -> tuple[EmbeddedAdapter, str]:
    """The model trained on every item and which it is: the checkpoint itself, or retrained with the settings."""
    if use_checkpoint:
        return retrainer.template, "checkpoint"
    return retrainer.without([], "nothing (the full model)"), "retrained"


def item_artists(root) -> dict[str, str]:
    """item_id → artist of every training item (the manifest's)."""
    manifest = read_table(root, "training_manifest").select("item_id", "artist")
    return dict(zip(manifest["item_id"], manifest["artist"]))


def target_artists(root, query_ids: list[str]) -> dict[str, str]:
    """query_id → the query's target artist."""
    return {q: read_table(root, "queries", query_id=q)["target_artist"][0] for q in query_ids}


def log_verdicts(log: Callable[[str], None], verdicts: dict[str, Verdict]) -> None:
    """One line per query: its attributed rise against the noise floor and the same-artist control, both verdicts."""
    for q, v in verdicts.items():
        log(
            f"{q}: attributed rise {v.attributed_rise:+.4f} vs noise floor {v.floor:+.4f} (random "
            f"{v.random_mean:+.4f} ± {v.random_sd:.4f}), vs same-artist {v.same_artist_rise:+.4f} (item floor "
            f"{v.item_floor:+.4f}): {'PASS' if v.passed else 'FAIL'}, item level "
            f"{'PASS' if v.passed_item_level else 'FAIL'}"
        )


def counterfactual_result(
    df: pl.DataFrame,
    verdicts: dict[str, Verdict],
    config: CounterfactualConfig,
    steps: int,
    full_kind: str,
    retrain_seconds: list[float],
    seconds: float,
    uri: str,
    root,
) -> MaterializeResult:
    """The materialization: the table, the plot, both verdict shares and the check (item level, more than half)."""
    means = {r: float(df.filter(pl.col("removal") == r)["loss_rise"].mean()) for r in REMOVALS}
    title = (
        f"counterfactual: query loss rise after removing k={config.k} items ({steps} training steps; "
        f"floor = random mean + {config.floor_sds:g} sd)"
    )
    plot = plots.write_png(
        root, key("plot", kind="counterfactual", name="loss_rise"), plots.counterfactual_bars(df, title), title
    )
    meta = {**verdict_metadata(verdicts, config), **{f"mean_loss_rise_{r}": v for r, v in means.items()}}
    return MaterializeResult(
        metadata={
            "queries": MetadataValue.json(list(verdicts)),
            "k": config.k,
            "config_id": config.config_id,
            "train_steps": steps,
            "full_model": full_kind,
            "retrains": len(retrain_seconds),
            "seconds": round(seconds, 1),
            "seconds_per_retrain": round(float(np.mean(retrain_seconds)), 1),
            **meta,
            "uri": MetadataValue.path(uri),
            **plot,
            "table": MetadataValue.md(markdown_table(df.select(*TABLE_COLUMNS))),
        },
        check_results=[check_result(verdicts, config, meta)],
    )


# the counterfactual table's columns shown in the materialization's metadata
TABLE_COLUMNS = (
    "query_id",
    "removal",
    "removal_seed",
    "k",
    "query_loss_full",
    "query_loss_removed",
    "loss_rise",
    "noise_floor",
    "item_floor",
    "passed",
    "passed_item_level",
)


def check_result(verdicts: dict[str, Verdict], config: CounterfactualConfig, meta: dict) -> AssetCheckResult:
    """The check: more than half of the queries pass item level; when not, how many passed each control."""
    passed = majority_passes(verdicts.values(), item_level=True)
    return AssetCheckResult(
        check_name=CHECK,
        passed=passed,
        metadata=meta,
        description=None
        if passed
        else (
            f"{meta['queries_passing_item_level']} of {len(verdicts)} queries' attributed removal raised the "
            f"query loss above both the noise floor of {config.random_removals} random removals and the "
            f"same-artist control ({meta['queries_passing']} above the random floor alone); more than half "
            f"must: the attribution of {config.config_id!r} does not find the items the query depends on "
            "beyond its artist (or retrain longer: train_steps)"
        ),
    )
