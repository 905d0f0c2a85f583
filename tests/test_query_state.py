"""One vocabulary for where a (query, configuration) stands: the grid counts the states that `tda queries` shows."""

from __future__ import annotations

import pytest

from tda_assets.data.query_state import QueryState
from tda_assets.experiments.grid import GridRun, summary


def test_a_failed_check_is_a_result_and_a_stale_or_pending_one_is_not():
    assert QueryState.FAILED_CHECK.is_result and QueryState.ATTRIBUTED.is_result
    assert not QueryState.STALE.is_result and not QueryState.PENDING.is_result and not QueryState.ERROR.is_result


def test_grid_summary_counts_each_state_and_times_only_the_runs_made_now():
    runs = [
        GridRun("q1", "base", QueryState.ATTRIBUTED, True, 4.0, 1.5),
        GridRun("q2", "base", QueryState.ATTRIBUTED, False, 0.0, 1.3),
        GridRun("q3", "base", QueryState.FAILED_CHECK, True, 2.0, 1.01, "too weak"),
        GridRun("q1", "weak", QueryState.FAILED_CHECK, False, 0.0, 1.02),
        GridRun("q2", "weak", QueryState.ERROR, True, 0.0, None, "boom"),
    ]
    table = summary(runs)
    assert table.columns == [
        "config_id", "queries", "ran", "recorded", "attributed", "failed_check", "error", "mean_loss_ratio",
        "seconds_per_run",
    ]  # fmt: skip
    assert table.row(0) == ("base", 3, 2, 1, 2, 1, 0, pytest.approx(1.27), 3.0)
    assert table.row(1) == ("weak", 2, 1, 1, 0, 1, 1, 1.02, 0.0)


def test_a_grid_run_prints_its_state_and_whether_it_was_found_recorded():
    assert GridRun("q", "c", QueryState.FAILED_CHECK, ran=False).label == "failed_check (recorded)"
    assert GridRun("q", "c", QueryState.ATTRIBUTED).label == "attributed"
