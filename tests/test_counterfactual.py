"""The counterfactual check on a tiny embedded corpus: retrain without attributed / random items, table and check."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from tda_assets.io.query_engine import QueryEngine
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.defs.assets.evaluation import CHECK, random_items, without
from tda_assets.defs.plots import PNG_SIGNATURE
from tda_assets.experiments.runner import Runner

ARTISTS, CLIPS, STEPS, K = 3, 4, 40, 2


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Training side (STEPS steps), two built-in queries with the default configuration, then `counterfactual`."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TDA_TRAIN_STEPS", str(STEPS))
    root = tmp_path_factory.mktemp("storage")
    runner = Runner.create(DagsterInstance.ephemeral(), str(root), log=lambda _m: None)
    runner.log_level = "ERROR"
    runner.training_side({"clips_per_artist": CLIPS, "artists": ARTISTS})
    store = runner.resources["storage"].storage()
    builtin_queries(store, artists=2)
    for qid in runner.requested_queries():
        runner.attribute(qid, UnlearningConfig(lr=100.0))
    result = runner.counterfactual(k=K, n_queries=2)
    yield runner, store, result
    mp.undo()


def test_table_has_both_removals_per_query(evaluated):
    _, store, _ = evaluated
    df = QueryEngine(store).sql("select * from counterfactual order by query_id, removal")
    assert df.select("query_id", "removal", "k").rows() == [
        ("demo-artist-00", "attributed", K), ("demo-artist-00", "random", K),
        ("demo-artist-01", "attributed", K), ("demo-artist-01", "random", K)]
    assert (df["loss_rise"] - (df["query_loss_removed"] - df["query_loss_full"])).abs().max() < 1e-12
    assert df["query_loss_full"].is_finite().all() and (df["query_loss_full"] > 0).all()
    assert df.group_by("query_id").agg(pl.col("query_loss_full").n_unique())["query_loss_full"].to_list() == [1, 1]


def test_attributed_removal_is_the_top_k_and_the_full_model_is_the_checkpoint(evaluated):
    _, store, _ = evaluated
    raw = store.read_parquet("counterfactual/part-0.parquet")
    assert set(raw["full_model"]) == {"checkpoint"}  # same steps and seed as the checkpoint: no full retrain
    engine = QueryEngine(store)
    for row in raw.filter(pl.col("removal") == "attributed").to_dicts():
        top = engine.sql(f"select item_id from attributions where query_id = '{row['query_id']}' and method = 'unlearning' "
                         f"and config_id = 'default' and rank <= {K} order by rank")["item_id"].to_list()
        assert sorted(row["removed_items"].split(",")) == sorted(top)


def test_check_result_and_plot_are_recorded(evaluated):
    runner, store, result = evaluated
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.check_name == CHECK and isinstance(evaluation.passed, bool)
    latest = runner.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(AssetKey("counterfactual"), CHECK)])
    assert latest  # the instance records it (shown in the UI)
    meta = runner.instance.get_latest_materialization_event(AssetKey("counterfactual")).asset_materialization.metadata
    assert meta["retrains"].value == 4 and meta["full_model"].value == "checkpoint"
    png = store.read_bytes("plots/counterfactual/loss_rise.png")
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024


def test_fewer_steps_retrain_the_full_model_too(evaluated):
    runner, store, _ = evaluated
    runner.counterfactual(query_ids=["demo-artist-01"], k=K, train_steps=10)
    raw = store.read_parquet("counterfactual/part-0.parquet")
    assert set(raw["full_model"]) == {"retrained"} and set(raw["train_steps"]) == {10}
    assert raw["query_id"].to_list() == ["demo-artist-01", "demo-artist-01"]


def test_random_removal_is_seeded_per_query():
    ids = [f"i{n}" for n in range(50)]
    assert random_items(ids, 5, 0, "q1") == random_items(ids, 5, 0, "q1")
    assert random_items(ids, 5, 0, "q1") != random_items(ids, 5, 0, "q2")
    assert len(set(random_items(ids, 5, 1, "q1"))) == 5


def test_without_keeps_order_and_drops_items():
    import torch

    batch = ItemBatch(["a", "b", "c"], torch.arange(3.0).view(3, 1, 1), {"h": torch.arange(3.0).view(3, 1)}, torch.ones(3, 1))
    kept = without(batch, {"b"})
    assert kept.item_ids == ["a", "c"] and kept.latents.flatten().tolist() == [0.0, 2.0]
