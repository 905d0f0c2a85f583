"""`tda`: the command line of the data product (SQL over the tables, the query inbox, the demo and the grid)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import polars as pl


def _storage():
    from resources import default_storage_url
    from resources.storage import Storage

    return Storage(default_storage_url(), endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None)


def _print(df: pl.DataFrame) -> None:
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=70, tbl_width_chars=220, tbl_hide_dataframe_shape=True):
        print(df)


def cmd_sql(args: argparse.Namespace) -> int:
    from resources.query_engine import QueryEngine

    _print(QueryEngine(_storage()).sql(args.query))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from resources.query_engine import QueryEngine

    params = {}
    for p in args.param:
        name, _, value = p.partition("=")
        params[name] = int(value) if value.lstrip("-").isdigit() else value
    _print(QueryEngine(_storage()).named(args.name, **params))
    return 0


def cmd_add_query(args: argparse.Namespace) -> int:
    from .inbox import add_query

    spec = add_query(_storage(), args.prompt, args.id, args.seed, args.audio, args.target_artist)
    print(f"added query {spec.query_id!r} to the inbox; the query_inbox_sensor picks it up on its next tick")
    return 0


def _instance():
    from dagster import DagsterInstance

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(Path.cwd() / "dagster_home"))).resolve()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    return DagsterInstance.get()


def builtin_queries(storage, artists: int | None = None) -> list[str]:
    """One query per artist of the embedded corpus, written from that artist's style; returns their ids."""
    from .attribution.embedded.corpus import ARTISTS, style_prompt
    from .inbox import add_query

    ids = []
    for i, style in enumerate(ARTISTS[:artists] if artists else ARTISTS):
        ids.append(add_query(storage, style_prompt(style), f"demo-{style.name.replace('_', '-')}", seed=100 + i,
                             target_artist=style.name).query_id)
    return ids


def cmd_demo(args: argparse.Namespace) -> int:
    from resources.query_engine import QueryEngine

    from .runner import Runner

    start = time.perf_counter()
    runner = Runner.create(_instance())
    store = runner.resources["storage"].storage()
    print(f"tda demo: storage {store.url}, Dagster instance {os.environ['DAGSTER_HOME']}")
    runner.training_side()
    builtin_queries(store)
    requested = runner.sensor_tick()
    print(f"==> query_inbox_sensor requested {len(requested)} runs")
    for i, qid in enumerate(requested, 1):
        runner.phase(f"query {i}/{len(requested)} {qid}", lambda q=qid: runner.attribute(q))
    runner.phase("consistency_report", lambda: runner.run(["consistency_report"]))
    print(f"\nTop-5 attributed training items per query (sql/top_k.sql, k = 5, method = unlearning):")
    engine = QueryEngine(store)
    top = engine.named("top_k", k=5).filter(pl.col("method") == "unlearning")
    _print(top.select([c for c in ("query_id", "target_artist", "rank", "item_id", "artist", "score", "caption") if c in top.columns]))
    print("\nShare of the top-10 by the target artist (sql/artist_shares.sql):")
    _print(engine.named("artist_shares", k=10))
    total = time.perf_counter() - start
    print("\nWall time by phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in runner.timings.items()) + f"; total {total:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tda", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sql", help="run SQL against the views of sql/views.sql and print the result")
    p.add_argument("query")
    p.set_defaults(fn=cmd_sql)
    p = sub.add_parser("query", help="run a named query of sql/ (e.g. top_k -p k=5)")
    p.add_argument("name")
    p.add_argument("-p", "--param", action="append", default=[], help="name=value")
    p.set_defaults(fn=cmd_query)
    p = sub.add_parser("add-query", help="drop a query (a prompt, optionally a clip) into the inbox")
    p.add_argument("prompt")
    p.add_argument("--id", help="query id (a safe slug); default: made from the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--audio", help="URI of a clip to attribute instead of generating one")
    p.add_argument("--target-artist")
    p.set_defaults(fn=cmd_add_query)
    p = sub.add_parser("demo", help="materialize the whole graph on the embedded default and print the attributions")
    p.set_defaults(fn=cmd_demo)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tda {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
