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
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import spearmanr

from tda_assets.attribution.adapter import DiTAdapter, ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.gradients import GradientSpec, GradientStore, gradient_store
from tda_assets.attribution.linearized import linearized_scores
from tda_assets.attribution.multifidelity import TwoStageResult, UnlearnedLosses, two_stage, unlearned_losses_fn
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import attribution_scores
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.unlearn import UnlearningResult, unlearn
from tda_assets.defs.fast_paths import cheap_signals
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
from tda_assets.io.gradients import read_gradient_store
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


def top10_recall(rank: np.ndarray, exact_rank: np.ndarray) -> float:
    """The share of the exact top-10 (by `exact_rank`, 1 = first) that `rank` puts in its own top-10."""
    return len(set(np.argsort(rank)[:10]) & set(np.argsort(exact_rank)[:10])) / 10


@dataclass
class RootScoring:
    """A storage root's model and training side, read once to score its queries outside Dagster as the
    per-configuration assets do: the default configuration, the loss protocol, the items in baseline order."""

    root: Storage
    compute: Compute
    settings: UnlearningSettings
    protocol: LossProtocol
    adapter: DiTAdapter
    identity: Identity
    encoder_id: str
    fisher: dict[str, torch.Tensor]
    item_ids: list[str]
    items: ItemBatch
    baseline: np.ndarray  # [N, K] per-draw losses at θ0
    gradients: GradientStore
    grads_s: float  # seconds to build (k given) or read (k None) the gradient store

    @property
    def n(self) -> int:
        return len(self.item_ids)


def read_root(root_url: str, protocol: LossProtocol, k: int | None = 4096) -> RootScoring:
    """The root's checkpoint, Fisher, baseline losses and features; the training gradients built here at sketch
    dimension `k`, or with `k` None the default configuration's store the root holds (`training_gradients`)."""
    root, compute, settings = Storage(root_url), Compute(), UnlearningSettings()
    adapter, record = load_checkpoint(root, ModelSource(), compute.device)
    identity = Identity(record.checkpoint_id, protocol.protocol_id)
    fisher = read_fisher(root, identity)
    baseline = read_baseline(root, identity, record.encoder_id)
    item_ids = baseline_item_ids(baseline)
    data = all_features(root, record.encoder_id)
    position = {i: j for j, i in enumerate(data.item_ids)}
    items = data.select([position[i] for i in item_ids])
    l0 = loss_matrix(baseline, item_ids, protocol.draws, "loss", "baseline_losses")
    t0 = time.perf_counter()
    if k is None:
        spec = GradientSpec.for_settings(settings)
        gradients = read_gradient_store(root, identity, spec, fisher, record.encoder_id, item_ids)
    else:
        gradients = gradient_store(
            adapter, [items], protocol, settings.param_subset, compute, k=k, fisher=fisher, damping=settings.damping
        )
    grads_s = time.perf_counter() - t0
    encoder_id = record.encoder_id
    return RootScoring(
        root,
        compute,
        settings,
        protocol,
        adapter,
        identity,
        encoder_id,
        fisher,
        item_ids,
        items,
        l0,
        gradients,
        grads_s,
    )


@dataclass
class QueryScoring:
    """One query under the default configuration: its unlearning, the full exact rescore of every item, the
    first-order estimate g_iᵀδ of mean ΔL, the product's cheap signals, and the seconds of each."""

    query_id: str
    result: UnlearningResult
    unlearned: np.ndarray  # [N, K] per-draw losses under the unlearned model
    exact: dict[str, np.ndarray]  # the attribution_scores columns of the full rescore
    first_order: np.ndarray  # linearized g_iᵀδ per item
    signals: dict[str, np.ndarray]  # fast_paths.cheap_signals, named internal, audio, linearized
    seconds: dict[str, float]  # unlearn, exact (rescoring every item), linearized (g_iᵀδ), signals (all three)


def score_query(ctx: RootScoring, query_id: str) -> QueryScoring:
    """Unlearn the query once, rescore every item exactly, and compute its first-order scores and cheap signals."""
    s, n = ctx.settings, ctx.n
    query = query_batch(ctx.root, query_id, ctx.encoder_id)
    result = unlearn(ctx.adapter, query, ctx.fisher, s, ctx.protocol, ctx.compute, n)
    t0 = time.perf_counter()
    fn = unlearned_losses_fn(ctx.adapter, ctx.items, result.delta, ctx.protocol, ctx.compute)
    after = fn(np.arange(n), 0, ctx.protocol.draws)
    exact_s = time.perf_counter() - t0
    exact = attribution_scores(ctx.baseline, after, s.score_type, ctx.gradients.item_norms)
    t0 = time.perf_counter()
    first_order = linearized_scores(ctx.gradients, result.delta)
    linearized_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    # as the product's two-stage: the similarities as they are, the linearised signal scored as the configuration's
    # score (normalized: over the same floored item norms)
    norms = ctx.gradients.item_norms
    signals = cheap_signals(
        ctx.root, ctx.identity, query_id, result.delta, ctx.item_ids, ctx.gradients, ctx.baseline, s.score_type, norms
    )
    signals_s = time.perf_counter() - t0
    seconds = {"unlearn": result.seconds, "exact": exact_s, "linearized": linearized_s, "signals": signals_s}
    named = {name.removeprefix("similarity:"): v for name, v in signals.items()}
    return QueryScoring(query_id, result, after, exact, first_order, named, seconds)


def cached_losses(q: QueryScoring) -> UnlearnedLosses:
    """The losses two-stage would compute, read from the full rescore (the same function of the same draws)."""
    return lambda idx, a, b: q.unlearned[idx, a:b]


def staged(
    ctx: RootScoring,
    q: QueryScoring,
    top: int | float,
    first_draws: int,
    keep: int | float,
    losses: UnlearnedLosses | None = None,
) -> TwoStageResult:
    """Two-stage scoring of the query's unlearning with its cheap signals (`top`, `keep`: counts or fractions), from
    `losses` (default: the full rescore's)."""
    return two_stage(
        ctx.baseline,
        losses or cached_losses(q),
        q.signals,
        top=top,
        first_draws=first_draws,
        keep=keep,
        min_keep=ctx.settings.min_keep,
        score_type=ctx.settings.score_type,
        item_norms=ctx.gradients.item_norms,
    )


def demo_agreement(root_url: str, n_queries: int = 8, draws: int = 16, k: int = 4096) -> dict:
    """Per-setting two-stage agreement and cost, and linearized agreement, against full exact on the root's demo
    queries."""
    start = time.perf_counter()
    ctx = read_root(root_url, LossProtocol(seed=0, draws=draws), k)
    n, settings = ctx.n, ctx.settings
    sims = read_tables(ctx.root, "similarity_scores")
    qids = sorted(q for q in sims["query_id"].unique().to_list() if q.startswith("demo-artist-"))[:n_queries]
    print(
        f"demo agreement: N={n}, K={ctx.protocol.draws}, {len(qids)} queries; gradient store "
        f"{ctx.grads_s:.0f} s (k={k}); default configuration: target ×{settings.target_ratio}, "
        f"score {settings.score_type}"
    )
    rows: list[dict] = []
    for qid in qids:
        q = score_query(ctx, qid)
        exact, lin, signals = q.exact, q.first_order, q.signals
        row = {
            "ratio": q.result.loss_ratio,
            "lin_spearman": spearmanr(lin, exact["mean_delta"])[0],
            "lin_jaccard10": jaccard10(rank_of(lin), rank_of(exact["mean_delta"])),
        }
        top10 = np.argsort(exact["rank"])[:10]
        for name, sig in signals.items():
            row[f"recall_{name}"] = float(np.mean(np.argsort(np.argsort(-sig))[top10] < 0.25 * n))
        for top, first, keep in SETTINGS:
            result = staged(ctx, q, top, first, keep)
            full = result.draws_used == ctx.protocol.draws
            row[(top, first, keep)] = (
                jaccard10(result.rank, exact["rank"]),
                spearmanr(result.score[full], exact["score"][full])[0],
                result.item_draws / (n * ctx.protocol.draws),
            )
        rows.append(row)
        print(
            f"  {qid}: query loss ×{q.result.loss_ratio:.3f}; linearized Spearman {row['lin_spearman']:.3f} "
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
