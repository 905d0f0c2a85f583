"""Every loss and score is pinned to the checkpoint and loss protocol it came from; no step mixes two identities.

The sensor path (inbox → sensor tick → the query's run) after the checkpoint is retrained, or after the protocol
seed changes, must not compute an attribution from the old baseline losses: it stops with one error naming both
identities and the fix, and once the training side is brought up to date the same query attributes under the new one.
"""

from __future__ import annotations

import re

import pytest
from dagster import DagsterInstance

from tda_assets.data.inbox import add_query
from tda_assets.experiments.runner import Runner, current_training_phases
from tda_assets.io.artifacts import Identity, IdentityError, read_baseline
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.tables import list_keys, read_tables
from tests.trained_roots import SMALL


@pytest.fixture(scope="module")
def first(trained_roots, tmp_path_factory):
    """A copy of the SMALL root (training side with protocol seed 0 and SMALL.steps training steps) and one query,
    attributed."""
    mp = pytest.MonkeyPatch()
    root_dir = tmp_path_factory.mktemp("storage")
    runner = trained_roots.runner(SMALL, root_dir, mp)
    runner.log_level = "WARNING"
    add_query(runner.root, "a plucked guitar tune", query_id="q0")
    assert runner.requested_queries() == ["q0"]
    runner.attribute("q0")
    yield str(root_dir), runner.instance, runner
    mp.undo()


def run_new_query(root_url: str, instance: DagsterInstance, query_id: str) -> tuple[Runner, Exception | None]:
    """A Runner built from the environment as it is now; the query goes through the inbox and the sensor."""
    runner = Runner.create(instance, root_url, log=lambda _m: None)
    runner.log_level = "WARNING"
    add_query(runner.root, "a plucked guitar tune", query_id=query_id)
    requested = runner.requested_queries()
    assert query_id in requested
    assert "q0" in requested  # its result is of the old identity: stale, so pending again
    try:
        runner.attribute(query_id)
    except Exception as exc:  # noqa: BLE001 - the run's error is what the test reads
        return runner, exc
    return runner, None


def test_a_query_after_a_protocol_change_is_not_scored_from_the_old_losses(first, monkeypatch):
    root_url, instance, _ = first
    monkeypatch.setenv("TDA_TRAIN_STEPS", str(SMALL.steps))
    monkeypatch.setenv("TDA_PROTOCOL_SEED", "1")
    runner, error = run_new_query(root_url, instance, "q-protocol")
    assert error is not None
    assert re.search(r"protocol s1-k16.*missing.*protocol s0-k16", str(error), re.S), str(error)
    assert "tda prepare" in str(error)
    assert not list_keys(runner.root, "attribution_scores", query_id="q-protocol")  # under no identity


def test_a_query_under_the_other_loss_precision_is_not_scored_from_the_fp32_losses(first, monkeypatch):
    root_url, instance, first_runner = first
    record = read_checkpoint_record(first_runner.root)
    bf16 = Identity(record.checkpoint_id, "s0-k16-bf16")
    with pytest.raises(IdentityError) as caught:  # the reader: fp32 baseline losses are not bf16 ones
        read_baseline(first_runner.root, bf16, record.encoder_id)
    assert f"the storage root has them only for checkpoint {record.checkpoint_id}, protocol s0-k16," in str(
        caught.value
    )
    assert "TDA_LOSS_PRECISION is part of the protocol" in str(caught.value)
    assert "TDA_LOSS_PRECISION" not in str(  # the hint is for a precision twin only
        pytest.raises(
            IdentityError,
            read_baseline,
            first_runner.root,
            Identity(record.checkpoint_id, "s1-k16-bf16"),
            record.encoder_id,
        ).value
    )
    monkeypatch.setenv("TDA_TRAIN_STEPS", str(SMALL.steps))
    monkeypatch.setenv("TDA_LOSS_PRECISION", "bf16")
    runner, error = run_new_query(
        root_url, instance, "q-bf16"
    )  # the product: the environment → the protocol → the error
    assert error is not None
    message = str(error)
    assert re.search(
        r"protocol s0-k16-bf16.*missing.*protocol s0-k16, .*TDA_LOSS_PRECISION is part of the protocol", message, re.S
    ), message
    assert "tda prepare" in message
    assert not list_keys(runner.root, "attribution_scores", query_id="q-bf16")  # under no identity


def test_a_query_after_retraining_is_not_scored_from_the_old_losses_then_attributes_once_prepared(first, monkeypatch):
    root_url, instance, old_runner = first
    old = read_checkpoint_record(old_runner.root).checkpoint_id
    monkeypatch.setenv("TDA_TRAIN_STEPS", str(SMALL.steps + 5))  # another checkpoint: other settings
    runner = Runner.create(instance, root_url, log=lambda _m: None)
    runner.log_level = "WARNING"
    runner.run(["checkpoint"])
    new = read_checkpoint_record(runner.root).checkpoint_id
    assert new != old

    runner, error = run_new_query(root_url, instance, "q-retrained")
    assert error is not None
    message = str(error)
    assert f"checkpoint {new}" in message and f"checkpoint {old}" in message, message
    assert not list_keys(runner.root, "attribution_scores", query_id="q-retrained")  # under no identity

    have = current_training_phases(runner.root, runner.resources["model_source"].model_source(), "s0-k16")
    assert have == {
        "training_manifest": True,
        "training_features": True,
        "checkpoint": True,
        "fisher_diagonal": False,
        "baseline_losses": False,
        "training_embeddings": False,
        "training_gradients": False,
    }
    runner.training_side_if_needed()
    runner.attribute("q-retrained")
    scores = read_tables(runner.root, "attribution_scores", query_id="q-retrained", config_id="default")
    assert set(scores["checkpoint_id"]) == {new} and set(scores["protocol_id"]) == {"s0-k16"}
    old_scores = read_tables(runner.root, "attribution_scores", query_id="q0", config_id="default")
    assert set(old_scores["checkpoint_id"]) == {old}  # the earlier answer lives beside the new one, under its identity


def test_the_attributions_view_exposes_both_identity_columns(first):
    root_url, _, runner = first
    df = QueryEngine(runner.root).sql(
        "SELECT DISTINCT query_id, method, checkpoint_id, protocol_id FROM attributions "
        "WHERE query_id = 'q0' ORDER BY method"
    )
    assert df["method"].to_list() == [
        "similarity:audio",
        "similarity:internal",
        "similarity:latent",
        "similarity:text",
        "unlearning",
    ]
    assert df["checkpoint_id"].n_unique() == 1 and df["checkpoint_id"][0].startswith("embedded-")
    assert set(df["protocol_id"]) == {"s0-k16"}


def test_baseline_losses_of_two_checkpoints_live_side_by_side(first):
    _, _, runner = first
    counts = QueryEngine(runner.root).sql(
        "SELECT checkpoint_id, protocol_id, count(*) AS n FROM baseline_losses GROUP BY ALL ORDER BY ALL"
    )
    assert counts.height >= 1 and all(n == 6 * 16 for n in counts["n"])
