"""Training data assets: the manifest (embedded corpus or a user's CSV/parquet) and the cached encoder features."""

import os
import tempfile
from pathlib import Path

import polars as pl
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from resources import ModelSourceResource, StorageResource
from resources.storage import Storage

from . import tables
from .attribution.adapter import ItemBatch
from .attribution.audio import decode_audio
from .attribution.embedded.corpus import generate_corpus
from .attribution.embedded.model import EmbeddedAdapter
from .attribution.errors import AttributionInputError
from .partitions import N_SHARDS, shard_of, training_shards
from .tags import GPU
from .store import read_uri_bytes, write_features

MANIFEST_COLUMNS = ("item_id", "audio_uri", "caption", "artist")


class ManifestConfig(Config):
    """`manifest_uri` (CSV or parquet with item_id, audio_uri, caption, artist; else env TDA_MANIFEST) or the embedded corpus."""

    manifest_uri: str | None = os.environ.get("TDA_MANIFEST") or None
    clips_per_artist: int = int(os.environ.get("TDA_CLIPS_PER_ARTIST", "40"))
    artists: int | None = None
    corpus_seed: int = 0


def _absolute_audio_uri(audio_uri: str | None, manifest_uri: str) -> str | None:
    """A relative audio path is relative to the manifest's folder (local or s3://); URLs and absolute paths stay."""
    if not audio_uri or "://" in audio_uri or os.path.isabs(os.path.expanduser(audio_uri)):
        return os.path.expanduser(audio_uri) if audio_uri and audio_uri.startswith("~") else audio_uri
    if "://" in manifest_uri and not manifest_uri.startswith("file://"):
        return f"{manifest_uri.rsplit('/', 1)[0]}/{audio_uri}"
    base = os.path.dirname(os.path.abspath(os.path.expanduser(manifest_uri.removeprefix("file://"))))
    return os.path.normpath(os.path.join(base, audio_uri))


def read_user_manifest(uri: str, store: Storage | None = None) -> pl.DataFrame:
    """A user's manifest (CSV or parquet, local or s3://), checked for the required columns and unique ids."""
    data = read_uri_bytes(uri, store or Storage("."))
    if data is None:
        raise FileNotFoundError(f"manifest {uri} not found: set manifest_uri (or TDA_MANIFEST) to a CSV or parquet file")
    try:
        if uri.endswith((".parquet", ".pq")):
            df = pl.read_parquet(data)
        else:
            df = pl.read_csv(data, infer_schema=False)  # ids like 0012 stay strings
    except Exception as exc:  # noqa: BLE001 - polars raises several types for unreadable files
        raise ValueError(f"manifest {uri} cannot be read as {'parquet' if uri.endswith(('.parquet', '.pq')) else 'CSV'} "
                         f"({type(exc).__name__}: {exc}); write a CSV with a header line or a parquet file") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {uri}: missing column(s) {missing}; required: {', '.join(MANIFEST_COLUMNS)}")
    df = df.with_columns(pl.col(c).cast(pl.Utf8) for c in MANIFEST_COLUMNS)
    no_id = df.with_row_index("row").filter(pl.col("item_id").is_null() | (pl.col("item_id").str.strip_chars() == ""))
    if no_id.height:
        raise ValueError(f"manifest {uri}: row(s) {(no_id['row'] + 1).to_list()[:5]} have no item_id; give every row a unique id")
    dupes = df.filter(pl.col("item_id").is_duplicated())["item_id"].unique().to_list()
    if dupes:
        raise ValueError(f"manifest {uri}: duplicate item_id(s) {dupes[:5]}")
    if "duration_s" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Float64).alias("duration_s"))
    df = df.with_columns(pl.col("duration_s").cast(pl.Float64, strict=False),
                         pl.col("audio_uri").map_elements(lambda u: _absolute_audio_uri(u, uri), return_dtype=pl.Utf8))
    return df.select(*MANIFEST_COLUMNS, "duration_s")


@asset(group_name="training_data", description="One row per training item: item_id, audio_uri, caption, artist, duration_s, shard.")
def training_manifest(context: AssetExecutionContext, config: ManifestConfig, storage: StorageResource) -> MaterializeResult:
    store = storage.storage()
    manifest_uri = config.manifest_uri or os.environ.get("TDA_MANIFEST") or None  # the env as it is at run time
    if manifest_uri:
        df = read_user_manifest(manifest_uri, store)
        origin = manifest_uri
    else:
        with tempfile.TemporaryDirectory() as tmp:
            rows = generate_corpus(tmp, clips_per_artist=config.clips_per_artist, seed=config.corpus_seed, artists=config.artists)
            for i, row in enumerate(rows):
                key = tables.corpus_audio(row["artist"], row["item_id"])
                row["audio_uri"] = store.write_bytes(key, Path(row.pop("audio_path")).read_bytes())
                if i % 100 == 0:
                    context.log.info(f"corpus: {i + 1}/{len(rows)} clips written")
        df = pl.DataFrame(rows).select(*MANIFEST_COLUMNS, "duration_s")
        origin = f"embedded synthetic corpus (seed {config.corpus_seed}, {config.clips_per_artist} clips per artist)"
    df = df.with_columns(pl.col("item_id").map_elements(lambda i: shard_of(i, N_SHARDS), return_dtype=pl.Utf8).alias("shard"))
    uri = store.write_parquet(tables.manifest(), df)
    counts = df.group_by("artist").len().sort("artist")
    return MaterializeResult(metadata={
        "rows": len(df), "artists": df["artist"].n_unique(), "origin": origin, "uri": MetadataValue.path(uri),
        "items_per_artist": MetadataValue.json({r["artist"]: r["len"] for r in counts.to_dicts()}),
    })


class FeaturesConfig(Config):
    """`skip_bad_items`: skip (and report) training items whose audio or caption is bad, instead of failing."""

    skip_bad_items: bool = False


def encoder_adapter(model_source: ModelSourceResource):
    """The frozen encoders: fixed for the embedded model, else those of the resolved checkpoint folder."""
    if model_source.is_embedded:
        return EmbeddedAdapter.new()
    from .attribution.model_folder import load_model

    return load_model(model_source.resolve().folder)


@asset(
    group_name="training_data", partitions_def=training_shards, deps=[training_manifest], **GPU,
    description="Cached latents z_i and conditioning h_i of one shard (the frozen encoders run once per item, never again).",
)
def training_features(
    context: AssetExecutionContext, config: FeaturesConfig, storage: StorageResource, model_source: ModelSourceResource
) -> MaterializeResult:
    store = storage.storage()
    shard = context.partition_key
    rows = store.read_parquet(tables.manifest()).filter(pl.col("shard") == shard)
    if rows.height == 0:  # a small manifest can leave a shard empty: no features file, nothing downstream to read
        store.delete(tables.features(shard))
        context.log.info(f"{shard}: no training items in this shard")
        return MaterializeResult(metadata={"rows": 0, "skipped_items": MetadataValue.json([])})
    adapter = encoder_adapter(model_source)
    good, audio, bad = [], [], []
    for row in rows.iter_rows(named=True):
        try:
            samples = decode_audio(read_uri_bytes(row["audio_uri"], store), row["item_id"], adapter.sample_rate)
            if not (row["caption"] or "").strip():
                raise AttributionInputError(f"item {row['item_id']}: empty caption; write a text description of the music")
        except AttributionInputError as exc:
            where = f"audio_uri {row['audio_uri']!r}, shard {shard}"
            if not config.skip_bad_items:
                raise AttributionInputError(
                    f"{exc} ({where}); or set skip_bad_items: true in the training_features config to skip and report it"
                ) from exc
            context.log.warning(f"skipping bad training item: {exc} ({where})")
            bad.append(row["item_id"])
            continue
        good.append(row)
        audio.append(samples)
    if not good:  # every item of the shard was bad and skipped on request: the shard is empty, and says why
        store.delete(tables.features(shard))
        context.log.warning(f"{shard}: all {len(bad)} items skipped as bad; the shard is empty")
        return MaterializeResult(metadata={"rows": 0, "skipped_items": MetadataValue.json(bad)})
    latents, mask = adapter.encode_audio(audio)
    cond = adapter.encode_text([r["caption"] for r in good], [r["item_id"] for r in good],
                               durations=[len(a) / adapter.sample_rate for a in audio])
    batch = ItemBatch([r["item_id"] for r in good], latents, cond, mask)
    uri = write_features(store, tables.features(shard), batch, {"skipped": ",".join(bad)})
    context.log.info(f"{shard}: encoded {len(good)} items ({len(bad)} skipped)")
    return MaterializeResult(metadata={
        "rows": len(good), "skipped_items": MetadataValue.json(bad), "latent_shape": str(tuple(latents.shape[1:])),
        "uri": MetadataValue.path(uri),
    })
