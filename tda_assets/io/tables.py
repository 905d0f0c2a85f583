"""Reading and writing the parquet tables of the layout: columns checked and cast, partition columns in the key only."""

from __future__ import annotations

import polars as pl

from .registry import TABLES, LayoutError, entry
from .storage import Storage


def _table(name: str):
    spec = entry(name)
    if not spec.is_table:
        raise LayoutError(f"{name!r} is a file of the layout, not a parquet table")
    return spec


def write_table(root: Storage, name: str, df: pl.DataFrame, /, **keys: object) -> str:
    """Write one file of a table atomically; missing columns raise, extra columns are kept. Returns its URI."""
    spec = _table(name)
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise LayoutError(f"table {name!r}: the frame lacks column(s) {missing} (has {df.columns})")
    key_ = spec.key(**keys)
    for p in (p for p in spec.partitions if p in df.columns):  # a frame's own identity column must agree with its key
        values = set(df[p].drop_nulls().cast(pl.String).unique().to_list())
        if values - {str(keys[p])}:
            raise LayoutError(
                f"table {name!r}: the frame's {p} {sorted(values)} is not its key's {keys[p]!r}: "
                f"write each identity's rows under their own key"
            )
    schema = spec.polars_schema()
    extra = [c for c in df.columns if c not in schema and c not in spec.partitions]
    out = df.select([pl.col(c).cast(t) for c, t in schema.items()] + [pl.col(c) for c in extra])
    return root.write_parquet(key_, out)


def table_exists(root: Storage, name: str, /, **keys: object) -> bool:
    """Whether the file of these keys exists."""
    return root.exists(_table(name).key(**keys))


def read_table(root: Storage, name: str, /, **keys: object) -> pl.DataFrame:
    """One file of a table (StorageError naming it when missing)."""
    return root.read_parquet(_table(name).key(**keys))


def read_tables(root: Storage, name: str, /, **fixed: object) -> pl.DataFrame:
    """Every file of a table matching the fixed keys, with their partition columns; a typed empty frame when none."""
    spec = _table(name)
    frames = []
    for key in root.glob(spec.glob(**fixed)):
        values = spec.parse(key)
        df = root.read_parquet(key)
        frames.append(df.with_columns(pl.lit(values[p], dtype=pl.String).alias(p) for p in spec.partitions))
    if not frames:
        return pl.DataFrame(schema=spec.polars_schema(with_partitions=True))
    return pl.concat(frames, how="diagonal_relaxed")


def write_replacing(root: Storage, name: str, df: pl.DataFrame, column: str, /, **keys: object) -> str:
    """Write `df` as the file of these keys, keeping the rows already there whose `column` holds another value than
    `df`'s (a run replaces its own rows only: a development run beside the reporting one). Rows where the old file has
    no such column or a null in it are dropped (their set is unknown)."""
    if table_exists(root, name, **keys):
        old = read_table(root, name, **keys)
        if column in old.columns:
            kept = old.filter(pl.col(column).is_not_null() & ~pl.col(column).is_in(df[column].unique().to_list()))
            df = pl.concat([kept.select(c for c in df.columns if c in kept.columns), df], how="diagonal_relaxed")
    return write_table(root, name, df, **keys)


def clip_generated_by(root: Storage, query_id: str) -> str | None:
    """The checkpoint that generated the query's clip (`queries.generated_by`; None: a user's clip, or no row yet)."""
    return (
        read_table(root, "queries", query_id=query_id)["generated_by"][0]
        if table_exists(root, "queries", query_id=query_id)
        else None
    )


def list_keys(root: Storage, name: str, /, **fixed: object) -> list[dict[str, str]]:
    """The field values of every existing file of an entry (table or file) matching the fixed keys."""
    spec = entry(name)
    return [spec.parse(k) for k in root.glob(spec.glob(**fixed))]


__all__ = [
    "TABLES",
    "clip_generated_by",
    "list_keys",
    "read_table",
    "read_tables",
    "table_exists",
    "write_replacing",
    "write_table",
]
