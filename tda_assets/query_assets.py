"""Per-query assets: the query clip, the unlearned model, its losses, and the attribution tables."""

import io
import time
from typing import Iterator

import numpy as np
import polars as pl
import soundfile as sf
import torch
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource

from . import tables
from .attribution.adapter import ItemBatch, apply_delta
from .attribution.audio import decode_audio
from .attribution.losses import stream_losses
from .attribution.sampling import generate_latents
from .attribution.scores import attribution_scores as score_items
from .attribution.scores import positive_shares, rank_descending
from .attribution.similarity import audio_embedding, cosine_scores, internal_embedding, text_embedding
from .attribution.unlearn import unlearn
from .checks import losses_complete
from .configs import UnlearningConfig
from .inbox import read_query
from .model_assets import baseline_losses, checkpoint, fisher_diagonal
from .partitions import SHARD_KEYS, queries
from .plots import attribution_plot
from .store import (
    baseline_item_ids,
    baseline_matrix,
    read_baseline,
    iter_training_batches,
    load_checkpoint,
    loss_matrix,
    losses_frame,
    query_batch,
    read_uri_bytes,
    write_features,
)
from .tags import GPU

MIN_QUERY_LOSS_RATIO = 1.05


def _top_items(store, scores: pl.DataFrame, n: int = 5) -> list[dict]:
    manifest = store.read_parquet(tables.manifest()).select("item_id", "artist", "caption")
    top = scores.sort("rank").head(n).join(manifest, on="item_id", how="left")
    return top.select("rank", "item_id", "artist", "score", "caption").to_dicts()


@asset(group_name="queries", partitions_def=queries, deps=[checkpoint], **GPU,
       description="The query: a clip generated from its prompt (or the user's clip), its prompt, seed, latent and conditioning.")
def query_clips(
    context: AssetExecutionContext, storage: StorageResource, model_source: ModelSourceResource, compute: ComputeResource
) -> MaterializeResult:
    store, cmp = storage.storage(), compute.compute()
    spec = read_query(store, context.partition_key)
    adapter, pointer = load_checkpoint(store, model_source, cmp.device)
    if spec.audio_uri:  # the user's clip: conditioned on its own duration, as training items are
        samples = decode_audio(read_uri_bytes(spec.audio_uri, store), spec.query_id, adapter.sample_rate)
        cond = adapter.encode_text([spec.prompt], [spec.query_id], durations=[len(samples) / adapter.sample_rate])
        latents, mask = adapter.encode_audio([samples])
        audio_uri = spec.audio_uri
    else:
        cond = adapter.encode_text([spec.prompt], [spec.query_id])
        latents = generate_latents(adapter, cond, spec.seed, cmp)
        mask = torch.ones(1, latents.shape[-1])
        buf = io.BytesIO()
        sf.write(buf, adapter.decode(latents)[0].numpy(), adapter.sample_rate, format="WAV", subtype="PCM_16")
        audio_uri = store.write_bytes(tables.query_clip(spec.query_id, "clip.wav"), buf.getvalue())
    write_features(store, tables.query_clip(spec.query_id, "features.safetensors"), ItemBatch([spec.query_id], latents, cond, mask),
                   {"checkpoint_id": pointer["checkpoint_id"]})
    row = pl.DataFrame({"prompt": [spec.prompt], "seed": [spec.seed], "audio_uri": [audio_uri],
                        "target_artist": pl.Series([spec.target_artist], dtype=pl.Utf8)})
    store.write_parquet(tables.query_row(spec.query_id), row)
    return MaterializeResult(metadata={
        "prompt": spec.prompt, "seed": spec.seed, "target_artist": spec.target_artist or "",
        "generated": spec.audio_uri is None, "audio": MetadataValue.path(audio_uri), "checkpoint_id": pointer["checkpoint_id"],
    })


@asset(
    group_name="unlearning", partitions_def=queries, deps=[query_clips, fisher_diagonal], **GPU,
    check_specs=[AssetCheckSpec("query_loss_raised", asset="unlearned_model", blocking=True,
                                description=f"unlearning raised the query loss by at least {MIN_QUERY_LOSS_RATIO}x")],
    description="The unlearned model of one query and configuration: a weight delta over the parameter subset, and the query loss before/after.",
)
def unlearned_model(
    context: AssetExecutionContext, config: UnlearningConfig, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> Iterator:
    store, cmp, proto = storage.storage(), compute.compute(), protocol.protocol()
    qid, cid = context.partition_key, config.config_id
    adapter, pointer = load_checkpoint(store, model_source, cmp.device)
    fisher, _ = store.read_tensors(tables.fisher(pointer["checkpoint_id"], proto.protocol_id))
    settings = config.settings()
    result = unlearn(adapter, query_batch(store, qid), fisher, settings, proto, cmp, n_train=len(baseline_item_ids(store)))
    delta_uri = store.write_tensors(tables.per_query_config("unlearned_model", qid, cid, "delta.safetensors"), result.delta,
                                    {"checkpoint_id": pointer["checkpoint_id"], "config_id": cid})
    store.write_parquet(tables.config_row(cid), config.row())
    store.write_parquet(tables.per_query_config("unlearning_runs", qid, cid), pl.DataFrame({
        "query_loss_before": [result.query_loss_before], "query_loss_after": [result.query_loss_after],
        "delta_uri": [delta_uri], "seconds": [result.seconds], "checkpoint_id": [pointer["checkpoint_id"]],
    }))
    context.log.info(f"{qid}/{cid}: query loss {result.query_loss_before:.4f} → {result.query_loss_after:.4f} "
                     f"(×{result.loss_ratio:.2f}) in {result.seconds:.1f}s")
    meta = {"config_id": cid, "query_loss_before": result.query_loss_before, "query_loss_after": result.query_loss_after,
            "loss_ratio": result.loss_ratio, "seconds": round(result.seconds, 2), "delta_uri": MetadataValue.path(delta_uri),
            "delta_parameters": sum(d.numel() for d in result.delta.values())}
    yield MaterializeResult(metadata=meta, check_results=[AssetCheckResult(
        check_name="query_loss_raised", passed=bool(result.loss_ratio >= MIN_QUERY_LOSS_RATIO), severity=AssetCheckSeverity.ERROR,
        metadata={"loss_ratio": result.loss_ratio, "config_id": cid},
        description=None if result.loss_ratio >= MIN_QUERY_LOSS_RATIO else
        f"query loss only ×{result.loss_ratio:.3f}: raise lr or steps in config {cid!r}; no attribution from a failed unlearning",
    )])


@asset(
    group_name="unlearning", partitions_def=queries, deps=[unlearned_model], **GPU,
    check_specs=[AssetCheckSpec("losses_finite_and_complete", asset="unlearned_losses")],
    description="ℓ_ik(θ_u): the unlearned model's loss on every training item and fixed draw.",
)
def unlearned_losses(
    context: AssetExecutionContext, config: UnlearningConfig, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> Iterator:
    store, cmp, proto = storage.storage(), compute.compute(), protocol.protocol()
    qid, cid = context.partition_key, config.config_id
    adapter, _ = load_checkpoint(store, model_source, cmp.device)
    delta, _ = store.read_tensors(tables.per_query_config("unlearned_model", qid, cid, "delta.safetensors"))
    frames, start = [], time.perf_counter()
    with apply_delta(adapter.denoiser, delta):
        for item_ids, losses in stream_losses(adapter, iter_training_batches(store, SHARD_KEYS, 32), proto, cmp):
            frames.append(losses_frame(item_ids, losses.loss).with_columns(loss_masked=pl.Series(losses.loss_masked.reshape(-1).numpy())))
    df = pl.concat(frames)
    seconds = time.perf_counter() - start
    uri = store.write_parquet(tables.per_query_config("unlearned_losses", qid, cid), df)
    n_items = df["item_id"].n_unique()
    yield MaterializeResult(metadata={"config_id": cid, "rows": len(df), "items": n_items, "seconds": round(seconds, 1),
                                      "item_draws_per_second": round(len(df) / seconds, 1), "uri": MetadataValue.path(uri)},
                            check_results=[losses_complete("losses_finite_and_complete", df, n_items * proto.draws)])


@asset(
    group_name="attribution", partitions_def=queries,
    deps=[unlearned_losses, AssetDep(baseline_losses, partition_mapping=AllPartitionMapping())],
    check_specs=[AssetCheckSpec("one_row_per_training_item", asset="attribution_scores")],
    description="Unlearning attribution of one query and configuration: score, rank, relative and skew scores, shares.",
)
def attribution_scores(
    context: AssetExecutionContext, config: UnlearningConfig, storage: StorageResource, protocol: LossProtocolResource,
) -> Iterator:
    store, proto = storage.storage(), protocol.protocol()
    qid, cid = context.partition_key, config.config_id
    masked = config.settings().masks_losses
    after = store.read_parquet(tables.per_query_config("unlearned_losses", qid, cid))
    item_ids = after["item_id"].unique(maintain_order=True).to_list()
    l_u = loss_matrix(after, item_ids, proto.draws, "loss_masked" if masked else "loss", "unlearned_losses")
    baseline = read_baseline(store)
    l_0 = baseline_matrix(baseline, item_ids, proto.draws, masked)
    s = score_items(l_0, l_u)
    df = pl.DataFrame({"method": "unlearning", "item_id": item_ids, "score": s["score"], "rank": s["rank"],
                       "relative_score": s["relative_score"], "skew_score": s["skew_score"], "share": s["share"]})
    uri = store.write_parquet(tables.per_query_config("attribution_scores", qid, cid), df)
    n_train = baseline["item_id"].n_unique()  # skipped bad items have no losses and no row
    top = _top_items(store, df)
    context.log.info(f"{qid}/{cid}: top-5 " + ", ".join(f"{t['item_id']} ({t['artist']})" for t in top))
    plot = attribution_plot(store, qid, cid, df)  # plots/top_k/<query>/<config>.png, shown in the UI
    yield MaterializeResult(metadata={"config_id": cid, "rows": len(df), "top_5": MetadataValue.json(top), "uri": MetadataValue.path(uri),
                                      **plot},
                            check_results=[AssetCheckResult(check_name="one_row_per_training_item", passed=len(df) == n_train,
                                                            metadata={"rows": len(df), "training_items": n_train})])


@asset(group_name="attribution", partitions_def=queries, deps=[query_clips, checkpoint], **GPU,
       description="Similarity attribution of one query: cosine similarity on audio, text and internal (denoiser) embeddings.")
def similarity_scores(
    context: AssetExecutionContext, storage: StorageResource, model_source: ModelSourceResource,
    compute: ComputeResource, protocol: LossProtocolResource,
) -> MaterializeResult:
    store, cmp, proto = storage.storage(), compute.compute(), protocol.protocol()
    qid = context.partition_key
    adapter, _ = load_checkpoint(store, model_source, cmp.device)
    query = query_batch(store, qid)
    embed = {
        "audio": audio_embedding,
        "text": text_embedding,
        "internal": lambda b: internal_embedding(adapter, b, proto, cmp),
    }
    item_ids: list[str] = []
    item_embs: dict[str, list[torch.Tensor]] = {name: [] for name in embed}
    for batch in iter_training_batches(store, SHARD_KEYS, 64):
        item_ids.extend(batch.item_ids)
        for name, fn in embed.items():
            item_embs[name].append(fn(batch))
    meta = {}
    for name, fn in embed.items():
        score = cosine_scores(fn(query), torch.cat(item_embs[name])).numpy().astype(np.float64)
        df = pl.DataFrame({"item_id": item_ids, "score": score, "rank": rank_descending(score), "share": positive_shares(score)})
        store.write_parquet(tables.similarity(qid, f"similarity:{name}"), df)
        meta[f"top_5_{name}"] = MetadataValue.json(_top_items(store, df))
    return MaterializeResult(metadata={"rows_per_method": len(item_ids), **meta})
