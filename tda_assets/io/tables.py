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


def write_table(store: Storage, name: str, df: pl.DataFrame, /, **keys: object) -> str:
    """Write one file of a table atomically; missing columns raise, extra columns are kept. Returns its URI."""
    spec = _table(name)
    missing = [c for c in spec.columns if c not in df.columns]
    if missing:
        raise LayoutError(f"table {name!r}: the frame lacks column(s) {missing} (has {df.columns})")
    schema = spec.polars_schema()
    extra = [c for c in df.columns if c not in schema and c not in spec.partitions]
    out = df.select([pl.col(c).cast(t) for c, t in schema.items()] + [pl.col(c) for c in extra])
    return store.write_parquet(spec.key(**keys), out)


def table_exists(store: Storage, name: str, /, **keys: object) -> bool:
    """Whether the file of these keys exists."""
    return store.exists(_table(name).key(**keys))


def read_table(store: Storage, name: str, /, **keys: object) -> pl.DataFrame:
    """One file of a table (StorageError naming it when missing)."""
    return store.read_parquet(_table(name).key(**keys))


def read_tables(store: Storage, name: str, /, **fixed: object) -> pl.DataFrame:
    """Every file of a table matching the fixed keys, with their partition columns; a typed empty frame when none."""
    spec = _table(name)
    frames = []
    for key in store.glob(spec.glob(**fixed)):
        values = spec.parse(key)
        df = store.read_parquet(key)
        frames.append(df.with_columns(pl.lit(values[p], dtype=pl.String).alias(p) for p in spec.partitions))
    if not frames:
        return pl.DataFrame(schema=spec.polars_schema(with_partitions=True))
    return pl.concat(frames, how="diagonal_relaxed")


def list_keys(store: Storage, name: str, /, **fixed: object) -> list[dict[str, str]]:
    """The field values of every existing file of an entry (table or file) matching the fixed keys."""
    spec = entry(name)
    return [spec.parse(k) for k in store.glob(spec.glob(**fixed))]


__all__ = ["TABLES", "list_keys", "read_table", "read_tables", "table_exists", "write_table"]
