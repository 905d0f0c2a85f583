"""The GPU benchmark at Stable Audio Open's shapes (DESIGN §4): one prepared run, one JSON line printed last.

    python -m tests.benchmarks.bench_gpu            # real shapes, random weights; ≈ 4–6 min on one H100 (budget 8)
    python -m tests.benchmarks.bench_gpu --tiny     # the same code at tiny shapes on CPU (tests/test_bench_gpu.py)

Everything runs through the product's own code: the `StableAudioAdapter` (built by `build_real_size.real_size_adapter`,
diffusers' default `StableAudioDiTModel`, 1.057 B parameters over 1024 latent frames of 64 channels), `batch_losses`,
`fisher_diagonal`, `unlearn` (one Newton step with the target-ratio search), `gradient_store` and `Compute`. Weights
are random: they change the answers, not the shapes, memory or time. Latents are random; the conditioning comes from
the adapter's own T5 + projection encoders.

Measured: item-draws/s of `batch_losses` per rows-per-pass under bf16 autocast (best reported) and fp32; achieved
TFLOP/s (FLOPs of one row counted by `FlopCounterMode`) and its share of the dense bf16 peak measured by a matmul in the
same run; peak device memory per phase (GPU: `max_memory_allocated`; CPU: peak RSS); Fisher items/s; one unlearning in
seconds; gradient-store items/s; hours per query at N = 115,000 and K = 16 (full exact, and the shipped two-stage plan
with the three signals' candidate sets taken as disjoint: an upper bound); and, on a few hundred items, how the bf16
and the bf16-split rankings after one real unlearning agree with the fp32 one, and the share of the delta's entries
that vanish in bf16 (θ0 + δ rounds to the same bf16 value as θ0: DESIGN §6; bf16-split keeps them, split.py).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from tda_assets.attribution.adapter import ItemBatch, apply_delta
from tda_assets.attribution.devices import Compute
from tda_assets.attribution.errors import UnlearningStrengthError
from tda_assets.attribution.fisher import fisher_diagonal
from tda_assets.attribution.gradients import gradient_store
from tda_assets.attribution.losses import batch_losses
from tda_assets.attribution.metrics import jaccard_at_k, spearman
from tda_assets.attribution.multifidelity import survivor_count
from tda_assets.attribution.protocol import LossProtocol
from tda_assets.attribution.scores import attribution_scores
from tda_assets.attribution.settings import UnlearningSettings
from tda_assets.attribution.unlearn import unlearn
from tda_assets.models.stable_audio import TINY_WORDS, StableAudioAdapter

CATALOGUE_N, CATALOGUE_K = 115_000, 16  # the paper's catalogue and the product's default draws
SIGNALS = 3  # two_stage's cheap signals: internal and audio similarity, linearized

# Sizes per mode: rows-per-pass sweep, draws, items per phase, rows per backward pass, matmul size.
SIZES = {
    "real": dict(
        sweep=(16, 32, 64, 128),
        passes=4,
        draws=16,
        fisher_items=4,
        gradient_items=4,
        rank_items=256,
        rank_draws=4,
        grad_rows=16,
        fp32_rows=32,
        matmul=8192,
        sketch_k=4096,
    ),
    "tiny": dict(
        sweep=(8, 32),
        passes=4,
        draws=4,
        fisher_items=4,
        gradient_items=4,
        rank_items=48,
        rank_draws=4,
        grad_rows=8,
        fp32_rows=32,
        matmul=512,
        sketch_k=64,
    ),
}


class Memory:
    """Peak memory per phase: the GPU's `max_memory_allocated`, or the process's peak RSS (reset per phase through
    /proc/self/clear_refs where the kernel allows it, else the peak since start)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.by_phase = device, {}

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def _peak_gb(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 1e9
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024 / 1e9
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._reset()
        start = time.perf_counter()
        yield
        self.by_phase[name] = round(self._peak_gb(), 3)
        log(f"{name}: {time.perf_counter() - start:.1f}s, peak {self.by_phase[name]:.2f} GB")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak_tflops(device: torch.device, n: int, repeat: int = 10) -> float:
    """Dense bf16 matmul TFLOP/s (n × n × n), best of `repeat`: the ceiling the forward is held against."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    a @ b
    best = math.inf
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def random_items(adapter: StableAudioAdapter, n: int, seed: int = 0) -> ItemBatch:
    """`n` items: random latents, conditioning from the adapter's own text and duration encoders (8 captions cycled)."""
    g = torch.Generator().manual_seed(seed)
    words = np.random.default_rng(seed).choice(TINY_WORDS, size=(8, 6))
    captions = [" ".join(w) for w in words]
    cond = adapter.encode_text(captions, durations=[adapter.clip_seconds * (0.5 + i / 16) for i in range(8)])
    pick = torch.arange(n) % 8
    latents = torch.randn(n, *adapter.latent_shape, generator=g)
    return ItemBatch(
        [f"b{seed}-{i:05d}" for i in range(n)],
        latents,
        {k: v[pick] for k, v in cond.items()},
        torch.ones(n, adapter.latent_shape[1]),
    )


def flops_per_row(adapter: StableAudioAdapter, items: ItemBatch) -> float:
    """FLOPs of one item-draw forward (matmuls and attention), counted by torch."""
    one = items.select([0])
    device = adapter.device
    cond = {k: v.to(device) for k, v in one.conditioning.items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        adapter.predict(one.latents.to(device), torch.full((1,), 0.5, device=device), cond)
    return float(counter.get_total_flops())


def draws_per_s(adapter, items: ItemBatch, protocol: LossProtocol, compute: Compute) -> float:
    """Item-draws per second of the product's `batch_losses` (one warm-up pass first)."""
    warm = max(1, compute.batch_size // protocol.draws)
    batch_losses(adapter, items.select(slice(0, warm)), protocol, compute)
    sync(compute.torch_device)
    start = time.perf_counter()
    batch_losses(adapter, items, protocol, compute)
    sync(compute.torch_device)
    return len(items) * protocol.draws / (time.perf_counter() - start)


def vanished_share(adapter: StableAudioAdapter, delta: dict[str, torch.Tensor]) -> float:
    """Share of the delta's non-zero entries with bf16(θ0 + δ) == bf16(θ0): changes a bf16 forward never sees."""
    params = dict(adapter.denoiser.named_parameters())
    vanished = changed = 0
    with torch.no_grad():
        for n, d in delta.items():
            theta = params[n].detach()
            d = d.to(theta.device)
            nonzero = d != 0
            same = (theta + d).bfloat16() == theta.bfloat16()
            vanished += int((same & nonzero).sum())
            changed += int(nonzero.sum())
    return vanished / max(changed, 1)


def two_stage_item_draws(n: int, k: int) -> int:
    """Item-draws of the shipped two-stage plan (UnlearningSettings' two_stage knobs) at `n` items and `k` draws, with
    the three signals' candidate sets taken as disjoint (an upper bound: on the demo their union was ≈ 27% of N)."""
    plan = UnlearningSettings(stage="two_stage")
    first = plan.first_draws or max(1, k // 4)
    cands = min(n, SIGNALS * plan.candidates_per_signal(n))
    keep = survivor_count(cands, plan.count_or_fraction(plan.keep), plan.min_keep)
    return cands * first + keep * (k - first)


def unlearn_once(adapter, query: ItemBatch, fisher, protocol: LossProtocol, compute: Compute, n_train: int):
    """The product default's unlearning (Newton, target ratio ×1.1); a fixed lr if the search cannot reach it on
    random weights (recorded in `unlearn_fallback`)."""
    settings = UnlearningSettings()
    try:
        return unlearn(adapter, query, fisher, settings, protocol, compute, n_train), None
    except UnlearningStrengthError as exc:
        log(f"target-ratio search failed on random weights ({exc}); fixed lr {settings.lr} instead")
        fixed = replace(settings, target_ratio=None)
        return unlearn(adapter, query, fisher, fixed, protocol, compute, n_train), str(exc)


def build(tiny: bool, device: torch.device) -> StableAudioAdapter:
    if tiny:
        return StableAudioAdapter.tiny().to(device)
    from tda_assets.models.build_real_size import real_size_adapter

    return real_size_adapter(device=device)


def run(tiny: bool) -> dict:
    mode = "tiny" if tiny else "real"
    size = SIZES[mode]
    device = torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu")
    mem = Memory(device)
    started = time.perf_counter()
    out: dict = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mode": mode,
        "torch": torch.__version__,
    }
    with mem.phase("build"):
        adapter = build(tiny, device)
    out["params"] = sum(p.numel() for p in adapter.denoiser.parameters())
    out["latent_shape"] = list(adapter.latent_shape)
    out["matmul_bf16_tflops"] = round(matmul_peak_tflops(device, size["matmul"]), 3)

    k = size["draws"]
    bf16, fp32 = LossProtocol(draws=k, precision="bf16"), LossProtocol(draws=k, precision="fp32")
    most = max(size["sweep"]) * size["passes"] // k
    items = random_items(adapter, max(most, size["rank_items"]))
    row_flops = flops_per_row(adapter, items)
    out["tflop_per_item_draw"] = row_flops / 1e12

    sweep = {}
    with mem.phase("forward_bf16"):
        for rows in size["sweep"]:
            compute = Compute(device.type, "bfloat16", rows)
            sweep[str(rows)] = round(
                draws_per_s(adapter, items.select(slice(0, rows * size["passes"] // k)), bf16, compute), 3
            )
            log(f"bf16, {rows} rows per pass: {sweep[str(rows)]:.2f} item-draws/s")
    best = max(sweep, key=sweep.get)
    rate = sweep[best]
    out.update(rows_per_pass=int(best), item_draws_per_s=rate, item_draws_per_s_by_rows=sweep)
    out["tflops"] = round(rate * row_flops / 1e12, 4)
    out["peak_share"] = round(out["tflops"] / out["matmul_bf16_tflops"], 4)
    with mem.phase("forward_fp32"):
        rows32 = min(size["fp32_rows"], int(best))
        rate32 = draws_per_s(
            adapter, items.select(slice(0, 2 * rows32 // k or 1)), fp32, Compute(device.type, None, rows32)
        )
    out.update(item_draws_per_s_fp32=round(rate32, 3), tflops_fp32=round(rate32 * row_flops / 1e12, 4))

    # the GPU default compute: bf16 autocast for the step and the Fisher, `grad_rows` rows per backward pass
    compute = Compute(device.type, "bfloat16" if device.type == "cuda" else None, int(best), size["grad_rows"])
    with mem.phase("fisher"):
        fisher_diagonal(adapter, [items.select([0])], fp32, "all", compute)  # warm-up
        sync(device)
        start = time.perf_counter()
        fisher = fisher_diagonal(adapter, [items.select(slice(1, 1 + size["fisher_items"]))], fp32, "all", compute)
        sync(device)
        out["fisher_items_per_s"] = round(size["fisher_items"] / (time.perf_counter() - start), 4)

    n_rank, k_rank = size["rank_items"], size["rank_draws"]
    ranked = items.select(slice(0, n_rank))
    query = items.select([0])  # the first ranked item unlearned as its own query (self-influence, DESIGN §1)
    with mem.phase("unlearn"):
        result, fallback = unlearn_once(adapter, query, fisher, fp32, compute, n_rank)
    out.update(
        unlearn_s=round(result.seconds, 3),
        unlearn_probes=result.probes,
        unlearn_loss_ratio=result.loss_ratio,
        unlearn_fallback=fallback,
    )

    stamps: list[float] = []
    with mem.phase("gradients"):
        gradient_store(
            adapter,
            [items.select(slice(0, size["gradient_items"] + 1))],
            fp32,
            "all",
            compute,
            k=size["sketch_k"],
            fisher=fisher,
            items_per_pass=1,
            progress=lambda _: (sync(device), stamps.append(time.perf_counter())),
        )
    # the first item carries the CountSketch's construction (O(D), once per store) and the warm-up: rate over the rest
    out["gradient_items_per_s"] = round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 4)

    with mem.phase("ranking"):
        scores = {}
        precisions = (("fp32", "fp32", None), ("bf16", "bf16", "bfloat16"), ("bf16_split", "bf16-split", "bfloat16"))
        for name, precision, autocast in precisions:
            protocol = LossProtocol(draws=k_rank, precision=precision)
            rows = min(size["fp32_rows"], int(best)) if precision == "fp32" else int(best)
            c = Compute(device.type, autocast, rows)
            base = batch_losses(adapter, ranked, protocol, c).loss.numpy()
            with apply_delta(adapter.denoiser, result.delta):
                after = batch_losses(adapter, ranked, protocol, c).loss.numpy()
            scores[name] = attribution_scores(base.astype(np.float64), after.astype(np.float64))["mean_delta"]
    out["bf16_spearman"] = round(spearman(scores["fp32"], scores["bf16"]), 4)
    out["bf16_top10_jaccard"] = round(jaccard_at_k(scores["fp32"], scores["bf16"], 10), 4)
    out["bf16_vanished_share"] = round(vanished_share(adapter, result.delta), 4)
    out["bf16_split_spearman"] = round(spearman(scores["fp32"], scores["bf16_split"]), 4)
    out["bf16_split_top10_jaccard"] = round(jaccard_at_k(scores["fp32"], scores["bf16_split"], 10), 4)
    out["rank_items"], out["rank_draws"] = n_rank, k_rank

    exact = CATALOGUE_N * CATALOGUE_K
    staged = two_stage_item_draws(CATALOGUE_N, CATALOGUE_K)
    out["exact_h_per_query_115k"] = round((exact / rate + result.seconds) / 3600, 4)
    out["two_stage_h_per_query_115k"] = round((staged / rate + result.seconds) / 3600, 4)
    out["two_stage_item_draws_115k"] = staged
    out["peak_mem_gb"] = max(mem.by_phase.values())
    out["peak_mem_gb_by_phase"] = mem.by_phase
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="GPU benchmark at Stable Audio Open's shapes (one JSON line)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (what the test runs)")
    args = parser.parse_args(argv)
    if args.tiny:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    print(json.dumps(run(args.tiny)), flush=True)


if __name__ == "__main__":
    main()
