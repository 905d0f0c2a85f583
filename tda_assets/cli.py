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


def _runner(verbose: bool = True):
    """A Runner on the instance of DAGSTER_HOME; Dagster's INFO logs only when `verbose`."""
    from .runner import Runner

    runner = Runner.create(_instance())
    if not verbose:
        runner.log_level = "WARNING"
    return runner


def _start(command: str):
    """A Runner on the instance of DAGSTER_HOME, its storage, and the start time; prints where they are."""
    runner = _runner()
    store = runner.resources["storage"].storage()
    print(f"tda {command}: storage {store.url}, Dagster instance {os.environ['DAGSTER_HOME']}")
    return runner, store, time.perf_counter()


def _print_timings(runner, start: float) -> None:
    total = time.perf_counter() - start
    print("\nWall time by phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in runner.timings.items()) + f"; total {total:.0f}s")


def cmd_demo(args: argparse.Namespace) -> int:
    from resources.query_engine import QueryEngine

    runner, store, start = _start("demo")
    runner.training_side()
    builtin_queries(store)
    requested = runner.sensor_tick()
    print(f"==> query_inbox_sensor requested {len(requested)} runs")
    for i, qid in enumerate(requested, 1):
        runner.phase(f"query {i}/{len(requested)} {qid}", lambda q=qid: runner.attribute(q))
    runner.phase("consistency_report", lambda: runner.run(["consistency_report"]))
    print("\nTop-5 attributed training items per query (sql/top_k.sql, k = 5, method = unlearning):")
    engine = QueryEngine(store)
    top = engine.named("top_k", k=5).filter(pl.col("method") == "unlearning")
    _print(top.select([c for c in ("query_id", "target_artist", "rank", "item_id", "artist", "score", "caption") if c in top.columns]))
    print("\nShare of the top-10 by the target artist (sql/artist_shares.sql):")
    _print(engine.named("artist_shares", k=10))
    _print_timings(runner, start)
    return 0


def _print_grid(results) -> None:
    from .grid import summary

    print("\nGrid runs per configuration (status of each (query, configuration); seconds_per_run over the runs made now):")
    _print(summary(results))
    failed = [r for r in results if r.status in ("check_failed", "skipped_failed", "error")]
    for r in failed:
        ratio = f"×{r.loss_ratio:.3f}" if r.loss_ratio is not None else "—"
        print(f"  {r.status}: {r.query_id} / {r.config_id} (query loss {ratio}) {r.message}")


def cmd_grid(args: argparse.Namespace) -> int:
    from .configs import load_grid
    from .grid import select_queries

    start = time.perf_counter()
    configs = load_grid(args.grid_file)
    runner = _runner(args.verbose)
    query_ids = select_queries(runner, args.queries)
    if not query_ids:
        raise ValueError("no queries partitions yet: add queries (`tda add-query`) and run them (`tda demo` or the sensor)")
    print(f"tda grid: {len(configs)} configurations × {len(query_ids)} queries ({', '.join(query_ids)})")
    results = runner.grid(configs, query_ids, force=args.force, report=not args.no_report)
    _print_grid(results)
    print(f"\ntotal {time.perf_counter() - start:.0f}s; the table: tda query consistency_table")
    return 1 if any(r.status == "error" for r in results) else 0


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from resources.query_engine import QueryEngine

    runner = _runner(args.verbose)
    ids = [q.strip() for q in args.queries.split(",")] if args.queries else None
    runner.phase("counterfactual", lambda: runner.counterfactual(query_ids=ids, n_queries=args.n_queries, k=args.k,
                                                                 train_steps=args.train_steps, config_id=args.config_id))
    _print_counterfactual(QueryEngine(runner.resources["storage"].storage()))
    return 0


def _print_counterfactual(engine) -> None:
    df = engine.sql("select query_id, removal, k, query_loss_full, query_loss_removed, loss_rise from counterfactual "
                    "order by query_id, removal")
    print("\nCounterfactual check (retrained without the top-k attributed items vs k random items; table `counterfactual`):")
    _print(df)
    means = df.group_by("removal").agg(pl.col("loss_rise").mean()).sort("removal")
    verdict = dict(means.rows())
    print("mean loss rise: " + ", ".join(f"{k} {v:+.4f}" for k, v in verdict.items())
          + (" → attributed removal raises the query loss more: PASSED" if verdict.get("attributed", 0) > verdict.get("random", 0)
             else " → attributed removal does NOT raise the query loss more: FAILED"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dagster import AssetKey

    from resources.query_engine import QueryEngine

    from .configs import load_grid
    from .grid import ensure_query
    from . import tables

    runner, store, start = _start("evaluate")
    runner.training_side_if_needed()
    runner.log_level = "WARNING"
    ids = builtin_queries(store)
    requested = runner.sensor_tick()
    print(f"==> query_inbox_sensor requested {len(requested)} runs")
    todo = [q for q in ids if not store.exists(tables.per_query_config("attribution_scores", q, "default"))]

    def queries_phase() -> None:
        for q in ids:
            if q in todo:
                runner.attribute(q)
            else:
                ensure_query(runner, store, q)

    runner.phase(f"built-in queries ({len(todo)} of {len(ids)} to run)", queries_phase)
    configs = load_grid(args.grid_file)
    grid_ids = sorted(ids)[: args.grid_queries] if args.grid_queries else sorted(ids)
    print(f"==> grid: {len(configs)} configurations × {len(grid_ids)} queries ({', '.join(grid_ids)})")
    results = []
    runner.phase("grid", lambda: results.extend(runner.grid(configs, grid_ids, force=args.force)))
    if not args.skip_counterfactual:
        runner.phase("counterfactual", lambda: runner.counterfactual(
            n_queries=args.cf_queries, k=args.cf_k, train_steps=args.cf_train_steps))
    engine = QueryEngine(store)
    _print_grid(results)
    print("\nConsistency between configurations and seed reruns (sql/consistency_table.sql, mean over queries;"
          " unlearning-vs-similarity pairs are in the next table):")
    table = engine.named("consistency_table")
    _print(table.filter(pl.col("pair") != "unlearning vs similarity"))
    report = runner.instance.get_latest_materialization_event(AssetKey("consistency_report")).asset_materialization.metadata
    per_config = report["config_consistency"].value if "config_consistency" in report else []  # as the report computed it
    if per_config:
        print("\nMean Jaccard@10 per configuration (with its seed reruns, with the other configurations):")
        _print(pl.DataFrame(per_config))
        print(f"most consistent configuration: {per_config[0]['config_id']}")
    print("\nAgreement of unlearning with each similarity method (sql/method_agreement.sql, mean over queries):")
    _print(engine.named("method_agreement").filter(pl.col("query_id") == "(mean)"))
    if not args.skip_counterfactual:
        _print_counterfactual(engine)
    plots = store.glob("plots/*/*.png") + store.glob("plots/*/*/*.png")
    print(f"\n{len(plots)} plots under {store.uri('plots')} (top-k bars per query and configuration, "
          "the consistency heatmap, the counterfactual bars)")
    _print_timings(runner, start)
    return 1 if any(r.status == "error" for r in results) else 0


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
    p = sub.add_parser("grid", help="run every configuration of the grid file for the queries, then the consistency report")
    p.add_argument("--queries", default="all", help="comma-separated query ids, or 'all' (every queries partition)")
    p.add_argument("--grid-file", help="grid YAML (default: TDA_GRID_FILE or tda_assets/unlearning_grid.yaml)")
    p.add_argument("--force", action="store_true", help="re-run (query, configuration) pairs already recorded")
    p.add_argument("--no-report", action="store_true", help="do not materialize consistency_report afterwards")
    p.add_argument("-v", "--verbose", action="store_true", help="Dagster INFO logs of every run")
    p.set_defaults(fn=cmd_grid)
    p = sub.add_parser("counterfactual", help="retrain without the top-k attributed / k random items (embedded default)")
    p.add_argument("--queries", help="comma-separated query ids (default: the first --n-queries with a target artist)")
    p.add_argument("--n-queries", type=int, default=3)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--train-steps", type=int, help="retraining steps (default: the checkpoint's TDA_TRAIN_STEPS)")
    p.add_argument("--config-id", default="default")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_counterfactual)
    p = sub.add_parser("evaluate", help="the paper's experiments on the embedded default: grid, consistency, similarity, counterfactual")
    p.add_argument("--grid-queries", type=int, default=int(os.environ.get("TDA_GRID_QUERIES", "4")),
                   help="run the grid on the first N built-in queries (0 = all; default 4 to fit 30 min on 2 cores)")
    p.add_argument("--grid-file")
    p.add_argument("--force", action="store_true")
    p.add_argument("--cf-queries", type=int, default=int(os.environ.get("TDA_CF_QUERIES", "2")),
                   help="queries of the counterfactual check (two retrains each; default 2 to fit 30 min on 2 cores)")
    p.add_argument("--cf-k", type=int, default=10)
    p.add_argument("--cf-train-steps", type=int, default=int(os.environ.get("TDA_CF_TRAIN_STEPS", "0")) or None,
                   help="retraining steps of the counterfactual check (default: the checkpoint's)")
    p.add_argument("--skip-counterfactual", action="store_true")
    p.set_defaults(fn=cmd_evaluate)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tda {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
