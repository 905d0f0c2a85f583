"""The data plane at catalogue counts (run on demand: `make bench-catalogue`): a synthetic storage root written through
the product's own writers and layout registry (no model): N training items in shards, their baseline losses at K = 16,
Q queries × 1 configuration of full attribution rows (N × Q rows) with their unlearning records, and an inbox of those
Q queries plus P pending ones. Then each user-facing read, in its own process (so each peak RSS is its own): the
DuckDB top-10 of one query, `artist_shares` over every query, `tda export` of one query, `tda queries`, and one tick of
the inbox sensor with P pending queries (seconds, runs requested), and one tick with the P queries past the partition
budget (TDA_MAX_QUERY_PARTITIONS=0: batch runs requested, queries they cover). The last line printed is one JSON
object.

    OMP_NUM_THREADS=1 python -m tests.benchmarks.bench_catalogue --items 115000 --queries 1000 --inbox 10000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import polars as pl

from tda_assets.attribution.protocol_id import protocol_id
from tda_assets.io.registry import entry
from tda_assets.io.storage import Storage

CHECKPOINT, ENCODER, CONFIG, DRAWS, ARTISTS = "bench-ckpt", "bench-enc", "default", 16, 500
PROTOCOL = protocol_id(0, DRAWS)
STEPS = ("topk", "artist_shares", "export", "queries_cli", "sensor_tick", "sensor_tick_batched")


def keys(name: str, **values: object) -> dict[str, object]:
    """The key fields of table `name` picked from `values` (the layout decides which identity fields a key has)."""
    return {f: values[f] for f in entry(name).fields}


def complete(name: str, df: pl.DataFrame) -> pl.DataFrame:
    """The frame with every column of table `name` it lacks, as nulls (columns this benchmark does not read)."""
    schema = entry(name).polars_schema()
    return df.with_columns(pl.lit(None, dtype=t).alias(c) for c, t in schema.items() if c not in df.columns)


def query_id(q: int) -> str:
    return f"query-{q:06d}"


def build(root: Storage, n_items: int, n_queries: int, n_inbox: int, n_shards: int) -> dict:
    """The synthetic root; returns the bytes of one query's attribution file and the seconds it took."""
    from tda_assets.data.inbox import add_query
    from tda_assets.data.manifests import shard_keys, with_shards
    from tda_assets.io.checkpoints import CheckpointRecord, write_checkpoint_record
    from tda_assets.io.tables import write_table

    start = time.perf_counter()
    ident = {"checkpoint_id": CHECKPOINT, "protocol_id": PROTOCOL, "config_id": CONFIG}
    ids = [f"item-{i:06d}" for i in range(n_items)]
    artists = [f"artist-{i % ARTISTS:03d}" for i in range(n_items)]
    manifest = pl.DataFrame(
        {
            "item_id": ids,
            "audio_uri": [f"s3://corpus/{a}/{i}.wav" for i, a in zip(ids, artists)],
            "caption": [f"a take by {a}" for a in artists],
            "artist": artists,
            "duration_s": np.full(n_items, 10.0),
        }
    )
    manifest = with_shards(manifest, n_shards)
    write_table(root, "training_manifest", complete("training_manifest", manifest))
    write_checkpoint_record(root, CheckpointRecord(CHECKPOINT, "external", "bench", ENCODER))
    rng = np.random.default_rng(0)
    for shard in shard_keys(n_shards):
        part = manifest.filter(pl.col("shard") == shard)["item_id"]
        n = len(part) * DRAWS
        losses = pl.DataFrame(
            {
                "item_id": part.to_numpy().repeat(DRAWS),
                "draw": np.tile(np.arange(DRAWS), len(part)),
                "t": rng.random(n, dtype=np.float32),
                "loss": rng.random(n, dtype=np.float32),
            }
        )
        losses = complete("baseline_losses", losses.with_columns(loss_masked=pl.col("loss")))
        write_table(root, "baseline_losses", losses, **keys("baseline_losses", shard=shard, **ident))
    item_ids = pl.Series("item_id", ids)
    for q in range(n_queries):
        qid = query_id(q)
        score = rng.standard_normal(n_items)
        rank = np.empty(n_items, dtype=np.int64)
        rank[np.argsort(-score)] = np.arange(1, n_items + 1)
        scores = pl.DataFrame(
            {
                "method": "unlearning",
                "item_id": item_ids,
                "score": score,
                "rank": rank,
                "mean_delta": score * 0.01,
                "relative_score": score * 0.1,
                "skew_score": score * 0.5,
                "share": np.exp(score) / np.exp(score).sum(),
                "score_type": "normalized",
                "rescored": True,
                "draws_used": DRAWS,
                "checkpoint_id": CHECKPOINT,
                "protocol_id": PROTOCOL,
            }
        )
        write_table(
            root,
            "attribution_scores",
            complete("attribution_scores", scores),
            **keys("attribution_scores", query_id=qid, **ident),
        )
        run = pl.DataFrame(
            {
                "query_loss_before": [1.0],
                "query_loss_after": [1.3],
                "delta_uri": [""],
                "seconds": [1.0],
                "lr_used": [1e-3],
                "target_ratio": [1.3],
                "search_ratio": [1.3],
                "probes": [1],
                "checkpoint_id": [CHECKPOINT],
                "protocol_id": [PROTOCOL],
            }
        )
        write_table(
            root, "unlearning_runs", complete("unlearning_runs", run), **keys("unlearning_runs", query_id=qid, **ident)
        )
        query = pl.DataFrame(
            {
                "prompt": [f"a tune like artist {q % ARTISTS}"],
                "seed": [q],
                "target_artist": [artists[q]],
                "encoder_id": [ENCODER],
                "generated_by": ["bench"],
            }
        )
        write_table(root, "queries", complete("queries", query), **keys("queries", query_id=qid, **ident))
        add_query(root, f"a tune like artist {q % ARTISTS}", qid, seed=q)
    for p in range(n_inbox):
        add_query(root, f"a pending tune number {p}", f"pending-{p:06d}", seed=p)
    one = entry("attribution_scores").key(**keys("attribution_scores", query_id=query_id(0), **ident))
    return {"parquet_bytes_per_query": root.size(one) if n_queries else 0, "build_s": time.perf_counter() - start}


def measure(step: str, root_url: str) -> dict:
    """One step, in this process: its seconds and what it returned (the parent reads this process's peak RSS)."""
    from tda_assets.io.query_engine import QueryEngine

    root = Storage(root_url)
    engine = QueryEngine(root, protocol_id=PROTOCOL)
    out: dict = {}
    start = time.perf_counter()
    if step == "topk":  # as a user's `tda sql` runs it: a fresh connection each time, the hive filter prunes the files
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            top = engine.sql(
                "SELECT rank, item_id, score FROM attributions WHERE query_id = $q AND config_id = $c "
                "AND method = 'unlearning' ORDER BY rank LIMIT 10",
                {"q": query_id(0), "c": CONFIG},
            )
            times.append(time.perf_counter() - t0)
        out = {"rows": top.height, "topk_ms": 1000 * statistics.median(times)}
    elif step == "artist_shares":
        out = {"rows": engine.named("artist_shares", k=10).height}
    elif step in ("export", "queries_cli"):
        from tda_assets.cli import main

        argv = (
            ["export", "--query", query_id(0), "--format", "parquet", "--out", f"{root_url}.export.parquet"]
            if step == "export"
            else ["queries"]
        )
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            code = main(argv)
        lines = printed.getvalue().splitlines()
        out = {"exit": code, "last_line": lines[-1] if lines else ""}
    elif step in ("sensor_tick", "sensor_tick_batched"):
        from dagster import DagsterInstance, build_sensor_context

        from resources import InboxResource, LossProtocolResource, StorageResource
        from tda_assets.defs.sensors import queries_of, query_batch_job, query_inbox_sensor

        inbox = InboxResource(max_query_partitions=0) if step == "sensor_tick_batched" else InboxResource()
        with DagsterInstance.ephemeral() as instance:
            context = build_sensor_context(
                instance=instance,
                resources={
                    "storage": StorageResource(url=root_url),
                    "inbox": inbox,
                    "protocol": LossProtocolResource(draws=DRAWS, seed=0),
                },
            )
            t0 = time.perf_counter()
            result = query_inbox_sensor(context)
            requests = list(getattr(result, "run_requests", None) or [])
            out = {
                "runs_requested": len(requests),
                "batch_runs": sum(r.job_name == query_batch_job.name for r in requests),
                "queries_covered": sum(len(queries_of(r)) for r in requests),
                "tick_s": time.perf_counter() - t0,
            }
    out["seconds"] = time.perf_counter() - start
    return out


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM: since its exec; ru_maxrss would keep the parent's peak at fork)."""
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    return kb / 2**20


def run_step(step: str, root_url: str, home: str) -> dict:
    """`measure(step)` in a child process, as a user's command runs; with its wall time and peak RSS."""
    env = {
        **os.environ,
        "TDA_STORAGE_URL": root_url,
        "DAGSTER_HOME": home,
        "TDA_DRAWS": str(DRAWS),
        "TDA_PROTOCOL_SEED": "0",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    code = (
        "import json, sys\nfrom tests.benchmarks.bench_catalogue import measure, peak_rss_gb\n"
        "out = measure(sys.argv[1], sys.argv[2])\n"
        "out['peak_rss_gb'] = peak_rss_gb()\nprint(json.dumps(out))"
    )
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, step, root_url], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode:
        raise RuntimeError(f"step {step} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.perf_counter() - start
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=115_000, help="training items")
    parser.add_argument("--queries", type=int, default=1000, help="attributed queries (full rows of every item)")
    parser.add_argument("--inbox", type=int, default=10_000, help="pending inbox queries for the sensor tick")
    parser.add_argument("--shards", type=int, default=4, help="training shards (TDA_SHARDS)")
    parser.add_argument("--dir", help="where to build the root (default: a temporary folder, removed afterwards)")
    parser.add_argument(
        "--measure-only",
        action="store_true",
        help="measure the root a run with the same counts and --dir left there, without building it",
    )
    args = parser.parse_args()
    base = args.dir or tempfile.mkdtemp(prefix="bench-catalogue-")
    root_url, home = os.path.join(base, "storage"), os.path.join(base, "home")
    try:
        if args.measure_only:
            one = entry("attribution_scores").key(
                **keys(
                    "attribution_scores",
                    query_id=query_id(0),
                    checkpoint_id=CHECKPOINT,
                    protocol_id=PROTOCOL,
                    config_id=CONFIG,
                )
            )
            built = {"parquet_bytes_per_query": Storage(root_url).size(one)}
        else:
            built = build(Storage(root_url), args.items, args.queries, args.inbox, args.shards)
        build_s = built.get("build_s")
        rss_build = peak_rss_gb()
        done = "measuring the root" if args.measure_only else f"built in {build_s:.0f} s (peak RSS {rss_build:.2f} GB):"
        print(
            done
            + f" root of {args.items} items × {args.queries} queries ({args.items * args.queries:,} attribution rows)"
            f" and {args.inbox} pending inbox queries; "
            f"{built['parquet_bytes_per_query'] / 1e6:.2f} MB of parquet per query",
            flush=True,
        )
        steps = {}
        for step in STEPS:
            steps[step] = run_step(step, root_url, home)
            print(f"{step:>14}: {steps[step]}", flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    assert steps["topk"]["rows"] == 10 and steps["export"]["exit"] == 0 and steps["queries_cli"]["exit"] == 0, steps
    print(
        json.dumps(
            {
                "n_items": args.items,
                "n_queries": args.queries,
                "n_inbox": args.inbox,
                "shards": args.shards,
                "attribution_rows": args.items * args.queries,
                "build_s": build_s and round(build_s, 1),
                "parquet_bytes_per_query": built["parquet_bytes_per_query"],
                "topk_ms": round(steps["topk"]["topk_ms"], 1),
                "artist_shares_s": round(steps["artist_shares"]["seconds"], 2),
                "artist_shares_rows": steps["artist_shares"]["rows"],
                "export_s": round(steps["export"]["seconds"], 2),
                "export_wall_s": round(steps["export"]["wall_s"], 2),
                "queries_cli_s": round(steps["queries_cli"]["seconds"], 2),
                "queries_cli_wall_s": round(steps["queries_cli"]["wall_s"], 2),
                "sensor_tick_s": round(steps["sensor_tick"]["tick_s"], 2),
                "sensor_runs_requested": steps["sensor_tick"]["runs_requested"],
                "batched_tick_s": round(steps["sensor_tick_batched"]["tick_s"], 2),
                "batch_runs_per_tick": steps["sensor_tick_batched"]["batch_runs"],
                "queries_per_tick": steps["sensor_tick_batched"]["queries_covered"],
                "peak_rss_gb": round(max(s["peak_rss_gb"] for s in steps.values()), 3),
                "peak_rss_gb_by_step": {k: round(s["peak_rss_gb"], 3) for k, s in steps.items()},
                "load_average": round(os.getloadavg()[0], 1),
            }
        )
    )


if __name__ == "__main__":
    main()
