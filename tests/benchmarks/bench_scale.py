"""Scale benchmark of the engine (run on demand): forward efficiency, per-query cost of the three scoring paths, and
their agreement with the full exact rescore. The last line printed is one JSON object.

Cost figures use the default embedded model with random latents (cost does not depend on the weights' values);
agreement figures use a tiny model trained for a few seconds (tests/tiny_model.py). Timings are medians of repeats;
other jobs may share the cores, so the load average is printed with them.

Forward efficiency, measured 2026-11-26 (torch 2.13 CPU, AVX-512 incl. bf16, 2 MiB L2 per core; other jobs kept the
load average at 5–7, so 1-thread figures are the stable ones): fp32 2048² mm 74–113 GFLOP/s per thread; the embedded
denoiser costs 161 MFLOP per row and ran at 50–61 GFLOP/s with 16–64 rows per forward, 46 at 512 and 32 at 1024 rows
(the feed-forward intermediate [rows·65, 1024] leaves L2). Profile at 256 rows: matmuls 51% of the time (the FF ones,
inner dim 128, reach ~67 GFLOP/s), bias broadcast-copy inside addmm 11%, SDPA 12%, SiLU/mul (SwiGLU, rotary) 15%,
cat/LayerNorm/add 6%: the gap to the matmul peak is memory-bound elementwise work. Tried without gain: torch.compile
(49 s compile, recompiles per shape, 269 vs 338 rows/s at 64 rows), the math SDPA backend instead of flash (equal).
bf16 autocast is not fp32-equivalent. So losses.py/adapter.py are unchanged; the lever is the forward batch size
(`Compute.batch_size`, TDA_BATCH_SIZE): 32–64 rows beat 256 by 15–33% at 1 thread (round-robin medians: 259, 250,
215, 194 rows/s at 32, 64, 128, 256 rows). With 2 threads on oversubscribed cores
the forward collapsed to 11–74 rows/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.utils.flop_counter import FlopCounterMode

from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.devices import Compute
from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.models.embedded.model import EmbeddedAdapter
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.gradients import GradientStore, gradient_store
from tda_assets.attribution.linearized import linearized_query, linearized_scores
from tda_assets.attribution.losses import batch_losses
from tda_assets.attribution.multifidelity import two_stage, unlearned_losses_fn
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import attribution_scores
from tda_assets.attribution.similarity import audio_embedding, cosine_scores, internal_embedding
from tda_assets.attribution.unlearn import UnlearningSettings, unlearn
from tda_assets.defs.configs import load_grid

SHIPPED = next(c for c in load_grid() if c.config_id == "two-stage").settings()  # the grid's `two-stage` entry
TOP, KEEP = SHIPPED.count_or_fraction(SHIPPED.candidates), SHIPPED.count_or_fraction(SHIPPED.keep)
FIRST_DRAWS_DIV = 16 // SHIPPED.first_draws  # its first draws as a share of K (4 of 16), for protocols of other K
SHIPPED_TWO_STAGE = f"{TOP}/{SHIPPED.first_draws}/{KEEP}"  # the same, as bench_demo_agreement.SETTINGS names it


def shipped_two_stage(baseline: np.ndarray, fn, signals: dict, draws: int):
    """The grid's `two-stage` plan at N = len(baseline): its candidate count there, its first draws as a share of K."""
    top = SHIPPED.candidates_per_signal(len(baseline))
    return two_stage(baseline, fn, signals, top=top, first_draws=draws // FIRST_DRAWS_DIV, keep=KEEP)


def median_s(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def random_items(adapter: EmbeddedAdapter, n: int, seed: int = 0) -> ItemBatch:
    g = torch.Generator().manual_seed(seed)
    c, t = adapter.latent_shape
    cond = {
        "encoder_hidden_states": torch.randn(n, 24, 384, generator=g),
        "global_hidden_states": torch.randn(n, 1, 384, generator=g),
    }
    return ItemBatch([f"s{seed}-{i:05d}" for i in range(n)], torch.randn(n, c, t, generator=g), cond, torch.ones(n, t))


def jaccard10(a: np.ndarray, b_rank: np.ndarray) -> float:
    x, y = set(np.argsort(-a)[:10]), set(np.argsort(b_rank)[:10])
    return len(x & y) / len(x | y)


def forward_figures(adapter: EmbeddedAdapter, batch_sizes: list[int], rounds: int = 5, n: int = 2048) -> dict:
    """Matmul peak (n² mm), bare forward GFLOP/s per batch size, pipeline (batch_losses) throughput and its ratio to
    bare."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    matmul = 2 * n**3 / median_s(lambda: torch.mm(a, b)) / 1e9
    print(f"fp32 matmul peak ({n}² mm):  {matmul:8.1f} GFLOP/s")
    items = random_items(adapter, 32)
    proto = LossProtocol(draws=16)
    out: dict = {"matmul_gflops": matmul, "bare": {}, "pipeline": {}}
    inputs, flops = {}, 0.0
    for bs in batch_sizes:
        x = items.latents[:1].repeat(bs, 1, 1)
        cond = {k: v[:1].repeat(bs, *[1] * (v.dim() - 1)) for k, v in items.conditioning.items()}
        inputs[bs] = (x, torch.rand(bs), cond)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            adapter.predict(*inputs[bs])
        flops = counter.get_total_flops() / bs
    bare_t: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    pipe_t: dict[int, list[float]] = {bs: [] for bs in batch_sizes}
    for _ in range(rounds):  # round-robin over batch sizes, so load from other jobs hits every size alike
        for bs in batch_sizes:
            with torch.no_grad():
                bare_t[bs].append(median_s(lambda bs=bs: adapter.predict(*inputs[bs]), 1))
            pipe_t[bs].append(median_s(lambda bs=bs: batch_losses(adapter, items, proto, Compute(batch_size=bs)), 1))
    for bs in batch_sizes:
        bare, pipe = bs / statistics.median(bare_t[bs]), len(items) * proto.draws / statistics.median(pipe_t[bs])
        out["bare"][bs], out["pipeline"][bs] = bare * flops / 1e9, pipe
        print(
            f"forward bs {bs:4d}: {flops / 1e6:.1f} MFLOP/row, bare {bare:6.0f} rows/s = "
            f"{bare * flops / 1e9:6.1f} GFLOP/s, pipeline {pipe:6.0f} item-draws/s (pipeline/bare {pipe / bare:.2f})"
        )
    best = max(out["bare"], key=out["bare"].get)
    out["best_bs"], out["flops_per_row"] = best, flops
    out["forward_gflops"] = out["bare"][best]
    out["pipeline_over_bare"] = out["pipeline"][best] / (out["bare"][best] * 1e9 / flops)
    return out


def cost_figures(adapter: EmbeddedAdapter, n_demo: int, n_big: int, bs: int, k: int) -> dict:
    """Per-query seconds of full exact, two-stage and linearized at N = n_demo (measured) and n_big."""
    proto, compute = LossProtocol(draws=16), Compute(batch_size=bs)
    settings = UnlearningSettings()
    demo = random_items(adapter, n_demo)
    fisher = fisher_diagonal(adapter, [demo], proto, settings.param_subset, compute, max_items=8)
    query = random_items(adapter, 1, seed=7)
    result = unlearn(adapter, query, fisher, settings, proto, compute, n_demo)
    t_unlearn = median_s(lambda: unlearn(adapter, query, fisher, settings, proto, compute, n_demo), 3)
    print(f"unlearn (newton, {settings.query_draws} query draws): {t_unlearn:.2f} s/query")

    # gradient store: build rate and size (per item), then a synthetic store of n_big rows for the query cost
    t0 = time.perf_counter()
    gradients = gradient_store(
        adapter, [demo.select(slice(0, 32))], proto, settings.param_subset, compute, k=k, fisher=fisher
    )
    per_item = (time.perf_counter() - t0) / 32
    print(
        f"gradient store: {1 / per_item:.2f} items/s (D={gradients.sketch.dim}, k={k}), {gradients.bytes_per_item} "
        "bytes/item "
        f"→ {n_big * per_item / 3600:.2f} h and {n_big * gradients.bytes_per_item / 1e6:.0f} MB for {n_big} items"
    )

    def linearized_cost(n: int) -> float:
        big = GradientStore(
            [f"x{i}" for i in range(n)],
            torch.randn(n, k),
            gradients.param_subset,
            gradients.protocol_id,
            gradients.masked,
            k,
            gradients.seed,
            gradients.sizes,
            gradients.scale,
            gradients.damping,
        )
        big.sketch  # noqa: B018  (built once per store, not per query)
        return t_unlearn + median_s(lambda: linearized_scores(big, result.delta), 3)

    out = {"unlearn_s": t_unlearn, "store_items_per_s": 1 / per_item, "store_bytes_per_item": gradients.bytes_per_item}
    for n, label in ((n_demo, "demo"), (n_big, "10k")):
        items = demo if n == n_demo else random_items(adapter, n, seed=1)
        base = np.zeros((n, proto.draws))  # baseline losses are precomputed; their values do not change the cost
        fn = unlearned_losses_fn(adapter, items, result.delta, proto, compute)
        shared = np.random.default_rng(0).standard_normal(n)  # correlated real signals: see agreement
        signals = {name: shared for name in ("internal", "audio", "linearized")}
        start = time.perf_counter()
        staged = shipped_two_stage(base, fn, signals, proto.draws)
        t_stage = t_unlearn + time.perf_counter() - start
        if n == n_demo:
            start = time.perf_counter()
            fn(np.arange(n), 0, proto.draws)
            t_exact = t_unlearn + time.perf_counter() - start
            rate = n * proto.draws / (t_exact - t_unlearn)
            exact_note = "measured"
        else:
            t_exact = t_unlearn + n * proto.draws / rate
            exact_note = f"extrapolated from {rate:.0f} item-draws/s measured at N={n_demo}"
        if n == n_big:  # at catalogue scale a candidate count (the demo's 10% of N) instead of a fraction of N
            count = int(TOP * n_demo)
            start = time.perf_counter()
            by_count = two_stage(base, fn, signals, top=count, first_draws=proto.draws // FIRST_DRAWS_DIV, keep=KEEP)
            t_count = t_unlearn + time.perf_counter() - start
            print(
                f"N={n:6d}: two-stage with {count} candidates per signal {t_count:7.1f} s/query (measured, "
                f"{by_count.item_draws} item-draws = {by_count.item_draws / (n * proto.draws):.2%} of exact)"
            )
        t_lin = linearized_cost(n)
        print(
            f"N={n:6d}: exact {t_exact:8.1f} s/query ({exact_note}); two-stage {t_stage:7.1f} s/query (measured, "
            f"{staged.item_draws} item-draws = {staged.item_draws / (n * proto.draws):.1%} of exact); "
            f"linearized {t_lin:6.2f} s/query (measured: unlearn + [N, k]·[k])"
        )
        out[label] = {
            "exact_s": t_exact,
            "two_stage_s": t_stage,
            "linearized_s": t_lin,
            "exact_measured": n == n_demo,
            **({"two_stage_count_s": t_count, "two_stage_count": count} if n == n_big else {}),
        }
    return out


def agreement_figures(queries_n: int, k: int) -> dict:
    """Two-stage and linearized against the full exact rescore on a tiny trained model."""
    from tests.tiny_model import PROTOCOL, tiny_trained

    adapter, train, queries, fisher, l0 = tiny_trained()
    n, compute = len(train), Compute()
    stores = {
        "sketched": gradient_store(adapter, [train], PROTOCOL, "all", compute, k=k, fisher=fisher),
        "unsketched": gradient_store(adapter, [train], PROTOCOL, "all", compute, k=None),
    }
    internal = internal_embedding(adapter, train, PROTOCOL, compute)
    rows: dict[str, list] = {}
    for q in range(queries_n):
        query = queries.select([q])
        for step, lr in (("tiny", 3.0), ("moderate", 50.0)):
            settings = UnlearningSettings(lr=lr, query_draws=16, target_ratio=None, score_type="mean_delta")
            lin, result = linearized_query(adapter, query, fisher, settings, PROTOCOL, compute, n, stores["sketched"])
            fn = unlearned_losses_fn(adapter, train, result.delta, PROTOCOL, compute)
            exact = attribution_scores(l0, fn(np.arange(n), 0, PROTOCOL.draws))["score"]
            full_lin = linearized_scores(stores["unsketched"], result.delta)
            signals = {
                "internal": cosine_scores(internal_embedding(adapter, query, PROTOCOL, compute), internal).numpy(),
                "audio": cosine_scores(audio_embedding(query), audio_embedding(train)).numpy(),
                "linearized": lin,
            }
            staged = shipped_two_stage(l0, fn, signals, PROTOCOL.draws)
            full = staged.draws_used == PROTOCOL.draws
            rows.setdefault(step, []).append(
                {
                    "ratio": result.loss_ratio,
                    "lin_spearman": spearmanr(lin, exact)[0],
                    "lin_jaccard10": jaccard10(lin, np.argsort(np.argsort(-exact))),
                    "unsketched_spearman": spearmanr(full_lin, exact)[0],
                    "two_stage_jaccard10": jaccard10(exact, staged.rank),
                    "two_stage_spearman_rescored": spearmanr(staged.score[full], exact[full])[0],
                    "two_stage_cost": staged.item_draws / (n * PROTOCOL.draws),
                }
            )
    summary = {}
    for step, rs in rows.items():
        mean = {key: float(np.mean([r[key] for r in rs])) for key in rs[0]}
        summary[step] = mean
        print(
            f"agreement, {step} step "
            f"(query loss ×{min(r['ratio'] for r in rs):.4f}–×{max(r['ratio'] for r in rs):.4f}, "
            f"{len(rs)} queries, N={n}, tiny model D={stores['sketched'].sketch.dim}, k={k}): "
            + ", ".join(f"{key} {v:.3f}" for key, v in mean.items() if key != "ratio")
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demo-items", type=int, default=320)
    parser.add_argument("--big-items", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=3)
    parser.add_argument(
        "--root",
        default="dagster_home/storage",
        help="a storage root where `make demo` ran: agreement is then measured on its queries (N = 320)",
    )
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's; 1 is the stable figure on shared cores)"
    )
    parser.add_argument("--batch-sizes", default="32,64,128,256", help="forward batch sizes timed (comma-separated)")
    parser.add_argument("--rounds", type=int, default=5, help="round-robin rounds of the forward timings")
    parser.add_argument("--matmul-n", type=int, default=2048, help="side of the square matmul of the fp32 peak")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    adapter = EmbeddedAdapter.new()
    adapter.denoiser.eval()
    fwd = forward_figures(adapter, [int(b) for b in args.batch_sizes.split(",")], args.rounds, args.matmul_n)
    cost = cost_figures(adapter, args.demo_items, args.big_items, fwd["best_bs"], args.k)
    agree = agreement_figures(args.queries, args.k)
    demo = None
    if Storage(args.root).exists(key("checkpoint_record")):
        from tests.benchmarks.bench_demo_agreement import demo_agreement

        demo = demo_agreement(args.root, k=args.k)
    else:
        print(f"no demo root at {args.root}: agreement below is the tiny model's only (run `make demo` first)")
    print(f"total {time.perf_counter() - start:.0f} s, load average {os.getloadavg()[0]:.1f}")
    shipped = demo["two_stage"][SHIPPED_TWO_STAGE] if demo else None
    print(
        json.dumps(
            {
                "matmul_gflops": round(fwd["matmul_gflops"], 1),
                "forward_gflops": round(fwd["forward_gflops"], 1),
                "forward_best_batch_rows": fwd["best_bs"],
                "pipeline_over_bare": round(fwd["pipeline_over_bare"], 3),
                "exact_s_per_query_demo": round(cost["demo"]["exact_s"], 2),
                "two_stage_s_per_query_demo": round(cost["demo"]["two_stage_s"], 2),
                "linearized_s_per_query_demo": round(cost["demo"]["linearized_s"], 3),
                "exact_s_per_query_10k": round(cost["10k"]["exact_s"], 1),
                "exact_10k_extrapolated": True,
                "two_stage_s_per_query_10k": round(cost["10k"]["two_stage_s"], 1),
                "two_stage_s_per_query_10k_by_count": round(cost["10k"]["two_stage_count_s"], 1),
                "two_stage_10k_candidates_per_signal": cost["10k"]["two_stage_count"],
                "linearized_s_per_query_10k": round(cost["10k"]["linearized_s"], 3),
                "gradient_store_items_per_s": round(cost["store_items_per_s"], 2),
                "gradient_store_bytes_per_item": cost["store_bytes_per_item"],
                # agreement on the demo's queries when a demo root exists, else on the tiny model
                "agreement_on": f"demo queries (N={demo['items']}, {demo['queries']} queries)"
                if demo
                else "tiny model",
                "two_stage_top10_jaccard": shipped["top10_jaccard"]
                if demo
                else round(agree["moderate"]["two_stage_jaccard10"], 3),
                "two_stage_spearman_rescored": shipped["spearman_rescored"]
                if demo
                else round(agree["moderate"]["two_stage_spearman_rescored"], 3),
                "linearized_spearman": demo["linearized_spearman"] if demo else round(agree["tiny"]["lin_spearman"], 3),
                "linearized_top10_jaccard": demo["linearized_top10_jaccard"]
                if demo
                else round(agree["tiny"]["lin_jaccard10"], 3),
                "tiny_model_two_stage_top10_jaccard": round(agree["moderate"]["two_stage_jaccard10"], 3),
                "tiny_model_linearized_spearman_tiny_step": round(agree["tiny"]["lin_spearman"], 3),
                "tiny_model_linearized_spearman_unsketched": round(agree["tiny"]["unsketched_spearman"], 3),
                "tiny_model_linearized_spearman_moderate_step": round(agree["moderate"]["lin_spearman"], 3),
                **({"demo_two_stage_settings": demo["two_stage"]} if demo else {}),
            }
        )
    )


if __name__ == "__main__":
    main()
