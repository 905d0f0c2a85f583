"""What an artifact was made from is recorded and checked when it is read: the training features under baseline losses
and gradient stores (an external checkpoint's id does not change with the corpus), the Fisher under a delta, the
compute precision of the Fisher, and the checkpoint that generated a query's clip. Real files on a local root."""

from __future__ import annotations

import polars as pl
import pytest
import torch

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.gradients import GradientSpec, GradientStore
from tda_assets.data.query_state import pending_queries
from tda_assets.io.artifacts import (
    COMPUTE_PRECISION,
    FEATURES_DIGEST,
    Identity,
    IdentityError,
    query_batch,
    read_baseline,
    read_fisher,
    shard_features_digest,
    stale_baseline_shards,
    write_features,
    write_fisher,
)
from tda_assets.io.deltas import read_delta, write_delta
from tda_assets.io.gradients import fisher_digest, read_gradient_norms, stale_gradient_shards, write_gradient_store
from tda_assets.io.registry import TABLES, key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import write_table

IDENTITY = Identity("external-x", "s0-k16")
ENCODER = "e"
SHARDS = {"s0": ["a", "b"], "s1": ["c"]}
SPEC = GradientSpec(k=2)


def write_shard_features(root: Storage, shard: str, value: float = 0.0) -> None:
    """A shard's training features: `value` fills the latents (a changed corpus is another value, the same items)."""
    ids = SHARDS[shard]
    n = len(ids)
    batch = ItemBatch(ids, torch.full((n, 2, 3), value), {"h": torch.zeros(n, 4)}, torch.ones(n, 3))
    write_features(root, key("training_features", encoder_id=ENCODER, shard=shard), batch, {"encoder_id": ENCODER})


@pytest.fixture
def root(tmp_path) -> Storage:
    root = Storage(str(tmp_path / "root"))
    for shard in SHARDS:
        write_shard_features(root, shard)
    write_fisher(root, IDENTITY, {"w": torch.linspace(0.5, 2.0, 4)}, {COMPUTE_PRECISION: "fp32"})
    return root


def write_baseline(root: Storage) -> None:
    for shard, ids in SHARDS.items():
        rows = pl.DataFrame(
            {
                "item_id": ids,
                "draw": [0] * len(ids),
                "t": [0.5] * len(ids),
                "loss": [1.0] * len(ids),
                "loss_masked": [1.0] * len(ids),
            }
        )
        digest = shard_features_digest(root, ENCODER, shard)
        write_table(
            root,
            "baseline_losses",
            rows.with_columns(pl.lit(digest).alias(FEATURES_DIGEST)),
            **IDENTITY.keys(),
            shard=shard,
        )


def test_baseline_losses_of_a_changed_corpus_under_the_same_checkpoint_are_refused(root):
    write_baseline(root)
    assert sorted(read_baseline(root, IDENTITY, ENCODER)["item_id"].to_list()) == ["a", "b", "c"]
    write_shard_features(root, "s1", value=1.0)  # the corpus changed; an external checkpoint keeps its id
    with pytest.raises(IdentityError, match=r"shard\(s\) \['s1'\] were measured on other training_features.*prepare"):
        read_baseline(root, IDENTITY, ENCODER)


def test_baseline_losses_that_record_no_features_are_stale(root):
    write_baseline(root)
    baseline = read_baseline(root, IDENTITY, ENCODER)
    assert stale_baseline_shards(root, baseline, ENCODER) == []
    assert stale_baseline_shards(root, baseline.drop(FEATURES_DIGEST), ENCODER) == ["s0", "s1"]


def test_a_gradient_store_of_a_changed_corpus_is_refused_and_listed_stale(root):
    digest = fisher_digest(root, IDENTITY)
    for shard, ids in SHARDS.items():
        rows = torch.tensor([[3.0, 4.0]] * len(ids))
        gradients = GradientStore(ids, rows, "all", IDENTITY.protocol_id, False, 2, 0, {"w": 4}, damping=0.1)
        write_gradient_store(
            root, IDENTITY, SPEC, shard, gradients, digest, shard_features_digest(root, ENCODER, shard)
        )
    assert read_gradient_norms(root, IDENTITY, SPEC, ENCODER, ["a", "b", "c"]).tolist() == [5.0, 5.0, 5.0]
    assert stale_gradient_shards(root, IDENTITY, SPEC, ENCODER) == []
    write_shard_features(root, "s0", value=2.0)
    assert stale_gradient_shards(root, IDENTITY, SPEC, ENCODER) == ["s0"]
    with pytest.raises(IdentityError, match="shard s0 .* built from other training_features"):
        read_gradient_norms(root, IDENTITY, SPEC, ENCODER, ["a", "b", "c"])


def test_a_delta_of_another_fisher_is_refused(root):
    delta = {"w": torch.tensor([0.1, -0.2, 0.3, 0.0])}
    write_delta(root, IDENTITY, "q1", "default", delta, {COMPUTE_PRECISION: "fp32"})
    assert torch.equal(read_delta(root, IDENTITY, "q1", "default")["w"], delta["w"])
    write_fisher(root, IDENTITY, {"w": torch.linspace(1.0, 3.0, 4)}, {COMPUTE_PRECISION: "fp32"})  # re-estimated
    with pytest.raises(IdentityError, match=r"q1/default .* another Fisher.*materialize unlearned_model for q1/"):
        read_delta(root, IDENTITY, "q1", "default")


def test_a_fisher_estimated_in_another_compute_precision_is_refused_by_a_step_in_this_one(root):
    write_fisher(root, IDENTITY, {"w": torch.ones(4)}, {COMPUTE_PRECISION: "bfloat16"})
    assert read_fisher(root, IDENTITY, "bfloat16")["w"].tolist() == [1.0] * 4
    with pytest.raises(IdentityError, match="estimated in bfloat16, this step computes in fp32"):
        read_fisher(root, IDENTITY, "fp32")


def write_query(root: Storage, query_id: str, generated_by: str | None) -> None:
    batch = ItemBatch([query_id], torch.zeros(1, 2, 3), {"h": torch.zeros(1, 4)}, torch.ones(1, 3))
    write_features(root, key("query_features", query_id=query_id), batch, {"encoder_id": ENCODER})
    schema = TABLES["queries"].polars_schema()
    row = {c: None for c in schema} | {"prompt": "p", "seed": 0, "encoder_id": ENCODER, "generated_by": generated_by}
    write_table(root, "queries", pl.DataFrame([row], schema=schema), query_id=query_id)


def test_a_clip_generated_by_another_checkpoint_is_refused_and_generated_again(root):
    write_query(root, "made", generated_by="embedded-old")
    write_query(root, "mine", generated_by=None)  # a user's clip: no model made it
    assert len(query_batch(root, "made", ENCODER, "embedded-old")) == 1
    with pytest.raises(IdentityError, match="generated by checkpoint embedded-old, not the current embedded-new"):
        query_batch(root, "made", ENCODER, "embedded-new")
    assert len(query_batch(root, "mine", ENCODER, "embedded-new")) == 1
    no_clip, no_attribution = pending_queries(root, ["made", "mine"], "embedded-new", "s0-k16", 1.05)
    assert (no_clip, no_attribution) == (["made"], ["mine"])  # the sensor asks for a new clip of `made`
