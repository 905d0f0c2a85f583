"""Every benchmark's entry point runs, at its smallest size, as `make bench` runs it
(`python -m tests.benchmarks.<name>` from the checkout), so none can break unseen; the last line of `make bench` carries
the headline figures."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "tests" / "benchmarks"
# the keys `make bench`'s last line must carry (issue 22)
HEADLINE = (
    "matmul_gflops",
    "forward_gflops",
    "pipeline_over_bare",
    "exact_s_per_query_10k",
    "two_stage_s_per_query_10k",
    "linearized_s_per_query_10k",
    "two_stage_top10_jaccard",
    "linearized_spearman",
)
SMALLEST = {  # benchmark → the arguments of its smallest run (bench_paths and bench_demo_agreement: test_paths_…)
    "bench_engine": ["--items", "8", "--draws", "2"],
    "bench_norms_read": ["--items", "64", "--k", "16", "--shards", "2", "--parameters", "1000", "--repeats", "1"],
    "bench_scale": [
        "--demo-items",
        "16",
        "--big-items",
        "32",
        "--k",
        "16",
        "--queries",
        "1",
        "--batch-sizes",
        "16",
        "--rounds",
        "1",
        "--matmul-n",
        "256",
        "--root",
        "no-demo-root",
    ],
    "bench_catalogue": ["--items", "400", "--queries", "3", "--inbox", "30", "--shards", "4"],
    "bench_gpu": ["--tiny"],  # run by tests/test_bench_gpu.py
    "bench_bf16_split": [],  # the embedded denoiser, 6 items × 4 draws: seconds (and its own test below)
    "bench_norm_floor": ["--clips-per-artist", "2", "--steps", "2", "--targets", "2", "--draws", "4"],
    "bench_10k": ["--items", "16", "--queries", "1", "--train-steps", "2", "--draws", "2"],  # + --root: its test
}
SLOW = (
    "bench_paths",
    "bench_demo_agreement",
    "bench_real_size",
)  # bench_real_size: tests/test_bench_gpu.py, tiny folder


def bench(name: str, *argv: str, timeout: int = 300) -> list[str]:
    """Run one benchmark as `make bench` does; its output lines (the test fails with its stderr on a non-zero exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", f"tests.benchmarks.{name}", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_every_benchmark_has_a_smallest_run_here():
    assert {p.stem for p in BENCHMARKS.glob("bench_*.py")} == set(SMALLEST) | set(SLOW)


def test_make_bench_runs_each_benchmark_as_a_module_and_bench_scale_last():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^bench: .*\n((?:\t.*\n)+)", makefile, re.MULTILINE).group(1).splitlines()
    assert all(re.search(r"python -m tests\.benchmarks\.bench_\w+", line) for line in recipe), recipe
    assert "tests.benchmarks.bench_scale" in recipe[-1]


@pytest.mark.parametrize("name", ["bench_engine", "bench_norms_read", "bench_norm_floor"])
def test_the_benchmark_runs_at_its_smallest_size(name):
    lines = bench(name, *SMALLEST[name])
    assert lines, f"{name} printed nothing"


def test_bench_bf16_split_sees_a_sub_half_step_change_that_plain_bf16_loses():
    rows = [line for line in bench("bench_bf16_split") if line.startswith("all:")]
    assert rows and "bf16 0.00e+00" in rows[0]
    assert float(rows[0].rsplit(" ", 1)[1]) < 0.1  # bf16-split's relative error against fp32 over the items


def test_bench_scale_ends_with_the_headline_figures():
    figures = json.loads(bench("bench_scale", *SMALLEST["bench_scale"])[-1])
    assert all(isinstance(figures[k], (int, float)) for k in HEADLINE), {k: figures.get(k) for k in HEADLINE}
    assert figures["agreement_on"] == "tiny model"


def test_bench_catalogue_ends_with_its_figures_at_the_asked_counts():
    figures = json.loads(bench("bench_catalogue", *SMALLEST["bench_catalogue"])[-1])
    assert (figures["n_items"], figures["n_queries"], figures["n_inbox"]) == (400, 3, 30)
    assert figures["attribution_rows"] == 400 * 3
    for k in ("topk_ms", "artist_shares_s", "export_s", "queries_cli_s", "sensor_tick_s", "peak_rss_gb"):
        assert figures[k] > 0, k
    assert (figures["batch_runs_per_tick"], figures["queries_per_tick"]) == (1, 30)  # past the bound: one batch of 30


def test_bench_10k_ends_with_every_figure_at_the_asked_size(tmp_path):
    figures = json.loads(bench("bench_10k", *SMALLEST["bench_10k"], "--root", str(tmp_path / "root"))[-1])
    assert (figures["n_items"], figures["n_queries"], figures["draws"]) == (16, 1, 2)
    assert figures["exact_item_draws_per_query"] == 16 * 2
    counts = [str(c) for c in figures["two_stage_candidates"]]
    assert counts == ["32", "64", "128", "256"]
    for name in ("top10_jaccard", "top10_recall", "item_draws", "cost_share", "s_per_query", "time_share"):
        per_count = figures[f"two_stage_{name}"]
        assert sorted(per_count, key=int) == counts and all(math.isfinite(v) for v in per_count.values()), name
    # every count reaches all 16 items: each gets the first of K = 2 draws, max(half, min_keep 10) = 10 the second
    assert figures["two_stage_item_draws"] == dict.fromkeys(counts, 16 + 10)
    assert figures["two_stage_cost_share"] == dict.fromkeys(counts, 26 / 32)
    seconds = ("exact_s_per_query", "linearized_s_per_query", "render_s", "train_s", "training_side_s")
    for k in (*seconds, "linearized_top10_jaccard"):
        assert math.isfinite(figures[k]) and figures[k] >= 0, k
    assert figures["shipped_candidates"] in (None, 32, 64, 128, 256)


def test_paths_and_demo_agreement_run_on_a_tiny_root(tmp_path):
    root_url = str(tmp_path / "root")
    paths = json.loads(
        bench(
            "bench_paths",
            "--artists",
            "2",
            "--clips-per-artist",
            "2",
            "--queries",
            "1",
            "--train-steps",
            "10",
            "--root",
            root_url,
            timeout=600,
        )[-1]
    )
    assert set(paths["paths"]) == {"full", "two-stage", "linearized"}
    agreement = json.loads(bench("bench_demo_agreement", "--root", root_url, "--queries", "1", "--k", "16")[-1])
    assert (agreement["items"], agreement["queries"]) == (4, 1)
