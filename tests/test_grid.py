"""The grid search on a tiny embedded corpus: every configuration for a query, a failing one recorded, the
consistency table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from dagster import AssetKey

from tda_assets.attribution.metrics import jaccard_at_k, spearman

from tda_assets.io.query_engine import QueryEngine
from tda_assets.cli import main
from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UnlearningConfig, load_grid
from tda_assets.experiments.grid import run_grid, select_queries, summary
from tda_assets.defs.plots import PNG_SIGNATURE
from tests.trained_roots import GRID as GRID_ROOT

# 40 items: a top-10 is a quarter of the corpus, so Jaccard@10 between unrelated rankings is low (about 0.15 for a
# random one) and the bounds below can fail; at 12 items any two top-10s share 8 and Jaccard@10 >= 0.67 always held.
# 8 artists of 5: the target artist's items fill only half of a top-10 (with 4 × 10 every ranking's top-10 was the
# target artist's ten items, and a seed rerun could not move it)
ARTISTS, CLIPS = GRID_ROOT.artists, GRID_ROOT.clips
SEED_RERUN_JACCARD_10, SEED_RERUN_SPEARMAN = 0.5, 0.8  # what a seed rerun must reach (measured values in the tests)
GRID = """
configs:
  - config_id: base             # 8 copies of the query per step (default 64): another seed moves the ranking a little
    lr: 100.0
    target_ratio: null          # a fixed step, ranked by mean delta-L (the values measured below)
    score_type: mean_delta
    query_draws: 8
  - config_id: base-again       # the same settings and seed: must rank exactly like `base`
    lr: 100.0
    target_ratio: null          # a fixed step, ranked by mean delta-L (the values measured below)
    score_type: mean_delta
    query_draws: 8
  - config_id: base-seed
    lr: 100.0
    target_ratio: null          # a fixed step, ranked by mean delta-L (the values measured below)
    score_type: mean_delta
    query_draws: 8
    seed: [1]
  - config_id: too-weak         # fails the blocking query_loss_raised check
    lr: 0.001
    target_ratio: null
"""
QUERY = "demo-artist-00"


@pytest.fixture(scope="module")
def grid(trained_roots, tmp_path_factory):
    """A copy of the GRID root (its training side), one built-in query with its default configuration, then the grid
    of GRID on it."""
    mp = pytest.MonkeyPatch()
    grid_file = tmp_path_factory.mktemp("grid") / "grid.yaml"
    grid_file.write_text(GRID)
    runner = trained_roots.runner(GRID_ROOT, tmp_path_factory.mktemp("storage"), mp)
    runner.log_level = "ERROR"
    root = runner.resources["storage"].root()
    builtin_queries(root, artists=1)
    runner.sensor_tick()
    configs = load_grid(grid_file)
    results = run_grid(runner, configs, select_queries(runner, "all"))
    yield runner, root, configs, results
    mp.undo()


def test_grid_file_expands_list_fields_into_configurations(grid):
    _, _, configs, _ = grid
    assert [c.config_id for c in configs] == ["base", "base-again", "base-seed-seed1", "too-weak"]
    assert configs[2].seed == 1 and configs[2].lr == 100.0


def test_the_shipped_grid_file_loads():
    ids = [c.config_id for c in load_grid()]
    assert ids[0] == "default" and len(ids) == len(set(ids)) >= 6


def test_every_configuration_ran_and_the_weak_one_was_recorded_not_fatal(grid):
    _, root, _, results = grid
    assert {r.config_id: r.label for r in results} == {
        "base": "attributed",
        "base-again": "attributed",
        "base-seed-seed1": "attributed",
        "too-weak": "failed_check",
    }
    engine = QueryEngine(root)
    runs = dict(engine.sql("select config_id, loss_ratio from unlearning_runs order by config_id").rows())
    assert set(runs) == {"base", "base-again", "base-seed-seed1", "too-weak"}
    assert runs["too-weak"] < 1.05 < runs["base"]
    configs = engine.sql("select distinct config_id from attributions where method = 'unlearning' order by 1")
    assert configs["config_id"].to_list() == ["base", "base-again", "base-seed-seed1"]
    assert engine.sql("select lr from unlearning_configs where config_id = 'too-weak'").item() == 0.001
    table = summary(results)
    too_weak = table.filter(table["config_id"] == "too-weak")
    assert too_weak.select("ran", "recorded", "attributed", "failed_check", "error").row(0) == (1, 0, 0, 1, 0)


def test_consistency_holds_every_pair_with_valid_values(grid):
    _, root, _, _ = grid
    df = QueryEngine(root).sql("select * from consistency where query_id = 'demo-artist-00'")
    labels = {
        "unlearning:base",
        "unlearning:base-again",
        "unlearning:base-seed-seed1",
        "similarity:audio",
        "similarity:text",
        "similarity:internal",
        "similarity:latent",
    }
    pairs = {frozenset(p) for p in df.select("left", "right").unique().rows()}
    assert len(pairs) == 21 and set().union(*pairs) == labels  # 7 rankings, every two
    jac = df.filter(df["metric"] == "jaccard")
    assert set(jac["k"].to_list()) == {10, 50, 100}
    assert jac["value"].is_between(0.0, 1.0).all()
    assert df.filter(df["metric"] == "spearman")["value"].is_between(-1.0, 1.0).all()
    same = df.filter((df["left"] == "unlearning:base") & (df["right"] == "unlearning:base-again"))
    assert dict(zip(same["metric"] + same["k"].cast(str).fill_null(""), same["value"])) == pytest.approx(
        {"jaccard10": 1.0, "jaccard50": 1.0, "jaccard100": 1.0, "spearman": 1.0, "pearson": 1.0}
    )


def test_consistency_table_sql_labels_seed_reruns(grid):
    _, root, _, _ = grid
    table = QueryEngine(root).named("consistency_table")
    kind = {(r["left"], r["right"]): r["pair"] for r in table.to_dicts()}
    assert kind[("unlearning:base", "unlearning:base-seed-seed1")] == "seed rerun"
    assert kind[("similarity:audio", "unlearning:base")] == "unlearning vs similarity"
    assert kind[("unlearning:base", "unlearning:base-again")] == "configurations"  # identical, not a rerun
    row = table.filter((table["left"] == "unlearning:base") & (table["right"] == "unlearning:base-again"))
    assert row["jaccard_10"].item() == pytest.approx(1.0) and row["spearman"].item() == pytest.approx(1.0)
    assert row["n_queries"].item() == 1


def scores_of(root, config_id: str) -> pl.DataFrame:
    return QueryEngine(root).sql(
        f"select item_id, score, rank from attributions where query_id = '{QUERY}' "
        f"and method = 'unlearning' and config_id = '{config_id}' order by item_id"
    )


def test_base_again_ranks_exactly_like_base(grid):
    _, root, _, _ = grid
    base, again = scores_of(root, "base"), scores_of(root, "base-again")
    assert len(base) == ARTISTS * CLIPS
    assert base["item_id"].to_list() == again["item_id"].to_list() and base["rank"].to_list() == again["rank"].to_list()
    assert (base["score"] - again["score"]).abs().max() == 0.0  # same settings, same seed: the same numbers


def test_seed_rerun_agrees_within_a_bound_that_a_shuffled_ranking_breaks(grid):
    _, root, _, _ = grid
    base, rerun = scores_of(root, "base"), scores_of(root, "base-seed-seed1")
    a, b = base["score"].to_numpy(), rerun["score"].to_numpy()
    measured, rho = jaccard_at_k(a, b, 10), spearman(a, b)
    # measured here: Jaccard@10 1.0 (the top-10 holds), Spearman 0.995 (the seed does move the ranking below it)
    assert measured >= SEED_RERUN_JACCARD_10 and SEED_RERUN_SPEARMAN <= rho < 1.0
    table = QueryEngine(root).sql(
        "select metric, k, value from consistency where query_id = 'demo-artist-00' and "
        'least("left", "right") = \'unlearning:base\' and '
        'greatest("left", "right") = \'unlearning:base-seed-seed1\''
    )
    recorded = {(m, k): v for m, k, v in table.rows()}
    assert recorded[("jaccard", 10)] == pytest.approx(measured)
    # a broken pipeline (ranks shuffled against the items) falls below both bounds: 100 shuffles of base's scores
    rng = np.random.default_rng(0)
    shuffled = [rng.permutation(a) for _ in range(100)]
    jaccards = [jaccard_at_k(a, s, 10) for s in shuffled]
    assert max(jaccards) < SEED_RERUN_JACCARD_10 and np.mean(jaccards) < 0.25
    assert max(abs(spearman(a, s)) for s in shuffled) < SEED_RERUN_SPEARMAN


def test_report_counts_only_the_other_seed_as_a_rerun_and_draws_the_heatmap(grid):
    runner, root, _, _ = grid
    meta = runner.instance.get_latest_materialization_event(
        AssetKey("consistency_report")
    ).asset_materialization.metadata
    assert meta["most_consistent_config_basis"].value == "seed reruns"
    per_config = {r["config_id"]: r for r in meta["config_consistency"].value}
    # base-seed-seed1 is a seed rerun of base; base-again (identical, seed included) is not
    # (counted as one, base would have 2 and base-again 2; base-seed-seed1 has both as reruns)
    assert per_config["base"]["seed_reruns"] == 1 and per_config["base-again"]["seed_reruns"] == 1
    assert per_config["base-seed-seed1"]["seed_reruns"] == 2
    measured = jaccard_at_k(
        scores_of(root, "base")["score"].to_numpy(), scores_of(root, "base-seed-seed1")["score"].to_numpy(), 10
    )
    assert per_config["base"]["jaccard_10_seed_reruns"] == pytest.approx(measured, abs=1e-4)
    assert per_config["base"]["jaccard_10_other_configs"] == pytest.approx(1.0)  # base-again, the only other one
    # every configuration's reruns agree at `measured`; base and base-again also agree with each other (1.0):
    # one of them
    assert meta["most_consistent_config"].value in {"base", "base-again"}
    png = root.read_bytes("plots/consistency/jaccard_10.png")
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1024
    assert "data:image/png;base64," in meta["plot_preview"].value


def test_attribution_scores_draws_top_k_bars_per_configuration(grid):
    runner, root, _, _ = grid
    for cid in ("base", "base-again", "base-seed-seed1"):
        png = root.read_bytes(f"plots/top_k/{QUERY}/{cid}.png")
        assert png.startswith(PNG_SIGNATURE) and len(png) > 1024
    assert not root.exists(f"plots/top_k/{QUERY}/too-weak.png")
    meta = runner.instance.get_latest_materialization_event(
        AssetKey("attribution_scores")
    ).asset_materialization.metadata
    assert meta["plot"].value.endswith(".png")


def test_second_grid_run_skips_what_is_recorded(grid):
    runner, _, configs, _ = grid
    again = run_grid(runner, configs, [QUERY], report=False)
    assert {r.config_id: r.label for r in again} == {
        "base": "attributed (recorded)",
        "base-again": "attributed (recorded)",
        "base-seed-seed1": "attributed (recorded)",
        "too-weak": "failed_check (recorded)",
    }


def test_unknown_query_is_refused_with_the_known_ones(grid):
    runner, _, _, _ = grid
    with pytest.raises(ValueError, match=r"unknown query id\(s\) \['nope'\].*demo-artist-00"):
        select_queries(runner, "nope,demo-artist-00")
    assert select_queries(runner, f" {QUERY} ") == [QUERY]


def test_cli_grid_reports_an_unknown_query(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TDA_STORAGE_URL", str(tmp_path / "storage"))
    assert main(["grid", "--queries", "nope"]) == 1
    assert "unknown query id(s) ['nope']" in capsys.readouterr().err


def test_changed_configuration_is_rerun(grid):
    runner, root, _, _ = grid
    changed = UnlearningConfig(config_id="base-again", lr=120.0)
    (run,) = run_grid(runner, [changed], [QUERY], report=False)
    assert (run.state, run.ran) == ("attributed", True)
    assert QueryEngine(root).sql("select lr from unlearning_configs where config_id = 'base-again'").item() == 120.0


@pytest.mark.parametrize(
    "entry, message",
    [
        (
            "  - config_id: a\n    lrr: 3\n",
            r"configuration 'a': unknown field\(s\) \['lrr'\]: the fields are recipe, lr",
        ),
        ("  - config_id: a\n    recipe: sgd_ascent\n", r"configuration 'a': unknown recipe 'sgd_ascent'"),
        ("  - config_id: a\n    param_subset: [all, mlp]\n", r"configuration 'a': unknown param_subset 'mlp'"),
        ("  - config_id: runs/a\n", r"config_id 'runs/a' is not a safe slug.*'runs-a'"),
        ("  - lr: 3.0\n", r"entry 1 needs a config_id"),
    ],
)
def test_a_bad_grid_entry_is_refused_naming_the_configuration_and_the_fix(tmp_path, entry, message):
    path = tmp_path / "grid.yaml"
    path.write_text("configs:\n" + entry)
    with pytest.raises(ValueError, match=rf"grid file {path}: .*{message}"):
        load_grid(path)


def test_grid_accepts_the_table_name_lambda_and_names_float_values_plainly(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        "configs:\n  - config_id: ewc\n    recipe: ewc_ascent\n    target_ratio: null\n    lambda: 5\n"
        "    lr: [0.001, 100.0]\n"
    )
    configs = load_grid(path)
    assert [c.config_id for c in configs] == ["ewc-lr0p001", "ewc-lr100"]
    assert {c.lambda_ for c in configs} == {5.0}
