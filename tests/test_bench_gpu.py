"""The GPU benchmark cannot rot between runs on a GPU: at tiny shapes on CPU it prints every figure, finite (issue 21);
the real-size benchmark runs the user's commands."""

from __future__ import annotations

import json
import math

from tests.benchmarks.bench_gpu import two_stage_item_draws
from tests.test_benchmarks_run import bench

REQUIRED = (
    "device",
    "params",
    "rows_per_pass",
    "item_draws_per_s",
    "tflops",
    "peak_share",
    "peak_mem_gb",
    "fisher_items_per_s",
    "unlearn_s",
    "gradient_items_per_s",
    "exact_h_per_query_115k",
    "two_stage_h_per_query_115k",
    "bf16_spearman",
    "bf16_top10_jaccard",
    "bf16_vanished_share",
    "bf16_split_spearman",
    "bf16_split_top10_jaccard",
)


def numbers(value) -> list[float]:
    """Every number inside a JSON value (dicts and lists walked)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    items = value.values() if isinstance(value, dict) else value
    return [x for v in items for x in numbers(v)]


def test_bench_gpu_tiny_prints_every_figure_finite_in_one_json_line():
    lines = bench("bench_gpu", "--tiny", timeout=240)
    assert len(lines) == 1, lines
    figures = json.loads(lines[0])
    assert [k for k in REQUIRED if k not in figures] == []
    assert figures["device"] == "cpu" and figures["mode"] == "tiny"
    required_numbers = [figures[k] for k in REQUIRED if k != "device"]
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in required_numbers), figures
    assert all(math.isfinite(v) for v in numbers(figures))
    assert figures["params"] == 11876  # StableAudioAdapter.tiny()'s denoiser
    assert str(figures["rows_per_pass"]) in figures["item_draws_per_s_by_rows"]
    assert figures["item_draws_per_s"] == max(figures["item_draws_per_s_by_rows"].values())
    assert 0 < figures["peak_share"] and -1 <= figures["bf16_spearman"] <= 1
    assert 0 <= figures["bf16_top10_jaccard"] <= 1 and 0 <= figures["bf16_vanished_share"] <= 1
    assert -1 <= figures["bf16_split_spearman"] <= 1 and 0 <= figures["bf16_split_top10_jaccard"] <= 1
    assert 0 < figures["two_stage_h_per_query_115k"] < figures["exact_h_per_query_115k"]


def test_two_stage_plan_at_catalogue_size_is_the_shipped_knobs_with_disjoint_signals():
    # 3 signals × at most 512 (max_candidates; 15% would be 17,250) = 1,536 candidates at 4 draws; half get the other 12
    assert two_stage_item_draws(115_000, 16) == 1_536 * 4 + 768 * 12
    # below the cap the fraction acts: 3 × 15% of 2,000 = 900 candidates, 450 of them on all 16 draws
    assert two_stage_item_draws(2_000, 16) == 900 * 4 + 450 * 12


def test_bench_real_size_runs_the_users_commands_on_a_pipeline_folder(tmp_path):
    """The real-size benchmark's path (build folder → `tda prepare` → `tda attribute`), on a tiny pipeline folder."""
    from tda_assets.models.stable_audio import StableAudioAdapter

    folder = StableAudioAdapter.tiny().save_pretrained(tmp_path / "model")
    argv = ("--folder", str(folder), "--work", str(tmp_path / "run"), "--threads", "1")
    figures = json.loads(bench("bench_real_size", *argv, timeout=600)[-1])
    assert figures["params"] == 11876 and figures["settings"]["TDA_GRAD_ROWS"] == "1"
    assert all(figures[k] > 0 for k in ("peak_rss_gb", "prepare_s", "attribute_s", "item_draw_s"))
