"""Result files written before the identity moved into their keys (registry `Entry.legacy`): found, refused, moved.

A root with such files is refused by the readers that decide what is current (the query engine, the pending queries)
with an error naming `tda prepare`; `tda prepare` moves each file under the identity its rows carry.
"""

from __future__ import annotations

import polars as pl

from .registry import IDENTITY, TABLES, LayoutError
from .storage import Storage


def legacy_keys(root: Storage) -> dict[str, list[str]]:
    """Table → its files under the key pattern from before identity keys (only tables that have some)."""
    out = {}
    for name, spec in TABLES.items():
        if spec.legacy:
            keys = root.glob(spec.legacy.format(**{f: "*" for f in spec.fields}))
            if keys:
                out[name] = keys
    return out


def require_current_layout(root: Storage) -> None:
    """LayoutError naming the tables and the fix when the root holds result files in the layout before identity keys."""
    old = legacy_keys(root)
    if old:
        counts = ", ".join(f"{name} ({len(keys)} file{'s' * (len(keys) > 1)})" for name, keys in sorted(old.items()))
        raise LayoutError(
            f"{root.url} holds results written before their keys carried checkpoint and protocol: "
            f"{counts}; run `tda prepare` once, which moves each under the identity its rows record"
        )


def migrate_legacy_results(root: Storage) -> dict[str, int]:
    """Move every legacy result file under the key of the identity its rows record (split when they differ);
    returns table → files moved. Columns added since read as typed NULL; a file whose rows lack an identity raises
    LayoutError naming it (delete it by hand)."""
    from .tables import write_table

    moved: dict[str, int] = {}
    for name, keys in legacy_keys(root).items():
        spec = TABLES[name]
        parse = type(spec)(name, spec.legacy).parse
        for k in keys:
            df = root.read_parquet(k)
            df = df.with_columns(
                pl.lit(None, dtype=t).alias(c) for c, t in spec.polars_schema().items() if c not in df.columns
            )  # columns added since: typed NULL
            if (
                any(c not in df.columns for c in IDENTITY)
                or df.select(pl.any_horizontal(pl.col(c).is_null() for c in IDENTITY).any()).item()
            ):
                raise LayoutError(
                    f"{root.uri(k)} has rows without checkpoint_id/protocol_id, so its identity is "
                    f"unknown: delete it and rerun what made it"
                )
            fields = parse(k)
            for (checkpoint_id, protocol_id), part in df.group_by(*IDENTITY, maintain_order=True):
                write_table(root, name, part, checkpoint_id=checkpoint_id, protocol_id=protocol_id, **fields)
            root.delete(k)
            moved[name] = moved.get(name, 0) + 1
    return moved
