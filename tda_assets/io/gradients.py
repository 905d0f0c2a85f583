"""The `training_gradients` store under the storage root: one safetensors file per shard, pinned to its identity.

Each file holds the sketched, Fisher-preconditioned per-item gradients `S P g_i` [n, k] of one shard; its key says the
checkpoint, the loss protocol and the `gradient_id` (subset, loss masking, sketch k and seed, damping), its metadata
says the same again plus the item ids, the parameter sizes the sketch is rebuilt from, and a digest of the Fisher the
preconditioner came from. A reader asked for one identity never returns another's rows: it raises `IdentityError`
naming what it needed, what the root has, and the fix. The preconditioner is not stored (it is D floats): it is
rebuilt from the Fisher whose digest the file carries. Beside the rows each file holds their norms `‖S P g_i‖`
(`NORMS`, 8 bytes an item), which is all the normalized score reads: `read_gradient_norms` fetches them and the
headers by range, not the rows nor the Fisher.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from tda_assets.attribution.gradients import GradientSpec, GradientStore, preconditioner

from .artifacts import (
    FEATURES_DIGEST,
    FISHER_DIGEST,
    Identity,
    IdentityError,
    feature_shards,
    precision_hint,
    shard_features_digest,
)
from .registry import key
from .storage import Storage
from .tables import list_keys

ROWS = "sketched"
NORMS = "norms"
STORE_DIGEST = "fisher_digest"  # a store's metadata field: `fisher_digest` of the Fisher it was preconditioned with


def fisher_digest(root: Storage, identity: Identity) -> str:
    """A digest of the stored Fisher of this identity (a re-estimated Fisher changes the preconditioner): the one its
    header carries (`write_fisher`), else, for a Fisher written without one, a digest of the file's bytes."""
    k = key("fisher_diagonal", **identity.keys())
    stored = root.read_tensors_metadata(k).get(FISHER_DIGEST)
    return stored or hashlib.blake2b(root.read_bytes(k), digest_size=8).hexdigest()


def gradients_key(identity: Identity, spec: GradientSpec, shard: str) -> str:
    return key("training_gradients", **identity.keys(), gradient_id=spec.gradient_id, shard=shard)


def write_gradient_store(
    root: Storage,
    identity: Identity,
    spec: GradientSpec,
    shard: str,
    gradients: GradientStore,
    digest: str,
    features: str | None = None,
) -> str:
    """One shard's store, atomically; `digest` is `fisher_digest` of the Fisher it was preconditioned with, `features`
    `shard_features_digest` of the training features its rows came from."""
    if not spec.matches(gradients) or gradients.protocol_id != identity.protocol_id:
        raise ValueError(
            f"gradient store of subset {gradients.param_subset!r}, k {gradients.k}, damping {gradients.damping}, "
            f"protocol {gradients.protocol_id} is not {spec.gradient_id} under {identity}"
        )
    meta = {
        **identity.keys(),
        "gradient_id": spec.gradient_id,
        "item_ids": json.dumps(gradients.item_ids),
        "param_subset": spec.param_subset,
        "masked": json.dumps(spec.masked),
        "k": str(spec.k),
        "seed": str(spec.seed),
        "damping": repr(spec.damping),
        "sizes": json.dumps(gradients.sizes),
        STORE_DIGEST: digest,
        **({FEATURES_DIGEST: features} if features else {}),
        "seconds": f"{gradients.seconds:.3f}",
    }
    tensors = {ROWS: gradients.sketched.float().contiguous(), NORMS: torch.from_numpy(gradients.item_norms)}
    return root.write_tensors(gradients_key(identity, spec, shard), tensors, meta)


def _shard_keys(root: Storage, identity: Identity, spec: GradientSpec, encoder_id: str) -> list[tuple[str, str]]:
    """`(shard, key)` of this identity and spec's store for every shard with training features (one listing)."""
    return [(s, gradients_key(identity, spec, s)) for s in feature_shards(root, encoder_id)]


def missing_gradient_shards(
    root: Storage,
    identity: Identity,
    spec: GradientSpec,
    encoder_id: str,
    shards: list[tuple[str, str]] | None = None,
) -> list[str]:
    """The shards with training features that have no gradient store of this identity and spec."""
    keys = _shard_keys(root, identity, spec, encoder_id) if shards is None else shards
    return [s for s, k in keys if not root.exists(k)]


def stale_gradient_shards(root: Storage, identity: Identity, spec: GradientSpec, encoder_id: str) -> list[str]:
    """The shards whose gradient store of this identity and spec is missing or was preconditioned with another Fisher
    than the stored one (headers only: no store is read)."""
    digest = fisher_digest(root, identity) if root.exists(key("fisher_diagonal", **identity.keys())) else None

    def current(shard: str, k: str) -> bool:
        if not root.exists(k):
            return False
        meta = root.read_tensors_metadata(k)
        return meta.get(STORE_DIGEST) == digest and _features_match(root, meta, encoder_id, shard)

    return [s for s, k in _shard_keys(root, identity, spec, encoder_id) if not current(s, k)]


def _features_match(root: Storage, meta: dict[str, str], encoder_id: str, shard: str) -> bool:
    """Whether a store (its header) was built from the shard's current training features; a store written before the
    features digest was recorded passes (its items are still checked against the ones asked for)."""
    recorded = meta.get(FEATURES_DIGEST)
    return recorded is None or recorded == shard_features_digest(root, encoder_id, shard)


def _fix(spec: GradientSpec) -> str:
    fields = ", ".join(f"{k}: {json.dumps(v)}" for k, v in vars(spec).items())
    return (
        f"materialize training_gradients for every shard with config {{{fields}}} (`tda attribute --config` and "
        "`tda grid` do it on demand)"
    )


def _present_shard_keys(
    root: Storage, identity: Identity, spec: GradientSpec, encoder_id: str
) -> list[tuple[str, str]]:
    """`(shard, key)` of every shard's store; IdentityError naming the stores the root has when one is missing."""
    shards = _shard_keys(root, identity, spec, encoder_id)
    missing = missing_gradient_shards(root, identity, spec, encoder_id, shards)
    if missing:
        stored = list_keys(root, "training_gradients")
        have = sorted(
            {f"{k['gradient_id']} (checkpoint {k['checkpoint_id']}, protocol {k['protocol_id']})" for k in stored}
        )
        raise IdentityError(
            f"training_gradients {spec.gradient_id} for {identity} are missing for shard(s) {missing}"
            + (f"; the storage root has {'; '.join(have)}, which is never mixed in" if have else "")
            + precision_hint(identity, [Identity(k["checkpoint_id"], k["protocol_id"]) for k in stored])
            + f": {_fix(spec)}"
        )
    return shards


def _check_shard(
    root: Storage,
    k_: str,
    shard: str,
    meta: dict[str, str],
    identity: Identity,
    spec: GradientSpec,
    digest: str,
    encoder_id: str,
) -> list[str]:
    """The shard file's item ids, after checking its metadata is of this identity and spec, of the stored Fisher and of
    the shard's current training features."""
    got = (meta.get("checkpoint_id"), meta.get("protocol_id"), meta.get("gradient_id"))
    if got != (identity.checkpoint_id, identity.protocol_id, spec.gradient_id):
        raise IdentityError(
            f"{root.uri(k_)} holds gradients {got[2]} of checkpoint {got[0]}, protocol {got[1]}, "
            f"not {spec.gradient_id} of {identity}: {_fix(spec)}"
        )
    if meta.get(STORE_DIGEST) != digest:
        raise IdentityError(
            f"training_gradients {spec.gradient_id} of shard {shard} were preconditioned with another "
            f"Fisher than the stored fisher_diagonal of {identity} (re-estimated since): {_fix(spec)}"
        )
    if not _features_match(root, meta, encoder_id, shard):
        raise IdentityError(
            f"training_gradients {spec.gradient_id} of shard {shard} under {identity} were built from "
            f"other training_features than the current ones (the corpus changed): {_fix(spec)}"
        )
    return json.loads(meta["item_ids"])


def _order(ids: list[str], item_ids: list[str], identity: Identity, spec: GradientSpec) -> list[int]:
    """The stored rows of `item_ids`, in their order; IdentityError when some are not stored."""
    index = {item: i for i, item in enumerate(ids)}
    absent = [i for i in item_ids if i not in index]
    if absent or not ids:
        raise IdentityError(
            f"training_gradients {spec.gradient_id} of {identity} lack {len(absent)} of the "
            f"{len(item_ids)} training items with baseline losses (e.g. {absent[:3]}): the features "
            f"changed since they were built; {_fix(spec)}"
        )
    return [index[i] for i in item_ids]


def read_gradient_norms(
    root: Storage, identity: Identity, spec: GradientSpec, encoder_id: str, item_ids: list[str]
) -> np.ndarray:
    """The items' stored gradient norms `‖S P g_i‖` [N] in `item_ids` order, checked as `read_gradient_store` checks
    the rows, from the files' headers and norms only (a store written before norms were stored: from its rows)."""
    digest = fisher_digest(root, identity)
    ids: list[str] = []
    norms: list[torch.Tensor] = []
    for shard, k_ in _present_shard_keys(root, identity, spec, encoder_id):
        stored, meta = root.read_tensor(k_, NORMS)
        ids += _check_shard(root, k_, shard, meta, identity, spec, digest, encoder_id)
        norms.append(stored if stored is not None else root.read_tensors(k_)[0][ROWS].double().norm(dim=1))
    return torch.cat(norms).double().numpy()[_order(ids, item_ids, identity, spec)]


def read_gradient_store(
    root: Storage,
    identity: Identity,
    spec: GradientSpec,
    fisher: dict[str, torch.Tensor],
    encoder_id: str,
    item_ids: list[str],
) -> GradientStore:
    """Every shard's store of this identity and spec as one `GradientStore`, rows in `item_ids` order.

    IdentityError when a shard is missing (naming the stores the root has), when a file's metadata is of another
    identity, when the Fisher changed since it was built, or when it lacks some of `item_ids`.
    """
    shards = _present_shard_keys(root, identity, spec, encoder_id)
    digest = fisher_digest(root, identity)
    ids: list[str] = []
    rows: list[torch.Tensor] = []
    sizes: dict[str, int] = {}
    for shard, k_ in shards:
        tensors, meta = root.read_tensors(k_)
        ids += _check_shard(root, k_, shard, meta, identity, spec, digest, encoder_id)
        rows.append(tensors[ROWS])
        sizes = json.loads(meta["sizes"])
    sketched = torch.cat(rows)[_order(ids, item_ids, identity, spec)]
    scale = preconditioner(fisher, sizes, spec.damping)
    return GradientStore(
        list(item_ids),
        sketched,
        spec.param_subset,
        identity.protocol_id,
        spec.masked,
        spec.k,
        spec.seed,
        sizes,
        scale,
        spec.damping,
    )
