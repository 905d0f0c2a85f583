"""Asset checks (DESIGN §2): losses finite and complete, a sound manifest."""

from typing import Mapping

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetKey, asset_check

from resources import StorageResource
from tda_assets.io.tables import read_table


def losses_complete(name: str, df: pl.DataFrame, item_ids: list[str], draws: int,
                    draws_per_item: Mapping[str, int] | None = None) -> AssetCheckResult:
    """Passed when every loss is finite and every expected item has each draw 0…K−1 exactly once, and nothing else.

    `draws_per_item` (a two_stage rescore): item → the draws it was rescored on (0…d−1 instead of 0…K−1).
    """
    finite = bool(np.isfinite(df["loss"].to_numpy()).all()) if len(df) else True
    per = {i: draws for i in item_ids} if draws_per_item is None else {i: draws_per_item[i] for i in item_ids}
    expected = pl.DataFrame({"item_id": [i for i in item_ids for _ in range(per[i])],
                             "draw": [d for i in item_ids for d in range(per[i])]}, schema={"item_id": pl.String, "draw": pl.Int32})
    have = df.select("item_id", pl.col("draw").cast(pl.Int32))
    missing = expected.join(have, on=["item_id", "draw"], how="anti")
    unexpected = have.join(expected, on=["item_id", "draw"], how="anti")
    duplicated = int(have.is_duplicated().sum())
    passed = finite and missing.is_empty() and unexpected.is_empty() and duplicated == 0
    return AssetCheckResult(check_name=name, passed=passed, metadata={
        "rows": len(df), "expected_rows": len(expected), "missing_rows": len(missing), "unexpected_rows": len(unexpected),
        "duplicated_rows": duplicated, "all_finite": finite,
        "missing_examples": str(missing.head(5).rows()) if len(missing) else "",
    })


@asset_check(asset=AssetKey("training_manifest"), description="item ids unique, captions and audio URIs present")
def manifest_is_sound(storage: StorageResource) -> AssetCheckResult:
    df = read_table(storage.storage(), "training_manifest")
    dupes = int(df["item_id"].is_duplicated().sum())
    empty_caption = int((df["caption"].fill_null("").str.strip_chars() == "").sum())
    no_audio = int(df["audio_uri"].is_null().sum())
    return AssetCheckResult(passed=dupes == 0 and empty_caption == 0 and no_audio == 0,
                            metadata={"duplicate_ids": dupes, "empty_captions": empty_caption, "missing_audio_uri": no_audio})
