"""What the file-only commands read (`tda queries`, `tda export`): every query with its state, and attribution rows.

Imports neither torch, diffusers nor the Dagster definitions: these commands answer in about a second.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import polars as pl

from tda_assets.attribution.near_copy_segments import CLIP
from tda_assets.data.inbox import inbox_files, judge_files
from tda_assets.data.query_state import (
    DEFAULT_CONFIG,
    MIN_QUERY_LOSS_RATIO,
    ConfigState,
    QueryState,
    config_states,
    has_clip,
)
from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.registry import key
from tda_assets.io.tables import read_tables
from tda_assets.io.storage import Storage

EXPORT_FORMATS = ("csv", "parquet", "json")
FINAL = (QueryState.ATTRIBUTED, QueryState.FAILED_CHECK, QueryState.INVALID)  # states no run in progress can change


def current_checkpoint_id(root: Storage) -> str | None:
    """The checkpoint the root's results must come from (None before `tda prepare`)."""
    k = key("checkpoint_record")
    return json.loads(root.read_bytes(k))["checkpoint_id"] if root.exists(k) else None


def _before_unlearning(root: Storage, query_id: str) -> QueryState:
    """A query with no recorded unlearning: `clip_ready` when its clip is in the root, else `waiting`."""
    return QueryState.CLIP_READY if has_clip(root, query_id) else QueryState.WAITING


def query_table(
    root: Storage, protocol_id: str, running: Callable[[], set[tuple[str, str]]] = frozenset, roots: Sequence[str] = ()
) -> pl.DataFrame:
    """One row per (query, configuration): `waiting` (no clip yet), `clip_ready`, `running`, `attributed`,
    `failed_check` (with the loss ratio), `stale` (results of another checkpoint or protocol), or `invalid` (its file,
    judged as the inbox sensor judges it under `roots`: `judge_query`; the reason in `prompt`).

    `running()` gives the (query, config) pairs with a run in progress; it is asked only when a pair is unfinished.
    """
    by_query: dict[str, dict[str, ConfigState]] = {}
    for (q, c), state in config_states(root, current_checkpoint_id(root), protocol_id, MIN_QUERY_LOSS_RATIO).items():
        by_query.setdefault(q, {})[c] = state
    valid, invalid = judge_files(root, inbox_files(root), roots)
    rows = []
    for qid in sorted({*valid, *invalid}):
        if qid in invalid:
            rows.append((qid, DEFAULT_CONFIG, QueryState.INVALID, None, invalid[qid]))
            continue
        prompt, mine = valid[qid].prompt, by_query.get(qid, {})
        for cid in sorted({DEFAULT_CONFIG, *mine}):
            state = mine[cid].state if cid in mine else _before_unlearning(root, qid)
            rows.append((qid, cid, state, mine[cid].loss_ratio if cid in mine else None, prompt[:60]))
    if any(r[2] not in FINAL for r in rows):
        now = running()
        rows = [
            (q, c, QueryState.RUNNING if st not in FINAL and (q, c) in now else st, *rest) for q, c, st, *rest in rows
        ]
    table = pl.DataFrame(
        [(q, c, st.value, *rest) for q, c, st, *rest in rows],
        schema={
            "query_id": pl.String,
            "config_id": pl.String,
            "state": pl.String,
            "loss_ratio": pl.Float64,
            "prompt": pl.String,
        },
        orient="row",
    )
    return table.join(near_copy_column(root, protocol_id), on="query_id", how="left")


def near_copy_column(root: Storage, protocol_id: str) -> pl.DataFrame:
    """`query_id, near_copy` of every query with a whole-clip verdict of the current identity (table near_copies):
    `yes: <item>` for a near copy, `no` otherwise."""
    checkpoint_id = current_checkpoint_id(root)
    if checkpoint_id is None:
        return pl.DataFrame(schema={"query_id": pl.String, "near_copy": pl.String})
    rows = read_tables(root, "near_copies", checkpoint_id=checkpoint_id, protocol_id=protocol_id)
    return rows.filter(pl.col("segment") == CLIP).select(
        "query_id",
        pl.when(pl.col("near_copy"))
        .then(pl.lit("yes: ") + pl.col("copy_of"))
        .otherwise(pl.lit("no"))
        .alias("near_copy"),
    )


def export_attributions(
    engine: QueryEngine,
    out: str | Path,
    fmt: str,
    query_id: str | None = None,
    config_id: str | None = None,
    method: str | None = "unlearning",
) -> int:
    """Write the attribution rows (with artist and caption) to `out` atomically; returns the row count.

    Raises ValueError naming the filter when no row matches, so an export never silently writes nothing.
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format {fmt!r}: use one of {', '.join(EXPORT_FORMATS)}")
    where, params = ["TRUE"], {}
    for column, value in (("query_id", query_id), ("config_id", config_id), ("method", method)):
        if value:
            where.append(f"a.{column} = ${column}")
            params[column] = value
    df = engine.sql(
        "SELECT a.query_id, a.config_id, a.method, a.rank, a.item_id, t.artist, t.caption, a.score, "
        "n.near_copy, n.copy_of, n.copy_score, n.margin AS near_copy_margin, n.signal AS near_copy_signal, "
        "a.checkpoint_id, a.protocol_id FROM attributions AS a LEFT JOIN training_items AS t USING (item_id) "
        f"LEFT JOIN near_copies AS n ON n.query_id = a.query_id AND n.segment = '{CLIP}' "
        "AND n.checkpoint_id = a.checkpoint_id AND n.protocol_id = a.protocol_id "
        f"WHERE {' AND '.join(where)} ORDER BY a.query_id, a.config_id, a.method, a.rank",
        params,
    )
    if df.is_empty():
        raise ValueError(f"no attribution rows for {params or 'any query'}: see `tda queries` for what is attributed")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        {"csv": df.write_csv, "parquet": df.write_parquet, "json": df.write_json}[fmt](tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return df.height
