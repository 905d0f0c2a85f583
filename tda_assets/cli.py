"""`tda`: the command line of the data product. It parses arguments and calls; nothing more.

Commands that only touch files (`sql`, `query`, `add-query`, `queries`, `export`) import neither torch, diffusers nor
the Dagster definitions; the ones that materialize go through `tda_assets.experiments.workflows`.
"""

from __future__ import annotations

import argparse
import os
import sys


def _root():
    from resources.env import Env
    from tda_assets.io.storage import Storage

    env = Env.read()
    return Storage(env.storage_url, endpoint_url=env.aws_endpoint_url)


def _engine():
    from resources.env import Env
    from tda_assets.io.query_engine import QueryEngine

    env = Env.read()
    return QueryEngine(_root(), env.sql_dir, protocol_id=env.protocol_id)  # named queries report this identity


def _print(df) -> None:
    from tda_assets.experiments.display import print_frame

    print_frame(df)


def cmd_sql(args: argparse.Namespace) -> int:
    _print(_engine().sql(args.query))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    params = {}
    for p in args.param:
        name, _, value = p.partition("=")
        params[name] = int(value) if value.lstrip("-").isdigit() else value
    _print(_engine().named(args.name, **params))
    return 0


def _audio_roots(root) -> list[str]:
    """Where a query's clip may come from, as the inbox sensor allows it (`allowed_audio_roots`)."""
    from resources.env import Env
    from tda_assets.data.inbox import allowed_audio_roots, audio_roots

    env = Env.read()
    return allowed_audio_roots(root, audio_roots(env.manifest, env.allowed_audio_roots))


def cmd_add_query(args: argparse.Namespace) -> int:
    from tda_assets.data.inbox import add_clip_query, add_query

    root = _root()
    if args.audio:
        spec = add_clip_query(root, args.audio, args.prompt, args.id, _audio_roots(root), args.seed, args.target_artist)
    else:
        spec = add_query(root, args.prompt, args.id, args.seed, None, args.target_artist)
    clip = f" with its clip {spec.audio_uri}" if spec.audio_uri else ""
    print(f"added query {spec.query_id!r} to the inbox{clip}; the query_inbox_sensor picks it up on its next tick")
    return 0


def _running(root) -> set[tuple[str, str]]:
    """(query, config) pairs with a run in progress on the instance of DAGSTER_HOME for this storage root."""
    from dagster import DagsterInstance

    from resources.env import use_dagster_home
    from tda_assets.data.query_batches import QUERIES_TAG, queries_of_tag
    from tda_assets.data.query_state import partition_tag
    from tda_assets.defs.query_runs import IN_PROGRESS, runs_of_root

    use_dagster_home()
    out = set()
    for tags in runs_of_root(DagsterInstance.get(), IN_PROGRESS, root.url):
        if QUERIES_TAG in tags:  # a batch run: each of its queries, default configuration
            out.update((q, "default") for q in queries_of_tag(tags[QUERIES_TAG]))
        elif partition_tag("query") in tags:
            out.add((tags[partition_tag("query")], tags[partition_tag("config")]))
        elif partition_tag() in tags:
            out.add((tags[partition_tag()], "default"))
    return out


def cmd_queries(args: argparse.Namespace) -> int:
    from resources.env import Env
    from tda_assets.experiments.query_listing import query_table

    root = _root()
    df = query_table(root, Env.read().protocol_id, lambda: _running(root), _audio_roots(root))
    if df.is_empty():
        print(f"no queries in the inbox of {root.url}: add one with `tda attribute` or `tda add-query`")
        return 0
    _print(df)
    counts = df.group_by("state").len().sort("state").rows()
    print(", ".join(f"{n} {state}" for state, n in counts))
    for qid, reason in df.filter(df["state"] == "invalid").select("query_id", "prompt").rows():
        print(f"  invalid: {qid}: {reason}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tda_assets.experiments.query_listing import export_attributions

    method = None if args.method == "all" else args.method
    n = export_attributions(_engine(), args.out, args.format, args.query, args.config, method)
    print(f"wrote {n} rows to {args.out}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    from tda_assets.experiments import workflows

    return workflows.attribute(args.audio, args.prompt, args.id, args.config, args.k, args.per_window)


def cmd_run_inbox(args: argparse.Namespace) -> int:
    from tda_assets.experiments import workflows

    return workflows.run_inbox()


def cmd_prepare(args: argparse.Namespace) -> int:
    from tda_assets.experiments import workflows

    return workflows.prepare(args.manifest)


def cmd_demo(args: argparse.Namespace) -> int:
    from tda_assets.experiments import workflows

    return workflows.demo()


def cmd_grid(args: argparse.Namespace) -> int:
    from tda_assets.experiments import workflows

    return workflows.grid(args.queries, args.grid_file, args.force, not args.no_report, args.verbose)


def cmd_counterfactual(args: argparse.Namespace) -> int:
    from tda_assets.experiments import workflows

    return workflows.counterfactual(
        args.queries, args.n_queries, args.k, args.train_steps, args.config_id, args.verbose, args.random_removals
    )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from tda_assets.experiments import workflows
    from tda_assets.experiments.options import EvaluateOptions

    return workflows.evaluate(EvaluateOptions(**{f.name: getattr(args, f.name) for f in fields(EvaluateOptions)}))


def _add_options(p: argparse.ArgumentParser, defaults) -> None:
    """One argument `--field-name` per field of an options dataclass, with the field's help and `defaults`' value."""
    from dataclasses import fields
    from typing import get_args, get_type_hints

    from tda_assets.experiments.options import env_variable

    hints = get_type_hints(type(defaults))
    for f in fields(defaults):
        flag, default, text = "--" + f.name.replace("_", "-"), getattr(defaults, f.name), f.metadata["help"]
        if hints[f.name] is bool:
            p.add_argument(flag, action="store_true", help=text)
            continue
        notes = ["default %(default)s"] if default is not None else []
        notes += [env_variable(f.name)] if f.metadata["env"] else []
        kind = int if int in (hints[f.name], *get_args(hints[f.name])) else str
        if notes:  # inside the help's closing parenthesis, if it has one
            text = f"{text[:-1]}; {'; '.join(notes)})" if text.endswith(")") else f"{text} ({'; '.join(notes)})"
        p.add_argument(flag, type=kind, default=default, help=text)


def parser() -> argparse.ArgumentParser:
    """The command line; defaults that come from the environment are read in `resources.env`."""
    from resources.env import Env
    from tda_assets.experiments.options import EvaluateOptions

    env = Env.read()
    top = argparse.ArgumentParser(prog="tda", description=__doc__.splitlines()[0])
    sub = top.add_subparsers(dest="command", required=True)
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
    p.add_argument(
        "--audio",
        help="a clip to attribute instead of generating one: a local file (copied into the storage "
        "root) or a URI under an allowed root; refused unless it decodes",
    )
    p.add_argument("--target-artist")
    p.set_defaults(fn=cmd_add_query)
    p = sub.add_parser(
        "prepare",
        help="the training side (manifest, features, checkpoint, Fisher, baseline losses), "
        "skipping what exists with the same identity",
    )
    p.add_argument(
        "--manifest",
        help="CSV or parquet with item_id, audio_uri, caption, artist (default: TDA_MANIFEST, "
        "else the embedded corpus)",
    )
    p.set_defaults(fn=cmd_prepare)
    p = sub.add_parser(
        "attribute",
        help="add one query (your clip, or a prompt to generate from) and attribute it now; "
        "prints the top-k with artist and caption",
    )
    p.add_argument(
        "--audio", help="a clip (local file of any rate/channels: WAV, FLAC, OGG, MP3; or an s3:// or file:// URI)"
    )
    p.add_argument("--prompt", help="the text the clip answers (with --audio: optional) or to generate from")
    p.add_argument("--id", help="query id (a safe slug); default: made from the file name or the prompt")
    p.add_argument("--config", help="configuration id: default, one of the grid file's, or one recorded in the root")
    p.add_argument("-k", type=int, default=10, help="how many top items to print")
    p.add_argument(
        "--per-window",
        nargs="?",
        const="flagged",
        choices=("flagged", "all"),
        help="also attribute windows of a clip longer than the model's window, each as its own query "
        "(<query>-at<s>s) under the two-stage configuration: the windows flagged near-copy (default) or all",
    )
    p.set_defaults(fn=cmd_attribute)
    p = sub.add_parser("run-inbox", help="run every inbox query without a result in this storage root, tick by tick")
    p.set_defaults(fn=cmd_run_inbox)
    p = sub.add_parser("queries", help="every inbox query and its state per configuration")
    p.set_defaults(fn=cmd_queries)
    p = sub.add_parser("export", help="write attribution rows (with artist and caption) to a file")
    p.add_argument("--query", help="one query id (default: all)")
    p.add_argument("--config", help="one configuration id (default: all)")
    p.add_argument(
        "--method",
        default="unlearning",
        help="unlearning (default), linearized (a linearized configuration's rows), "
        "similarity:audio|text|internal, or all",
    )
    p.add_argument("--format", choices=["csv", "parquet", "json"], default="csv")
    p.add_argument("--out", required=True, help="output file path")
    p.set_defaults(fn=cmd_export)
    p = sub.add_parser("demo", help="materialize the whole graph on the embedded default and print the attributions")
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser(
        "grid", help="run every configuration of the grid file for the queries, then the consistency report"
    )
    p.add_argument("--queries", default="all", help="comma-separated query ids, or 'all' (every queries partition)")
    p.add_argument(
        "--grid-file", help="grid YAML (default: TDA_GRID_FILE or tda_assets/experiments/unlearning_grid.yaml)"
    )
    p.add_argument("--force", action="store_true", help="re-run (query, configuration) pairs already recorded")
    p.add_argument("--no-report", action="store_true", help="do not materialize consistency_report afterwards")
    p.add_argument("-v", "--verbose", action="store_true", help="Dagster INFO logs of every run")
    p.set_defaults(fn=cmd_grid)
    p = sub.add_parser(
        "counterfactual", help="retrain without the top-k attributed / k random items (embedded default)"
    )
    p.add_argument("--queries", help="comma-separated query ids (default: the first --n-queries with a target artist)")
    p.add_argument(
        "--n-queries",
        type=int,
        default=4,
        help="queries to check (default 4); each costs 2 retrains of --train-steps (its top-k and its "
        "same-artist control), plus --random-removals retrains shared by all",
    )
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--train-steps",
        type=int,
        help="retraining steps (default: the checkpoint's TDA_TRAIN_STEPS, so the "
        "checkpoint is the full model; fewer: one more retrain for it)",
    )
    p.add_argument("--config-id", default="default")
    p.add_argument(
        "--random-removals",
        type=int,
        help="random removals, shared by every query, each a retrain (default 3; "
        "their spread is the noise floor the attributed removal must clear)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=cmd_counterfactual)
    p = sub.add_parser(
        "evaluate",
        help="the paper's experiments on the embedded default: grid, consistency, similarity, counterfactual",
    )
    _add_options(p, EvaluateOptions.from_env(env))
    p.set_defaults(fn=cmd_evaluate)
    return top


MATERIALIZING = ("prepare", "attribute", "run-inbox", "demo", "grid", "counterfactual", "evaluate")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command in MATERIALIZING:  # SIGTERM/SIGINT stop its run within seconds: marked failed, its slots freed
            from tda_assets.experiments.supervise import stop_on_signals

            with stop_on_signals():
                return args.fn(args)
        return args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"tda {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # supervise.CommandStopped: its run is released already
        print(
            f"tda {args.command}: {stop or 'interrupted'}; its run (if one was running) is marked failed and its "
            "pool slots are free: run the command again to go on",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + getattr(stop, "signum", 2))  # now: finalizing under the run's interrupted thread can abort


if __name__ == "__main__":
    sys.exit(main())
