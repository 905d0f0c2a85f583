"""Printing tables as the CLI shows them (plain polars; cheap to import)."""

from __future__ import annotations

import polars as pl


def print_frame(df: pl.DataFrame) -> None:
    """A frame in full: every row and column, long strings kept readable."""
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=70, tbl_width_chars=220, tbl_hide_dataframe_shape=True):
        print(df)
