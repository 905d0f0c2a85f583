"""The whole graph on a tiny embedded corpus: real Dagster instance, real parquet, real DuckDB."""

from __future__ import annotations

import polars as pl
import pytest
from dagster import AssetKey

from tda_assets.io.query_engine import QueryEngine
from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UNLEARNING_ASSETS, UnlearningConfig, record_config, unlearning_run_config
from tda_assets.defs.partitions import query_config_key
from tda_assets.io.tables import read_tables
from tda_assets.data.inbox import add_query
from tda_assets.experiments.query_listing import query_table
from tda_assets.io.registry import glob, key
from tests.trained_roots import TINY

ARTISTS, CLIPS = TINY.artists, TINY.clips


@pytest.fixture(scope="module")
def pipeline(trained_roots, tmp_path_factory):
    """A copy of the TINY root (its training side) and two built-in queries drained once; tests read what it left."""
    mp = pytest.MonkeyPatch()
    runner = trained_roots.runner(TINY, tmp_path_factory.mktemp("storage"), mp)
    root = runner.resources["storage"].root()
    builtin_queries(root, artists=2)
    drain = runner.drain_inbox(UnlearningConfig(lr=100.0))
    yield runner, root, drain
    mp.undo()


def test_draining_the_inbox_runs_each_query_clip_first_then_its_default_attribution(pipeline):
    runner, _, drain = pipeline
    assert drain.ticks == 2 and drain.failed == []
    assert drain.attributed == ["demo-artist-00", "demo-artist-01"]
    assert sorted(runner.instance.get_dynamic_partitions("queries")) == drain.attributed
    assert runner.instance.get_dynamic_partitions("configs") == ["default"]


def test_the_sensor_requests_nothing_once_every_query_has_its_result(pipeline):
    runner, _, _ = pipeline
    assert runner.sensor_tick() == []


def test_a_query_whose_results_left_the_root_is_pending_again_whatever_the_instance_knows(pipeline, tmp_path):
    runner, root, _ = pipeline
    moved = {}
    for name in ("unlearning_runs", "attribution_scores"):  # as if the root had lost this query's results
        (k,) = root.glob(glob(name, query_id="demo-artist-01", config_id="default"))  # the root's one identity
        moved[k] = root.read_bytes(k)
        root.delete(k)
    try:
        (request,) = runner.sensor_tick()
        assert request.job_name == "attribute_config"
        assert request.partition_key == "default|demo-artist-01"
        assert "demo-artist-01" in runner.instance.get_dynamic_partitions("queries")
    finally:
        for k, data in moved.items():
            root.write_bytes(k, data)
    assert runner.sensor_tick() == []


def test_tables_have_the_expected_row_counts(pipeline):
    _, root, _ = pipeline
    counts = QueryEngine(root).table_counts()
    n = ARTISTS * CLIPS
    assert counts["training_items"] == n
    assert counts["baseline_losses"] == n * 16
    assert counts["queries"] == 2
    assert counts["unlearning_runs"] == 2
    assert counts["attributions"] == 2 * n * 5  # unlearning + 4 similarity methods (audio, text, internal, latent)


def test_queries_record_the_target_artist(pipeline):
    _, root, _ = pipeline
    df = QueryEngine(root).sql("select query_id, target_artist from queries order by query_id")
    assert df.rows() == [("demo-artist-00", "artist_00"), ("demo-artist-01", "artist_01")]


def test_each_query_has_one_attribution_row_per_item_with_ranks_1_to_n(pipeline):
    _, root, _ = pipeline
    df = QueryEngine(root).sql(
        "select query_id, count(*) n, min(rank) lo, max(rank) hi from attributions "
        "where method = 'unlearning' group by query_id order by query_id"
    )
    n = ARTISTS * CLIPS
    assert df.rows() == [("demo-artist-00", n, 1, n), ("demo-artist-01", n, 1, n)]


def test_unlearning_check_passed_and_raised_the_query_loss(pipeline):
    runner, root, _ = pipeline
    runs = QueryEngine(root).sql("select query_id, loss_ratio from unlearning_runs order by query_id")
    assert all(r > 1.05 for r in runs["loss_ratio"])
    record = runner.instance.get_latest_materialization_event(AssetKey("unlearned_model"))
    assert record is not None and record.asset_materialization.metadata["loss_ratio"].value > 1.05


def test_named_top_k_query_prints_artist_and_caption(pipeline):
    _, root, _ = pipeline
    top = QueryEngine(root).named("top_k", k=3)
    assert {"query_id", "rank", "item_id", "artist", "caption"} <= set(top.columns)
    assert top.filter(top["method"] == "unlearning").height == 2 * 3


def test_rematerializing_one_query_leaves_the_other_untouched(pipeline):
    runner, root, _ = pipeline
    (other_key,) = root.glob(glob("attribution_scores", query_id="demo-artist-01", config_id="default"))
    other = root.read_bytes(other_key)
    runner.attribute_config("demo-artist-00", UnlearningConfig(lr=100.0))
    assert root.read_bytes(other_key) == other


def test_a_second_configuration_lands_beside_the_default(pipeline):
    runner, root, _ = pipeline
    runner.attribute_config("demo-artist-01", UnlearningConfig(config_id="lr10", lr=10.0))
    engine = QueryEngine(root)
    configs = engine.sql(
        "select distinct config_id from attributions where query_id = 'demo-artist-01' "
        "and method = 'unlearning' order by 1"
    )
    assert configs["config_id"].to_list() == ["default", "lr10"]
    assert engine.sql("select lr from unlearning_configs where config_id = 'lr10'").item() == 10.0


def test_a_config_partition_launched_without_run_config_runs_its_recorded_settings(pipeline):
    runner, root, _ = pipeline
    record_config(root, UnlearningConfig(config_id="lr20", lr=20.0, target_ratio=None))  # a fixed step
    runner.add_partitions("demo-artist-00", "lr20")
    runner.run(UNLEARNING_ASSETS, query_config_key("demo-artist-00", "lr20"))  # as the UI launches it
    runs = read_tables(root, "unlearning_runs", query_id="demo-artist-00", config_id="lr20")  # one identity: the root's
    assert runs["lr_used"].item() == 20.0


def test_a_run_config_naming_another_configuration_than_the_partition_is_refused(pipeline):
    runner, _, _ = pipeline
    runner.add_partitions("demo-artist-00", "lr30")
    with pytest.raises(Exception, match=r"run config is configuration 'lr40' but the partition's is 'lr30'"):
        runner.run(
            UNLEARNING_ASSETS,
            query_config_key("demo-artist-00", "lr30"),
            unlearning_run_config(UnlearningConfig(config_id="lr40", lr=40.0)),
        )


def test_query_id_with_a_slash_is_refused_with_the_fix(pipeline):
    _, root, _ = pipeline
    with pytest.raises(ValueError, match=r"not a safe slug.*'a-b'"):
        add_query(root, "a prompt", query_id="a/b")


def test_self_influence_ranks_each_k_means_target_among_all_items(pipeline):
    runner, root, _ = pipeline
    runner.run(["self_influence"], run_config={"ops": {"self_influence": {"config": {"n_targets": 3, "k": 3}}}})
    rows = QueryEngine(root).sql("select * from self_influence order by target_item_id")
    n = ARTISTS * CLIPS
    assert rows.height == 3 and rows["target_item_id"].n_unique() == 3 and set(rows["config_id"]) == {"default"}
    assert rows["rank"].is_between(1, n).all() and (rows["loss_ratio"] > 1.0).all()
    assert (rows["top_k_similarity"] > rows["bottom_k_similarity"]).all()
    summary = QueryEngine(root).named("self_influence_summary")
    assert summary["targets"].to_list() == [3]
    meta = runner.instance.get_latest_materialization_event(AssetKey("self_influence")).asset_materialization.metadata
    assert meta["per_config"].value["default"]["R"] == pytest.approx(rows["rank"].mean(), abs=1e-3)


def test_replication_ranks_the_source_of_each_transformed_clip(pipeline):
    runner, root, _ = pipeline
    runner.run(["replication"], run_config={"ops": {"replication": {"config": {"n_sources": 1}}}})
    rows = QueryEngine(root).sql("select source_item_id, transform, rank from replication order by transform")
    assert rows["transform"].to_list() == ["fade_-6db", "noise_30db", "resample_22k", "shift_50ms"]
    assert rows["source_item_id"].n_unique() == 1 and rows["rank"].is_between(1, ARTISTS * CLIPS).all()


def test_a_second_configuration_s_self_influence_lands_beside_the_first(pipeline):
    runner, root, _ = pipeline
    runner.run(["self_influence"], run_config={"ops": {"self_influence": {"config": {"n_targets": 3, "k": 3}}}})
    runner.attribute_config("demo-artist-00", UnlearningConfig(config_id="target", target_ratio=1.2))  # records it
    runner.run(
        ["self_influence"],
        run_config={"ops": {"self_influence": {"config": {"config_ids": ["target"], "n_targets": 3, "k": 3}}}},
    )
    df = QueryEngine(root).sql(
        "select config_id, count(*) as n, min(loss_ratio) as lo, max(loss_ratio) as hi "
        "from self_influence group by all order by all"
    )
    assert df.select("config_id", "n").rows() == [("default", 3), ("target", 3)]
    lo, hi = df.filter(df["config_id"] == "target").select("lo", "hi").row(0)
    assert 1.1 < lo and hi < 1.3  # the step size was searched per target: 1.2 ± 10% of 0.2, and the protocol draws


def test_the_query_table_gives_each_query_its_state_per_configuration(pipeline):
    _, root, _ = pipeline
    add_query(root, "a later query", query_id="later")
    try:
        df = query_table(root, "s0-k16")
    finally:
        root.delete(key("inbox", name="later.json"))
    states = {(q, c): s for q, c, s in df.select("query_id", "config_id", "state").rows()}
    assert states[("demo-artist-00", "default")] == "attributed"
    assert states[("later", "default")] == "waiting"
    assert df.filter(pl.col("state") == "attributed")["loss_ratio"].min() > 1.05
