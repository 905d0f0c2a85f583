"""Asset checks (DESIGN §2): losses finite and complete, one attribution row per training item, a sound manifest.

Each check compares a table with what it must hold, derived from another source than the table or the result that
wrote it: the training side's items, the protocol's draws, a two_stage plan from the cheap signals and the settings.
"""

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetKey, asset_check

from resources import StorageResource
from tda_assets.io.tables import read_table


def _compare_rows(df: pl.DataFrame, draws_per_item: Mapping[str, int]) -> tuple[bool, dict]:
    """Whether `df`'s losses are finite and it holds each item's draws 0…d−1 exactly once and nothing else; metadata."""
    finite = bool(np.isfinite(df["loss"].to_numpy()).all()) if len(df) else True
    expected = pl.DataFrame(
        {
            "item_id": [i for i, d in draws_per_item.items() for _ in range(d)],
            "draw": [k for d in draws_per_item.values() for k in range(d)],
        },
        schema={"item_id": pl.String, "draw": pl.Int32},
    )
    have = df.select("item_id", pl.col("draw").cast(pl.Int32))
    missing = expected.join(have, on=["item_id", "draw"], how="anti")
    unexpected = have.join(expected, on=["item_id", "draw"], how="anti")
    duplicated = int(have.is_duplicated().sum())
    passed = finite and missing.is_empty() and unexpected.is_empty() and duplicated == 0
    return passed, {
        "rows": len(df),
        "expected_rows": len(expected),
        "missing_rows": len(missing),
        "unexpected_rows": len(unexpected),
        "duplicated_rows": duplicated,
        "all_finite": finite,
        "missing_examples": str(missing.head(5).rows()) if len(missing) else "",
        "unexpected_examples": str(unexpected.head(5).rows()) if len(unexpected) else "",
    }


def losses_complete(name: str, df: pl.DataFrame, item_ids: list[str], draws: int) -> AssetCheckResult:
    """Passed when every loss is finite and every expected item has each draw 0…K−1 exactly once, and nothing else."""
    passed, meta = _compare_rows(df, {i: draws for i in item_ids})
    return AssetCheckResult(check_name=name, passed=passed, metadata=meta)


@dataclass(frozen=True)
class TwoStagePlan:
    """What a two_stage rescore must hold, fixed before it runs (the cheap signals' candidates and the settings), never
    read from its result: every candidate on draws 0…first_draws−1, exactly `survivors` of them on all `draws`."""

    candidates: list[str]
    draws: int
    first_draws: int
    survivors: int


def two_stage_losses_complete(name: str, df: pl.DataFrame, plan: TwoStagePlan) -> AssetCheckResult:
    """Passed when the rows are finite and follow `plan`: each candidate's first-stage draws once, the draws after
    them for exactly `plan.survivors` candidates (every one of those draws, once), and no row of any other item.

    Which candidates survive depends on their first-stage scores, so the check takes the survivors from the rows, then
    demands that there are exactly as many as the plan says and that each has every later draw."""
    cand = set(plan.candidates)
    if plan.first_draws >= plan.draws:  # no halving: every candidate on every draw
        full, expected_full = sorted(cand), len(cand)
    else:
        later = df.filter(pl.col("draw") >= plan.first_draws)["item_id"].unique().to_list()
        full, expected_full = sorted(i for i in later if i in cand), plan.survivors
    per = {i: plan.draws if i in full else plan.first_draws for i in plan.candidates}
    passed, meta = _compare_rows(df, per)
    return AssetCheckResult(
        check_name=name,
        passed=passed and len(full) == expected_full,
        metadata={
            **meta,
            "candidates": len(plan.candidates),
            "full_draw_items": len(full),
            "expected_full_draw_items": expected_full,
        },
    )


def rows_per_item(name: str, df: pl.DataFrame, expected_items: list[str]) -> AssetCheckResult:
    """Passed when `df` has exactly one row per expected item: none missing, none unexpected, none duplicated."""
    have = df["item_id"]
    expected = set(expected_items)
    missing = sorted(expected - set(have.to_list()))
    unexpected = sorted(set(have.to_list()) - expected)
    duplicated = int(have.is_duplicated().sum())
    return AssetCheckResult(
        check_name=name,
        passed=not missing and not unexpected and duplicated == 0,
        metadata={
            "rows": len(df),
            "training_items": len(expected),
            "missing_items": len(missing),
            "unexpected_items": len(unexpected),
            "duplicated_rows": duplicated,
            "missing_examples": ", ".join(missing[:5]),
            "unexpected_examples": ", ".join(unexpected[:5]),
        },
    )


@asset_check(asset=AssetKey("training_manifest"), description="item ids unique, captions and audio URIs present")
def manifest_is_sound(storage: StorageResource) -> AssetCheckResult:
    df = read_table(storage.root(), "training_manifest")
    dupes = int(df["item_id"].is_duplicated().sum())
    empty_caption = int((df["caption"].fill_null("").str.strip_chars() == "").sum())
    no_audio = int(df["audio_uri"].is_null().sum())
    return AssetCheckResult(
        passed=dupes == 0 and empty_caption == 0 and no_audio == 0,
        metadata={"duplicate_ids": dupes, "empty_captions": empty_caption, "missing_audio_uri": no_audio},
    )
