"""Small tables as the Dagster UI shows them in asset metadata (`MetadataValue.md`): the assets' one table helper."""

from __future__ import annotations

import polars as pl


def _cell(value: object) -> str:
    """A value as one table cell: floats to 4 significant digits, nothing for a missing value, `|` kept out."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "/")


def markdown_table(df: pl.DataFrame) -> str:
    """A small frame as a Markdown table, its numeric columns right-aligned."""
    align = ["---:" if dtype.is_numeric() else "---" for dtype in df.dtypes]
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.rows()]
    return "\n".join(lines)
