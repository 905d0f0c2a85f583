"""Development and reporting targets in storage: a run replaces its own set only, and the summaries read the reporting
set (real parquet + DuckDB, no model)."""

from __future__ import annotations

import polars as pl
import pytest

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, write_replacing

IDENTITY = {"checkpoint_id": "c", "protocol_id": "p"}


def self_influence_rows(target_set: str, ranks: list[int], ratios: list[float]) -> pl.DataFrame:
    n = len(ranks)
    return pl.DataFrame(
        {
            "config_id": ["default"] * n,
            "target_item_id": [f"{target_set[:3]}-{i}" for i in range(n)],
            "rank": ranks,
            "score": [1.0] * n,
            "loss_ratio": ratios,
            "lr_used": [1.0] * n,
            "score_type": ["normalized"] * n,
            "top_k_similarity": [0.5] * n,
            "bottom_k_similarity": [0.1] * n,
            "others_median_relative_change": [0.0] * n,
            "target_set": [target_set] * n,
            **{k: [v] * n for k, v in IDENTITY.items()},
        }
    )


def replication_rows(target_set: str, ranks: list[int], snr: float) -> pl.DataFrame:
    n = len(ranks)
    return pl.DataFrame(
        {
            "config_id": ["default"] * n,
            "source_item_id": [f"{target_set[:3]}-{i}" for i in range(n)],
            "transform": ["fade_-6db"] * n,
            "rank": ranks,
            "score": [1.0] * n,
            "loss_ratio": [1.1] * n,
            "target_set": [target_set] * n,
            "snr_db": [snr] * n,
            "latent_change": [0.1] * n,
            **{k: [v] * n for k, v in IDENTITY.items()},
        }
    )


@pytest.fixture
def root(tmp_path) -> Storage:
    root = Storage(str(tmp_path / "root"))
    keys = {**IDENTITY, "config_id": "default"}
    # 16 development targets all first (what tuned the default), 8 reporting targets of which 6 first
    write_replacing(
        root,
        "self_influence",
        self_influence_rows("reporting", [1] * 6 + [2, 5], [1.1] * 7 + [1.32]),
        "target_set",
        **keys,
    )
    write_replacing(
        root, "self_influence", self_influence_rows("development", [1] * 16, [1.1] * 16), "target_set", **keys
    )
    write_replacing(root, "replication", replication_rows("reporting", [1, 1, 3, 1], 10.1), "target_set", **keys)
    write_replacing(root, "replication", replication_rows("development", [1] * 16, 9.0), "target_set", **keys)
    return root


def test_a_development_run_is_kept_beside_the_reporting_run(root):
    rows = read_table(root, "self_influence", **IDENTITY, config_id="default")
    assert rows.group_by("target_set").len().sort("target_set").rows() == [("development", 16), ("reporting", 8)]
    # a second reporting run replaces the reporting rows only
    write_replacing(
        root,
        "self_influence",
        self_influence_rows("reporting", [1, 1], [1.1, 1.1]),
        "target_set",
        **IDENTITY,
        config_id="default",
    )
    rows = read_table(root, "self_influence", **IDENTITY, config_id="default")
    assert rows.group_by("target_set").len().sort("target_set").rows() == [("development", 16), ("reporting", 2)]


def test_the_self_influence_summary_reports_the_reporting_targets_only(root):
    summary = QueryEngine(root, **IDENTITY).named("self_influence_summary").row(0, named=True)
    # 6 of 8 first, R = (6 + 2 + 5) / 8; the Wilson lower end of 6/8 by hand: 0.4093; spread 1.32 / 1.1
    assert (summary["targets"], summary["share_first"], summary["r_mean_rank"]) == (8, 0.75, pytest.approx(13 / 8))
    assert summary["share_first_low"] == pytest.approx(0.4093, abs=1e-4)
    assert summary["loss_ratio_spread"] == pytest.approx(1.2)


def test_the_replication_summary_reports_reporting_sources_with_their_snr(root):
    summary = QueryEngine(root, **IDENTITY).named("replication_summary").row(0, named=True)
    assert (summary["sources"], summary["share_first"], summary["snr_db"]) == (4, 0.75, pytest.approx(10.1))
    assert summary["share_first_low"] == pytest.approx(0.3006, abs=1e-4)  # Wilson, 3 of 4
