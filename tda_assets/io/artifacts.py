"""The engine's cached inputs and outputs under the storage root, each pinned to its identity.

Training features by the encoders they came from (`encoder_id`); baseline and unlearned losses by `checkpoint_id` and
`protocol_id`; training embeddings by all three. A reader asked for one identity never returns another's artifact: it
raises `IdentityError`, which names the identity asked for, the ones present, and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import numpy as np
import polars as pl
import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.protocol_id import PRECISION_SUFFIX, precision_twin
from tda_assets.attribution.similarity import EMBEDDINGS

from .registry import key
from .storage import Storage
from .tables import clip_generated_by, list_keys, read_tables

COND_PREFIX = "cond."
CONTENT_DIGEST = "content_digest"  # a features file's metadata field: `tensors_digest` of its tensors
FEATURES_DIGEST = "features_digest"  # what baseline losses and gradient stores record of the features they came from
EMBEDDING_PREFIX = "embedding."


class IdentityError(FileNotFoundError):
    """An artifact is missing for the identity a step needs; the message names both identities and the fix."""


@dataclass(frozen=True)
class Identity:
    """What losses and scores were computed with: the checkpoint and the loss protocol."""

    checkpoint_id: str
    protocol_id: str

    def keys(self) -> dict[str, str]:
        return {"checkpoint_id": self.checkpoint_id, "protocol_id": self.protocol_id}

    def __str__(self) -> str:
        return f"checkpoint {self.checkpoint_id}, protocol {self.protocol_id}"


# features --------------------------------------------------------------------------------------------------------
def write_features(root: Storage, key_: str, batch: ItemBatch, meta: dict[str, str]) -> str:
    """Latents, frame mask and conditioning of a batch as one safetensors file; item ids and `meta` in its metadata."""
    tensors = {"latents": batch.latents.contiguous(), "frame_mask": batch.frame_mask.contiguous()}
    tensors.update({COND_PREFIX + k: v.contiguous() for k, v in batch.conditioning.items()})
    meta = {"item_ids": json.dumps(batch.item_ids), CONTENT_DIGEST: tensors_digest(tensors), **meta}
    return root.write_tensors(key_, tensors, meta)


def read_features(root: Storage, key_: str) -> tuple[ItemBatch, dict[str, str]]:
    """The batch written by `write_features`, and the file's other metadata."""
    tensors, meta = root.read_tensors(key_)
    cond = {k[len(COND_PREFIX) :]: v for k, v in tensors.items() if k.startswith(COND_PREFIX)}
    return ItemBatch(json.loads(meta["item_ids"]), tensors["latents"], cond, tensors["frame_mask"]), meta


def manifest_digest(rows: pl.DataFrame) -> str:
    """A digest of the manifest rows features are made from (id, audio and caption): a changed row changes it."""
    cols = rows.select("item_id", "audio_uri", "caption").sort("item_id").rows()
    return hashlib.blake2b(json.dumps(cols).encode(), digest_size=8).hexdigest()


def feature_shards(root: Storage, encoder_id: str) -> list[str]:
    """The shards that have training features made by `encoder_id`."""
    return sorted(k["shard"] for k in list_keys(root, "training_features", encoder_id=encoder_id))


def iter_training_batches(
    root: Storage, encoder_id: str, size: int, shards: list[str] | None = None
) -> Iterator[ItemBatch]:
    """Training items shard by shard in batches of at most `size` (one shard in memory at a time)."""
    for shard in feature_shards(root, encoder_id) if shards is None else shards:
        k = key("training_features", encoder_id=encoder_id, shard=shard)
        if not root.exists(k):
            continue
        batch, _ = read_features(root, k)
        for lo in range(0, len(batch), size):
            yield batch.select(slice(lo, lo + size))


def all_features(root: Storage, encoder_id: str) -> ItemBatch:
    """Every shard's training features as one batch (training and the counterfactual need them all at once)."""
    parts = [
        read_features(root, key("training_features", encoder_id=encoder_id, shard=s))[0]
        for s in feature_shards(root, encoder_id)
    ]
    if not parts:
        others = sorted({k["encoder_id"] for k in list_keys(root, "training_features")})
        raise IdentityError(
            f"no training_features made by encoders {encoder_id} under {root.url}"
            + (f" (there are features of encoders {others})" if others else "")
            + ": materialize training_features for every shard (`tda prepare`, or the UI)"
        )
    return ItemBatch(
        [i for p in parts for i in p.item_ids],
        torch.cat([p.latents for p in parts]),
        {k: torch.cat([p.conditioning[k] for p in parts]) for k in parts[0].conditioning},
        torch.cat([p.frame_mask for p in parts]),
    )


def shard_features_digest(root: Storage, encoder_id: str, shard: str) -> str | None:
    """A digest of one shard's training features, from its file's header alone (None when the shard has none): what
    baseline losses and gradient stores record, so that under an external checkpoint (whose id does not change with
    the corpus) a changed corpus is not read against losses or gradients of the old one."""
    k = key("training_features", encoder_id=encoder_id, shard=shard)
    if not root.exists(k):
        return None
    meta = root.read_tensors_metadata(k)
    return (
        meta.get(CONTENT_DIGEST)
        or hashlib.blake2b(  # files written before the content digest: their items and rows
            json.dumps([meta.get("item_ids"), meta.get("manifest_digest")]).encode(), digest_size=8
        ).hexdigest()
    )


def stale_baseline_shards(root: Storage, baseline: pl.DataFrame, encoder_id: str) -> list[str]:
    """The shards whose baseline rows were measured on other training features than the current ones, or record none."""
    if baseline.is_empty():
        return []
    if FEATURES_DIGEST not in baseline.columns:
        return sorted(baseline["shard"].unique().to_list())
    recorded = baseline.group_by("shard").agg(pl.col(FEATURES_DIGEST).unique()).rows()
    return sorted(s for s, digests in recorded if digests != [shard_features_digest(root, encoder_id, s)])


def features_digest(root: Storage, encoder_id: str) -> str:
    """A digest of every shard's feature file (the embedded checkpoint's id includes it)."""
    h = hashlib.blake2b(digest_size=8)
    for shard in feature_shards(root, encoder_id):
        h.update(root.read_bytes(key("training_features", encoder_id=encoder_id, shard=shard)))
    return h.hexdigest()


def encoded_item_ids(root: Storage, encoder_id: str) -> list[str]:
    """The training items the training side encoded (the manifest's minus any skipped as bad), from the feature files'
    headers alone: what a per-item table must cover, read from another source than the losses."""
    return [
        i
        for shard in feature_shards(root, encoder_id)
        for i in json.loads(
            root.read_tensors_metadata(key("training_features", encoder_id=encoder_id, shard=shard))["item_ids"]
        )
    ]


def query_batch(root: Storage, query_id: str, encoder_id: str, checkpoint_id: str | None = None) -> ItemBatch:
    """The query's latent, frame mask and conditioning; IdentityError when made by other encoders, or (given the
    current `checkpoint_id`) when its clip was generated by another checkpoint: a generated query is what the model
    being attributed made, so a retrained model's query is generated again."""
    batch, meta = read_features(root, key("query_features", query_id=query_id))
    if meta.get("encoder_id") != encoder_id:
        raise IdentityError(
            f"query {query_id!r} was encoded by encoders {meta.get('encoder_id')}, the checkpoint uses "
            f"{encoder_id}: re-materialize query_clips for {query_id!r}"
        )
    generated_by = clip_generated_by(root, query_id) if checkpoint_id else None
    if generated_by is not None and generated_by != checkpoint_id:
        raise IdentityError(
            f"query {query_id!r}'s clip was generated by checkpoint {generated_by}, not the current "
            f"{checkpoint_id}: re-materialize query_clips for {query_id!r} (the sensor does it for a "
            f"pending query) so the current model generates it"
        )
    return batch


# losses ----------------------------------------------------------------------------------------------------------
def losses_frame(
    item_ids: list[str], losses: torch.Tensor, masked: torch.Tensor, t: torch.Tensor | None = None, first_draw: int = 0
) -> pl.DataFrame:
    """Long rows `(item_id, draw, loss, loss_masked[, t])` from [b, K] loss matrices (draws from `first_draw` on)."""
    b, k = losses.shape
    frame = {
        "item_id": [i for i in item_ids for _ in range(k)],
        "draw": np.tile(np.arange(first_draw, first_draw + k, dtype=np.int32), b),
        "loss": losses.reshape(-1).numpy().astype(np.float32),
        "loss_masked": masked.reshape(-1).numpy().astype(np.float32),
    }
    if t is not None:
        frame["t"] = t.reshape(-1).numpy().astype(np.float32)
    return pl.DataFrame(frame)


def partial_loss_matrix(df: pl.DataFrame, item_ids: list[str], draws: int, column: str) -> np.ndarray:
    """Long `(item_id, draw, loss)` rows as [N, K] in `item_ids` order, NaN where an item has no row for a draw."""
    index = {item: i for i, item in enumerate(item_ids)}
    out = np.full((len(item_ids), draws), np.nan)
    rows = df.filter(pl.col("item_id").is_in(item_ids) & (pl.col("draw") < draws))
    out[[index[i] for i in rows["item_id"].to_list()], rows["draw"].to_numpy()] = rows[column].to_numpy()
    return out


def loss_matrix(df: pl.DataFrame, item_ids: list[str], draws: int, column: str, table: str) -> np.ndarray:
    """`partial_loss_matrix` that raises, naming `table`, when any item lacks a draw."""
    out = partial_loss_matrix(df, item_ids, draws, column)
    missing = np.isnan(out).any(axis=1)
    if missing.any():
        names = [item_ids[i] for i in np.flatnonzero(missing)[:5]]
        raise ValueError(f"{table} is missing draws for {int(missing.sum())} item(s), e.g. {names}: re-materialize it")
    return out


def precision_hint(identity: Identity, others: Iterable[Identity]) -> str:
    """A note that TDA_LOSS_PRECISION is part of the protocol when one of `others` differs from `identity` only by
    it."""
    if any(
        o.checkpoint_id == identity.checkpoint_id and precision_twin(o.protocol_id, identity.protocol_id)
        for o in others
    ):
        kinds = ", ".join(f"ids ending in {end} were measured in {p}" for p, end in PRECISION_SUFFIX.items() if end)
        return f" (TDA_LOSS_PRECISION is part of the protocol: {kinds}, the others in fp32; set it back to use those)"
    return ""


def root_has(root: Storage, identity: Identity, table: str, pronoun: str = "them", /, **fixed: str) -> str:
    """`; the storage root has <pronoun> only for …, which is never mixed in` (and `precision_hint`), or "" when the
    root has `table` (under `fixed`) for no other identity."""
    others = sorted(
        {Identity(k["checkpoint_id"], k["protocol_id"]) for k in list_keys(root, table, **fixed)} - {identity},
        key=str,
    )
    if not others:
        return ""
    return (
        f"; the storage root has {pronoun} only for {'; '.join(map(str, others))}, which is never mixed in"
        + precision_hint(identity, others)
    )


def read_baseline(root: Storage, identity: Identity, encoder_id: str) -> pl.DataFrame:
    """Every shard's baseline losses of this identity; IdentityError when a shard with features has none."""
    df = read_tables(root, "baseline_losses", **identity.keys())
    have = set(df["shard"].unique().to_list())
    missing = [s for s in feature_shards(root, encoder_id) if s not in have]
    if missing or df.is_empty():
        raise IdentityError(
            f"baseline_losses for {identity} are missing for shard(s) {missing or 'all'}"
            + root_has(root, identity, "baseline_losses")
            + ": materialize baseline_losses for every shard (`tda prepare`, or the UI)"
        )
    stale = stale_baseline_shards(root, df, encoder_id)
    if stale:
        raise IdentityError(
            f"baseline_losses for {identity} of shard(s) {stale} were measured on other "
            f"training_features than the current ones (or record none): re-materialize baseline_losses for them "
            f"(`tda prepare`, or the UI)"
        )
    return df


def require(root: Storage, name: str, identity: Identity, fix: str, /, **keys: str) -> str:
    """The key of entry `name` under `identity`; IdentityError naming it, the identities present, and `fix`."""
    k = key(name, **identity.keys(), **keys)
    if not root.exists(k):
        what = f"{name}" + (f" of {'/'.join(keys.values())}" if keys else "")
        raise IdentityError(
            f"{what} for {identity} is missing" + root_has(root, identity, name, "it", **keys) + f": {fix}"
        )
    return k


FISHER_DIGEST = "digest"  # the Fisher file's metadata field holding `tensors_digest` of its tensors
COMPUTE_PRECISION = "compute_precision"  # the Fisher's and a delta's metadata field: what their step computed in


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of named tensors' values (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # the raw bytes, whatever the dtype (bf16 too)
    return h.hexdigest()


def write_fisher(root: Storage, identity: Identity, fisher: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The Fisher diagonal of this identity, atomically, with its `tensors_digest` in the header: what a gradient store
    was preconditioned with is then checked from headers alone."""
    meta = {**metadata, **identity.keys(), FISHER_DIGEST: tensors_digest(fisher)}
    return root.write_tensors(key("fisher_diagonal", **identity.keys()), fisher, meta)


def read_fisher(
    root: Storage, identity: Identity, compute_precision: str | None = None, lazy: bool = False
) -> Mapping[str, torch.Tensor]:
    """The Fisher diagonal of this identity (IdentityError naming the identities present and the fix when missing, or,
    given the step's `compute_precision`, when the Fisher was estimated in another one). `lazy`: a mapping that reads
    each tensor when asked for, for a step that uses one at a time (the whole Fisher is 4.2 GB at 1 B parameters)."""
    fix = "materialize fisher_diagonal (`tda prepare`, or the UI)"
    k = require(root, "fisher_diagonal", identity, fix)
    if lazy:
        stored = root.tensors_lazily(k)
        tensors, meta = stored, stored.metadata
    else:
        tensors, meta = root.read_tensors(k)
    recorded = meta.get(COMPUTE_PRECISION)
    if compute_precision and recorded and recorded != compute_precision:
        raise IdentityError(
            f"the fisher_diagonal of {identity} was estimated in {recorded}, this step computes in "
            f"{compute_precision}: {fix} on this compute (its deltas and gradient stores follow), or run "
            f"on the compute it was estimated with"
        )
    return tensors


def read_unlearned(root: Storage, identity: Identity, query_id: str, config_id: str) -> pl.DataFrame:
    """The unlearned losses of a query and configuration under this identity (IdentityError naming what exists)."""
    fix = f"materialize unlearned_model and unlearned_losses for {query_id}/{config_id}"
    return root.read_parquet(require(root, "unlearned_losses", identity, fix, query_id=query_id, config_id=config_id))


def baseline_item_ids(baseline: pl.DataFrame) -> list[str]:
    """The training items that have baseline losses: the manifest's items minus any skipped as bad."""
    return baseline["item_id"].unique(maintain_order=True).to_list()


# embeddings ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Embeddings:
    """Training items' similarity embeddings: their ids and one [N, D] matrix per embedding name, rows in id order."""

    item_ids: list[str]
    matrices: dict[str, torch.Tensor]


def embeddings_key(identity: Identity, encoder_id: str, shard: str) -> str:
    """The key of one shard's training embeddings under this identity and these encoders."""
    return key("training_embeddings", **identity.keys(), encoder_id=encoder_id, shard=shard)


def write_embeddings(root: Storage, key_: str, embeddings: Embeddings, meta: dict[str, str]) -> str:
    """One shard's embeddings as one safetensors file (a float32 matrix per name); item ids and `meta` in its
    metadata."""
    n = len(embeddings.item_ids)
    bad = {name: tuple(m.shape) for name, m in embeddings.matrices.items() if m.ndim != 2 or m.shape[0] != n}
    if bad:
        raise ValueError(f"embeddings for {key_}: every matrix must be [{n}, D] (one row per item id), got {bad}")
    tensors = {EMBEDDING_PREFIX + name: m.float().contiguous() for name, m in embeddings.matrices.items()}
    names = ",".join(sorted(embeddings.matrices))  # which embeddings it holds (embeddings_match_features reads it)
    return root.write_tensors(key_, tensors, {**meta, "item_ids": json.dumps(embeddings.item_ids), "names": names})


def read_embeddings(root: Storage, key_: str) -> tuple[Embeddings, dict[str, str]]:
    """The embeddings written by `write_embeddings`, and the file's other metadata."""
    tensors, meta = root.read_tensors(key_)
    matrices = {k[len(EMBEDDING_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EMBEDDING_PREFIX)}
    return Embeddings(json.loads(meta["item_ids"]), matrices), meta


def embeddings_match_features(root: Storage, embeddings_meta: dict[str, str], encoder_id: str, shard: str) -> bool:
    """Whether embeddings (their file's metadata) were made from the shard's current features (the same items, made from
    the same manifest rows; reads the features file's header only) and hold every embedding of `EMBEDDINGS`."""
    if not set(EMBEDDINGS) <= set(embeddings_meta.get("names", "").split(",")):
        return False
    features = root.read_tensors_metadata(key("training_features", encoder_id=encoder_id, shard=shard))
    return all(embeddings_meta.get(k) == features.get(k) for k in ("item_ids", "manifest_digest"))


def read_training_embeddings(root: Storage, identity: Identity, encoder_id: str) -> Embeddings:
    """Every shard's training embeddings of this identity, in shard order.

    IdentityError naming the identity, the ones present and the fix when a shard with training features has none, or
    has some made from other features than its current ones (a changed corpus under the same external checkpoint).
    """
    shards = feature_shards(root, encoder_id)
    fix = "materialize training_embeddings for every shard (`tda prepare`, or the UI)"
    missing = [s for s in shards if not root.exists(embeddings_key(identity, encoder_id, s))]
    if missing or not shards:
        raise IdentityError(
            f"training_embeddings for {identity} (encoders {encoder_id}) are missing for shard(s) {missing or 'all'}"
            + root_has(root, identity, "training_embeddings", encoder_id=encoder_id)
            + f": {fix}"
        )
    parts, stale = [], []
    for shard in shards:
        part, meta = read_embeddings(root, embeddings_key(identity, encoder_id, shard))
        if not embeddings_match_features(root, meta, encoder_id, shard):
            stale.append(shard)
        parts.append(part)
    if stale:
        raise IdentityError(
            f"training_embeddings for {identity} of shard(s) {stale} were made from other training_features "
            f"than the current ones, or before an embedding was added: re-materialize training_embeddings for them "
            f"(`tda prepare`, or the UI)"
        )
    return Embeddings(
        [i for p in parts for i in p.item_ids],
        {name: torch.cat([p.matrices[name] for p in parts]) for name in parts[0].matrices},
    )
