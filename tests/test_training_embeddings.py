"""training_embeddings: every training item embedded once per shard and identity; similarity_scores reads them.

A query's similarity attribution is one query embedding and a matrix product per embedding: its scores equal the
recomputation from the engine's embedding functions, no training item is embedded again, and embeddings of another
identity (or none) stop it with an IdentityError naming the identity and the fix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dagster import AssetKey, AssetRecordsFilter

from tda_assets.attribution import similarity
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.scores import rank_descending
from tda_assets.data.inbox import add_query
from tda_assets.defs.partitions import SHARD_KEYS
from tda_assets.experiments.runner import TRAINING_PHASES, Runner, current_training_phases, phases_to_run
from tda_assets.io.artifacts import (
    Embeddings,
    Identity,
    IdentityError,
    all_features,
    embeddings_key,
    iter_training_batches,
    query_batch,
    read_embeddings,
    read_features,
    read_training_embeddings,
    write_embeddings,
)
from tda_assets.io.checkpoints import load_checkpoint, read_checkpoint_record
from tda_assets.io.registry import key
from tda_assets.io.tables import read_table
from tests.trained_roots import SMALL

PROTOCOL = "s0-k16"


@pytest.fixture(scope="module")
def prepared(trained_roots, tmp_path_factory):
    """A copy of the SMALL root (its training side with training_embeddings) and one query's clip and similarity
    scores."""
    mp = pytest.MonkeyPatch()
    runner = trained_roots.runner(SMALL, tmp_path_factory.mktemp("storage"), mp)
    runner.log_level = "WARNING"
    add_query(runner.root, "a plucked guitar tune", query_id="q0")
    runner.clip("q0")
    record = read_checkpoint_record(runner.root)
    yield runner, Identity(record.checkpoint_id, PROTOCOL), record.encoder_id
    mp.undo()


def shards_with_items(runner: Runner) -> list[str]:
    return sorted(read_table(runner.root, "training_manifest")["shard"].unique().to_list())


def test_each_shard_with_items_has_its_items_embedded_under_its_identity_and_the_empty_shard_none(prepared):
    runner, identity, encoder_id = prepared
    root = runner.root
    config = load_checkpoint(root, runner.resources["model_source"].model_source())[0].denoiser.config
    inner_dim = config.num_attention_heads * config.attention_head_dim
    with_items = shards_with_items(runner)
    assert with_items == ["shard-00", "shard-02", "shard-03"]
    runner.run(["training_embeddings"], "shard-01")  # the copy's instance is fresh: the empty shard's run, here
    for shard in SHARD_KEYS:
        k = embeddings_key(identity, encoder_id, shard)
        if shard not in with_items:
            assert not root.exists(k)
            continue
        emb, meta = read_embeddings(root, k)
        features, features_meta = read_features(root, key("training_features", encoder_id=encoder_id, shard=shard))
        assert emb.item_ids == features.item_ids
        assert {n: tuple(m.shape) for n, m in emb.matrices.items()} == {
            "audio": (len(features), 2 * features.latents.shape[1]),
            "text": (len(features), features.conditioning["encoder_hidden_states"].shape[-1]),
            "internal": (len(features), inner_dim),
            # the copy detector's map: channels × frames, its frame mask and its frame count (frames ≤ MAX_FRAMES here)
            "latent": (len(features), (features.latents.shape[1] + 1) * features.latents.shape[2] + 1),
        }
        assert torch.equal(emb.matrices["audio"], similarity.audio_embedding(features))  # the engine's, stored as is
        assert {k_: meta[k_] for k_ in ("checkpoint_id", "protocol_id", "encoder_id", "shard")} == {
            **identity.keys(),
            "encoder_id": encoder_id,
            "shard": shard,
        }
        assert meta["manifest_digest"] == features_meta["manifest_digest"]
    (empty,) = runner.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("training_embeddings"), asset_partitions=["shard-01"]), limit=1
    ).records
    assert empty.asset_materialization.metadata["rows"].value == 0


def test_similarity_scores_equal_the_recomputation_from_the_engine(prepared):
    runner, identity, encoder_id = prepared
    root = runner.root
    adapter, _ = load_checkpoint(root, runner.resources["model_source"].model_source())
    protocol, compute = runner.resources["protocol"].protocol(), Compute()
    # what similarity_scores computed before training_embeddings: every training item embedded per query, batches of 64
    ids, embs = [], {"audio": [], "text": [], "internal": []}
    for batch in iter_training_batches(root, encoder_id, 64):
        ids += batch.item_ids
        embs["audio"].append(similarity.audio_embedding(batch))
        embs["text"].append(similarity.text_embedding(batch))
        embs["internal"].append(similarity.internal_embedding(adapter, batch, protocol, compute))
    query = query_batch(root, "q0", encoder_id)
    query_embs = {
        "audio": similarity.audio_embedding(query),
        "text": similarity.text_embedding(query),
        "internal": similarity.internal_embedding(adapter, query, protocol, compute),
    }
    assert sorted(ids) == sorted(all_features(root, encoder_id).item_ids) and len(ids) == 6
    for name, parts in embs.items():
        expected = similarity.cosine_scores(query_embs[name].mean(0), torch.cat(parts)).numpy()
        stored = read_table(root, "similarity_scores", query_id="q0", method=f"similarity:{name}")
        assert stored["item_id"].to_list() == ids, name
        np.testing.assert_allclose(stored["score"].to_numpy(), expected, rtol=0, atol=1e-5, err_msg=name)
        assert stored["rank"].to_list() == rank_descending(expected.astype(np.float64)).tolist(), name
        assert set(stored["checkpoint_id"]) == {identity.checkpoint_id} and set(stored["protocol_id"]) == {PROTOCOL}
    assert not np.allclose(
        read_table(root, "similarity_scores", query_id="q0", method="similarity:internal")["score"],
        read_table(root, "similarity_scores", query_id="q0", method="similarity:audio")["score"],
    )


def test_similarity_scores_embed_the_query_only(prepared, monkeypatch):
    runner, _, _ = prepared
    embedded: list[str] = []
    for name in ("audio_embedding", "text_embedding", "internal_embedding"):
        fn = getattr(similarity, name)
        monkeypatch.setattr(
            similarity,
            name,
            lambda *a, _fn=fn: embedded.extend(next(x for x in a if hasattr(x, "item_ids")).item_ids) or _fn(*a),
        )
    before = read_table(runner.root, "similarity_scores", query_id="q0", method="similarity:internal")
    runner.run(["similarity_scores"], "q0")  # in process: the patched engine is the one the step calls
    assert embedded == ["q0"] * 3  # one window, three embeddings; never a training item
    after = read_table(runner.root, "similarity_scores", query_id="q0", method="similarity:internal")
    assert after.equals(before)


def test_missing_embeddings_stop_similarity_naming_the_identity_then_prepare_makes_only_them(prepared):
    runner, identity, encoder_id = prepared
    root = runner.root
    k = embeddings_key(identity, encoder_id, "shard-02")
    kept = read_embeddings(root, k)[0]
    root.delete(k)
    with pytest.raises(Exception) as error:
        runner.run(["similarity_scores"], "q0")
    message = str(error.value)
    assert (
        f"training_embeddings for {identity} (encoders {encoder_id}) are missing for shard(s) ['shard-02']" in message
    )
    assert "materialize training_embeddings for every shard (`tda prepare`, or the UI)" in message
    have = current_training_phases(root, runner.resources["model_source"].model_source(), PROTOCOL)
    assert have == {**dict.fromkeys(have, True), "training_embeddings": False}
    runner.timings.clear()
    runner.training_side_if_needed()
    assert list(runner.timings) == ["training_embeddings"]
    remade = read_embeddings(root, k)[0]
    assert remade.item_ids == kept.item_ids
    assert all(torch.allclose(remade.matrices[n], kept.matrices[n], atol=1e-6) for n in kept.matrices)
    assert all(current_training_phases(root, runner.resources["model_source"].model_source(), PROTOCOL).values())


def test_embeddings_of_another_protocol_are_never_used(prepared, monkeypatch):
    runner, identity, _ = prepared
    monkeypatch.setenv("TDA_PROTOCOL_SEED", "1")
    other = Runner.create(runner.instance, runner.root.url, log=lambda _m: None)
    other.log_level = "WARNING"
    with pytest.raises(Exception) as error:
        other.run(["similarity_scores"], "q0")
    message = str(error.value)
    assert f"training_embeddings for checkpoint {identity.checkpoint_id}, protocol s1-k16" in message, message
    assert f"the storage root has them only for {identity}, which is never mixed in" in message


@pytest.mark.parametrize("change", ["other manifest rows", "one item fewer"])
def test_embeddings_made_from_other_features_are_refused(prepared, change):
    runner, identity, encoder_id = prepared
    root = runner.root
    k = embeddings_key(identity, encoder_id, "shard-03")
    original = root.read_bytes(k)
    emb, meta = read_embeddings(root, k)
    if change == "one item fewer":  # as if the features were remade since, skipping an item
        emb = Embeddings(emb.item_ids[1:], {n: m[1:] for n, m in emb.matrices.items()})
    else:  # as if the corpus changed under the same checkpoint id (an external model's)
        meta = {**meta, "manifest_digest": "0000000000000000"}
    try:
        write_embeddings(root, k, emb, meta)
        with pytest.raises(IdentityError, match=r"shard\(s\) \['shard-03'\] were made from other training_features"):
            read_training_embeddings(root, identity, encoder_id)
        have = current_training_phases(root, runner.resources["model_source"].model_source(), PROTOCOL)
        assert have == {**dict.fromkeys(have, True), "training_embeddings": False}
    finally:
        root.write_bytes(k, original)
    assert read_training_embeddings(root, identity, encoder_id).item_ids == [
        i
        for s in shards_with_items(runner)
        for i in read_embeddings(root, embeddings_key(identity, encoder_id, s))[0].item_ids
    ]


def test_an_embedding_matrix_without_one_row_per_item_is_refused(tmp_path):
    from tda_assets.io.storage import Storage

    bad = Embeddings(["a", "b"], {"audio": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match=r"every matrix must be \[2, D\].*'audio': \(3, 4\)"):
        write_embeddings(Storage(str(tmp_path)), "x.safetensors", bad, {})


@pytest.mark.parametrize(
    "missing, runs",
    [
        ({"training_embeddings"}, {"training_embeddings"}),
        ({"baseline_losses"}, {"baseline_losses"}),  # a killed baseline shard: the embeddings are not rewritten
        (
            {"fisher_diagonal"},
            {"fisher_diagonal", "training_gradients"},
        ),  # the default's store is preconditioned with it
        ({"training_gradients"}, {"training_gradients"}),
        (
            {"fisher_diagonal", "baseline_losses", "training_embeddings"},
            {"fisher_diagonal", "baseline_losses", "training_embeddings", "training_gradients"},
        ),
        (
            {"checkpoint"},
            {"checkpoint", "fisher_diagonal", "baseline_losses", "training_embeddings", "training_gradients"},
        ),
        ({"training_features"}, set(TRAINING_PHASES) - {"training_manifest"}),
        (set(), set()),
    ],
)
def test_prepare_runs_the_phases_not_current_and_those_downstream_of_them_only(missing, runs):
    assert phases_to_run({name: name not in missing for name in TRAINING_PHASES}) == runs
