"""`tda evaluate` end to end on a tiny embedded corpus: it reuses the training side and prints every table."""

from __future__ import annotations

import contextlib
import io

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage
from tda_assets.io.tables import write_table
from tda_assets.cli import main
from tests.trained_roots import TINY

GRID = """
configs:
  - config_id: default
  - config_id: rerun
    seed: [1]
"""


# a perfect self-influence result of a configuration this evaluate does not judge (left by an earlier run on the root)
STALE_SELF_INFLUENCE = pl.DataFrame(
    {
        "target_item_id": ["a00-0000"],
        "rank": [1],
        "score": [1.0],
        "loss_ratio": [1.1],
        "lr_used": [1.0],
        "score_type": ["normalized"],
        "top_k_similarity": [0.5],
        "bottom_k_similarity": [0.1],
        "others_median_relative_change": [0.0],
        "checkpoint_id": ["old"],
        "protocol_id": ["s0-k16"],
        "target_set": ["reporting"],
    }
)


@pytest.fixture(scope="module")
def evaluated(trained_roots, tmp_path_factory):
    """A copy of the TINY root (a tiny training side), then `tda evaluate` on it: its exit code, output and root."""
    mp = pytest.MonkeyPatch()
    root_dir, home = tmp_path_factory.mktemp("storage"), tmp_path_factory.mktemp("home")
    grid_file = tmp_path_factory.mktemp("grid") / "grid.yaml"
    grid_file.write_text(GRID)
    runner = trained_roots.runner(TINY, root_dir, mp)
    for name, value in {
        "DAGSTER_HOME": str(home),
        "TDA_STORAGE_URL": str(root_dir),
        "TDA_GRID_FILE": str(grid_file),
    }.items():
        mp.setenv(name, value)
    write_table(
        runner.root,
        "self_influence",
        STALE_SELF_INFLUENCE,
        checkpoint_id="old",
        protocol_id="s0-k16",
        config_id="a-stale",
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "evaluate",
                "--grid-queries",
                "1",
                "--cf-queries",
                "1",
                "--cf-k",
                "2",
                "--si-targets",
                "3",
                "--rep-sources",
                "1",
            ]
        )
    yield code, out.getvalue(), QueryEngine(Storage(str(root_dir)))
    mp.undo()


def test_evaluate_reuses_the_training_side_and_exits_zero(evaluated):
    code, out, _ = evaluated
    assert code == 0, out
    assert "training side: already materialized" in out


def test_evaluate_prints_the_grid_consistency_agreement_and_counterfactual(evaluated):
    _, out, _ = evaluated
    for heading in (
        "Grid runs per configuration",
        "Consistency between configurations and seed reruns",
        "most consistent configuration:",
        "Agreement of unlearning with each similarity method",
        "Counterfactual check",
        "Verdict per query",
        "Cross-query overlap",
        "Self-influence",
        "Replication detection",
        "Figures per configuration",
        "Wall time by phase",
    ):
        assert heading in out, heading


def test_evaluate_names_the_configuration_self_influence_chose(evaluated):
    _, out, engine = evaluated
    figures = engine.named("config_figures")
    assert figures["config_id"].to_list() == ["default", "rerun-seed1"]  # only default was judged: it ranks first
    r = engine.sql("select avg(rank) from self_influence where config_id = 'default'").item()
    assert f"chosen by self-influence: default (R {r:.3f}, " in out
    assert figures.row(0, named=True)["replication_queries"] == 4


def test_evaluate_chooses_among_the_configurations_it_judged(evaluated):
    _, out, engine = evaluated
    # R 1.0 of another checkpoint from an earlier run: kept beside this run's, never in the current summary
    assert "a-stale" not in engine.named("self_influence_summary")["config_id"].to_list()
    assert engine.sql("select count(*) from self_influence where config_id = 'a-stale'").item() == 1
    assert "chosen by self-influence: default" in out
    assert engine.sql("select distinct config_id from replication").rows() == [("default",)]


def test_evaluate_fills_the_tables(evaluated):
    _, _, engine = evaluated
    assert engine.sql("select count(distinct query_id) from queries").item() == 8
    assert sorted(engine.sql("select config_id from unlearning_configs")["config_id"]) == ["default", "rerun-seed1"]
    table = engine.named("consistency_table")
    seed_pairs = table.filter(table["pair"] == "seed rerun").select("left", "right").rows()
    assert seed_pairs == [("unlearning:default", "unlearning:rerun-seed1")]
    # one query: its top-2, 3 random removals and its same-artist control, retrained the checkpoint's 60 steps (under
    # the 400 cap: no full retrain)
    assert engine.sql("select removal, count(*) from counterfactual group by all order by 1").rows() == [
        ("attributed", 1),
        ("random", 3),
        ("same_artist", 1),
    ]
    assert engine.sql("select distinct train_steps, full_model from counterfactual").rows() == [(60, "checkpoint")]
    # 8 built-in queries, each of its own target artist: every pair of them counts, C(8, 2) = 28
    overlap = engine.named("cross_query_overlap").filter(pl.col("ranking") == "unlearning:default").row(0, named=True)
    assert overlap["query_pairs"] == 28 and overlap["queries"] == 8
    # the report's metadata holds the same figure, per ranking, as the named query computes from the views
    report = (
        DagsterInstance.get().get_latest_materialization_event(AssetKey("consistency_report")).asset_materialization
    )
    recorded = {r["ranking"]: r for r in report.metadata["cross_query_overlap"].value}
    assert recorded["unlearning:default"]["query_pairs"] == 28
    for row in engine.named("cross_query_overlap").to_dicts():
        assert recorded[row["ranking"]]["cross_query_jaccard_10"] == pytest.approx(row["cross_query_jaccard"], abs=1e-4)
    # newton-target is not in this grid: only default is judged, on 3 targets (a-stale is the fixture's earlier result)
    assert engine.sql("select config_id, count(*) from self_influence group by all order by 1").rows() == [
        ("a-stale", 1),
        ("default", 3),
    ]
    assert engine.sql("select count(*) from replication").item() == 4
    # reporting targets and sources only, none of the development targets (at most half of the 12 items: 6)
    assert engine.sql("select distinct target_set from self_influence where config_id = 'default'").rows() == [
        ("reporting",)
    ]
    assert engine.sql("select distinct target_set from replication").rows() == [("reporting",)]
    assert engine.sql("select count(*) from replication where snr_db is null or latent_change is null").item() == 0
