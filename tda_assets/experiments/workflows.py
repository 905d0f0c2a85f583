"""The commands that materialize (demo, grid, counterfactual, evaluate): each goes through the Dagster instance of
DAGSTER_HOME with the code location's resources and executor, and prints what a user reads."""

from __future__ import annotations

import sys
import time

import polars as pl
from dagster import AssetKey, DagsterInstance

from resources.env import Env, dagster_home, use_dagster_home
from tda_assets.data.demo import builtin_queries
from tda_assets.data.inbox import add_clip_query, add_query, inbox_files, judge_files
from tda_assets.data.query_state import MIN_QUERY_LOSS_RATIO, QueryState, pending_queries
from tda_assets.defs.configs import GRID_FILE, UnlearningConfig, as_config, load_grid, recorded_settings
from tda_assets.io.artifacts import Identity
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.registry import entry, key
from tda_assets.io.storage import Storage

from .display import print_frame
from .grid import GridRun, ensure_query, has_current_attribution, run_grid, select_queries, summary
from .near_copies import PER_WINDOW_CONFIG, attribute_windows, print_near_copy
from .options import EvaluateOptions
from .runner import Runner


def instance() -> DagsterInstance:
    """The instance of DAGSTER_HOME (default: dagster_home/ in the checkout), created if missing."""
    use_dagster_home()
    return DagsterInstance.get()


def runner(verbose: bool = True) -> Runner:
    """A Runner on the instance of DAGSTER_HOME; Dagster's INFO logs only when `verbose`."""
    run = Runner.create(instance())
    if not verbose:
        run.log_level = "WARNING"
    return run


def _start(command: str) -> tuple[Runner, float]:
    run = runner()
    print(f"tda {command}: storage {run.root.url}, Dagster instance {dagster_home()}")
    return run, time.perf_counter()


def _print_timings(run: Runner, start: float) -> None:
    total = time.perf_counter() - start
    print(
        "\nWall time by phase: " + ", ".join(f"{k} {v:.0f}s" for k, v in run.timings.items()) + f"; total {total:.0f}s"
    )


def _engine(run: Runner) -> QueryEngine:
    """The query engine over the run's root, reporting the run's checkpoint and loss protocol."""
    return QueryEngine(run.root, protocol_id=run.resources["protocol"].protocol().protocol_id)


def prepare(manifest: str | None) -> int:
    """The training side for a manifest (or the embedded corpus), skipping what exists with the same identity."""
    run, start = _start("prepare")
    run.training_side_if_needed({"manifest_uri": manifest} if manifest else None)
    record = read_checkpoint_record(run.root)
    protocol = run.resources["protocol"].protocol()
    items = _engine(run).sql("SELECT count(*) AS n FROM training_items").item()
    print(
        f"\ntraining side ready: {items} training items, checkpoint {record.checkpoint_id} ({record.kind}), "
        f"loss protocol {protocol.protocol_id}"
    )
    _print_timings(run, start)
    return 0


def _print_top(run: Runner, query_ids: list[str], k: int, config_id: str | None = None) -> None:
    engine = _engine(run)
    top = engine.named("top_k", k=k).filter(
        pl.col("method").is_in(["unlearning", "linearized"]) & pl.col("query_id").is_in(query_ids)
    )
    if config_id:
        top = top.filter(pl.col("config_id") == config_id)
    print_frame(
        top.select(
            [
                c
                for c in ("query_id", "target_artist", "config_id", "rank", "item_id", "artist", "score", "caption")
                if c in top.columns and not (c == "target_artist" and top[c].null_count() == top.height)
            ]
        )
    )


def resolve_config(config_id: str | None, root) -> UnlearningConfig:
    """A configuration by id: `default`, one of the grid file's, or one recorded in the root (clear error otherwise)."""
    if not config_id or config_id == "default":
        return UnlearningConfig()
    grid_file = Env.read().grid_file
    for config in load_grid(grid_file):
        if config.config_id == config_id:
            return config
    try:
        return as_config(config_id, recorded_settings(root, config_id))
    except FileNotFoundError:
        raise ValueError(
            f"unknown configuration {config_id!r}: not in the grid file {grid_file or GRID_FILE} nor recorded "
            "in this storage root; add it to the grid file"
        ) from None


def attribute(
    audio: str | None,
    prompt: str | None,
    query_id: str | None,
    config_id: str | None,
    k: int,
    per_window: str | None = None,
) -> int:
    """Add one query (a user's clip, or a prompt to generate from) and attribute it now; prints its near-copy verdict
    and top-k, and with `per_window` (flagged or all) each such window's own verdict and top-k (near_copies.py)."""
    if not audio and not prompt:
        raise ValueError("give --audio FILE_OR_URI (optionally with --prompt), or --prompt TEXT to generate a clip")
    run, start = _start("attribute")
    run.log_level = "WARNING"
    root = run.root
    if not root.exists(key("checkpoint_record")):
        raise RuntimeError(f"no checkpoint in {root.url} yet: run `tda prepare --manifest …` first")
    config = resolve_config(config_id, root)
    window_config = resolve_config(PER_WINDOW_CONFIG, root) if per_window else None  # refused before any run
    if audio:
        spec = add_clip_query(root, audio, prompt, query_id, run.resources["inbox"].allowed_roots(root))
    else:
        spec = add_query(root, prompt, query_id)
    audio_uri = spec.audio_uri
    print(
        f"==> query {spec.query_id!r}"
        + (f": clip {audio_uri}" if audio_uri else f": generated from {spec.prompt!r}")
        + f", configuration {config.config_id!r}"
    )
    try:
        run.phase("attribution", lambda: run.attribute(spec.query_id, config))
    except Exception as exc:  # noqa: BLE001 - the command reports what failed and exits non-zero
        print(
            f"tda attribute: query {spec.query_id!r} was not attributed: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        return 1
    print()
    rows = print_near_copy(_engine(run), spec.query_id)
    print(f"\nTop-{k} training items for {spec.query_id!r} ({config.config_id}):")
    _print_top(run, [spec.query_id], k, config.config_id)
    code = 0
    if per_window:

        def windows() -> None:
            nonlocal code
            top = lambda q: _print_top(run, [q], k, window_config.config_id)  # noqa: E731
            code = attribute_windows(run, spec, rows, per_window, window_config, k, top)

        run.phase("per-window attribution", windows)
    _print_timings(run, start)
    return code


def run_inbox() -> int:
    """Drain the inbox: tick the sensor and run its requests until every query has a result in this root."""
    run, start = _start("run-inbox")
    run.log_level = "WARNING"
    root = run.root
    waiting = _waiting_queries(run)
    drain = run.drain_inbox()
    print(f"\n{drain.ticks} ticks: {len(drain.attributed)} queries attributed, {len(drain.failed)} runs failed")
    for qid, message in drain.failed:
        print(f"  failed: {qid}: {message}")
    _, invalid = judge_files(
        root,
        {q: p for q, p in inbox_files(root).items() if q in waiting},
        run.resources["inbox"].allowed_roots(root),
    )
    for qid, reason in invalid.items():
        print(f"  invalid: {qid}: {reason}")
    if waiting and not drain.attributed:
        print(
            f"tda run-inbox: {len(waiting)} queries were waiting and none was attributed"
            + (f" ({len(invalid)} invalid: fix or remove their files)" if invalid else ""),
            file=sys.stderr,
        )
    _print_timings(run, start)
    return 1 if drain.failed or (waiting and not drain.attributed) else 0


def _waiting_queries(run: Runner) -> set[str]:
    """The inbox queries without a result in the root (as the sensor counts them); all of them before `tda prepare`."""
    root = run.root
    files = inbox_files(root)
    if not root.exists(key("checkpoint_record")):
        if files:
            raise RuntimeError(
                f"{len(files)} queries wait in the inbox but {root.url} has no checkpoint yet: run `tda prepare` first"
            )
        return set()
    protocol_id = run.resources["protocol"].protocol().protocol_id
    no_clip, no_attribution = pending_queries(
        root, list(files), read_checkpoint_record(root).checkpoint_id, protocol_id, MIN_QUERY_LOSS_RATIO
    )
    return {*no_clip, *no_attribution}


def demo() -> int:
    """The whole graph on the embedded default: training side, the built-in queries through the inbox, the report."""
    run, start = _start("demo")
    run.training_side()
    ids = builtin_queries(run.root)
    drain = run.drain_inbox()
    print(
        f"==> inbox drained in {drain.ticks} ticks: {len(drain.attributed)} queries attributed, "
        f"{len(drain.failed)} failed"
    )
    run.phase("consistency_report", lambda: run.run(["consistency_report"]))
    print("\nTop-5 attributed training items per query (sql/top_k.sql, k = 5, method = unlearning):")
    _print_top(run, ids, 5)
    print("\nShare of the top-10 by the target artist (sql/artist_shares.sql):")
    print_frame(_engine(run).named("artist_shares", k=10))
    _print_timings(run, start)
    return 1 if drain.failed or not drain.attributed else 0


def print_grid(results: list[GridRun]) -> None:
    """The grid's runs per configuration, and every failed (query, configuration)."""
    print(
        "\nGrid runs per configuration (state of each (query, configuration); seconds_per_run over the runs made now):"
    )
    print_frame(summary(results))
    for r in results:
        if r.state is not QueryState.ATTRIBUTED:
            ratio = f"×{r.loss_ratio:.3f}" if r.loss_ratio is not None else "—"
            print(f"  {r.label}: {r.query_id} / {r.config_id} (query loss {ratio}) {r.message}")


def grid(queries: str, grid_file: str | None, force: bool, report: bool, verbose: bool) -> int:
    """Every configuration of the grid file for the queries, then the consistency report."""
    start = time.perf_counter()
    configs = load_grid(grid_file or Env.read().grid_file)
    run = runner(verbose)
    query_ids = select_queries(run, queries)
    if not query_ids:
        raise ValueError(
            "no queries partitions yet: add queries (`tda add-query`) and run them (`tda demo` or the sensor)"
        )
    print(f"tda grid: {len(configs)} configurations × {len(query_ids)} queries ({', '.join(query_ids)})")
    results = run_grid(run, configs, query_ids, force=force, report=report)
    print_grid(results)
    print(f"\ntotal {time.perf_counter() - start:.0f}s; the table: tda query consistency_table")
    return 1 if any(r.state is QueryState.ERROR for r in results) else 0


def print_counterfactual(engine: QueryEngine) -> None:
    """The counterfactual table, the verdict per query and the share passing."""
    df = engine.sql(
        "select query_id, removal, removal_seed, k, query_loss_full, query_loss_removed, loss_rise, "
        "removed_of_target_artist from counterfactual semi join current_identity using (checkpoint_id, "
        "protocol_id) order by query_id, removal, removal_seed"
    )
    print(
        "\nCounterfactual check (retrained without each query's top-k attributed items, without k other items of its "
        "target artist, and several times without k random items shared by every query; table `counterfactual`):"
    )
    print_frame(df)
    verdicts = engine.named("counterfactual_verdicts")
    print(
        "Verdict per query (sql/counterfactual_verdicts.sql: `passed` = the attributed rise clears the noise floor, "
        "the random rises' mean + floor_sds · sd, 2 by default; `passed_item_level` = it also clears the same-artist "
        "rise + floor_sds · sd, so the attributed items matter beyond their artist):"
    )
    print_frame(
        verdicts.filter(pl.col("query_id") != "(all)").select(
            "query_id",
            "attributed_rise",
            "random_rise_mean",
            "random_rise_sd",
            "noise_floor",
            "same_artist_rise",
            "item_floor",
            "passed",
            "passed_item_level",
        )
    )
    _print_overall_verdict(verdicts)


def _print_overall_verdict(verdicts: pl.DataFrame) -> None:
    """The share of queries passing each verdict (the `(all)` row), and the check's outcome."""
    overall = verdicts.filter(pl.col("query_id") == "(all)")
    if not overall.height:
        return
    n, row = verdicts.height - 1, overall.row(0, named=True)
    for what, share, low in (
        ("above the random noise floor", row["share_passing"], row["share_passing_low"]),
        ("above both controls (item level)", row["share_item_level"], row["share_item_level_low"]),
    ):
        print(f"{round(share * n)} of {n} queries {what}: {share:.0%} (95% lower end {low:.2f})")
    if row["passed_item_level"]:
        print("check: PASSED (more than half item level)")
    else:
        print("check: FAILED (more than half must pass item level)")


def counterfactual(
    queries: str | None,
    n_queries: int,
    k: int,
    train_steps: int | None,
    config_id: str,
    verbose: bool,
    random_removals: int | None = None,
) -> int:
    """The counterfactual asset for the queries, then its table and verdicts."""
    run = runner(verbose)
    ids = [q.strip() for q in queries.split(",")] if queries else None
    run.phase(
        "counterfactual",
        lambda: run.counterfactual(
            query_ids=ids,
            n_queries=n_queries,
            k=k,
            train_steps=train_steps,
            config_id=config_id,
            random_removals=random_removals,
        ),
    )
    print_counterfactual(_engine(run))
    return 0


def _latest_metadata(run: Runner, asset: str) -> dict:
    """The metadata of `asset`'s latest materialization on the run's instance."""
    return run.instance.get_latest_materialization_event(AssetKey(asset)).asset_materialization.metadata


def evaluate(options: EvaluateOptions) -> int:
    """The paper's experiments on the embedded default: built-in queries, grid, self-influence, replication,
    counterfactual; then the tables they fill."""
    run, start = _start("evaluate")
    run.training_side_if_needed()
    run.log_level = "WARNING"
    ids = _builtin_queries(run)
    results = _grid(run, ids, options)
    judged = _self_influence(run, results, options)
    chosen = _latest_metadata(run, "self_influence")["best_config"].value if judged else "default"  # of this run's
    _replication(run, chosen, options.rep_sources)
    if not options.skip_counterfactual:
        _counterfactual(run, options)
    _print_evaluation(run, results, judged, chosen, options)
    _print_timings(run, start)
    return 1 if any(r.state is QueryState.ERROR for r in results) else 0


def _builtin_queries(run: Runner) -> list[str]:
    """The built-in queries, each attributed with the default configuration unless the root has it already."""
    root = run.root
    ids = builtin_queries(root)
    identity = Identity(read_checkpoint_record(root).checkpoint_id, run.resources["protocol"].protocol().protocol_id)
    todo = [q for q in ids if not has_current_attribution(root, q, "default", identity)]

    def attribute_todo() -> None:
        for q in ids:
            if q in todo:
                run.attribute(q)
            else:
                ensure_query(run, root, q)

    run.phase(f"built-in queries ({len(todo)} of {len(ids)} to run)", attribute_todo)
    return ids


def _grid(run: Runner, ids: list[str], options: EvaluateOptions) -> list[GridRun]:
    """The grid file's configurations on the first `grid_queries` built-in queries (in id order)."""
    configs = load_grid(options.grid_file or Env.read().grid_file)
    grid_ids = sorted(ids)[: options.grid_queries] if options.grid_queries else sorted(ids)
    print(f"==> grid: {len(configs)} configurations × {len(grid_ids)} queries ({', '.join(grid_ids)})")
    results: list[GridRun] = []
    run.phase("grid", lambda: results.extend(run_grid(run, configs, grid_ids, force=options.force)))
    return results


def _self_influence(run: Runner, results: list[GridRun], options: EvaluateOptions) -> list[str]:
    """Self-influence of the `si_configs` the grid attributed; the configurations it judged."""
    attributed = {r.config_id for r in results if r.state is QueryState.ATTRIBUTED}
    wanted = options.self_influence_configs
    judged = [c for c in wanted if c in attributed]
    if len(judged) < len(wanted):
        print(f"    self-influence skips {sorted(set(wanted) - set(judged))}: not in the grid, or no attribution")
    if judged:
        run.phase(
            "self_influence",
            lambda: run.with_config("self_influence", config_ids=judged, n_targets=options.si_targets),
        )
    return judged


def _replication(run: Runner, chosen: str, sources: int) -> None:
    """Replication of the default and of the configuration self-influence chose, then the near-copy rule's
    calibration on as many reporting sources per transform (nothing when `sources` is 0)."""
    if not sources:
        return
    for cid in dict.fromkeys(["default", chosen]):
        run.phase(f"replication {cid}", lambda c=cid: run.with_config("replication", config_id=c, n_sources=sources))
    run.phase("near_copy_calibration", lambda: run.with_config("near_copy_calibration", n_sources=sources))


def _counterfactual(run: Runner, options: EvaluateOptions) -> None:
    """The counterfactual check on `cf_queries` queries, retrained `counterfactual_steps` steps each."""
    steps = options.counterfactual_steps(run.resources["model_source"].model_source().train_steps)
    print(
        f"==> counterfactual: {options.cf_queries} queries × (top-{options.cf_k} + same-artist control) + 3 shared "
        f"random removals, retrained {steps} steps each"
    )
    run.phase(
        "counterfactual",
        lambda: run.counterfactual(n_queries=options.cf_queries, k=options.cf_k, train_steps=steps),
    )


def _print_evaluation(
    run: Runner, results: list[GridRun], judged: list[str], chosen: str, options: EvaluateOptions
) -> None:
    """Every table the evaluation filled, in the order docs/experiments.md reads them."""
    engine = _engine(run)
    print_grid(results)
    _print_consistency(run, engine)
    if judged:
        _print_self_influence(engine, options.si_targets)
    if options.rep_sources:
        _print_replication(engine, options.rep_sources)
    _print_figures(engine, chosen if judged else None)
    print("\nAgreement of unlearning with each similarity method (sql/method_agreement.sql, mean over queries):")
    print_frame(engine.named("method_agreement").filter(pl.col("query_id") == "(mean)"))
    if options.rep_sources:
        print(
            "\nNear-copy rule (view near_copy_summary: reporting sources per transform, recall with the lower end of "
            "its 95% interval; false positives on held-out clips of the same artists and the generated clips):"
        )
        print_frame(engine.sql("SELECT * FROM near_copy_summary"))
    if not options.skip_counterfactual:
        print_counterfactual(engine)
    _print_plots(run.root)


def _print_consistency(run: Runner, engine: QueryEngine) -> None:
    """The consistency table, the most consistent configuration (as the report computed it), cross-query overlap."""
    print(
        "\nConsistency between configurations and seed reruns (sql/consistency_table.sql, mean over queries;"
        " unlearning-vs-similarity pairs are in the next table):"
    )
    print_frame(engine.named("consistency_table").filter(pl.col("pair") != "unlearning vs similarity"))
    report = _latest_metadata(run, "consistency_report")
    per_config = report["config_consistency"].value if "config_consistency" in report else []
    if per_config:
        print("\nMean Jaccard@10 per configuration (with its seed reruns, with the other configurations):")
        print_frame(pl.DataFrame(per_config))
        print(f"most consistent configuration: {per_config[0]['config_id']}")
    print(
        "\nCross-query overlap (sql/cross_query_overlap.sql: mean Jaccard@10 between the top-10s of queries with "
        "different target artists; high = the same items whatever the query):"
    )
    print_frame(engine.named("cross_query_overlap").drop("checkpoint_id", "protocol_id"))


def _print_self_influence(engine: QueryEngine, targets: int) -> None:
    print(
        f"\nSelf-influence ({targets} reporting targets: k-means-chosen training items outside the 16 "
        "development targets that tuned the defaults, unlearned as their own queries; target_set = reporting; "
        "sql/self_influence_summary.sql; R = mean rank of the item itself, 1.0 = always first; "
        "share_first_low = the lower end of share_first's 95% interval; the best: lowest R, a tie to the higher "
        "share_first_low, then the smaller loss_ratio_spread):"
    )
    print_frame(engine.named("self_influence_summary"))


def _print_replication(engine: QueryEngine, sources: int) -> None:
    print(
        f"\nReplication detection ({sources} reporting sources × 4 transforms, each applied at the source "
        "file's own rate; the default and the configuration self-influence chose; sql/replication_summary.sql; "
        "snr_db = the transform's SNR against its source in the model's band (above ~35 dB it changes little the "
        "model hears); share_first_low = the lower end of share_first's 95% interval, so 4 of 4 first shows at "
        "least 0.51 and the goal's 0.95 needs 73 of 73):"
    )
    print_frame(engine.named("replication_summary"))


def _print_figures(engine: QueryEngine, chosen: str | None) -> None:
    """The figures per configuration, and the one self-influence chose (None: it judged none)."""
    figures = engine.named("config_figures")
    print("\nFigures per configuration (sql/config_figures.sql; best self-influence first):")
    print_frame(figures)
    if chosen is None:
        return
    ranked = figures.filter(pl.col("config_id") == chosen, pl.col("r_mean_rank").is_not_null())
    if ranked.height:
        best = ranked.row(0, named=True)
        print(
            f"chosen by self-influence: {best['config_id']} (R {best['r_mean_rank']:.3f}, "
            f"{best['si_share_first']:.0%} of {best['si_targets']} targets first)"
        )


def _print_plots(root: Storage) -> None:
    plots = root.glob(entry("plot").glob()) + root.glob(entry("plot_top_k").glob())
    print(
        f"\n{len(plots)} plots (top-k bars per query and configuration, the consistency heatmap, the counterfactual "
        f"bars) under {root.uri(entry('plot').glob())} and {root.uri(entry('plot_top_k').glob())}"
    )
