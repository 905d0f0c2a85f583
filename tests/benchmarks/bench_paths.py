"""Per-query seconds of the three scoring paths through the product (run on demand): the full exact rescore, the
shipped `two-stage` and `linearized` grid entries, each a (query × config) run of the Runner on a fresh embedded
corpus, with the Dagster step times, and their agreement with the full rescore. The last line printed is one JSON
object.

    OMP_NUM_THREADS=1 python -m tests.benchmarks.bench_paths --artists 8 --clips-per-artist 16 --queries 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
from dagster import DagsterInstance
from scipy.stats import spearmanr

from tda_assets.data.demo import builtin_queries
from tda_assets.defs.configs import UnlearningConfig, load_grid
from tda_assets.experiments.runner import Runner
from tda_assets.io.tables import read_tables


def step_seconds(runner: Runner, run_id: str) -> dict[str, float]:
    return {
        s.step_key: round(s.end_time - s.start_time, 2)
        for s in runner.instance.get_run_step_stats(run_id)
        if s.end_time and s.start_time
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--artists", type=int, default=8)
    p.add_argument("--clips-per-artist", type=int, default=16)
    p.add_argument("--queries", type=int, default=3)
    p.add_argument("--train-steps", default="300")
    p.add_argument("--root", help="the storage root to build (default: a new temporary folder)")
    args = p.parse_args()
    os.environ["TDA_TRAIN_STEPS"] = args.train_steps
    runner = Runner.create(
        DagsterInstance.ephemeral(), args.root or tempfile.mkdtemp(prefix="bench-paths-"), log=lambda _m: None
    )
    runner.log_level = "ERROR"
    runner.training_side({"clips_per_artist": args.clips_per_artist, "artists": args.artists})
    root = runner.root
    ids = builtin_queries(root, artists=args.queries)
    runner.sensor_tick()
    for q in ids:
        runner.clip(q)
    grid = {c.config_id: c for c in load_grid()}
    configs = {"full": UnlearningConfig(), "two-stage": grid["two-stage"], "linearized": grid["linearized"]}
    start = time.perf_counter()
    built = runner.ensure_gradients(configs["linearized"])
    gradients_s = time.perf_counter() - start
    out: dict = {
        "items": args.artists * args.clips_per_artist,
        "queries": ids,
        "gradient_shards": len(built),
        "training_gradients_seconds": round(gradients_s, 1),
        "load_average": os.getloadavg()[0],
        "paths": {},
    }
    for name, cfg in configs.items():
        walls, steps = [], []
        for q in ids:
            t0 = time.perf_counter()
            result = runner.attribute_config(q, cfg)
            walls.append(time.perf_counter() - t0)
            steps.append(step_seconds(runner, result.run_id))
        keys = steps[0].keys()
        out["paths"][name] = {
            "run_seconds_median": round(statistics.median(walls), 2),
            "run_seconds": [round(w, 2) for w in walls],
            "step_seconds_median": {k: statistics.median(s[k] for s in steps) for k in keys},
        }
        print(name, out["paths"][name], flush=True)
    agreement = {}
    for name in ("two-stage", "linearized"):
        rows = []
        for q in ids:
            full = read_tables(root, "attribution_scores", query_id=q, config_id="default").sort("item_id")
            fast = read_tables(root, "attribution_scores", query_id=q, config_id=name).sort("item_id")
            a, b = full["score"].to_numpy(), fast["score"].to_numpy()
            top_full = set(full.sort("rank").head(10)["item_id"]), set(fast.sort("rank").head(10)["item_id"])
            ok = np.isfinite(b)
            rows.append(
                {
                    "jaccard_10": len(top_full[0] & top_full[1]) / len(top_full[0] | top_full[1]),
                    "spearman": float(spearmanr(a[ok], b[ok])[0]),
                    "rescored": int(fast["rescored"].sum()),
                }
            )
        agreement[name] = {k: round(float(np.mean([r[k] for r in rows])), 3) for k in rows[0]}
    out["agreement_with_full"] = agreement
    print(json.dumps(out))


if __name__ == "__main__":
    main()
