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
from tda_assets.attribution.scores import attribution_scores
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.unlearn import unlearn
from tda_assets.io.artifacts import Identity, all_features, baseline_item_ids, loss_matrix, query_batch, read_baseline, require
from tda_assets.io.checkpoints import load_checkpoint, read_checkpoint_record
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_tables
from tda_assets.models.sources import ModelSource

# (candidates: fraction of N from each cheap signal, first draws, survivors: fraction of the candidates)
SETTINGS = [(0.25, 4, 0.5), (0.25, 4, 0.25), (0.5, 4, 0.25), (0.5, 2, 0.25), (0.5, 4, 0.1), (0.15, 4, 0.5)]


def jaccard10(a_rank: np.ndarray, b_rank: np.ndarray) -> float:
    x, y = set(np.argsort(a_rank)[:10]), set(np.argsort(b_rank)[:10])
    return len(x & y) / len(x | y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", default="dagster_home/storage")
    parser.add_argument("--queries", type=int, default=8, help="the first N built-in queries (demo-artist-…)")
    parser.add_argument("--draws", type=int, default=16, help="the root's protocol draws (TDA_PROTOCOL_DRAWS)")
    parser.add_argument("--k", type=int, default=4096, help="sketch dimension of the gradient store")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    store, compute, settings = Storage(args.root), Compute(), UnlearningSettings()
    protocol = LossProtocol(seed=0, draws=args.draws)
    record = read_checkpoint_record(store)
    adapter, record = load_checkpoint(store, ModelSource(), compute.device)
    identity = Identity(record.checkpoint_id, protocol.protocol_id)
    fisher = store.read_tensors(require(store, "fisher_diagonal", identity, "run `make demo` first"))[0]
    baseline = read_baseline(store, identity, record.encoder_id)
    item_ids = baseline_item_ids(baseline)
    data = all_features(store, record.encoder_id)
    items = data.select([data.item_ids.index(i) for i in item_ids])
    l0 = loss_matrix(baseline, item_ids, protocol.draws, "loss", "baseline_losses")
    n = len(item_ids)
    sims = read_tables(store, "similarity_scores")
    qids = sorted(q for q in sims["query_id"].unique().to_list() if q.startswith("demo-artist-"))[: args.queries]
    t0 = time.perf_counter()
    grads = gradient_store(adapter, [items], protocol, settings.param_subset, compute, k=args.k, fisher=fisher,
                           damping=settings.damping)
    print(f"N={n}, K={protocol.draws}, {len(qids)} queries; gradient store {time.perf_counter() - t0:.0f} s (k={args.k}); "
          f"default configuration: target ×{settings.target_ratio}, score {settings.score_type}")
    rows: list[dict] = []
    for qid in qids:
        result = unlearn(adapter, query_batch(store, qid, record.encoder_id), fisher, settings, protocol, compute, n)
        fn = unlearned_losses_fn(adapter, items, result.delta, protocol, compute)
        after = fn(np.arange(n), 0, protocol.draws)
        exact = attribution_scores(l0, after, settings.score_type)
        cached = lambda idx, a, b: after[idx, a:b]  # noqa: E731  (the same losses two-stage would compute)
        lin = linearized_scores(grads, result.delta)
        q = sims.filter(pl.col("query_id") == qid)
        signal = lambda m: q.filter(pl.col("method") == m).sort(pl.col("item_id").replace_strict(  # noqa: E731
            {i: j for j, i in enumerate(item_ids)}, default=None))["score"].to_numpy()
        signals = {"internal": signal("similarity:internal"), "audio": signal("similarity:audio"), "linearized": lin}
        lin_rank = np.argsort(np.argsort(-lin)) + 1
        row = {"query_id": qid, "ratio": result.loss_ratio, "lin_spearman": spearmanr(lin, exact["score"])[0],
               "lin_jaccard10": jaccard10(lin_rank, exact["rank"])}
        top10 = np.argsort(exact["rank"])[:10]
        for name, sig in signals.items():
            rank = np.argsort(np.argsort(-sig))
            row[f"recall_top10_in_top25pct_{name}"] = float(np.mean(rank[top10] < 0.25 * n))
        for top, first, keep in SETTINGS:
            staged = two_stage(l0, cached, signals, top=top, first_draws=first, keep=keep, score_type=settings.score_type)
            full = staged.draws_used == protocol.draws
            row[f"{top}/{first}/{keep}"] = (jaccard10(staged.rank, exact["rank"]),
                                            spearmanr(staged.score[full], exact["score"][full])[0],
                                            staged.item_draws / (n * protocol.draws))
        rows.append(row)
        print(f"{qid}: query loss ×{result.loss_ratio:.3f}; linearized Spearman {row['lin_spearman']:.3f}, "
              f"Jaccard@10 {row['lin_jaccard10']:.2f}; " + ", ".join(
                  f"two-stage {s}: J@10 {row[s][0]:.2f}" for s in (f"{t}/{f}/{k}" for t, f, k in SETTINGS)))
    out: dict = {"items": n, "queries": len(rows), "seconds": round(time.perf_counter() - start)}
    out["linearized_spearman"] = round(float(np.mean([r["lin_spearman"] for r in rows])), 3)
    out["linearized_top10_jaccard"] = round(float(np.mean([r["lin_jaccard10"] for r in rows])), 3)
    for name in signals:
        out[f"recall_top10_in_top25pct_{name}"] = round(float(np.mean([r[f"recall_top10_in_top25pct_{name}"] for r in rows])), 3)
    for top, first, keep in SETTINGS:
        s = f"{top}/{first}/{keep}"
        j, sp, cost = (float(np.mean([r[s][i] for r in rows])) for i in range(3))
        print(f"two-stage candidates {top:.0%} per signal, {first} first draws, {keep:.0%} survivors: "
              f"top-10 Jaccard {j:.3f} (min {min(r[s][0] for r in rows):.2f}), Spearman over rescored {sp:.3f}, "
              f"cost {cost:.1%} of full exact")
        out[f"two_stage_{s}"] = {"top10_jaccard": round(j, 3), "spearman_rescored": round(sp, 3), "cost": round(cost, 3)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
