"""The normalized score's floor (`NORM_FLOOR`) chosen on development targets, and two-stage's linearized signal raw or
scored as the configuration's score, on the tests' corpus model (run on demand, about 20 min on a busy 2-core box).

Trains the embedded model on the tests' corpus (16 clips × 8 artists, 500 steps, as tests/conftest.py), computes the
Fisher and the default's sketched gradient store (its item norms), and unlearns each development target
(`choose_targets(16, seed 0)`) as its own query with the default configuration; every item is rescored at every
protocol draw (`attribute_exact`). Per floor fraction of the median norm: R, the targets ranked first, and the mean
share of the top-10 in the lowest-norm decile. Then two-stage at the shipped candidate share (internal and audio
similarity plus the linearized signal, raw or divided by the floored norms) against the full rescore: top-10 Jaccard,
the share of the exact top-10 among the candidates, cost. The last line is one JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python -m tests.benchmarks.bench_norm_floor

The defaults are the measured run; `--clips-per-artist`, `--steps`, `--targets` and `--draws` shrink it.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from tda_assets.attribution.exact import attribute_exact
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.gradients import gradient_store
from tda_assets.attribution.linearized import linearized_scores
from tda_assets.attribution.losses import batch_losses
from tda_assets.attribution.multifidelity import two_stage
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import (
    attribution_scores,
    low_norm_share,
    norm_divisor,
    rank_descending,
    score_columns,
)
from tda_assets.attribution.self_influence import choose_targets
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.similarity import audio_embedding, cosine_scores, internal_embedding
from tda_assets.data.corpus import generate_corpus
from tests.corpus_model import CLIPS_PER_ARTIST, STEPS, train_on_corpus

FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)


def two_stage_agreement(l0, after, exact_rank, signals, norms, settings, draws) -> dict[str, float]:
    staged = two_stage(
        l0,
        lambda idx, a, b: after[idx, a:b],
        signals,
        top=settings.candidates,
        first_draws=draws // 4,
        keep=settings.keep,
        score_type="normalized",
        item_norms=norms,
    )
    top_exact, top_staged = set(np.argsort(exact_rank)[:10]), set(np.argsort(staged.rank)[:10])
    return {
        "jaccard10": len(top_exact & top_staged) / len(top_exact | top_staged),
        "recall10": len(top_exact & set(np.flatnonzero(staged.rescored))) / 10,
        "cost": staged.item_draws / after.size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips-per-artist", type=int, default=CLIPS_PER_ARTIST, help="clips of each of 8 artists")
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps of the embedded model")
    parser.add_argument("--targets", type=int, default=16, help="development targets: choose_targets(n, seed 0)")
    parser.add_argument("--draws", type=int, default=16, help="protocol draws K")
    args = parser.parse_args()
    print(json.dumps(measure(args.clips_per_artist, args.steps, args.targets, args.draws)))


def measure(clips_per_artist: int, steps: int, n_targets: int, draws: int) -> dict:
    """The floor table and the two-stage agreement (see the module docstring), as one dict."""
    start = time.perf_counter()
    rows = generate_corpus(tempfile.mkdtemp(), clips_per_artist=clips_per_artist, seed=0)
    adapter, batch = train_on_corpus(rows, steps)  # the tests' session model (tests/conftest.py `trained`)
    ids, compute, settings = batch.item_ids, Compute(), UnlearningSettings()
    protocol = LossProtocol(seed=0, draws=draws)
    fisher = fisher_diagonal(adapter, [batch], protocol, "all", compute, max_items=64)
    gradients = gradient_store(
        adapter,
        [batch],
        protocol,
        settings.param_subset,
        compute,
        k=settings.sketch_k,
        fisher=fisher,
        damping=settings.damping,
    )
    norms = gradients.item_norms
    internal, audio = internal_embedding(adapter, batch, protocol, compute), audio_embedding(batch)
    l0 = batch_losses(adapter, batch, protocol, compute).loss.numpy().astype(np.float64)
    targets = [ids.index(i) for i in choose_targets(audio.numpy(), ids, n_targets, seed=0)]
    print(
        f"setup {time.perf_counter() - start:.0f} s; N {len(ids)}; item norms median {np.median(norms):.4g}, "
        f"min {norms.min():.4g}, max {norms.max():.4g}",
        flush=True,
    )
    afters, ratios, stage = [], [], {"raw": [], "normalized": []}
    for t in targets:
        query = batch.select([t])
        s, result, after = attribute_exact(adapter, query, batch, l0, fisher, settings, protocol, compute, norms)
        ratios.append(result.loss_ratio)
        print(
            f"  target {ids[t]}: ×{result.loss_ratio:.3f} on the protocol draws (search ×{result.search_ratio:.3f})"
            + ("" if result.passed else ": FAILED the minimum"),
            flush=True,
        )
        if after is None:
            continue
        afters.append((t, after))
        lin = linearized_scores(gradients, result.delta)
        sims = {
            "internal": cosine_scores(internal_embedding(adapter, query, protocol, compute), internal).numpy(),
            "audio": cosine_scores(audio_embedding(query), audio).numpy(),
        }
        scored = score_columns(l0, "normalized", norms, mean_delta=lin)["score"]  # as fast_paths.cheap_signals
        for name, signal in (("raw", lin), ("normalized", scored)):
            stage[name].append(
                two_stage_agreement(
                    l0, after, s["rank"], {**sims, "linearized": signal}, norms, settings, protocol.draws
                )
            )
    out: dict = {
        "items": len(ids),
        "targets": len(targets),
        "failed": len(targets) - len(afters),
        "loss_ratios": [round(r, 4) for r in ratios],
        "by_floor": {},
    }
    for frac in FRACTIONS:
        ranks, low = [], []
        for t, after in afters:
            rank = rank_descending(attribution_scores(l0, after)["mean_delta"] / norm_divisor(norms, frac))
            ranks.append(int(rank[t]))
            low.append(low_norm_share(rank, norms, 10))
        if not ranks:  # every unlearning failed the minimum: nothing ranked
            continue
        r = np.array(ranks)
        out["by_floor"][frac] = {
            "R": round(float(r.mean()), 3),
            "first": int((r == 1).sum()),
            "top10_low_norm_share": round(float(np.mean(low)), 3),
        }
        print(
            f"floor {frac:.2f} × median: R {r.mean():.3f}, first {(r == 1).sum()}/{len(r)}, "
            f"top-10 in the lowest-norm decile {np.mean(low):.3f}; ranks {ranks}",
            flush=True,
        )
    for score_type in ("mean_delta", "skew") if afters else ():
        r = np.array([int(attribution_scores(l0, a, score_type)["rank"][t]) for t, a in afters])
        out[score_type] = {"R": round(float(r.mean()), 3), "first": int((r == 1).sum())}
    for name, rows in stage.items() if afters else ():
        out[f"two_stage_{name}"] = {
            m: round(float(np.mean([r[m] for r in rows])), 3) for m in ("jaccard10", "recall10", "cost")
        }
        out[f"two_stage_{name}"]["jaccard10_min"] = round(float(min(r["jaccard10"] for r in rows)), 3)
        print(f"two-stage (candidates {settings.candidates:.0%}, linearized signal {name}): {out[f'two_stage_{name}']}")
    out["seconds"] = round(time.perf_counter() - start)
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))
    main()
