"""Agreement of two-stage and linearized scoring with the full exact rescore on the demo's own queries (run on demand).

Reads a storage root where `make demo` (or `tda evaluate`) ran: the checkpoint, Fisher, baseline losses, the built-in
queries' clips and their similarity scores. For each query it unlearns once with the default configuration, rescores
every item exactly, then scores the same unlearning by two-stage (under each candidate/halving setting below, with
the query's internal and audio similarity and the linearized score as cheap signals) and by the linearized method.
Prints one line per setting and, last, one JSON object.

    .venv/bin/python tests/benchmarks/bench_demo_agreement.py --root dagster_home/storage
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from tda_assets.attribution.devices import Compute
from tda_assets.attribution.gradients import gradient_store
from tda_assets.attribution.linearized import linearized_scores
from tda_assets.attribution.multifidelity import two_stage, unlearned_losses_fn
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import attribution_scores, score_columns
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.unlearn import unlearn
from tda_assets.io.artifacts import (
    Identity,
    all_features,
    baseline_item_ids,
    loss_matrix,
    query_batch,
    read_baseline,
    read_fisher,
)
from tda_assets.io.checkpoints import load_checkpoint
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_tables
from tda_assets.models.sources import ModelSource

# (candidates: fraction of N from each cheap signal, first draws, survivors: fraction of the candidates)
SETTINGS = [
    (0.25, 4, 0.5),
    (0.25, 4, 0.25),
    (0.15, 4, 0.5),
    (0.15, 4, 0.25),
    (0.1, 4, 0.5),
    (0.1, 4, 0.25),
    (0.05, 4, 0.5),
]  # the grid's `two-stage` entry is 0.15/4/0.5


def jaccard10(a_rank: np.ndarray, b_rank: np.ndarray) -> float:
    x, y = set(np.argsort(a_rank)[:10]), set(np.argsort(b_rank)[:10])
    return len(x & y) / len(x | y)


def demo_agreement(root: str, n_queries: int = 8, draws: int = 16, k: int = 4096) -> dict:
    """Per-setting two-stage agreement and cost, and linearized agreement, against full exact on the root's demo
    queries."""
    start = time.perf_counter()
    store, compute, settings = Storage(root), Compute(), UnlearningSettings()
    protocol = LossProtocol(seed=0, draws=draws)
    adapter, record = load_checkpoint(store, ModelSource(), compute.device)
    identity = Identity(record.checkpoint_id, protocol.protocol_id)
    fisher = read_fisher(store, identity)
    baseline = read_baseline(store, identity, record.encoder_id)
    item_ids = baseline_item_ids(baseline)
    data = all_features(store, record.encoder_id)
    items = data.select([data.item_ids.index(i) for i in item_ids])
    l0 = loss_matrix(baseline, item_ids, protocol.draws, "loss", "baseline_losses")
    n = len(item_ids)
    sims = read_tables(store, "similarity_scores")
    qids = sorted(q for q in sims["query_id"].unique().to_list() if q.startswith("demo-artist-"))[:n_queries]
    t0 = time.perf_counter()
    grads = gradient_store(
        adapter, [items], protocol, settings.param_subset, compute, k=k, fisher=fisher, damping=settings.damping
    )
    print(
        f"demo agreement: N={n}, K={protocol.draws}, {len(qids)} queries; gradient store "
        f"{time.perf_counter() - t0:.0f} s (k={k}); default configuration: target ×{settings.target_ratio}, "
        f"score {settings.score_type}"
    )
    position = {i: j for j, i in enumerate(item_ids)}
    rows: list[dict] = []
    for qid in qids:
        result = unlearn(adapter, query_batch(store, qid, record.encoder_id), fisher, settings, protocol, compute, n)
        after = unlearned_losses_fn(adapter, items, result.delta, protocol, compute)(np.arange(n), 0, protocol.draws)
        exact = attribution_scores(l0, after, settings.score_type, grads.item_norms)
        cached = lambda idx, a, b: after[idx, a:b]  # noqa: E731  (the losses two-stage would compute: the same function)
        lin = linearized_scores(grads, result.delta)
        q = sims.filter(pl.col("query_id") == qid)

        def signal(method: str) -> np.ndarray:
            df = q.filter(pl.col("method") == method)
            out = np.full(n, np.nan)
            out[[position[i] for i in df["item_id"].to_list()]] = df["score"].to_numpy()
            return out

        # as the product's two-stage: the linearised signal scored as the configuration's score (normalized: over the
        # same floored item norms), the similarities as they are (fast_paths.cheap_signals)
        lin_scored = score_columns(l0, settings.score_type, grads.item_norms, mean_delta=lin)["score"]
        signals = {
            "internal": signal("similarity:internal"),
            "audio": signal("similarity:audio"),
            "linearized": lin_scored,
        }
        row = {
            "ratio": result.loss_ratio,
            "lin_spearman": spearmanr(lin, exact["mean_delta"])[0],
            "lin_jaccard10": jaccard10(np.argsort(np.argsort(-lin)) + 1, rank_of(exact["mean_delta"])),
        }
        top10 = np.argsort(exact["rank"])[:10]
        for name, sig in signals.items():
            row[f"recall_{name}"] = float(np.mean(np.argsort(np.argsort(-sig))[top10] < 0.25 * n))
        for top, first, keep in SETTINGS:
            staged = two_stage(
                l0,
                cached,
                signals,
                top=top,
                first_draws=first,
                keep=keep,
                score_type=settings.score_type,
                item_norms=grads.item_norms,
            )
            full = staged.draws_used == protocol.draws
            row[(top, first, keep)] = (
                jaccard10(staged.rank, exact["rank"]),
                spearmanr(staged.score[full], exact["score"][full])[0],
                staged.item_draws / (n * protocol.draws),
            )
        rows.append(row)
        print(
            f"  {qid}: query loss ×{result.loss_ratio:.3f}; linearized Spearman {row['lin_spearman']:.3f} "
            f"(vs exact mean ΔL), Jaccard@10 {row['lin_jaccard10']:.2f}; two-stage J@10 "
            + ", ".join(f"{row[s][0]:.2f}" for s in SETTINGS)
        )
    mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
    out: dict = {
        "items": n,
        "queries": len(rows),
        "seconds": round(time.perf_counter() - start),
        "linearized_spearman": round(mean("lin_spearman"), 3),
        "linearized_top10_jaccard": round(mean("lin_jaccard10"), 3),
        **{f"recall_top10_in_top25pct_{name}": round(mean(f"recall_{name}"), 3) for name in signals},
        "two_stage": {},
    }
    for s in SETTINGS:
        j, sp, cost = (float(np.mean([r[s][i] for r in rows])) for i in range(3))
        print(
            f"two-stage, candidates {s[0]:.0%} per signal, {s[1]} first draws, {s[2]:.0%} survivors: "
            f"top-10 Jaccard {j:.3f} (min {min(r[s][0] for r in rows):.2f}), Spearman over the fully rescored "
            f"{sp:.3f}, cost {cost:.1%} of full exact"
        )
        out["two_stage"]["/".join(map(str, s))] = {
            "top10_jaccard": round(j, 3),
            "spearman_rescored": round(sp, 3),
            "cost": round(cost, 3),
        }
    return out


def rank_of(score: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(-score)) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="dagster_home/storage")
    parser.add_argument("--queries", type=int, default=8, help="the first N built-in queries (demo-artist-…)")
    parser.add_argument("--draws", type=int, default=16, help="the root's protocol draws (TDA_DRAWS)")
    parser.add_argument("--k", type=int, default=4096, help="sketch dimension of the gradient store")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(json.dumps(demo_agreement(args.root, args.queries, args.draws, args.k)))


if __name__ == "__main__":
    main()
