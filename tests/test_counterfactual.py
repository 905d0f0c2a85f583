"""The counterfactual check on a tiny embedded corpus, with answers known in advance.

The corpus holds an exact duplicate of one query: the query `planted-copy` is a training item's own audio and caption.
Its attribution must put that item first, and retraining without its top-k (the duplicate among them) must raise its
loss above the noise floor of random removals and above the removal of k other clips of its artist: verdict pass at the
item level. The same query with a deliberately wrong "attribution" (its bottom-k, the least attributed items) must not
pass, and with it the check must fail.
"""

from __future__ import annotations

import statistics

import numpy as np
import polars as pl
import pytest
from dagster import AssetCheckKey, AssetKey

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.data.demo import builtin_queries
from tda_assets.data.inbox import add_query
from tda_assets.defs.assets.counterfactual import CHECK, without
from tda_assets.defs.configs import UnlearningConfig
from tda_assets.defs.plots import PNG_SIGNATURE
from tda_assets.experiments.runner import Runner
from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.tables import read_table, read_tables, write_table
from tests.trained_roots import TINY

ARTISTS, CLIPS, K, RANDOM = TINY.artists, TINY.clips, 2, 3
PLANTED, DEMO = "planted-copy", "demo-artist-00"


def counterfactual_run(runner: Runner, **config) -> tuple[pl.DataFrame, pl.DataFrame, object, dict]:
    """Run the asset; its table, verdicts (named query), check evaluation and materialization metadata, read at once
    (the next run overwrites the table)."""
    result = runner.counterfactual(**config)
    engine = QueryEngine(runner.root)
    table = engine.sql("select * from counterfactual order by query_id, removal, removal_seed")
    verdicts = engine.named("counterfactual_verdicts")
    (evaluation,) = result.get_asset_check_evaluations()
    (materialization,) = result.asset_materializations_for_node("counterfactual")
    return table, verdicts, evaluation, materialization.metadata


@pytest.fixture(scope="module")
def evaluated(trained_roots, tmp_path_factory):
    """A copy of the TINY root (its training side); a built-in query and the planted copy of item `copied`, attributed
    with the default configuration; then `counterfactual` on both (the first two queries with a target artist)."""
    mp = pytest.MonkeyPatch()
    root_dir = tmp_path_factory.mktemp("storage")
    runner = trained_roots.runner(TINY, root_dir, mp)
    runner.log_level = "ERROR"
    root = runner.root
    builtin_queries(root, artists=1)
    copied = (
        read_table(root, "training_manifest").filter(pl.col("artist") == "artist_01").sort("item_id").row(0, named=True)
    )
    audio_uri = trained_roots.in_copy(TINY, copied["audio_uri"], root_dir)  # the item's own audio file, in this root
    add_query(root, copied["caption"], PLANTED, audio_uri=audio_uri, target_artist=copied["artist"])
    for qid in runner.requested_queries():
        runner.attribute(qid, UnlearningConfig(lr=100.0, target_ratio=None, score_type="mean_delta"))
    run = counterfactual_run(runner, k=K, n_queries=2)
    yield runner, root, copied["item_id"], run
    mp.undo()


@pytest.fixture(scope="module")
def bottom_k(evaluated):
    """The planted copy again, its "attribution" replaced by the reverse ranking (config `bottom-k`): the removed items
    are the k least attributed."""
    runner, root, _, _ = evaluated
    scores = read_tables(root, "attribution_scores", query_id=PLANTED, config_id="default")  # one identity: the root's
    identity = scores.select("checkpoint_id", "protocol_id").unique().row(0, named=True)
    write_table(
        root,
        "attribution_scores",
        scores.with_columns(rank=len(scores) + 1 - pl.col("rank"), config_id=pl.lit("bottom-k")),
        **identity,
        query_id=PLANTED,
        config_id="bottom-k",
    )
    write_table(
        root, "unlearning_configs", read_table(root, "unlearning_configs", config_id="default"), config_id="bottom-k"
    )
    return counterfactual_run(runner, query_ids=[PLANTED], k=K, config_id="bottom-k")


def floor_by_definition(random: list[float]) -> tuple[float, float]:
    """(sample sd, floor) from DESIGN §1's definition, not from the code: the random rises' mean + 2 sample sds
    (statistics.stdev divides by n − 1). tests/test_counterfactual_verdict.py pins the code's noise_floor by hand."""
    sd = statistics.stdev(random)
    return sd, statistics.fmean(random) + 2 * sd


def rises(table: pl.DataFrame, qid: str) -> tuple[float, list[float]]:
    rows = table.filter(pl.col("query_id") == qid)
    return (
        rows.filter(pl.col("removal") == "attributed")["loss_rise"].item(),
        rows.filter(pl.col("removal") == "random")["loss_rise"].to_list(),
    )


def same_artist_rise(table: pl.DataFrame, qid: str) -> float:
    return table.filter((pl.col("query_id") == qid) & (pl.col("removal") == "same_artist"))["loss_rise"].item()


def test_the_planted_duplicate_is_in_the_attributed_top_k(evaluated):
    _, root, copied, _ = evaluated
    top = (
        QueryEngine(root)
        .sql(
            f"select item_id from attributions where query_id = '{PLANTED}' and method = 'unlearning' "
            f"and config_id = 'default' order by rank limit {K}"
        )["item_id"]
        .to_list()
    )
    assert copied in top


def test_removing_the_planted_duplicate_passes_well_above_the_noise_floor(evaluated):
    _, _, copied, (table, verdicts, _, _) = evaluated
    attributed, random = rises(table, PLANTED)
    row = verdicts.filter(pl.col("query_id") == PLANTED).row(0, named=True)
    assert row["passed"] is True and row["random_removals"] == RANDOM
    # item level: the duplicate matters more than any two other clips of its artist
    assert row["passed_item_level"] is True and attributed > row["item_floor"] > same_artist_rise(table, PLANTED)
    assert (
        copied
        in table.filter((pl.col("query_id") == PLANTED) & (pl.col("removal") == "attributed"))["removed_items"].item()
    )
    # the model saw the query's exact audio and caption; without it the loss must rise far more than any random removal
    assert attributed > row["noise_floor"] and attributed > 2 * max(max(random), row["noise_floor"], 0.0)
    assert attributed > 0.02 and attributed / table.filter(pl.col("query_id") == PLANTED)["query_loss_full"][0] > 0.05


def test_the_least_attributed_items_do_not_pass_and_the_check_fails(evaluated, bottom_k):
    _, _, copied, (main, *_) = evaluated
    table, verdicts, evaluation, meta = bottom_k
    removed = table.filter(pl.col("removal") == "attributed")["removed_items"].item().split(",")
    assert copied not in removed and len(removed) == K
    attributed, random = rises(table, PLANTED)
    floor = floor_by_definition(random)[1]
    row = verdicts.filter(pl.col("query_id") == PLANTED).row(0, named=True)
    assert attributed <= floor and row["passed"] is False and row["passed_item_level"] is False
    assert attributed < rises(main, PLANTED)[0] / 2  # the true top-k raised the loss at least twice as much
    assert evaluation.check_name == CHECK and evaluation.passed is False
    assert meta["share_passing"].value == 0.0 and meta["queries_passing"].value == 0
    assert meta["share_passing_item_level"].value == 0.0
    assert "0 of 1 queries" in evaluation.description and "'bottom-k'" in evaluation.description


def test_each_query_has_its_top_k_a_same_artist_control_and_the_shared_random_removals(evaluated):
    _, root, _, (table, *_) = evaluated
    assert table.select("query_id", "removal").rows() == [
        (DEMO, "attributed"),
        *[(DEMO, "random")] * RANDOM,
        (DEMO, "same_artist"),
        (PLANTED, "attributed"),
        *[(PLANTED, "random")] * RANDOM,
        (PLANTED, "same_artist"),
    ]
    engine = QueryEngine(root)
    random_sets = {
        q: table.filter((pl.col("query_id") == q) & (pl.col("removal") == "random"))["removed_items"].to_list()
        for q in (DEMO, PLANTED)
    }
    assert random_sets[DEMO] == random_sets[PLANTED]  # one set of retrained models for every query
    artist_of = dict(engine.sql("select item_id, artist from training_items").rows())
    for (qid,), rows in table.group_by("query_id"):
        target = engine.sql(f"select target_artist from queries where query_id = '{qid}'").item()
        same = rows.filter(pl.col("removal") == "same_artist")["removed_items"].item().split(",")
        assert len(same) == K and {artist_of[i] for i in same} == {target}
        top = engine.sql(
            f"select item_id from attributions where query_id = '{qid}' and method = 'unlearning' "
            f"and config_id = 'default' and rank <= {K} order by rank"
        )["item_id"].to_list()
        attributed = rows.filter(pl.col("removal") == "attributed")
        assert sorted(attributed["removed_items"].item().split(",")) == sorted(top)
        assert attributed["removal_seed"].item() is None
        random = rows.filter(pl.col("removal") == "random")
        sets = [frozenset(s.split(",")) for s in random["removed_items"]]
        assert len(set(sets)) == RANDOM and all(len(s) == K and not s & set(top) for s in sets)
        assert not set(same) & set(top)
        assert random["removal_seed"].to_list() == sorted(set(random["removal_seed"].to_list()))
    assert (table["loss_rise"] - (table["query_loss_removed"] - table["query_loss_full"])).abs().max() < 1e-12
    assert table["query_loss_full"].is_finite().all() and (table["query_loss_full"] > 0).all()
    assert set(table["full_model"]) == {"checkpoint"}  # same steps and seed as the checkpoint: no full retrain


def test_every_row_of_a_query_carries_its_floor_and_verdict(evaluated):
    _, _, _, (table, verdicts, _, _) = evaluated
    for qid in (DEMO, PLANTED):
        rows = table.filter(pl.col("query_id") == qid)
        attributed, random = rises(table, qid)
        sd, floor = floor_by_definition(random)
        assert rows["noise_floor"].to_list() == pytest.approx([floor] * (RANDOM + 2))
        assert rows["random_rise_sd"][0] == pytest.approx(np.std(random, ddof=1)) and sd > 0
        assert rows["passed"].n_unique() == 1 and rows["passed"][0] == (attributed > floor)
        item_floor = same_artist_rise(table, qid) + 2 * sd
        assert rows["item_floor"].to_list() == pytest.approx([item_floor] * (RANDOM + 2))
        assert rows["passed_item_level"].n_unique() == 1
        assert rows["passed_item_level"][0] == (attributed > floor and attributed > item_floor)
        assert verdicts.filter(pl.col("query_id") == qid)["attributed_rise"].item() == pytest.approx(attributed)


def test_check_is_a_majority_of_item_level_verdicts_with_both_shares_in_its_metadata(evaluated):
    runner, root, _, (_, verdicts, evaluation, meta) = evaluated
    passing = verdicts.filter(pl.col("query_id") != "(all)")["passed_item_level"].to_list()
    assert len(passing) == 2 and passing[1] is True  # PLANTED (sorted after DEMO) passes
    assert evaluation.check_name == CHECK and evaluation.passed is all(passing)  # 2 queries: more than half is both
    assert meta["share_passing_item_level"].value == pytest.approx(sum(passing) / 2)
    assert meta["queries_checked"].value == 2
    assert {v["query_id"]: v["passed_item_level"] for v in meta["verdicts"].value} == dict(
        zip([DEMO, PLANTED], passing)
    )
    overall = verdicts.filter(pl.col("query_id") == "(all)").row(0, named=True)
    assert overall["share_item_level"] == pytest.approx(sum(passing) / 2) and overall["passed_item_level"] is all(
        passing
    )
    latest = runner.instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [AssetCheckKey(AssetKey("counterfactual"), CHECK)]
    )
    assert latest  # the instance records it (shown in the UI)
    assert meta["retrains"].value == RANDOM + 2 * 2 and meta["full_model"].value == "checkpoint"  # random ones shared
    png = root.read_bytes("plots/counterfactual/loss_rise.png")
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024


def test_fewer_steps_retrain_the_full_model_too(evaluated, bottom_k):
    runner, _, _, _ = evaluated
    table, _, _, meta = counterfactual_run(runner, query_ids=[PLANTED], k=K, train_steps=10)
    assert set(table["full_model"]) == {"retrained"} and set(table["train_steps"]) == {10}
    assert table["query_id"].to_list() == [PLANTED] * (2 + RANDOM) and meta["retrains"].value == 1 + RANDOM + 2


def test_fewer_than_three_random_removals_are_refused(evaluated):
    runner, _, _, _ = evaluated
    with pytest.raises(Exception, match="random_removals"):
        runner.counterfactual(query_ids=[PLANTED], k=K, random_removals=2)


def test_without_keeps_order_and_drops_items():
    import torch

    batch = ItemBatch(
        ["a", "b", "c"], torch.arange(3.0).view(3, 1, 1), {"h": torch.arange(3.0).view(3, 1)}, torch.ones(3, 1)
    )
    kept = without(batch, {"b"})
    assert kept.item_ids == ["a", "c"] and kept.latents.flatten().tolist() == [0.0, 2.0]
