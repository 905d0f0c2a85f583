"""The assets' one Markdown table helper, as the UI shows its tables."""

from __future__ import annotations

import polars as pl

from tda_assets.defs.markdown import markdown_table


def test_a_table_right_aligns_numbers_rounds_floats_and_keeps_each_cell_one_cell():
    df = pl.DataFrame({"rank": [1, 2], "item": ["a|b", None], "score": [0.123456, 12345.6]})
    assert markdown_table(df).splitlines() == [
        "| rank | item | score |",
        "|---:|---|---:|",
        "| 1 | a/b | 0.1235 |",
        "| 2 |  | 1.235e+04 |",
    ]
