"""The checks compare a table with what it must hold, from another source than itself: the completeness check with the
items × draws (or a two_stage plan), the attribution check with the items the training side encoded. Each defect
that the data can have is written into it here, and the check must fail."""

import polars as pl
import pytest

from tda_assets.defs.checks import TwoStagePlan, losses_complete, rows_per_item, two_stage_losses_complete

ITEMS, DRAWS = ["a", "b", "c"], 4


def losses(rows: list[tuple[str, int]], value: float = 1.0) -> pl.DataFrame:
    return pl.DataFrame(
        {"item_id": [i for i, _ in rows], "draw": [d for _, d in rows], "loss": [value] * len(rows)},
        schema={"item_id": pl.String, "draw": pl.Int32, "loss": pl.Float32},
    )


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
    assert (
        not result.passed
        and result.metadata["missing_rows"].value == 4
        and result.metadata["unexpected_rows"].value == 4
    )


def test_duplicated_rows_and_non_finite_losses_fail():
    assert not losses_complete("c", losses(FULL + FULL[:1]), ITEMS, DRAWS).passed
    assert not losses_complete("c", losses(FULL, value=float("nan")), ITEMS, DRAWS).passed


# two_stage: the plan is fixed before the rescore (candidates from the cheap signals, draws and survivors from the
# settings); the rows must follow it. Here: candidates a, b, c; 2 first-stage draws of 4; one survivor (a).
PLAN = TwoStagePlan(["a", "b", "c"], draws=4, first_draws=2, survivors=1)
STAGED = [("a", d) for d in range(4)] + [("b", 0), ("b", 1), ("c", 0), ("c", 1)]


def test_a_two_stage_rescore_that_follows_its_plan_passes():
    result = two_stage_losses_complete("c", losses(STAGED), PLAN)
    assert result.passed
    assert (result.metadata["expected_rows"].value, result.metadata["full_draw_items"].value) == (8, 1)


@pytest.mark.parametrize(
    "broken, why",
    [
        ([r for r in STAGED if r != ("c", 1)], "a candidate's first-stage draw missing"),
        ([r for r in STAGED if r != ("a", 3)], "a survivor's later draw missing"),
        (STAGED + [("b", 2), ("b", 3)], "two survivors where the plan keeps one"),
        ([r for r in STAGED if r[0] != "a" or r[1] < 2], "no survivor at all"),
        (STAGED + [("d", 0), ("d", 1)], "rows of an item that is no candidate"),
        (
            [r for r in STAGED if r[0] != "c"] + [("d", 0), ("d", 1)],
            "another item instead of a candidate, same row count",
        ),
        (STAGED + [("b", 1)], "a duplicated row"),
        (STAGED + [("a", 4)], "a draw beyond the protocol's"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_two_stage_rescore_off_its_plan_fails(broken, why):
    assert not two_stage_losses_complete("c", losses(broken), PLAN).passed, why


def test_a_two_stage_rescore_with_non_finite_losses_fails():
    assert not two_stage_losses_complete("c", losses(STAGED, value=float("inf")), PLAN).passed


def test_without_halving_every_candidate_must_have_every_draw():
    plan = TwoStagePlan(["a", "b"], draws=4, first_draws=4, survivors=1)
    full = [(i, d) for i in ("a", "b") for d in range(4)]
    assert two_stage_losses_complete("c", losses(full), plan).passed
    assert not two_stage_losses_complete("c", losses(full[:-1]), plan).passed


# one_row_per_training_item: the expected items are the ones the training side encoded (feature files' headers), not
# the baseline losses the linearized and two_stage scores take their items from.
def attribution(items: list[str]) -> pl.DataFrame:
    return pl.DataFrame({"item_id": items, "score": [0.0] * len(items)})


def test_one_row_per_encoded_item_passes_and_any_defect_fails():
    items = ["a", "b", "c"]
    assert rows_per_item("c", attribution(items), items).passed
    missing = rows_per_item("c", attribution(["a", "b"]), items)
    assert not missing.passed and missing.metadata["missing_examples"].value == "c"
    swapped = rows_per_item("c", attribution(["a", "b", "x"]), items)  # the count matches, the items do not
    assert not swapped.passed and swapped.metadata["unexpected_examples"].value == "x"
    assert not rows_per_item("c", attribution(["a", "b", "c", "c"]), items).passed


def test_an_item_lost_from_the_baseline_losses_fails_the_check_read_from_the_features(tmp_path):
    import torch

    from tda_assets.attribution.adapter import ItemBatch
    from tda_assets.io.artifacts import encoded_item_ids, write_features
    from tda_assets.io.registry import key
    from tda_assets.io.storage import Storage

    root = Storage(str(tmp_path / "root"))
    for shard, ids in [("s0", ["a", "b"]), ("s1", ["c"])]:  # shard s1 also had a bad item, skipped by the encoder
        n = len(ids)
        batch = ItemBatch(ids, torch.zeros(n, 2, 3), {"h": torch.zeros(n, 4)}, torch.ones(n, 3))
        write_features(
            root,
            key("training_features", encoder_id="e", shard=shard),
            batch,
            {"skipped": "bad" if shard == "s1" else "", "encoder_id": "e"},
        )
    expected = encoded_item_ids(root, "e")
    assert expected == ["a", "b", "c"]
    baseline_items = ["a", "b"]  # c's baseline losses lost: every non-exact path's scores then lack c too
    result = rows_per_item("one_row_per_training_item", attribution(baseline_items), expected)
    assert not result.passed and result.metadata["missing_examples"].value == "c"
