"""Per-query assets: the query clip, the unlearned model, its losses, and the attribution tables; and, past the
partition budget, `query_batch`, which runs the same step functions for each query of a batch.

Every loss and score is pinned to the current checkpoint and loss protocol (`Identity`): a step reads only
artifacts of that identity and stops with an `IdentityError` naming both identities when one is missing.
"""

import io
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import polars as pl
import soundfile as sf
import torch
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from resources import ComputeResource, InboxResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.adapter import DiTAdapter, ItemBatch, apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.losses import stream_losses
from tda_assets.attribution.multifidelity import (
    candidates,
    first_stage_draws,
    signal_ranks,
    staged_scores,
    survivor_count,
    two_stage,
    unlearned_losses_fn,
)
from tda_assets.attribution.linearized import linearized_scores
from tda_assets.attribution.scores import (
    attribution_scores as score_items,
    low_norm_share,
    positive_shares,
    rank_descending,
    score_columns,
)
from tda_assets.attribution.near_copy import near_copy_verdict
from tda_assets.attribution.near_copy_segments import (
    CLIP,
    WINDOW,
    SegmentVerdict,
    verdict_line,
    verdict_of,
    window_verdicts,
)
from tda_assets.attribution.similarity import embedding_scores, embeddings
from tda_assets.attribution.unlearn import unlearn
from tda_assets.data.audio import LONG_CLIP_POLICY, MAX_QUERY_WINDOWS, decode_clip, query_windows
from tda_assets.data.inbox import QuerySpec, read_query
from tda_assets.data.query_batches import read_batch
from tda_assets.data.query_state import DEFAULT_CONFIG, MIN_QUERY_LOSS_RATIO, QueryState
from tda_assets.defs.checks import TwoStagePlan, losses_complete, rows_per_item, two_stage_losses_complete
from tda_assets.defs.configs import UnlearningConfig, partition_config, record_config
from tda_assets.defs.fast_paths import cheap_signals
from tda_assets.defs.markdown import markdown_table
from tda_assets.defs.model_step import TRAINING_SIDE_DEPS, ModelStep, TrainingReads, model_step
from tda_assets.defs.partitions import queries, query_and_config, query_batches, query_configs
from tda_assets.defs.plots import attribution_plot
from tda_assets.defs.progress import Progress
from tda_assets.defs.sensors import wanted_runs
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import (
    COMPUTE_PRECISION,
    Identity,
    iter_training_batches,
    loss_matrix,
    losses_frame,
    partial_loss_matrix,
    query_batch,
    read_unlearned,
    write_features,
)
from tda_assets.io.deltas import read_delta, write_delta
from tda_assets.io.checkpoints import (
    CheckpointRecord,
    load_checkpoint,
    load_checkpoint_encoders,
    read_checkpoint_record,
)
from tda_assets.io.registry import TABLES, key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, table_exists, write_table
from tda_assets.io.uris import read_uri_bytes
from tda_assets.models.sampling import generate_latents


TOP_COLUMNS = {"rank": pl.Int64, "item_id": pl.String, "artist": pl.String, "score": pl.Float64, "caption": pl.String}


def _top_items(side: TrainingReads, scores: pl.DataFrame, n: int = 5) -> list[dict]:
    top = scores.sort("rank").head(n).join(side.manifest(), on="item_id", how="left")
    return top.select(*TOP_COLUMNS).to_dicts()


def _top_table(top: list[dict], above: str | None = None) -> MetadataValue:
    """The top-k as a Markdown table, as the UI shows it beside the plot (`above`: a line printed over it)."""
    table = markdown_table(pl.DataFrame(top, schema=TOP_COLUMNS).rename({"item_id": "item"}))
    return MetadataValue.md(f"{above}\n\n{table}" if above else table)


def _window_batch(
    adapter, prompt: str, query_id: str, samples: np.ndarray, windows: list[tuple[int, int]]
) -> ItemBatch:
    """The windows `(start, end)` of a user's clip encoded as a batch, each conditioned on the prompt and its own
    duration, as training items are."""
    parts = [samples[a:b] for a, b in windows]
    cond = adapter.encode_text(
        [prompt] * len(parts), [query_id] * len(parts), durations=[len(p) / adapter.sample_rate for p in parts]
    )
    latents, mask = adapter.encode_audio(parts)
    return ItemBatch([query_id] * len(parts), latents, cond, mask)


@asset(
    group_name="queries",
    partitions_def=queries,
    deps=[AssetKey("checkpoint")],
    **GPU,
    description="The query: a clip generated from its prompt (or the user's clip), its prompt, seed, latent and "
    "conditioning.",
)
def query_clips(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    inbox: InboxResource,
) -> MaterializeResult:
    root, cmp = storage.root(), compute.compute()
    spec = read_query(root, context.partition_key, inbox.allowed_roots(root))
    load = load_checkpoint_encoders if spec.audio_uri else load_checkpoint  # a user's clip needs no denoiser
    adapter, record = load(root, model_source.model_source(), cmp.device)
    return make_clip(root, cmp, adapter, record, spec, context.log)


def make_clip(
    root: Storage, cmp: Compute, adapter: DiTAdapter, record: CheckpointRecord, spec: QuerySpec, log: logging.Logger
) -> MaterializeResult:
    """The query's clip written to the root (its features, its `queries` row, a generated clip's audio): the step of
    `query_clips`, and of each query of a `query_batch` run."""
    if spec.audio_uri:  # the user's clip: conditioned on its own duration, as training items are
        clip = decode_clip(read_uri_bytes(spec.audio_uri, root), spec.query_id, adapter.sample_rate)
        windows = query_windows(clip.samples, adapter.window_samples)
        encoded = _window_batch(adapter, spec.prompt, spec.query_id, clip.samples, windows)
        cond, latents, mask = encoded.conditioning, encoded.latents, encoded.frame_mask
        audio_uri, generated_by = spec.audio_uri, None
        source = {"source_rate": clip.source_rate, "source_channels": clip.source_channels, "seconds": clip.seconds}
        if len(windows) > 1:
            log.info(
                f"{spec.query_id}: {clip.seconds:.1f} s clip attributed on {len(windows)} windows of "
                f"{adapter.window_samples / adapter.sample_rate:.2f} s"
            )
    else:
        cond = adapter.encode_text([spec.prompt], [spec.query_id])
        latents = generate_latents(adapter, cond, spec.seed, cmp)
        mask = torch.ones(1, latents.shape[-1])
        buf = io.BytesIO()
        sf.write(buf, adapter.decode(latents)[0].numpy(), adapter.sample_rate, format="WAV", subtype="PCM_16")
        audio_uri = root.write_bytes(key("query_audio", query_id=spec.query_id), buf.getvalue())
        generated_by = record.checkpoint_id
        source = {
            "source_rate": adapter.sample_rate,
            "source_channels": 1,
            "seconds": adapter.window_samples / adapter.sample_rate,
        }
    n_windows = latents.shape[0]
    write_features(
        root,
        key("query_features", query_id=spec.query_id),
        ItemBatch([spec.query_id] * n_windows, latents, cond, mask),
        {"encoder_id": record.encoder_id, "checkpoint_id": record.checkpoint_id},
    )
    row = pl.DataFrame(
        {
            "prompt": [spec.prompt],
            "seed": [spec.seed],
            "audio_uri": [audio_uri],
            "target_artist": [spec.target_artist],
            "encoder_id": [record.encoder_id],
            "generated_by": [generated_by],
            **{k: [v] for k, v in source.items()},
            "windows": [n_windows],
        },
        schema_overrides={"target_artist": pl.String, "generated_by": pl.String},
    )
    write_table(root, "queries", row, query_id=spec.query_id)
    return MaterializeResult(
        metadata={
            "prompt": spec.prompt,
            "seed": spec.seed,
            "target_artist": spec.target_artist or "",
            "generated": spec.audio_uri is None,
            "audio": MetadataValue.path(audio_uri),
            "checkpoint_id": record.checkpoint_id,
            **source,
            "windows": n_windows,
            **({"long_clip_policy": LONG_CLIP_POLICY.format(max=MAX_QUERY_WINDOWS)} if n_windows > 1 else {}),
        }
    )


@asset(
    group_name="unlearning",
    partitions_def=query_configs,
    deps=[AssetKey("query_clips"), AssetKey("fisher_diagonal")],
    **GPU,
    check_specs=[
        AssetCheckSpec(
            "query_loss_raised",
            asset="unlearned_model",
            blocking=True,
            description=f"unlearning raised the query loss by at least {MIN_QUERY_LOSS_RATIO}x",
        )
    ],
    description="The unlearned model of one query and configuration: a weight delta over the parameter subset, "
    "and the query loss before/after.",
)
def unlearned_model(
    context: AssetExecutionContext,
    config: UnlearningConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    qid, cid = query_and_config(context)
    step = model_step(storage, model_source, compute, protocol)
    yield unlearn_query(step, qid, partition_config(config, step.root, cid), context.log)


def unlearn_query(step: ModelStep, qid: str, config: UnlearningConfig, log: logging.Logger) -> MaterializeResult:
    """Unlearn one query under one configuration and record it (`unlearning_runs`, its delta), with the blocking check
    `query_loss_raised`: the step of `unlearned_model`, and of each query of a `query_batch` run."""
    root, record, identity, cid = step.root, step.record, step.identity, config.config_id
    settings = config.settings()
    n_train = len(step.side.item_ids())
    # the Fisher read from storage a tensor at a time as the step divides the gradient by it: never whole in memory
    # (4.2 GB at 1 B parameters)
    result = unlearn(
        step.adapter,
        query_batch(root, qid, record.encoder_id, record.checkpoint_id),
        step.fisher(lazy=True),
        settings,
        step.protocol,
        step.compute,
        n_train=n_train,
    )
    delta_uri = write_delta(root, identity, qid, cid, result.delta, {COMPUTE_PRECISION: step.compute.precision})
    record_config(root, config)
    write_table(
        root,
        "unlearning_runs",
        pl.DataFrame(
            {
                "query_loss_before": [result.query_loss_before],
                "query_loss_after": [result.query_loss_after],
                "delta_uri": [delta_uri],
                "seconds": [result.seconds],
                "lr_used": [result.lr_used],
                "target_ratio": [result.target_ratio],
                "search_ratio": [result.search_ratio],
                "probes": [result.probes],
                **{k: [v] for k, v in identity.keys().items()},
            },
            schema_overrides={"target_ratio": pl.Float64, "search_ratio": pl.Float64},
        ),
        **identity.keys(),
        query_id=qid,
        config_id=cid,
    )
    target = (
        f", target ×{result.target_ratio} reached ×{result.search_ratio:.3f} in {result.probes} probes"
        if result.target_ratio
        else ""
    )
    log.info(
        f"{qid}/{cid}: query loss {result.query_loss_before:.4f} → {result.query_loss_after:.4f} "
        f"(×{result.loss_ratio:.2f}) at lr {result.lr_used:g}{target} in {result.seconds:.1f}s"
    )
    meta = {
        "config_id": cid,
        "query_loss_before": result.query_loss_before,
        "query_loss_after": result.query_loss_after,
        "loss_ratio": result.loss_ratio,
        "seconds": round(result.seconds, 2),
        "delta_uri": MetadataValue.path(delta_uri),
        "delta_parameters": sum(d.numel() for d in result.delta.values()),
        "lr_used": result.lr_used,
        **(
            {"target_ratio": result.target_ratio, "search_ratio": result.search_ratio, "probes": result.probes}
            if result.target_ratio
            else {}
        ),
        **identity.keys(),
    }
    return MaterializeResult(
        metadata=meta,
        check_results=[
            AssetCheckResult(
                check_name="query_loss_raised",
                passed=result.passed,
                severity=AssetCheckSeverity.ERROR,
                metadata={"loss_ratio": result.loss_ratio, "config_id": cid},
                description=None
                if result.passed
                else (
                    f"query loss only ×{result.loss_ratio:.3f}: raise lr or steps in config {cid!r}; "
                    "no attribution from a failed unlearning"
                ),
            )
        ],
    )


@asset(
    group_name="unlearning",
    partitions_def=query_configs,
    **GPU,
    deps=[
        AssetKey("unlearned_model"),
        AssetDep(AssetKey("baseline_losses"), partition_mapping=AllPartitionMapping()),
        AssetKey("similarity_scores"),  # the query dimension (inferred mapping)
        AssetDep(AssetKey("training_gradients"), partition_mapping=AllPartitionMapping()),
    ],
    check_specs=[
        AssetCheckSpec(
            "losses_finite_and_complete",
            asset="unlearned_losses",
            description="every training item has every protocol draw, all finite (two_stage: every "
            "rescored item has the draws it was given; linearized: nothing rescored)",
        )
    ],
    description="ℓ_ik(θ_u): the unlearned model's loss on every training item and fixed draw, keyed by checkpoint and "
    "protocol (two_stage: only the cheap signals' candidates, with successive halving over draws; "
    "linearized: nothing, its scores need no exact rescore).",
)
def unlearned_losses(
    context: AssetExecutionContext,
    config: UnlearningConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    qid, cid = query_and_config(context)
    settings = partition_config(config, storage.root(), cid).settings()  # another configuration's run config is refused
    if not settings.needs_exact_rescore:  # no model to load
        yield _no_exact_rescore(storage.root(), protocol.protocol(), qid, cid, settings)
        return
    yield rescore_query(model_step(storage, model_source, compute, protocol), qid, cid, settings, context.log)


def rescore_query(
    step: ModelStep, qid: str, cid: str, settings: UnlearningSettings, log: logging.Logger
) -> MaterializeResult:
    """The unlearned model's losses of one query and configuration (none for `linearized`), with the check
    `losses_finite_and_complete`: the step of `unlearned_losses`, and of each query of a `query_batch` run."""
    if not settings.needs_exact_rescore:
        return _no_exact_rescore(step.root, step.protocol, qid, cid, settings)
    root, proto, record, identity = step.root, step.protocol, step.record, step.identity
    delta = read_delta(root, identity, qid, cid)  # of the stored Fisher, or an IdentityError with the fix
    if settings.stage == "two_stage":
        df, plan, meta = _two_stage_losses(log, step, qid, settings, delta)
        check = two_stage_losses_complete("losses_finite_and_complete", df, plan)
    else:
        expected = step.side.item_ids()
        progress = Progress(log, f"{qid}/{cid} unlearned losses", len(expected), proto.draws)
        frames = []
        with apply_delta(step.adapter.denoiser, delta):
            for ids, losses in stream_losses(
                step.adapter, iter_training_batches(root, record.encoder_id, 32), proto, step.compute
            ):
                frames.append(losses_frame(ids, losses.loss, losses.loss_masked))
                progress.advance(len(ids))
        df = pl.concat(frames)
        meta = {"item_draws_per_second": progress.rate()}
        check = losses_complete("losses_finite_and_complete", df, expected, proto.draws)
    uri = write_table(root, "unlearned_losses", df, **identity.keys(), query_id=qid, config_id=cid)
    return MaterializeResult(
        metadata={
            "config_id": cid,
            "rows": len(df),
            "items": df["item_id"].n_unique(),
            "uri": MetadataValue.path(uri),
            **meta,
            **identity.keys(),
        },
        check_results=[check],
    )


def _no_exact_rescore(root: Storage, proto: LossProtocol, qid: str, cid: str, settings) -> MaterializeResult:
    """`linearized`: no item is rescored, so no losses are written (an older file of the pair is removed, so the table
    never shows another method's losses under this configuration) and the completeness check expects none."""
    identity = Identity(read_checkpoint_record(root).checkpoint_id, proto.protocol_id)
    root.delete(key("unlearned_losses", **identity.keys(), query_id=qid, config_id=cid))
    empty = pl.DataFrame(schema=TABLES["unlearned_losses"].polars_schema())
    return MaterializeResult(
        metadata={
            "config_id": cid,
            "rows": 0,
            "exact_rescore": f"none: method {settings.method!r} scores every item from "
            "training_gradients in attribution_scores",
            **identity.keys(),
        },
        check_results=[losses_complete("losses_finite_and_complete", empty, [], proto.draws)],
    )


def _two_stage_losses(log, step, qid: str, settings, delta) -> tuple[pl.DataFrame, TwoStagePlan, dict]:
    """The exact losses of the cheap signals' candidates by successive halving (DESIGN §1, multi-fidelity): the rows,
    the plan they must follow (fixed from the signals and settings before any rescore), and metadata."""
    root, proto, identity = step.root, step.protocol, step.identity
    item_ids, data, baseline = step.training_set()
    l0 = loss_matrix(
        baseline, item_ids, proto.draws, "loss_masked" if settings.masks_losses else "loss", "baseline_losses"
    )
    gradients = step.side.gradients(settings, item_ids)
    norms = step.side.norms(settings, item_ids, gradients)
    signals = cheap_signals(root, identity, qid, delta, item_ids, gradients, l0, settings.score_type, norms)
    top = settings.candidates_per_signal(len(item_ids))
    picked = [item_ids[i] for i in candidates(signals, top)]
    plan = TwoStagePlan(
        picked,
        proto.draws,
        first_stage_draws(proto.draws, settings.first_draws),
        survivor_count(len(picked), settings.count_or_fraction(settings.keep), settings.min_keep),
    )
    evaluated: list = []
    start = time.perf_counter()
    fn = unlearned_losses_fn(
        step.adapter, data, delta, proto, step.compute, settings.masks_losses, 32, record=evaluated
    )
    result = two_stage(
        l0,
        fn,
        signals,
        top=top,
        first_draws=settings.first_draws,
        keep=settings.count_or_fraction(settings.keep),
        min_keep=settings.min_keep,
        score_type=settings.score_type,
        item_norms=norms,
    )
    seconds = time.perf_counter() - start
    df = pl.concat(
        [
            losses_frame([item_ids[i] for i in idx], part.loss, part.loss_masked, first_draw=first)
            for idx, first, part in evaluated
        ]
    )
    rescored = int(result.rescored.sum())
    full = int((result.draws_used == proto.draws).sum())
    log.info(
        f"{qid}: two_stage rescored {rescored} of {len(item_ids)} items ({full} on all {proto.draws} draws) "
        f"from signals {sorted(signals)}: {result.item_draws} item-draws, "
        f"{result.item_draws / (len(item_ids) * proto.draws):.0%} of the full rescore, in {seconds:.1f}s"
    )
    return (
        df,
        plan,
        {
            "signals": MetadataValue.json(sorted(signals)),
            "candidates": rescored,
            "full_draw_items": full,
            "item_draws": result.item_draws,
            "share_of_full_rescore": round(result.item_draws / (len(item_ids) * proto.draws), 4),
            "item_draws_per_second": round(result.item_draws / max(seconds, 1e-9), 1),
        },
    )


@asset(
    group_name="attribution",
    partitions_def=query_configs,
    deps=[
        AssetKey("unlearned_losses"),
        AssetDep(AssetKey("baseline_losses"), partition_mapping=AllPartitionMapping()),
        AssetDep(AssetKey("training_gradients"), partition_mapping=AllPartitionMapping()),
    ],
    check_specs=[AssetCheckSpec("one_row_per_training_item", asset="attribution_scores")],
    description="Attribution of one query and configuration: score, rank, relative and skew scores, shares (method "
    "unlearning: exact, every item or the two_stage candidates; linearized: from training_gradients).",
)
def attribution_scores(
    context: AssetExecutionContext,
    config: UnlearningConfig,
    storage: StorageResource,
    protocol: LossProtocolResource,
) -> Iterator:
    root, proto = storage.root(), protocol.protocol()
    qid, cid = query_and_config(context)
    settings = partition_config(config, root, cid).settings()
    record = read_checkpoint_record(root)
    side = TrainingReads(root, Identity(record.checkpoint_id, proto.protocol_id), record.encoder_id)
    yield score_query(side, proto, qid, cid, settings, context.log)


def score_query(
    side: TrainingReads, proto: LossProtocol, qid: str, cid: str, settings: UnlearningSettings, log: logging.Logger
) -> MaterializeResult:
    """The attribution scores of one query and configuration (with the check `one_row_per_training_item`): the step
    of `attribution_scores`, and of each query of a `query_batch` run."""
    root, identity = side.root, side.identity
    column = "loss_masked" if settings.masks_losses else "loss"
    baseline = side.baseline()  # the same identity, or an IdentityError: never mixed
    after = read_unlearned(root, identity, qid, cid) if settings.needs_exact_rescore else None
    item_ids = after["item_id"].unique(maintain_order=True).to_list() if settings.is_full_exact else side.item_ids()
    gradients = side.gradients(settings, item_ids)  # the one read of the rows
    norms = side.norms(settings, item_ids, gradients)
    l0 = loss_matrix(baseline, item_ids, proto.draws, column, "baseline_losses")
    if settings.is_full_exact:
        s = score_items(
            l0, loss_matrix(after, item_ids, proto.draws, column, "unlearned_losses"), settings.score_type, norms
        )
    else:
        delta = read_delta(root, identity, qid, cid)
        if settings.method == "linearized":
            s = score_columns(l0, settings.score_type, norms, mean_delta=linearized_scores(gradients, delta))
        else:
            signals = cheap_signals(root, identity, qid, delta, item_ids, gradients, l0, settings.score_type, norms)
            s = staged_scores(
                l0,
                partial_loss_matrix(after, item_ids, proto.draws, column),
                signal_ranks(signals).mean(axis=0),
                settings.score_type,
                norms,
            )
    df = pl.DataFrame(
        {
            "method": settings.method,
            "item_id": item_ids,
            "score": s["score"],
            "rank": s["rank"],
            "mean_delta": s["mean_delta"],
            "relative_score": s["relative_score"],
            "skew_score": s["skew_score"],
            "share": s["share"],
            "score_type": settings.score_type,
            "rescored": s["draws_used"] > 0,
            "draws_used": s["draws_used"],
            **identity.keys(),
        },
        nan_to_null=True,
    )
    uri = write_table(root, "attribution_scores", df, **identity.keys(), query_id=qid, config_id=cid)
    # one row per item the training side encoded (skipped bad items have no features and no row): read from the feature
    # files' headers, not from the baseline losses every non-exact path takes its items from
    check = rows_per_item("one_row_per_training_item", df, side.encoded_ids())
    top = _top_items(side, df)
    log.info(f"{qid}/{cid}: top-5 " + ", ".join(f"{t['item_id']} ({t['artist']})" for t in top))
    near_copy = _near_copy_line(root, identity, qid)
    low = low_norm_share(s["rank"], norms, 10)  # DESIGN §1: the share of the top-10 in the lowest-norm decile
    if low is not None:
        log.info(f"{qid}/{cid}: {low:.0%} of the top-10 lie in the lowest-norm decile")
    plot = attribution_plot(root, qid, cid, df)  # plots/top_k/<query>/<config>.png, shown in the UI
    rescored = (
        {} if settings.is_full_exact else {"method": settings.method, "rescored_items": int(df["rescored"].sum())}
    )
    return MaterializeResult(
        metadata={
            "config_id": cid,
            "rows": len(df),
            "top_5": _top_table(top, near_copy),
            "uri": MetadataValue.path(uri),
            **({"near_copy": near_copy} if near_copy else {}),
            **rescored,
            **identity.keys(),
            **plot,
            **({} if low is None else {"top_10_low_norm_share": low}),
        },
        check_results=[check],
    )


@asset(
    group_name="attribution",
    partitions_def=queries,
    **GPU,
    deps=[
        AssetKey("query_clips"),
        AssetKey("checkpoint"),
        AssetDep(AssetKey("training_embeddings"), partition_mapping=AllPartitionMapping()),
    ],
    description="Similarity attribution of one query: cosine similarity on audio, text and internal (denoiser) "
    "embeddings, against the stored training_embeddings of the current checkpoint and protocol; and the near-copy "
    "verdict (table near_copies) of the whole clip and of each window of a clip longer than the model's window.",
)
def similarity_scores(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> MaterializeResult:
    return similarity_of_query(model_step(storage, model_source, compute, protocol), context.partition_key)


def similarity_of_query(step: ModelStep, qid: str) -> MaterializeResult:
    """The query's similarity scores of every embedding and its near-copy verdicts: the step of `similarity_scores`,
    and of each query of a `query_batch` run."""
    root, record, identity = step.root, step.record, step.identity
    items = step.side.embeddings()  # this identity's, or an IdentityError with the fix
    query = embeddings(
        step.adapter, query_batch(root, qid, record.encoder_id, record.checkpoint_id), step.protocol, step.compute
    )
    meta, clip_scores = {}, {}
    for name, score in embedding_scores(query, items.matrices).items():  # the query's windows pooled
        score = clip_scores[name] = score.numpy().astype(np.float64)
        df = pl.DataFrame(
            {
                "item_id": items.item_ids,
                "score": score,
                "rank": rank_descending(score),
                "share": positive_shares(score),
                **identity.keys(),
            }
        )
        write_table(root, "similarity_scores", df, query_id=qid, method=f"similarity:{name}")
        meta[f"top_5_{name}"] = _top_table(_top_items(step.side, df))
    segments = _segment_verdicts(step, qid, near_copy_verdict(clip_scores, items.item_ids), items)
    write_table(root, "near_copies", _near_copy_frame(segments), **identity.keys(), query_id=qid)
    meta["near_copy"] = verdict_line(segments[0].verdict)
    if len(segments) > 1:
        meta["near_copy_windows"] = _windows_table(segments[1:])
    return MaterializeResult(metadata={"rows_per_method": len(items.item_ids), **identity.keys(), **meta})


WINDOWS_PER_BATCH = 8  # windows embedded at once for their verdicts (bounds the memory of a long clip)


def _segment_verdicts(step, qid: str, clip_verdict, items) -> list[SegmentVerdict]:
    """The whole clip's verdict (`clip_verdict`, from the scores the similarity tables hold) and, for a clip longer
    than the model's window, each window's from its own embeddings scored alone: every window of the clip, not only
    the evenly spaced ones its attribution keeps (`LONG_CLIP_POLICY`), so no second of a long clip goes unexamined."""
    adapter, root = step.adapter, step.root
    row = read_table(root, "queries", query_id=qid).row(0, named=True)
    clip = SegmentVerdict(CLIP, 0.0, float(row["seconds"]), clip_verdict)
    if row["audio_uri"] is None or round(row["seconds"] * adapter.sample_rate) <= adapter.window_samples:
        return [clip]
    samples = decode_clip(read_uri_bytes(row["audio_uri"], root), qid, adapter.sample_rate).samples
    windows = query_windows(samples, adapter.window_samples, max_windows=len(samples))
    out = [clip]
    for i in range(0, len(windows), WINDOWS_PER_BATCH):
        chunk = windows[i : i + WINDOWS_PER_BATCH]
        batch = _window_batch(adapter, row["prompt"], qid, samples, chunk)
        emb = embeddings(adapter, batch, step.protocol, step.compute)
        rate = adapter.sample_rate
        out += [
            SegmentVerdict(WINDOW, a / rate, b / rate, v)
            for (a, b), v in zip(chunk, window_verdicts(emb, items.matrices, items.item_ids))
        ]
    return out


def _near_copy_frame(segments: list[SegmentVerdict]) -> pl.DataFrame:
    """The near_copies rows of a query: one per segment, its seconds and its verdict."""
    return pl.DataFrame(
        [
            {"segment": s.segment, "segment_start_s": s.start_s, "segment_end_s": s.end_s, **asdict(s.verdict)}
            for s in segments
        ],
        schema=TABLES["near_copies"].polars_schema(),
    )


def _windows_table(windows: list[SegmentVerdict]) -> MetadataValue:
    """The per-window verdicts as a Markdown table (the UI's view of which seconds copy which item)."""
    lines = ["| seconds | near copy | copy of (closest) | score | margin |", "|---|---|---|---:|---:|"]
    lines += [
        f"| {w.start_s:.2f}–{w.end_s:.2f} | {'yes' if w.verdict.near_copy else 'no'} | {w.verdict.copy_of or ''} "
        f"| {w.verdict.copy_score:.4g} | {w.verdict.margin:+.4g} |"
        for w in windows
    ]
    return MetadataValue.md("\n".join(lines))


def _near_copy_line(root, identity: Identity, qid: str) -> str | None:
    """The query's whole-clip verdict in words (None when its similarity_scores predate the near_copies table)."""
    if not table_exists(root, "near_copies", **identity.keys(), query_id=qid):
        return None
    df = read_table(root, "near_copies", **identity.keys(), query_id=qid).filter(pl.col("segment") == CLIP)
    return verdict_line(verdict_of(df.row(0, named=True))) if df.height else None


# --- queries past the partition budget: the steps above, for each query of a batch -------------------------------


@dataclass
class BatchOutcome:
    """What a batch run did to each of its queries."""

    states: dict[str, QueryState] = field(default_factory=dict)  # attributed or failed_check
    skipped: list[str] = field(default_factory=list)  # already had a result when the run started
    failed: dict[str, str] = field(default_factory=dict)  # query → its error
    failed_checks: list[str] = field(default_factory=list)  # `query: check` of a non-blocking check that failed


def attribute_query(
    step: ModelStep, qid: str, needs_clip: bool, roots: list[str], log: logging.Logger, outcome: BatchOutcome
) -> QueryState:
    """One query's steps under the default configuration, as its own runs take them: its clip and similarity scores
    when due, the unlearning, then (unless it fails its blocking check `query_loss_raised`) the losses and scores."""
    root = step.root
    if needs_clip:
        make_clip(root, step.compute, step.adapter, step.record, read_query(root, qid, roots), log)
        similarity_of_query(step, qid)
    config = partition_config(UnlearningConfig(), root, DEFAULT_CONFIG)
    unlearned = unlearn_query(step, qid, config, log)
    if not all(c.passed for c in unlearned.check_results):
        return QueryState.FAILED_CHECK
    settings = config.settings()
    for result in (
        rescore_query(step, qid, config.config_id, settings, log),
        score_query(step.side, step.protocol, qid, config.config_id, settings, log),
    ):
        outcome.failed_checks += [f"{qid}: {c.check_name}" for c in result.check_results if not c.passed]
    return QueryState.ATTRIBUTED


def run_batch(step: ModelStep, query_ids: list[str], roots: list[str], log: logging.Logger) -> BatchOutcome:
    """Each query of a batch that has no result yet, in order; a query that raises is logged and recorded, and the
    next one runs."""
    outcome = BatchOutcome()
    due = {qid: s for s, qid, _ in wanted_runs(step.root, query_ids, step.protocol.protocol_id)}
    for qid in query_ids:
        if qid not in due:
            outcome.skipped.append(qid)
            continue
        try:
            outcome.states[qid] = attribute_query(step, qid, due[qid] == "clip", roots, log, outcome)
        except Exception as exc:  # noqa: BLE001 - one broken query must not stop the batch
            outcome.failed[qid] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            log.error(f"{qid}: failed in its batch: {outcome.failed[qid]}")
    return outcome


@asset(
    name="query_batch",  # the function's name is taken by `artifacts.query_batch`, a query's stored features
    group_name="queries",
    partitions_def=query_batches,
    deps=[
        AssetKey("checkpoint"),
        *TRAINING_SIDE_DEPS,
        AssetDep(AssetKey("training_embeddings"), partition_mapping=AllPartitionMapping()),
    ],
    **GPU,
    description="A batch of inbox queries past the partition budget (TDA_MAX_QUERY_PARTITIONS): each query's clip, "
    "similarity and default attribution, written to the same files as its own runs would; the model and training "
    "side read once. The run fails (after the others) when a query failed: that query stays pending.",
)
def query_batch_asset(
    context: AssetExecutionContext,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
    inbox: InboxResource,
) -> MaterializeResult:
    step = model_step(storage, model_source, compute, protocol)
    query_ids = read_batch(step.root, context.partition_key)
    outcome = run_batch(step, query_ids, inbox.allowed_roots(step.root), context.log)
    count = {
        str(s): sum(v == s for v in outcome.states.values()) for s in (QueryState.ATTRIBUTED, QueryState.FAILED_CHECK)
    }
    meta = {
        "queries": len(query_ids),
        **count,
        "already_done": len(outcome.skipped),
        "failed": len(outcome.failed),
        **({"failed_checks": MetadataValue.json(outcome.failed_checks)} if outcome.failed_checks else {}),
    }
    if outcome.failed:
        raise Failure(
            description=f"{len(outcome.failed)} of {len(query_ids)} queries of {context.partition_key} failed (the "
            f"others are written): " + "; ".join(f"{q}: {e}" for q, e in outcome.failed.items()),
            metadata={**meta, "errors": MetadataValue.json(outcome.failed)},
        )
    return MaterializeResult(metadata=meta)
