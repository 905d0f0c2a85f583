"""Reads whose cost must not grow with the number of queries' files: whether a table has any file (`has_match`)."""

from __future__ import annotations

import pytest

from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage


@pytest.fixture
def root(tmp_path) -> Storage:
    return Storage(str(tmp_path / "root"))


def test_has_match_finds_a_file_as_glob_does(root):
    root.write_bytes("scores/query_id=q2/config_id=c/part-0.parquet", b"x")
    assert root.has_match("scores/query_id=*/config_id=*/part-0.parquet")
    assert not root.has_match("scores/query_id=*/config_id=*/part-1.parquet")
    assert not root.has_match("other/query_id=*/part-0.parquet")


def test_has_match_ignores_hidden_names_as_glob_does(root):
    root.write_bytes("scores/query_id=q1/.part-0.parquet.tmp-1", b"half")
    root.write_bytes("scores/.query_id=q2/part-0.parquet", b"x")
    pattern = "scores/*/*"
    assert root.glob(pattern) == [] and not root.has_match(pattern)


def test_a_table_with_only_a_killed_write_reads_as_an_empty_view(root):
    root.write_bytes("attribution_scores/.part-0.parquet.tmp-1", b"half")
    assert QueryEngine(root).sql("SELECT count(*) AS n FROM attributions")["n"].item() == 0
