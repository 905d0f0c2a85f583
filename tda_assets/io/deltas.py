"""The unlearned model's weight delta under the storage root, pinned to the Fisher it was computed with.

A delta is keyed by checkpoint, protocol, query and configuration; its header also records the digest of the Fisher
(and the compute precision) of its step. The Fisher of an identity can be re-estimated in place (another compute
precision, a changed corpus under an external checkpoint), so a reader compares the recorded digest with the stored
Fisher's and refuses a delta of another Fisher. Deltas written before the digest was recorded carry none and are read.
"""

from __future__ import annotations

import torch

from .artifacts import Identity, IdentityError, require
from .gradients import STORE_DIGEST, fisher_digest
from .registry import key
from .storage import Storage


def write_delta(
    root: Storage,
    identity: Identity,
    query_id: str,
    config_id: str,
    delta: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> str:
    """The delta of one query and configuration, atomically, with the stored Fisher's digest in its header."""
    meta = {
        **(metadata or {}),
        **identity.keys(),
        "config_id": config_id,
        STORE_DIGEST: fisher_digest(root, identity),
    }
    return root.write_tensors(
        key("unlearned_delta", **identity.keys(), query_id=query_id, config_id=config_id), delta, meta
    )


def read_delta(root: Storage, identity: Identity, query_id: str, config_id: str) -> dict[str, torch.Tensor]:
    """The delta of one query and configuration under `identity`; IdentityError naming the fix when it is missing or
    was computed with another Fisher than the stored one."""
    fix = f"materialize unlearned_model for {query_id}/{config_id}"
    k = require(root, "unlearned_delta", identity, fix, query_id=query_id, config_id=config_id)
    delta, meta = root.read_tensors(k)
    recorded = meta.get(STORE_DIGEST)
    if recorded is not None and recorded != fisher_digest(root, identity):
        raise IdentityError(
            f"the unlearned_model of {query_id}/{config_id} under {identity} was computed with another "
            f"Fisher (digest {recorded}) than the stored fisher_diagonal (re-estimated since): {fix}"
        )
    return delta
