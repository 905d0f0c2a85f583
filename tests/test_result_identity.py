"""One identity per result: result tables keyed by checkpoint and protocol, named queries on the current identity only.

A real local root, real parquet files and the real DuckDB views; the rows are hand-made so every expected figure is
worked out here by hand.
"""

from __future__ import annotations

import polars as pl
import pytest

from tda_assets.data.query_state import config_states
from tda_assets.io.legacy_layout import migrate_legacy_results
from tda_assets.io.query_engine import QueryEngine, QueryEngineError
from tda_assets.io.registry import TABLES, LayoutError, key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, table_exists, write_table

CURRENT, OLD = "embedded-new", "embedded-old"
PROTOCOL = "s0-k16"  # what the environment's defaults (TDA_DRAWS 16, TDA_PROTOCOL_SEED 0, fp32) name


@pytest.fixture
def root(tmp_path) -> Storage:
    root = Storage(str(tmp_path / "root"))
    root.write_bytes(key("checkpoint_record"), f'{{"checkpoint_id": "{CURRENT}"}}'.encode())
    return root


def self_influence_rows(ranks: dict[str, int], config_id: str = "default") -> pl.DataFrame:
    """One configuration's self-influence rows: target → the rank of the target itself."""
    n = len(ranks)
    df = pl.DataFrame(
        {
            "config_id": [config_id] * n,
            "target_item_id": list(ranks),
            "rank": list(ranks.values()),
            "score": [1.0] * n,
            "loss_ratio": [2.0] * n,
            "lr_used": [1.0] * n,
            "score_type": ["mean_delta"] * n,
            "top_k_similarity": [0.5] * n,
            "bottom_k_similarity": [0.1] * n,
            "others_median_relative_change": [0.0] * n,
        }
    )
    schema = TABLES["self_influence"].polars_schema()  # the summaries report reporting targets: these are
    return df.with_columns(
        pl.lit("reporting" if c == "target_set" else None, dtype=t).alias(c)
        for c, t in schema.items()
        if c not in df.columns
    )


def write_self_influence(
    root: Storage, checkpoint_id: str, protocol_id: str, ranks: dict[str, int], config_id: str = "default"
) -> None:
    write_table(
        root,
        "self_influence",
        self_influence_rows(ranks, config_id),
        checkpoint_id=checkpoint_id,
        protocol_id=protocol_id,
        config_id=config_id,
    )


def test_tda_query_self_influence_summary_on_a_root_with_two_checkpoints_shows_only_the_current_one(root, monkeypatch):
    from tda_assets import cli

    # the old checkpoint put all 4 targets first; the current one 2 of 4 (ranks 1, 1, 3, 5: R = 2.5); the current
    # checkpoint under the bf16 protocol (not the environment's) ranked every target last
    write_self_influence(root, OLD, PROTOCOL, {"a": 1, "b": 1, "c": 1, "d": 1})
    write_self_influence(root, CURRENT, PROTOCOL, {"a": 1, "b": 1, "c": 3, "d": 5})
    write_self_influence(root, CURRENT, PROTOCOL + "-bf16", {"a": 9, "b": 9, "c": 9, "d": 9})
    assert len(root.glob(TABLES["self_influence"].glob())) == 3  # the three live side by side
    for name in ("TDA_DRAWS", "TDA_PROTOCOL_SEED", "TDA_LOSS_PRECISION", "TDA_SQL_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TDA_STORAGE_URL", root.url)
    printed = []
    monkeypatch.setattr(cli, "_print", printed.append)
    assert cli.main(["query", "self_influence_summary"]) == 0
    (summary,) = printed
    assert summary.select("config_id", "targets", "r_mean_rank", "share_first").rows() == [("default", 4, 2.5, 0.5)]


def test_the_named_queries_follow_the_checkpoint_record(root):
    write_self_influence(root, OLD, PROTOCOL, {"a": 1, "b": 2})
    write_self_influence(root, CURRENT, PROTOCOL, {"a": 4, "b": 4})
    r = lambda: QueryEngine(root, protocol_id=PROTOCOL).named("self_influence_summary")["r_mean_rank"].to_list()  # noqa: E731
    assert r() == [4.0]
    root.write_bytes(key("checkpoint_record"), f'{{"checkpoint_id": "{OLD}"}}'.encode())
    assert r() == [1.5]


def test_without_a_protocol_the_engine_takes_the_only_one_and_names_several(root):
    write_self_influence(root, CURRENT, PROTOCOL, {"a": 2})
    assert QueryEngine(root).current_identity() == (CURRENT, PROTOCOL)
    write_self_influence(root, CURRENT, PROTOCOL + "-bf16", {"a": 3})
    with pytest.raises(QueryEngineError, match=r"under protocols \['s0-k16', 's0-k16-bf16'\].*TDA_LOSS_PRECISION"):
        QueryEngine(root).named("self_influence_summary")
    assert QueryEngine(root).sql("SELECT count(*) FROM self_influence").item() == 2  # the raw views still read


def test_self_influence_summary_compares_configurations_on_the_targets_all_of_them_have(root):
    write_self_influence(root, CURRENT, PROTOCOL, {"a": 1, "b": 1, "c": 7, "d": 9})
    write_self_influence(root, CURRENT, PROTOCOL, {"a": 2, "b": 1}, config_id="other")
    summary = QueryEngine(root, protocol_id=PROTOCOL).named("self_influence_summary")
    got = {r["config_id"]: r for r in summary.to_dicts()}
    assert (got["default"]["targets"], got["default"]["r_mean_rank"]) == (2, 1.0)  # c and d: `other` never saw them
    assert (got["other"]["targets"], got["other"]["r_mean_rank"]) == (2, 1.5)


def unlearning_run(ratio: float) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "query_loss_before": [1.0],
            "query_loss_after": [ratio],
            "delta_uri": ["d"],
            "seconds": [1.0],
            "lr_used": [1.0],
            "target_ratio": [None],
            "search_ratio": [None],
            "probes": [0],
        }
    )


def test_config_figures_compare_configurations_on_the_queries_all_of_them_ran(root):
    # default ran on 4 queries (ratios 2, 4, 8, 16), `other` on 2 of them (3, 3): both are judged on q1 and q2 only
    for q, ratio in zip(["q1", "q2", "q3", "q4"], [2.0, 4.0, 8.0, 16.0]):
        write_table(
            root,
            "unlearning_runs",
            unlearning_run(ratio),
            checkpoint_id=CURRENT,
            protocol_id=PROTOCOL,
            query_id=q,
            config_id="default",
        )
    for q in ["q1", "q2"]:
        write_table(
            root,
            "unlearning_runs",
            unlearning_run(3.0),
            checkpoint_id=CURRENT,
            protocol_id=PROTOCOL,
            query_id=q,
            config_id="other",
        )
    write_table(
        root,
        "unlearning_runs",
        unlearning_run(100.0),
        checkpoint_id=OLD,
        protocol_id=PROTOCOL,
        query_id="q1",
        config_id="other",
    )  # another checkpoint's run: neither counted nor widening the spread
    figures = QueryEngine(root, protocol_id=PROTOCOL).named("config_figures").sort("config_id")
    assert figures.select("config_id", "queries", "loss_ratio_spread").rows() == [
        ("default", 2, 2.0),
        ("other", 2, 1.0),
    ]


def test_a_rerun_under_another_protocol_lives_beside_the_first(root):
    for protocol, rank in [(PROTOCOL, 1), (PROTOCOL + "-bf16", 2)]:
        write_self_influence(root, CURRENT, protocol, {"a": rank})
    for protocol, rank in [(PROTOCOL, 1), (PROTOCOL + "-bf16", 2)]:
        got = read_table(root, "self_influence", checkpoint_id=CURRENT, protocol_id=protocol, config_id="default")
        assert got["rank"].to_list() == [rank]


def test_a_frame_whose_identity_differs_from_its_key_is_refused(root):
    frame = self_influence_rows({"a": 1}).with_columns(checkpoint_id=pl.lit(OLD), protocol_id=pl.lit(PROTOCOL))
    with pytest.raises(LayoutError, match=r"checkpoint_id \['embedded-old'\] is not its key's 'embedded-new'"):
        write_table(root, "self_influence", frame, checkpoint_id=CURRENT, protocol_id=PROTOCOL, config_id="default")


def test_a_pair_run_under_two_identities_is_attributed_under_the_current_one_stale_under_the_other(root):
    for checkpoint_id in (OLD, CURRENT):
        write_table(
            root,
            "unlearning_runs",
            unlearning_run(2.0),
            checkpoint_id=checkpoint_id,
            protocol_id=PROTOCOL,
            query_id="q1",
            config_id="default",
        )
    write_table(
        root,
        "unlearning_runs",
        unlearning_run(2.0),
        checkpoint_id=OLD,
        protocol_id=PROTOCOL,
        query_id="q2",
        config_id="default",
    )
    write_table(
        root,
        "attribution_scores",
        pl.DataFrame(schema=TABLES["attribution_scores"].polars_schema()),
        checkpoint_id=CURRENT,
        protocol_id=PROTOCOL,
        query_id="q1",
        config_id="default",
    )
    states = config_states(root, CURRENT, PROTOCOL, 1.05)
    assert {pair: s.state for pair, s in states.items()} == {
        ("q1", "default"): "attributed",
        ("q2", "default"): "stale",
    }


def write_legacy_self_influence(root: Storage) -> str:
    """A self_influence file as written before identity keys: no identity in its key, identity columns in its rows and
    no column added since (the registry's columns minus `score_type`)."""
    legacy_key = TABLES["self_influence"].legacy.format(config_id="default")
    rows = self_influence_rows({"a": 1, "b": 3}).drop("config_id", "score_type")
    root.write_parquet(legacy_key, rows.with_columns(checkpoint_id=pl.lit(CURRENT), protocol_id=pl.lit(PROTOCOL)))
    return legacy_key


def test_a_root_of_the_layout_before_identity_keys_is_refused_with_the_fix(root):
    write_legacy_self_influence(root)
    with pytest.raises(QueryEngineError, match=r"self_influence \(1 file\).*run `tda prepare`"):
        QueryEngine(root, protocol_id=PROTOCOL).named("self_influence_summary")
    with pytest.raises(LayoutError, match="tda prepare"):  # the pending-query decision refuses it too
        config_states(root, CURRENT, PROTOCOL, 1.05)


def test_migration_moves_legacy_results_under_their_identity_with_new_columns_null(root):
    legacy_key = write_legacy_self_influence(root)
    assert migrate_legacy_results(root) == {"self_influence": 1}
    assert not root.exists(legacy_key)
    assert table_exists(root, "self_influence", checkpoint_id=CURRENT, protocol_id=PROTOCOL, config_id="default")
    summary = QueryEngine(root, protocol_id=PROTOCOL).named("self_influence_summary")
    assert summary.select("config_id", "score_type", "targets", "r_mean_rank").rows() == [("default", None, 2, 2.0)]
    assert migrate_legacy_results(root) == {}  # nothing left to move


def consistency(rows: list[tuple[str, str, str, float]]) -> pl.DataFrame:
    """Jaccard@10 rows `(query, left, right, value)`."""
    return pl.DataFrame(
        [(q, left, right, "jaccard", 10, v) for q, left, right, v in rows],
        schema=["query_id", "left", "right", "metric", "k", "value"],
        orient="row",
    )


def test_consistency_and_agreement_compare_on_the_queries_every_pair_has(root):
    # default vs audio on q1 (0.2) and q2 (0.6); other vs audio on q1 only (0.4); another checkpoint's q1 row (0.9)
    write_table(
        root,
        "consistency",
        consistency(
            [
                ("q1", "unlearning:default", "similarity:audio", 0.2),
                ("q2", "unlearning:default", "similarity:audio", 0.6),
                ("q1", "unlearning:other", "similarity:audio", 0.4),
            ]
        ),
        checkpoint_id=CURRENT,
        protocol_id=PROTOCOL,
    )
    write_table(
        root,
        "consistency",
        consistency([("q1", "unlearning:default", "similarity:audio", 0.9)]),
        checkpoint_id=OLD,
        protocol_id=PROTOCOL,
    )
    engine = QueryEngine(root, protocol_id=PROTOCOL)
    table = engine.named("consistency_table").select("right", "jaccard_10", "n_queries").sort("right").rows()
    assert table == [("unlearning:default", 0.2, 1), ("unlearning:other", 0.4, 1)]  # default's q2 is left out
    means = engine.named("method_agreement").filter(pl.col("query_id") == "(mean)")
    assert means.select("config_id", "jaccard_10", "n_queries").sort("config_id").rows() == [
        ("default", 0.2, 1),
        ("other", 0.4, 1),
    ]
