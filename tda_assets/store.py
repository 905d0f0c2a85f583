"""Reading and writing the engine's inputs and outputs under the storage root; shared by every asset."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import fsspec
import numpy as np
import polars as pl
import torch

from resources.model_source import ModelSourceResource, model_copies_dir
from resources.storage import SUCCESS_MARKER, Storage

from . import tables
from .attribution.adapter import DiTAdapter, ItemBatch
from .attribution.model_folder import load_model

COND_PREFIX = "cond."


def write_features(storage: Storage, key: str, batch: ItemBatch, extra: dict[str, str] | None = None) -> str:
    """Latents, frame mask and conditioning of a batch as one safetensors file; item ids in its metadata."""
    tensors = {"latents": batch.latents.contiguous(), "frame_mask": batch.frame_mask.contiguous()}
    tensors.update({COND_PREFIX + k: v.contiguous() for k, v in batch.conditioning.items()})
    meta = {"item_ids": json.dumps(batch.item_ids), **(extra or {})}
    return storage.write_tensors(key, tensors, meta)


def read_features(storage: Storage, key: str) -> tuple[ItemBatch, dict[str, str]]:
    """The batch written by `write_features`, and the file's other metadata."""
    tensors, meta = storage.read_tensors(key)
    cond = {k[len(COND_PREFIX) :]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
    batch = ItemBatch(json.loads(meta["item_ids"]), tensors["latents"], cond, tensors["frame_mask"])
    return batch, meta


def all_features(store: Storage, shards: list[str]) -> ItemBatch:
    """Every shard's cached training features as one batch (for training and Fisher, which need them all at once)."""
    parts = [read_features(store, tables.features(s))[0] for s in shards if store.exists(tables.features(s))]
    if not parts:
        raise FileNotFoundError("no training_features yet: materialize all training_features partitions first")
    return ItemBatch(
        [i for p in parts for i in p.item_ids],
        torch.cat([p.latents for p in parts]),
        {k: torch.cat([p.conditioning[k] for p in parts]) for k in parts[0].conditioning},
        torch.cat([p.frame_mask for p in parts]),
    )


def iter_training_batches(storage: Storage, shards: list[str], size: int) -> Iterator[ItemBatch]:
    """Training items shard by shard in batches of at most `size` (one shard in memory at a time)."""
    for shard in shards:
        key = tables.features(shard)
        if not storage.exists(key):
            continue
        batch, _ = read_features(storage, key)
        for lo in range(0, len(batch), size):
            yield batch.select(slice(lo, lo + size))


@functools.lru_cache(maxsize=8)
def _bucket_storage(bucket: str, endpoint_url: str | None, _env: tuple) -> Storage:
    return Storage(f"s3://{bucket}", endpoint_url=endpoint_url)


def read_uri_bytes(uri: str | None, storage: Storage) -> bytes | None:
    """Bytes of a file anywhere (plain path, file://, s3://); None if it does not exist.

    s3:// objects are read through an s3fs client configured like the storage root (endpoint, region and
    credentials from the AWS variables); an unreachable endpoint or refused credentials raise StorageError.
    """
    if not uri:
        return None
    if uri.startswith(("s3://", "s3a://")):
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        env = tuple(os.environ.get(v) for v in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE"))
        endpoint = storage.endpoint_url if storage.protocol == "s3" else None
        return _bucket_storage(bucket, endpoint, env).read_if_exists(key)
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def read_checkpoint_pointer(storage: Storage) -> dict:
    """What the `checkpoint` asset recorded: id, kind, source, revision, and where the folder is."""
    key = tables.checkpoint_pointer()
    if not storage.exists(key):
        raise FileNotFoundError("no checkpoint yet: materialize the `checkpoint` asset first")
    return json.loads(storage.read_bytes(key))


@functools.lru_cache(maxsize=2)
def _load_adapter(checkpoint_id: str, folder: str) -> DiTAdapter:
    return load_model(folder)


def local_model_folder(storage: Storage, pointer: dict, model_source: ModelSourceResource) -> Path:
    """A local diffusers folder for the recorded checkpoint (copied from the storage root when needed)."""
    if pointer["kind"] == "embedded" or pointer.get("folder_key"):
        key = pointer["folder_key"]
        local = storage.local_path(key)
        if local:
            return Path(local)
        # the upload's _SUCCESS token keys the local copy: a re-trained folder under the same id is fetched again
        token = storage.read_bytes(f"{key}/{SUCCESS_MARKER}")
        slug = hashlib.sha1(storage.uri(key).encode()).hexdigest()[:10]
        return storage.cached_copy(key, model_copies_dir(model_source.cache_dir) / f"{pointer['checkpoint_id']}-{slug}", token)
    source = pointer["source"]  # what the checkpoint asset recorded, pinned to the resolved hub commit
    if source.startswith("hf://") and pointer.get("revision"):
        source = f"{source.partition('@')[0]}@{pointer['revision']}"
    return model_source.resolve(source).folder


def load_checkpoint(storage: Storage, model_source: ModelSourceResource, device: str = "cpu") -> tuple[DiTAdapter, dict]:
    """The adapter of the materialized checkpoint (cached per process) and its pointer record."""
    pointer = read_checkpoint_pointer(storage)
    folder = local_model_folder(storage, pointer, model_source)
    adapter = _load_adapter(pointer["checkpoint_id"], str(folder))
    if str(adapter.device) != device:
        adapter.to(device)
    for p in adapter.denoiser.parameters():
        p.requires_grad_(True)
    return adapter, pointer


def read_table(storage: Storage, pattern: str) -> pl.DataFrame:
    """All parquet files matching a glob as one frame (hive folder values are not added)."""
    keys = storage.glob(pattern)
    if not keys:
        raise FileNotFoundError(f"no files match {pattern!r} under {storage.url}")
    return pl.concat([storage.read_parquet(k) for k in keys], how="vertical_relaxed")


def read_baseline(storage: Storage) -> pl.DataFrame:
    """Every shard's `baseline_losses` rows as one frame."""
    return read_table(storage, "baseline_losses/shard=*/part-*.parquet")


def baseline_matrix(baseline: pl.DataFrame, item_ids: list[str], draws: int, masked: bool) -> np.ndarray:
    """`L0` as [N, K] in the order of `item_ids` from `read_baseline` rows (raises if any item or draw is missing)."""
    return loss_matrix(baseline, item_ids, draws, "loss_masked" if masked else "loss", "baseline_losses")


def loss_matrix(df: pl.DataFrame, item_ids: list[str], draws: int, column: str, table: str) -> np.ndarray:
    """Pivot long `(item_id, draw, loss)` rows into [N, K] in `item_ids` order."""
    index = {item: i for i, item in enumerate(item_ids)}
    out = np.full((len(item_ids), draws), np.nan)
    rows = df.filter(pl.col("item_id").is_in(item_ids) & (pl.col("draw") < draws))
    out[[index[i] for i in rows["item_id"].to_list()], rows["draw"].to_numpy()] = rows[column].to_numpy()
    missing = np.isnan(out).any(axis=1)
    if missing.any():
        names = [item_ids[i] for i in np.flatnonzero(missing)[:5]]
        raise ValueError(f"{table} is missing draws for {int(missing.sum())} item(s), e.g. {names}: re-materialize it")
    return out


def baseline_item_ids(storage: Storage) -> list[str]:
    """The training items that have baseline losses: the manifest's items minus any skipped as bad (`skip_bad_items`)."""
    return read_baseline(storage)["item_id"].unique(maintain_order=True).to_list()


def query_batch(storage: Storage, query_id: str) -> ItemBatch:
    """The query's latent, frame mask and conditioning written by `query_clips`."""
    batch, _ = read_features(storage, tables.query_clip(query_id, "features.safetensors"))
    return batch


def losses_frame(item_ids: list[str], losses: torch.Tensor, **columns: object) -> pl.DataFrame:
    """Long rows `(…, item_id, draw, loss)` from a [b, K] loss matrix."""
    b, k = losses.shape
    frame = {name: [value] * (b * k) for name, value in columns.items()}
    frame.update(
        item_id=[i for i in item_ids for _ in range(k)],
        draw=np.tile(np.arange(k, dtype=np.int32), b),
        loss=losses.reshape(-1).numpy().astype(np.float32),
    )
    return pl.DataFrame(frame)
