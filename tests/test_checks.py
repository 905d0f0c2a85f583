"""The completeness check compares a losses table with the items × draws it must hold, not with itself."""

import polars as pl

from tda_assets.defs.checks import losses_complete

ITEMS, DRAWS = ["a", "b", "c"], 4


def losses(rows: list[tuple[str, int]], value: float = 1.0) -> pl.DataFrame:
    return pl.DataFrame({"item_id": [i for i, _ in rows], "draw": [d for _, d in rows], "loss": [value] * len(rows)},
                        schema={"item_id": pl.String, "draw": pl.Int32, "loss": pl.Float32})


FULL = [(i, d) for i in ITEMS for d in range(DRAWS)]


def test_a_complete_finite_table_passes():
    result = losses_complete("c", losses(FULL), ITEMS, DRAWS)
    assert result.passed and result.metadata["rows"].value == result.metadata["expected_rows"].value == 12


def test_removed_rows_fail_the_check_and_are_named():
    result = losses_complete("c", losses(FULL[:5] + FULL[6:]), ITEMS, DRAWS)  # item b, draw 1 gone
    assert not result.passed
    assert result.metadata["missing_rows"].value == 1 and "('b', 1)" in result.metadata["missing_examples"].value


def test_a_missing_item_fails_even_when_the_row_count_matches():
    rows = [r for r in FULL if r[0] != "c"] + [("d", d) for d in range(DRAWS)]  # 12 rows, but d instead of c
    result = losses_complete("c", losses(rows), ITEMS, DRAWS)
    assert not result.passed and result.metadata["missing_rows"].value == 4 and result.metadata["unexpected_rows"].value == 4


def test_duplicated_rows_and_non_finite_losses_fail():
    assert not losses_complete("c", losses(FULL + FULL[:1]), ITEMS, DRAWS).passed
    assert not losses_complete("c", losses(FULL, value=float("nan")), ITEMS, DRAWS).passed
