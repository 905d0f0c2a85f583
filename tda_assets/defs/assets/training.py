"""Training data assets: the manifest (embedded corpus or a user's CSV/parquet) and the cached encoder features."""

import tempfile
from pathlib import Path

import polars as pl
from dagster import AssetExecutionContext, AssetKey, Config, MaterializeResult, MetadataValue, asset

from resources import ModelSourceResource, StorageResource, TrainingDataResource
from tda_assets.attribution.adapter import DiTAdapter, ItemBatch
from tda_assets.attribution.errors import AttributionInputError
from tda_assets.data.audio import decode_audio
from tda_assets.data.corpus import generate_corpus
from tda_assets.data.manifests import MANIFEST_COLUMNS, read_user_manifest, record_manifest_origin, with_shards
from tda_assets.defs.partitions import SHARD_KEYS, training_shards
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import manifest_digest, write_features
from tda_assets.io.registry import key
from tda_assets.io.tables import read_table, write_table
from tda_assets.io.uris import read_uri_bytes
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.models.model_folder import load_model
from tda_assets.models.sources import ModelSource


class ManifestConfig(Config):
    """`manifest_uri` (CSV or parquet with item_id, audio_uri, caption, artist) or the embedded corpus; unset fields
    take the `training_data` resource's values (TDA_MANIFEST, TDA_CLIPS_PER_ARTIST)."""

    manifest_uri: str | None = None
    clips_per_artist: int | None = None
    artists: int | None = None
    corpus_seed: int = 0


@asset(
    group_name="training_data",
    description="One row per training item: item_id, audio_uri, caption, artist, duration_s, shard.",
)
def training_manifest(
    context: AssetExecutionContext,
    config: ManifestConfig,
    storage: StorageResource,
    training_data: TrainingDataResource,
) -> MaterializeResult:
    root = storage.root()
    manifest_uri = config.manifest_uri or training_data.manifest_uri
    clips_per_artist = config.clips_per_artist or training_data.clips_per_artist
    if manifest_uri:
        df = read_user_manifest(manifest_uri, root)
        origin = manifest_uri
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = generate_corpus(
                tmp, clips_per_artist=clips_per_artist, seed=config.corpus_seed, artists=config.artists
            )
            for i, row in enumerate(rows):
                audio_key = key("corpus_audio", artist=row["artist"], item_id=row["item_id"])
                row["audio_uri"] = root.write_bytes(audio_key, Path(row.pop("audio_path")).read_bytes())
                if i % 100 == 0:
                    context.log.info(f"corpus: {i + 1}/{len(rows)} clips written")
        df = pl.DataFrame(rows).select(*MANIFEST_COLUMNS, "duration_s")
        origin = f"embedded synthetic corpus (seed {config.corpus_seed}, {clips_per_artist} clips per artist)"
    df = with_shards(df, len(SHARD_KEYS))
    uri = write_table(root, "training_manifest", df)
    record_manifest_origin(root, manifest_uri)
    counts = df.group_by("artist").len().sort("artist")
    return MaterializeResult(
        metadata={
            "rows": len(df),
            "artists": df["artist"].n_unique(),
            "origin": origin,
            "uri": MetadataValue.path(uri),
            "items_per_artist": MetadataValue.json({r["artist"]: r["len"] for r in counts.to_dicts()}),
        }
    )


class FeaturesConfig(Config):
    """`skip_bad_items`: skip (and report) training items whose audio or caption is bad, instead of failing."""

    skip_bad_items: bool = False


def encoder_adapter(source: ModelSource) -> tuple[DiTAdapter, str]:
    """The frozen encoders and their identity: fixed for the embedded model, else those of the resolved checkpoint."""
    if source.is_embedded:
        return EmbeddedAdapter.new(), source.encoder_id()
    resolved = source.resolve()
    return load_model(resolved.folder, denoiser=False), resolved.checkpoint_id  # encoding needs no DiT weights


@asset(
    group_name="training_data",
    partitions_def=training_shards,
    deps=[AssetKey("training_manifest")],
    **GPU,
    description="Cached latents z_i and conditioning h_i of one shard, keyed by the encoders that made them "
    "(the frozen encoders run once per item, never again).",
)
def training_features(
    context: AssetExecutionContext, config: FeaturesConfig, storage: StorageResource, model_source: ModelSourceResource
) -> MaterializeResult:
    root = storage.root()
    shard = context.partition_key
    rows = read_table(root, "training_manifest").filter(pl.col("shard") == shard)
    adapter, encoder_id = encoder_adapter(model_source.model_source())
    features_key = key("training_features", encoder_id=encoder_id, shard=shard)
    if rows.height == 0:  # a small manifest can leave a shard empty: no features file, nothing downstream to read
        root.delete(features_key)
        context.log.info(f"{shard}: no training items in this shard")
        return MaterializeResult(
            metadata={"rows": 0, "skipped_items": MetadataValue.json([]), "encoder_id": encoder_id}
        )
    good, audio, bad = [], [], []
    for row in rows.iter_rows(named=True):
        try:
            samples = decode_audio(read_uri_bytes(row["audio_uri"], root), row["item_id"], adapter.sample_rate)
            if not (row["caption"] or "").strip():
                raise AttributionInputError(
                    f"item {row['item_id']}: empty caption; write a text description of the music"
                )
        except AttributionInputError as exc:
            where = f"audio_uri {row['audio_uri']!r}, shard {shard}"
            if not config.skip_bad_items:
                raise AttributionInputError(
                    f"{exc} ({where}); or set skip_bad_items: true in the training_features config to skip and "
                    "report it"
                ) from exc
            context.log.warning(f"skipping bad training item: {exc} ({where})")
            bad.append(row["item_id"])
            continue
        good.append(row)
        audio.append(samples)
    if not good:  # every item of the shard was bad and skipped on request: the shard is empty, and says why
        root.delete(features_key)
        context.log.warning(f"{shard}: all {len(bad)} items skipped as bad; the shard is empty")
        return MaterializeResult(
            metadata={"rows": 0, "skipped_items": MetadataValue.json(bad), "encoder_id": encoder_id}
        )
    latents, mask = adapter.encode_audio(audio)
    cond = adapter.encode_text(
        [r["caption"] for r in good],
        [r["item_id"] for r in good],
        durations=[len(a) / adapter.sample_rate for a in audio],
    )
    batch = ItemBatch([r["item_id"] for r in good], latents, cond, mask)
    uri = write_features(
        root,
        features_key,
        batch,
        {"skipped": ",".join(bad), "encoder_id": encoder_id, "manifest_digest": manifest_digest(rows)},
    )
    context.log.info(f"{shard}: encoded {len(good)} items ({len(bad)} skipped)")
    return MaterializeResult(
        metadata={
            "rows": len(good),
            "skipped_items": MetadataValue.json(bad),
            "latent_shape": str(tuple(latents.shape[1:])),
            "encoder_id": encoder_id,
            "uri": MetadataValue.path(uri),
        }
    )
