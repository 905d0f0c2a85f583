"""The stored item norms of a training_gradients store (what score_type `normalized` reads per query) and the Fisher
digest in its header: read by range, checked as the rows are, and equal to the rows' norms."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from tda_assets.attribution.gradients import GradientSpec, GradientStore
from tda_assets.io.artifacts import FISHER_DIGEST, Identity, IdentityError, read_fisher, tensors_digest, write_fisher
from tda_assets.io.gradients import (
    NORMS,
    ROWS,
    fisher_digest,
    gradients_key,
    read_gradient_norms,
    read_gradient_store,
    write_gradient_store,
)
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage

IDENTITY = Identity("ckpt-a", "s0-k16")
ENCODER = "enc-a"
SPEC = GradientSpec(k=4)
D = 6
# rows whose norms are known by hand: 5 (3-4-0-0), 13 (5-12), 2, 0.5, 25 (7-24) and 1
SHARDS = {
    "shard-00": (["a", "b", "c"], [[3, 4, 0, 0], [0, 5, 12, 0], [2, 0, 0, 0]]),
    "shard-01": (["d", "e", "f"], [[0, 0, 0, 0.5], [7, 0, 0, 24], [0, 0, 1, 0]]),
}
NORMS_BY_ID = {"a": 5.0, "b": 13.0, "c": 2.0, "d": 0.5, "e": 25.0, "f": 1.0}


def fisher(scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {"w": scale * torch.linspace(0.5, 2.0, D)}


@pytest.fixture
def root(tmp_path) -> Storage:
    root = Storage(str(tmp_path / "root"))
    write_fisher(root, IDENTITY, fisher(), {"items": "6"})
    digest = fisher_digest(root, IDENTITY)
    for shard, (ids, rows) in SHARDS.items():
        root.write_tensors(key("training_features", encoder_id=ENCODER, shard=shard), {"x": torch.zeros(1)})
        gradients = GradientStore(
            ids,
            torch.tensor(rows, dtype=torch.float32),
            "all",
            IDENTITY.protocol_id,
            False,
            4,
            0,
            {"w": D},
            damping=0.1,
        )
        write_gradient_store(root, IDENTITY, SPEC, shard, gradients, digest)
    return root


def test_the_stored_norms_are_the_rows_norms_in_the_order_asked(root):
    order = ["e", "a", "f", "c", "b", "d"]
    norms = read_gradient_norms(root, IDENTITY, SPEC, ENCODER, order)
    assert norms.tolist() == [NORMS_BY_ID[i] for i in order]
    rows = read_gradient_store(root, IDENTITY, SPEC, read_fisher(root, IDENTITY), ENCODER, order)
    assert rows.item_norms.tolist() == norms.tolist()


def test_the_norms_are_read_without_the_rows(root):
    for shard in SHARDS:  # the rows' bytes made NaN in place: a reader of the rows would return NaN norms
        path = root.local_path(gradients_key(IDENTITY, SPEC, shard))
        data = bytearray(open(path, "rb").read())
        (n,) = np.frombuffer(data[:8], dtype="<u8")
        begin, end = json.loads(data[8 : 8 + n])[ROWS]["data_offsets"]
        data[8 + n + begin : 8 + n + end] = np.full((end - begin) // 4, np.nan, dtype="<f4").tobytes()
        open(path, "wb").write(bytes(data))
    assert read_gradient_norms(root, IDENTITY, SPEC, ENCODER, list(NORMS_BY_ID)).tolist() == list(NORMS_BY_ID.values())


def test_a_store_written_before_norms_were_stored_gives_the_norms_from_its_rows(root):
    k = gradients_key(IDENTITY, SPEC, "shard-01")
    tensors, meta = root.read_tensors(k)
    root.write_tensors(k, {ROWS: tensors[ROWS]}, meta)
    assert root.read_tensor(k, NORMS)[0] is None
    assert read_gradient_norms(root, IDENTITY, SPEC, ENCODER, ["d", "e", "a"]).tolist() == [0.5, 25.0, 5.0]


def test_norms_of_a_store_preconditioned_with_a_fisher_since_re_estimated_are_refused(root):
    write_fisher(root, IDENTITY, fisher(scale=2.0), {"items": "6"})
    with pytest.raises(
        IdentityError, match=r"shard-00 were preconditioned with another Fisher.*materialize training_gradients"
    ):
        read_gradient_norms(root, IDENTITY, SPEC, ENCODER, ["a"])


def test_norms_of_items_the_store_lacks_or_of_a_missing_spec_are_refused_naming_the_fix(root):
    with pytest.raises(
        IdentityError, match=r"lack 1 of the 2 training items.*\['zz'\].*materialize training_gradients"
    ):
        read_gradient_norms(root, IDENTITY, SPEC, ENCODER, ["a", "zz"])
    with pytest.raises(
        IdentityError,
        match=r"all-unmasked-k8-s0-d0p1 .* missing for shard\(s\) \['shard-00', 'shard-01'\]"
        r".*the storage root has all-unmasked-k4-s0-d0p1",
    ):
        read_gradient_norms(root, IDENTITY, GradientSpec(k=8), ENCODER, ["a"])


def test_the_fisher_header_carries_a_digest_of_its_values(root):
    meta = root.read_tensors_metadata(key("fisher_diagonal", **IDENTITY.keys()))
    assert meta[FISHER_DIGEST] == fisher_digest(root, IDENTITY) == tensors_digest(fisher())
    changed = fisher()
    changed["w"][3] += 1e-6
    assert tensors_digest(changed) != tensors_digest(fisher())
    assert tensors_digest({"w": fisher()["w"].double()}) != tensors_digest(fisher())  # the dtype is part of it
    # a scalar, a bf16 and an empty tensor are digested too, and the scalar's value counts
    mixed = lambda scale: {"scale": torch.tensor(scale), "w": fisher()["w"].bfloat16(), "none": torch.zeros(0)}  # noqa: E731
    assert tensors_digest(mixed(2.0)) != tensors_digest(mixed(3.0))


def test_a_fisher_written_without_a_digest_keeps_the_digest_of_its_bytes(root):
    k = key("fisher_diagonal", **IDENTITY.keys())
    root.write_tensors(k, fisher(), IDENTITY.keys())  # as written before the header carried one
    assert fisher_digest(root, IDENTITY) == hashlib.blake2b(root.read_bytes(k), digest_size=8).hexdigest()
