"""The DuckDB views and the named queries over a tiny hand-made dataset on a local root."""

from __future__ import annotations

from dataclasses import replace

import polars as pl
import pytest

from tda_assets.attribution.settings import UnlearningSettings, settings_row

from tda_assets.io.query_engine import QueryEngine, QueryEngineError
from tda_assets.io.registry import TABLES
from tda_assets.io.storage import Storage
from tda_assets.io.tables import write_table

ITEMS = {"i1": "A", "i2": "A", "i3": "B", "i4": "B", "i5": "C", "i6": "C"}
# unlearning scores per query (configuration `default`), then similarity:audio scores
UNLEARNING = {"0012": [0.9, 0.8, 0.1, 0.05, 0.0, -0.1], "q2": [0.2, 0.0, 0.7, 0.6, 0.1, 0.3]}
SIMILARITY = {"0012": [0.5, 0.1, 0.9, 0.2, 0.0, 0.3], "q2": [0.1, 0.2, 0.3, 0.9, 0.8, 0.0]}
CONSISTENCY = [  # query, left, right, metric, k, value
    ("0012", "unlearning:default", "similarity:audio", "jaccard", 10, 0.5),
    ("0012", "unlearning:default", "similarity:audio", "spearman", None, 0.4),
    ("q2", "similarity:audio", "unlearning:default", "jaccard", 10, 0.3),  # either order
    ("q2", "unlearning:default", "similarity:audio", "spearman", None, 0.2),
    ("0012", "unlearning:default", "unlearning:seed1", "jaccard", 10, 0.9),
    ("q2", "unlearning:seed1", "unlearning:default", "jaccard", 10, 0.7),
]


IDENTITY_VALUES = {"checkpoint_id": "c", "protocol_id": "p"}
IDENTITY = {k: pl.lit(v) for k, v in IDENTITY_VALUES.items()}


def ranked(values: list[float]) -> pl.DataFrame:
    order = sorted(range(len(values)), key=lambda i: -values[i])
    rank = {i: r + 1 for r, i in enumerate(order)}
    pos = sum(v for v in values if v > 0)
    return pl.DataFrame(
        {
            "item_id": list(ITEMS),
            "score": values,
            "rank": [rank[i] for i in range(len(values))],
            "share": [max(v, 0.0) / pos for v in values],
        }
    )


def row(**columns) -> pl.DataFrame:
    """A one-row frame."""
    return pl.DataFrame({k: [v] for k, v in columns.items()})


def query_row(q: str, target: str | None, seed: int = 1) -> pl.DataFrame:
    """The `queries` row of a query generated from a prompt: one window of 4.096 s at 16 kHz, mono."""
    return row(
        prompt=f"in the style of {target}" if target else "a tune",
        seed=seed,
        audio_uri=f"q/{q}.wav",
        target_artist=target,
        encoder_id="e",
        generated_by=None,
        source_rate=16000,
        source_channels=1,
        seconds=4.096,
        windows=1,
    )


def add_query_with_unlearning(root: Storage, q: str, target: str | None, scores: list[float]) -> None:
    """Query `q` and its unlearning scores of configuration `default` (mean ΔL, every item rescored)."""
    write_table(root, "queries", query_row(q, target), query_id=q)
    unlearning = ranked(scores).with_columns(
        method=pl.lit("unlearning"),
        relative_score="score",
        skew_score="score",
        mean_delta="score",
        score_type=pl.lit("mean_delta"),
        rescored=True,
        draws_used=1,
        **IDENTITY,
    )
    write_table(root, "attribution_scores", unlearning, **IDENTITY_VALUES, query_id=q, config_id="default")


def write_tiny_dataset(root: Storage) -> None:
    """Six items by three artists, queries `0012` (target A) and `q2` (target B), one configuration."""
    manifest = pl.DataFrame(
        {
            "item_id": list(ITEMS),
            "audio_uri": [f"audio/{i}.wav" for i in ITEMS],
            "caption": [f"a tune by {a}" for a in ITEMS.values()],
            "artist": list(ITEMS.values()),
            "duration_s": [2.0] * 6,
            "shard": ["s0", "s0", "s0", "s1", "s1", "s1"],
        }
    )
    write_table(root, "training_manifest", manifest)
    for q, target in [("0012", "A"), ("q2", "B")]:
        run = {"query_id": q, "config_id": "default"}
        add_query_with_unlearning(root, q, target, UNLEARNING[q])
        write_table(
            root,
            "similarity_scores",
            ranked(SIMILARITY[q]).with_columns(**IDENTITY),
            query_id=q,
            method="similarity:audio",
        )
        write_table(
            root,
            "unlearning_runs",
            row(
                query_loss_before=1.0,
                query_loss_after=1.5,
                delta_uri="d",
                seconds=0.1,
                lr_used=1e-3,
                target_ratio=None,
                search_ratio=None,
                probes=0,
                **IDENTITY_VALUES,
            ),
            **run,
            **IDENTITY_VALUES,
        )
        losses = pl.DataFrame({"item_id": list(ITEMS), "draw": [0] * 6, "loss": [1.0] * 6, "loss_masked": [1.0] * 6})
        write_table(root, "unlearned_losses", losses, **run, checkpoint_id="c", protocol_id="p")
    config = row(**settings_row(UnlearningSettings(lr=1e-3, optimizer="sgd", query_draws=8, damping=1e-8)))
    write_table(root, "unlearning_configs", config, config_id="default")
    for shard in ("s0", "s1"):
        losses = row(item_id="i1", draw=0, t=0.5, loss=1.0, loss_masked=1.0, features_digest="f")
        write_table(root, "baseline_losses", losses, shard=shard, checkpoint_id="c", protocol_id="p")
    write_table(
        root,
        "consistency",
        pl.DataFrame(
            CONSISTENCY, schema=["query_id", "left", "right", "metric", "k", "value"], orient="row"
        ).with_columns(**IDENTITY),
        **IDENTITY_VALUES,
    )
    # Three shared random removals raised both queries' loss by 0.01, 0.02, 0.03 (mean 0.02, sd 0.01, floor 0.04).
    # Query 0012: its top-k by 0.2, its artist's other items by 0.1 (item floor 0.12): it passes both. Query q2: its
    # top-k by 0.06 (above the floor), its artist's other items by 0.08 (item floor 0.10): artist level only.
    random = [("random", 0, 0.01), ("random", 1, 0.02), ("random", 2, 0.03)]
    counterfactual = pl.concat(
        [
            row(
                query_id=q,
                removal=removal,
                removal_seed=seed,
                k=2,
                query_loss_full=1.0,
                query_loss_removed=1.0 + rise,
                loss_rise=rise,
                relative_rise=rise,
                removed_of_target_artist=2,
                removed_items="a,b",
                config_id="default",
                train_steps=100,
                full_model="checkpoint",
                query_draws=64,
                random_rise_mean=0.02,
                random_rise_sd=0.01,
                noise_floor=0.04,
                floor_sds=2.0,
                passed=True,
                same_artist_rise=same,
                item_floor=same + 0.02,
                passed_item_level=q == "0012",
                **IDENTITY_VALUES,
            )
            for q, attributed, same in (("0012", 0.2, 0.1), ("q2", 0.06, 0.08))
            for removal, seed, rise in [("attributed", None, attributed), *random, ("same_artist", 0, same)]
        ],
        how="diagonal_relaxed",
    )
    write_table(root, "counterfactual", counterfactual, **IDENTITY_VALUES)


@pytest.fixture
def engine(tmp_path) -> QueryEngine:
    root = Storage(str(tmp_path / "root"))
    write_tiny_dataset(root)
    return QueryEngine(root, protocol_id="p", checkpoint_id="c")  # the identity the named queries report


def test_views_return_the_rows(engine):
    assert engine.table_counts() == {
        "training_items": 6,
        "baseline_losses": 2,
        "queries": 2,
        "unlearning_configs": 1,
        "unlearning_runs": 2,
        "unlearned_losses": 12,
        "attributions": 24,
        "near_copies": 0,
        "consistency": 6,
        "counterfactual": 10,
        "self_influence": 0,
        "replication": 0,
        "near_copy_summary": 0,
    }


def test_query_ids_stay_strings(engine):
    df = engine.sql("SELECT DISTINCT query_id FROM attributions WHERE query_id = '0012'")
    assert df.schema["query_id"] == pl.String and df["query_id"].to_list() == ["0012"]


def test_similarity_rows_have_their_method_and_no_config(engine):
    df = engine.sql("SELECT DISTINCT method, config_id FROM attributions ORDER BY method")
    assert df.rows() == [("similarity:audio", None), ("unlearning", "default")]


def test_fresh_root_has_every_view_with_zero_rows(tmp_path):
    engine = QueryEngine(Storage(str(tmp_path / "empty")))
    counts = engine.table_counts()
    assert set(counts) == {
        "training_items",
        "baseline_losses",
        "queries",
        "unlearning_configs",
        "unlearning_runs",
        "unlearned_losses",
        "attributions",
        "near_copies",
        "consistency",
        "counterfactual",
        "self_influence",
        "replication",
        "near_copy_summary",
    }
    assert set(counts.values()) == {0}
    schema = engine.sql("SELECT * FROM attributions").schema
    assert list(schema) == [
        "query_id",
        "config_id",
        "method",
        "item_id",
        "score",
        "rank",
        "relative_score",
        "skew_score",
        "share",
        "checkpoint_id",
        "protocol_id",
        "rescored",
        "draws_used",
    ]
    assert schema["query_id"] == pl.String and schema["rank"] == pl.Int64 and schema["score"] == pl.Float64
    assert schema["rescored"] == pl.Boolean and schema["draws_used"] == pl.Int64


def test_named_queries_run_on_a_fresh_root(tmp_path):
    engine = QueryEngine(Storage(str(tmp_path / "empty")))
    for name in engine.named_queries():
        assert engine.named(name).height == 0


def test_new_files_are_seen_by_the_next_query(engine):
    write_table(engine.root, "queries", query_row("q3", None, seed=2), query_id="q3")
    assert engine.sql("SELECT query_id FROM queries ORDER BY 1")["query_id"].to_list() == ["0012", "q2", "q3"]


def test_views_ignore_temp_files_of_killed_writes(engine):
    folder = engine.root.local_path("queries/query_id=q2")
    with open(f"{folder}/.part-0.parquet.deadbeef.tmp", "wb") as f:
        f.write(b"half a file")
    assert engine.table_counts()["queries"] == 2


def test_filter_on_query_id_prunes_partitions(engine):
    plan = engine.sql("EXPLAIN SELECT * FROM attributions WHERE query_id = '0012'")["explain_value"][0]
    assert plan.count("Scanning Files: 1/2") == 2  # one of two files, in both tables of the union


def test_top_k_gives_the_top_items_with_artist_and_target(engine):
    df = engine.named("top_k", k=1)
    assert df.select("query_id", "method", "config_id", "item_id", "artist", "target_artist").rows() == [
        ("0012", "similarity:audio", None, "i3", "B", "A"),
        ("0012", "unlearning", "default", "i1", "A", "A"),
        ("q2", "similarity:audio", None, "i4", "B", "B"),
        ("q2", "unlearning", "default", "i3", "B", "B"),
    ]
    assert df["caption"][1] == "a tune by A"


def test_top_k_default_k_is_ten(engine):
    assert engine.named("top_k").height == 24  # all six items of 2 queries × 2 methods


def test_artist_shares_top_artist_per_query_and_method(engine):
    df = engine.named("artist_shares", k=2).filter(pl.col("artist_rank") == 1)
    got = {
        (r[0], r[1]): r[2:] for r in df.select("query_id", "method", "artist", "share", "top_artist_is_target").rows()
    }
    assert got == {
        ("0012", "unlearning"): ("A", 1.0, True),
        ("0012", "similarity:audio"): ("B", 0.5, False),  # i3 (B) and i1 (A) tie on count; B has more credit
        ("q2", "unlearning"): ("B", 1.0, True),
        ("q2", "similarity:audio"): ("B", 0.5, True),
    }


def test_artist_shares_top_artist_follows_count_then_credit(engine):
    df = engine.named("artist_shares", k=2).filter(
        (pl.col("query_id") == "q2") & (pl.col("method") == "similarity:audio")
    )
    assert df.select("artist_rank", "artist", "n_items", "share").rows() == [(1, "B", 1, 0.5), (2, "C", 1, 0.5)]
    assert df["top_artist_is_target"].to_list() == [True, True]


def test_method_agreement_per_query_and_mean(engine):
    df = engine.named("method_agreement", config_id="default")
    rows = {
        r[0]: r[1:] for r in df.select("query_id", "config_id", "method", "jaccard_10", "spearman", "n_queries").rows()
    }
    assert rows["0012"] == ("default", "similarity:audio", 0.5, 0.4, 1)
    assert rows["q2"] == ("default", "similarity:audio", 0.3, 0.2, 1)
    assert rows["(mean)"][:2] == ("default", "similarity:audio") and rows["(mean)"][2:4] == pytest.approx((0.4, 0.3))
    assert rows["(mean)"][4] == 2 and df["query_id"].to_list()[-1] == "(mean)"


def test_method_agreement_other_config_is_empty(engine):
    assert engine.named("method_agreement", config_id="nope").height == 0


def test_consistency_table_one_row_per_unordered_pair(engine):
    df = engine.named("consistency_table")
    assert df.select("left", "right", "n_queries").rows() == [
        ("similarity:audio", "unlearning:default", 2),
        ("unlearning:default", "unlearning:seed1", 2),
    ]
    assert df["jaccard_10"].to_list() == pytest.approx([0.4, 0.8])
    assert df["spearman"].to_list()[0] == pytest.approx(0.3) and df["spearman"].to_list()[1] is None


def test_counterfactual_verdicts_one_row_per_query_and_both_shares(engine):
    df = engine.named("counterfactual_verdicts")
    assert df.select(
        "query_id", "random_removals", "passed", "passed_item_level", "share_passing", "share_item_level"
    ).rows() == [
        ("0012", 3, True, True, 1.0, 1.0),
        ("q2", 3, True, False, 1.0, 0.0),
        ("(all)", 3, True, False, 1.0, 0.5),
    ]  # the random removals are shared: 3, not 6; half is not a majority
    assert df["attributed_rise"].to_list()[:2] == pytest.approx([0.2, 0.06])
    assert df["same_artist_rise"].to_list()[:2] == pytest.approx([0.1, 0.08])
    assert df["item_floor"].to_list()[:2] == pytest.approx([0.12, 0.10])
    # Wilson 95% lower ends by hand: 2 of 2 → 1 / (1 + 1.96²/2) = 0.3424; 1 of 2 → 0.0945
    overall = df.filter(pl.col("query_id") == "(all)").row(0, named=True)
    assert (overall["share_passing_low"], overall["share_item_level_low"]) == pytest.approx((0.3424, 0.0945), abs=1e-4)


def test_bad_sql_raises_query_engine_error_naming_the_query(engine):
    with pytest.raises(QueryEngineError, match=r"(?s)nosuchcolumn.*SELECT nosuchcolumn FROM queries"):
        engine.sql("SELECT nosuchcolumn FROM queries")


def test_unknown_named_query_or_parameter_is_refused(engine):
    with pytest.raises(QueryEngineError, match="available"):
        engine.named("nope")
    with pytest.raises(QueryEngineError, match="takes parameters"):
        engine.named("top_k", kk=3)


def test_an_own_sql_dir_reads_tables_through_the_registry(tmp_path, engine):
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "views.sql").write_text(
        "CREATE OR REPLACE VIEW only_items AS SELECT * FROM {table:training_manifest};"
    )
    assert QueryEngine(engine.root, tmp_path / "sql").table_counts() == {"only_items": 6}


def test_a_view_of_a_table_not_in_the_registry_is_refused(tmp_path, engine):
    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "views.sql").write_text("CREATE OR REPLACE VIEW x AS SELECT * FROM {table:no_such_table};")
    with pytest.raises(QueryEngineError, match=r"no_such_table.*not a table of the layout"):
        QueryEngine(engine.root, tmp_path / "sql").table_counts()


def test_tda_sql_dir_from_the_environment_reaches_the_cli(tmp_path, monkeypatch, engine, capsys):
    from tda_assets.cli import main

    (tmp_path / "sql").mkdir()
    (tmp_path / "sql" / "views.sql").write_text(
        "CREATE OR REPLACE VIEW only_items AS SELECT * FROM {table:training_manifest};"
    )
    monkeypatch.setenv("TDA_SQL_DIR", str(tmp_path / "sql"))
    monkeypatch.setenv("TDA_STORAGE_URL", engine.root.url)
    assert main(["sql", "SELECT count(*) AS n FROM only_items"]) == 0
    assert "6" in capsys.readouterr().out


def test_consistency_table_calls_only_other_seeds_of_equal_fields_a_seed_rerun(engine):
    base = UnlearningSettings(lr=1e-3, optimizer="sgd", query_draws=8, damping=1e-8)
    write_table(engine.root, "unlearning_configs", row(**settings_row(replace(base, seed=1))), config_id="seed1")
    write_table(engine.root, "unlearning_configs", row(**settings_row(base)), config_id="copy")  # the default, renamed
    consistency = pl.DataFrame(
        [("0012", "unlearning:default", "unlearning:copy", "jaccard", 10, 1.0)],
        schema=["query_id", "left", "right", "metric", "k", "value"],
        orient="row",
    )
    write_table(
        engine.root,
        "consistency",
        pl.concat([pl.DataFrame(CONSISTENCY, schema=consistency.columns, orient="row"), consistency]).with_columns(
            **IDENTITY
        ),
        **IDENTITY_VALUES,
    )
    pairs = dict(
        engine.named("consistency_table").select(pl.concat_str("left", "right", separator=" / "), "pair").rows()
    )
    assert pairs["unlearning:default / unlearning:seed1"] == "seed rerun"
    assert pairs["unlearning:copy / unlearning:default"] == "configurations"


def test_report_seed_reruns_exclude_identical_configurations():
    from tda_assets.defs.assets.reports import is_seed_rerun

    groups = {"default": ("fields", 0), "seed1": ("fields", 1), "copy": ("fields", 0), "lr100": ("other", 1)}
    assert is_seed_rerun(groups, "default", "seed1")
    assert not is_seed_rerun(groups, "default", "copy") and not is_seed_rerun(groups, "seed1", "lr100")


def test_cross_query_overlap_known_values_in_sql_and_in_the_report(engine):
    from tda_assets.defs.assets.reports import cross_query_rows, score_vectors
    from tda_assets.io.artifacts import Identity

    # top-3 of `default`: 0012 (A) {i1, i2, i3}, q2 (B) {i3, i4, i6}; q3 (A, like 0012) {i4, i5, i6};
    # u (a user's query, no target artist) {i1, i2, i3}: left out, else it would pair with q2 and q3
    add_query_with_unlearning(engine.root, "q3", "A", [0.0, 0.0, 0.0, 0.9, 0.8, 0.7])
    add_query_with_unlearning(engine.root, "u", None, UNLEARNING["0012"])
    # pairs of different artists: 0012–q2 1/5, q2–q3 2/4 (0012–q3 share artist A): mean 0.35 over 2 pairs.
    # similarity:audio (0012 and q2 only): {i3, i1, i6} vs {i4, i5, i3} = 1/5 over 1 pair
    df = engine.named("cross_query_overlap", k=3)
    assert df.select("ranking", "k", "query_pairs", "queries").rows() == [
        ("similarity:audio", 3, 1, 2),
        ("unlearning:default", 3, 2, 3),
    ]
    assert df["cross_query_jaccard"].to_list() == pytest.approx([0.2, 0.35])
    rows = cross_query_rows(
        score_vectors(engine.root, Identity("c", "p")), {"0012": "A", "q2": "B", "q3": "A", "u": None}, k=3
    )
    assert rows == [
        {"ranking": "similarity:audio", "cross_query_jaccard_3": 0.2, "query_pairs": 1, "queries": 2},
        {"ranking": "unlearning:default", "cross_query_jaccard_3": 0.35, "query_pairs": 2, "queries": 3},
    ]
    # at the default k = 10 every one of the 6 items is in every top-10: the overlap is total
    assert engine.named("cross_query_overlap")["cross_query_jaccard"].to_list() == pytest.approx([1.0, 1.0])


def test_share_lower_is_the_95_percent_wilson_bound(engine):
    got = engine.sql(
        "SELECT share_lower(4, 4) AS a, share_lower(19, 20) AS b, share_lower(0, 5) AS c, share_lower(2, 4) AS d"
    ).row(0)
    # k = n gives n / (n + z²); the others worked by hand from the Wilson formula with z = 1.959964
    assert got == pytest.approx((4 / (4 + 1.959964**2), 0.763869, 0.0, 0.150037), abs=1e-5)


def test_replication_summary_gives_share_first_and_its_lower_bound(engine):
    ranks = {"gain_-6db": [1, 1, 1, 1], "noise_30db": [1, 3, 1, 62]}
    rows = pl.DataFrame(
        [
            {
                "source_item_id": f"i{s + 1}",
                "transform": t,
                "rank": r,
                "score": 0.0,
                "loss_ratio": 1.1,
                "target_set": "reporting",
                "snr_db": 30.0,
                "latent_change": 0.4,
            }
            for t, rs in ranks.items()
            for s, r in enumerate(rs)
        ]
    ).with_columns(**IDENTITY)
    write_table(engine.root, "replication", rows, **IDENTITY_VALUES, config_id="default")
    got = {r["transform"]: r for r in engine.named("replication_summary").iter_rows(named=True)}
    assert (got["gain_-6db"]["share_first"], got["noise_30db"]["share_first"]) == (1.0, 0.5)
    assert got["gain_-6db"]["share_first_low"] == pytest.approx(0.51011, abs=1e-5)
    assert got["noise_30db"]["share_first_low"] == pytest.approx(0.150037, abs=1e-5)
    assert (got["noise_30db"]["worst_rank"], got["noise_30db"]["mean_rank"]) == (62, 16.75)


def test_a_source_whose_unlearning_failed_is_counted_as_failed_and_not_first(engine):
    rows = pl.DataFrame(
        [
            {
                "source_item_id": f"i{s}",
                "transform": "fade",
                "rank": r,
                "score": sc,
                "loss_ratio": lr,
                "target_set": "reporting",
                **IDENTITY_VALUES,
            }
            for s, (r, sc, lr) in enumerate([(1, 0.3, 1.1), (1, 0.2, 1.1), (None, None, 1.02)])
        ],
        schema=TABLES["replication"].polars_schema(),
    )  # the table's other columns null
    write_table(engine.root, "replication", rows, **IDENTITY_VALUES, config_id="default")
    got = engine.named("replication_summary").row(0, named=True)
    assert (got["sources"], got["failed"], got["share_first"], got["mean_rank"]) == (3, 1, pytest.approx(2 / 3), 1.0)
