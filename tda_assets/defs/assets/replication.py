"""Replication detection (DESIGN §1): a training item's own audio after a mild transformation, used as a query with
its caption, must rank that item first. The memorisation case a rights holder cares about most.

Each transform is applied to the source file's audio at its own rate, then the result is decoded and resampled to the
model's rate like any query clip; each row records the transform's SNR against the source in the model's band
(`snr_db`) and how much the query's latents moved (`latent_change`), so a transform that changes nothing is visible."""

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
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.exact import attribute_exact
from tda_assets.attribution.replication import TRANSFORMS, latent_change, snr_db
from tda_assets.attribution.self_influence import TARGET_SETS, targets_of
from tda_assets.attribution.similarity import audio_embedding
from tda_assets.data.audio import Clip, as_query_clip, check_clip
from tda_assets.defs.configs import recorded_settings, require_full_exact
from tda_assets.defs.model_step import TRAINING_SIDE_DEPS, model_step
from tda_assets.defs.progress import Progress
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import loss_matrix
from tda_assets.io.registry import TABLES
from tda_assets.io.tables import read_table, write_replacing
from tda_assets.io.uris import read_uri_bytes


class ReplicationConfig(Config):
    """Which configuration, and how many source items (k-means-chosen, as for self-influence)."""

    config_id: str = "default"
    n_sources: int = Field(
        default=4,
        description="training items whose transformed audio is used as a query (reporting "
        "sources: chosen outside the development targets)",
    )
    seed: int = 0
    target_set: str = Field(
        default="reporting",
        description="`reporting` (n_sources chosen outside the development "
        "targets) or `development` (the self-influence development "
        "targets)",
    )


def transformed_clip(source: Clip, name: str, model_rate: int) -> tuple[np.ndarray, float]:
    """Transform `name` of a clip at its own rate, decoded and resampled to the model's rate as a query clip would be,
    and its SNR against the source in the model's band (0 to the model's Nyquist)."""
    y = TRANSFORMS[name](source.samples, source.sample_rate)
    clip = as_query_clip(y, source.sample_rate, name, model_rate)
    return clip, snr_db(source.samples, y, source.sample_rate, (0.0, model_rate / 2))


@asset(
    group_name="evaluation",
    **GPU,
    deps=TRAINING_SIDE_DEPS,
    description="Replication detection: each source item's audio at its own rate after a −6 dB fade, a 50 ms shift, a "
    "22.05 kHz round trip and 30 dB SNR noise, used as a query with its caption; the rank of the source "
    "among all items, and each transform's SNR in the model's band.",
)
def replication(
    context: AssetExecutionContext,
    config: ReplicationConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    step = model_step(storage, model_source, compute, protocol)
    root, proto, identity, adapter = step.root, step.protocol, step.identity, step.adapter
    settings = require_full_exact(recorded_settings(root, config.config_id), config.config_id, "replication")
    item_ids, data, baseline = step.training_set()
    l0 = loss_matrix(
        baseline, item_ids, proto.draws, "loss_masked" if settings.masks_losses else "loss", "baseline_losses"
    )
    fisher = step.fisher()
    if config.target_set not in TARGET_SETS:
        raise ValueError(f"target_set {config.target_set!r} is not one of {TARGET_SETS}")
    sources = targets_of(config.target_set, audio_embedding(data).numpy(), item_ids, config.n_sources, config.seed)
    manifest = read_table(root, "training_manifest").filter(pl.col("item_id").is_in(sources))
    norms = step.item_norms(settings, item_ids)
    progress = Progress(context.log, "replication", len(sources) * len(TRANSFORMS), len(item_ids) * proto.draws)
    rows = []
    for row in manifest.sort("item_id").iter_rows(named=True):
        source = check_clip(read_uri_bytes(row["audio_uri"], root), row["item_id"])  # at the file's own rate
        t = item_ids.index(row["item_id"])
        for name in TRANSFORMS:
            query_id = f"{row['item_id']}~{name}"
            clip, snr = transformed_clip(source, name, adapter.sample_rate)
            latents, mask = adapter.encode_audio([clip])
            frames = mask[0] if data.frame_mask is None else mask[0] * data.frame_mask[t].to(mask.device)
            change = latent_change(data.latents[t].cpu().numpy(), latents[0].cpu().numpy(), frames.cpu().numpy())
            cond = adapter.encode_text([row["caption"]], [query_id], durations=[len(clip) / adapter.sample_rate])
            query = ItemBatch([query_id], latents, cond, mask)
            s, result, _ = attribute_exact(adapter, query, data, l0, fisher, settings, proto, step.compute, norms)
            ranked = {} if s is None else {"rank": int(s["rank"][t]), "score": float(s["score"][t])}  # None: failed
            rows.append(
                {
                    "config_id": config.config_id,
                    "source_item_id": row["item_id"],
                    "transform": name,
                    **ranked,
                    "loss_ratio": result.loss_ratio,
                    "target_set": config.target_set,
                    "snr_db": snr,
                    "latent_change": change,
                    **identity.keys(),
                }
            )
            if s is None:
                context.log.warning(
                    f"replication: {query_id} unlearned only ×{result.loss_ratio:.3f}: failed, not ranked"
                )
            progress.advance(1)
    df = pl.DataFrame(rows, schema=TABLES["replication"].polars_schema(with_partitions=True))
    uri = write_replacing(root, "replication", df, "target_set", **identity.keys(), config_id=config.config_id)
    first = df.group_by("transform").agg((pl.col("rank") == 1).mean().alias("share_first")).sort("transform")
    snr = df.group_by("transform").agg(pl.col("snr_db").mean()).sort("transform")
    context.log.info(
        "replication, share ranked first: "
        + ", ".join(f"{t} {v:.0%}" for t, v in first.rows())
        + "; mean SNR in band: "
        + ", ".join(f"{t} {v:.1f} dB" for t, v in snr.rows())
    )
    yield MaterializeResult(
        metadata={
            "config_id": config.config_id,
            "target_set": config.target_set,
            "sources": MetadataValue.json(sources),
            "snr_db": MetadataValue.json({t: round(v, 2) for t, v in snr.rows()}),
            "share_first": MetadataValue.json(dict(first.rows())),
            "all_first": bool((df["rank"] == 1).fill_null(False).all()),
            "failed": int(df["rank"].is_null().sum()),  # unlearnings below the minimum ratio: not ranked
            "uri": MetadataValue.path(uri),
            **identity.keys(),
        }
    )
