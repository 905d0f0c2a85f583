"""Training manifests: a user's CSV or parquet (checked, audio paths made absolute) and the stable shard of each
item."""

from __future__ import annotations

import hashlib
import json
import os

import polars as pl

from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.io.uris import read_uri_bytes


def shard_keys(n_shards: int) -> list[str]:
    """The shard partition keys: `shard-00` … ."""
    return [f"shard-{i:02d}" for i in range(n_shards)]


def shard_of(item_id: str, n_shards: int) -> str:
    """The shard a training item belongs to: a stable hash of its id (any machine, any order)."""
    h = int.from_bytes(hashlib.blake2b(item_id.encode(), digest_size=4).digest(), "little")
    return f"shard-{h % n_shards:02d}"


def with_shards(df: pl.DataFrame, n_shards: int) -> pl.DataFrame:
    """The manifest with its `shard` column."""
    return df.with_columns(
        pl.col("item_id").map_elements(lambda i: shard_of(i, n_shards), return_dtype=pl.Utf8).alias("shard")
    )


MANIFEST_COLUMNS = ("item_id", "audio_uri", "caption", "artist")


def _absolute_audio_uri(audio_uri: str | None, manifest_uri: str) -> str | None:
    """A relative audio path is relative to the manifest's folder (local or s3://); URLs and absolute paths stay."""
    if not audio_uri or "://" in audio_uri or os.path.isabs(os.path.expanduser(audio_uri)):
        return os.path.expanduser(audio_uri) if audio_uri and audio_uri.startswith("~") else audio_uri
    if "://" in manifest_uri and not manifest_uri.startswith("file://"):
        return f"{manifest_uri.rsplit('/', 1)[0]}/{audio_uri}"
    base = os.path.dirname(os.path.abspath(os.path.expanduser(manifest_uri.removeprefix("file://"))))
    return os.path.normpath(os.path.join(base, audio_uri))


def _check_utf8(data: bytes, uri: str) -> None:
    """ValueError naming the manifest, the line and the byte when a CSV is not UTF-8 (polars says only "invalid
    utf-8")."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"manifest {uri} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line}; save it as UTF-8 "
            "(e.g. `iconv -f latin1 -t utf-8 old.csv > new.csv`)"
        ) from None


def read_user_manifest(uri: str, root: Storage | None = None) -> pl.DataFrame:
    """A user's manifest (CSV or parquet, local or s3://), checked for the required columns and unique ids."""
    data = read_uri_bytes(uri, root or Storage("."))
    if data is None:
        raise FileNotFoundError(
            f"manifest {uri} not found: set manifest_uri (or TDA_MANIFEST) to a CSV or parquet file"
        )
    if not uri.endswith((".parquet", ".pq")):
        _check_utf8(data, uri)
    try:
        if uri.endswith((".parquet", ".pq")):
            df = pl.read_parquet(data)
        else:
            df = pl.read_csv(data, infer_schema=False)  # ids like 0012 stay strings
    except Exception as exc:  # noqa: BLE001 - polars raises several types for unreadable files
        raise ValueError(
            f"manifest {uri} cannot be read as {'parquet' if uri.endswith(('.parquet', '.pq')) else 'CSV'} "
            f"({type(exc).__name__}: {exc}); write a CSV with a header line or a parquet file"
        ) from None
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest {uri}: missing column(s) {missing}; required: {', '.join(MANIFEST_COLUMNS)}")
    df = df.with_columns(pl.col(c).cast(pl.Utf8) for c in MANIFEST_COLUMNS)
    no_id = df.with_row_index("row").filter(pl.col("item_id").is_null() | (pl.col("item_id").str.strip_chars() == ""))
    if no_id.height:
        raise ValueError(
            f"manifest {uri}: row(s) {(no_id['row'] + 1).to_list()[:5]} have no item_id; give every row a unique id"
        )
    dupes = df.filter(pl.col("item_id").is_duplicated())["item_id"].unique().to_list()
    if dupes:
        raise ValueError(f"manifest {uri}: duplicate item_id(s) {dupes[:5]}; give every row a unique item_id")
    if "duration_s" not in df.columns:
        df = df.with_columns(pl.lit(None, pl.Float64).alias("duration_s"))
    df = df.with_columns(
        pl.col("duration_s").cast(pl.Float64, strict=False),
        pl.col("audio_uri").map_elements(lambda u: _absolute_audio_uri(u, uri), return_dtype=pl.Utf8),
    )
    return df.select(*MANIFEST_COLUMNS, "duration_s")


def record_manifest_origin(root: Storage, manifest_uri: str | None) -> None:
    """Record in the root which manifest it was prepared from (None: the embedded corpus), so that every reader of the
    inbox (the sensor, `tda queries`, `tda add-query`) allows query clips from that manifest's folder."""
    if manifest_uri and "://" not in manifest_uri:  # a local path, as the process that prepared the root saw it
        manifest_uri = os.path.abspath(os.path.expanduser(manifest_uri))
    root.write_bytes(key("manifest_origin"), json.dumps({"manifest_uri": manifest_uri}).encode())


def manifest_origin(root: Storage) -> str | None:
    """The manifest the root was prepared from (`record_manifest_origin`); None for the embedded corpus or an older
    root."""
    data = root.read_if_exists(key("manifest_origin"))
    return json.loads(data).get("manifest_uri") if data else None
