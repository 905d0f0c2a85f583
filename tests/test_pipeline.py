"""The whole graph on a tiny embedded corpus: real Dagster instance, real parquet, real DuckDB."""

from __future__ import annotations

import pytest
from dagster import AssetKey, DagsterInstance

from tda_assets.io.query_engine import QueryEngine
from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.data.inbox import add_query
from tda_assets.experiments.runner import Runner

ARTISTS, CLIPS = 3, 4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """Runs the training side and two built-in queries once; tests read what it left."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TDA_TRAIN_STEPS", "60")
    root = tmp_path_factory.mktemp("storage")
    instance = DagsterInstance.ephemeral()
    runner = Runner.create(instance, str(root), log=lambda _m: None)
    runner.training_side({"clips_per_artist": CLIPS, "artists": ARTISTS})
    store = runner.resources["storage"].storage()
    builtin_queries(store, artists=2)
    requested = runner.sensor_tick()
    for qid in requested:
        runner.attribute(qid, UnlearningConfig(lr=100.0))
    yield runner, store, requested
    mp.undo()


def test_sensor_adds_one_partition_and_run_per_inbox_query(pipeline):
    runner, _, requested = pipeline
    assert requested == ["demo-artist-00", "demo-artist-01"]
    assert sorted(runner.instance.get_dynamic_partitions("queries")) == requested


def test_sensor_is_idempotent(pipeline):
    runner, _, _ = pipeline
    assert runner.sensor_tick() == []


def test_tables_have_the_expected_row_counts(pipeline):
    _, store, _ = pipeline
    counts = QueryEngine(store).table_counts()
    n = ARTISTS * CLIPS
    assert counts["training_items"] == n
    assert counts["baseline_losses"] == n * 16
    assert counts["queries"] == 2
    assert counts["unlearning_runs"] == 2
    assert counts["attributions"] == 2 * n * 4  # unlearning + 3 similarity methods


def test_queries_record_the_target_artist(pipeline):
    _, store, _ = pipeline
    df = QueryEngine(store).sql("select query_id, target_artist from queries order by query_id")
    assert df.rows() == [("demo-artist-00", "artist_00"), ("demo-artist-01", "artist_01")]


def test_each_query_has_one_attribution_row_per_item_with_ranks_1_to_n(pipeline):
    _, store, _ = pipeline
    df = QueryEngine(store).sql(
        "select query_id, count(*) n, min(rank) lo, max(rank) hi from attributions "
        "where method = 'unlearning' group by query_id order by query_id")
    n = ARTISTS * CLIPS
    assert df.rows() == [("demo-artist-00", n, 1, n), ("demo-artist-01", n, 1, n)]


def test_unlearning_check_passed_and_raised_the_query_loss(pipeline):
    runner, store, _ = pipeline
    runs = QueryEngine(store).sql("select query_id, loss_ratio from unlearning_runs order by query_id")
    assert all(r > 1.05 for r in runs["loss_ratio"])
    record = runner.instance.get_latest_materialization_event(AssetKey("unlearned_model"))
    assert record is not None and record.asset_materialization.metadata["loss_ratio"].value > 1.05


def test_named_top_k_query_prints_artist_and_caption(pipeline):
    _, store, _ = pipeline
    top = QueryEngine(store).named("top_k", k=3)
    assert {"query_id", "rank", "item_id", "artist", "caption"} <= set(top.columns)
    assert top.filter(top["method"] == "unlearning").height == 2 * 3


def test_rematerializing_one_query_leaves_the_other_untouched(pipeline):
    runner, store, _ = pipeline
    other = store.read_bytes("attribution_scores/query_id=demo-artist-01/config_id=default/part-0.parquet")
    runner.attribute_config("demo-artist-00", UnlearningConfig(lr=100.0))
    assert store.read_bytes("attribution_scores/query_id=demo-artist-01/config_id=default/part-0.parquet") == other


def test_a_second_configuration_lands_beside_the_default(pipeline):
    runner, store, _ = pipeline
    runner.attribute_config("demo-artist-01", UnlearningConfig(config_id="lr10", lr=10.0))
    engine = QueryEngine(store)
    configs = engine.sql("select distinct config_id from attributions where query_id = 'demo-artist-01' "
                         "and method = 'unlearning' order by 1")
    assert configs["config_id"].to_list() == ["default", "lr10"]
    assert engine.sql("select lr from unlearning_configs where config_id = 'lr10'").item() == 10.0


def test_query_id_with_a_slash_is_refused_with_the_fix(pipeline):
    _, store, _ = pipeline
    with pytest.raises(ValueError, match=r"not a safe slug.*'a-b'"):
        add_query(store, "a prompt", query_id="a/b")
