"""Asset checks (DESIGN §2): losses finite and complete, one attribution row per training item, a sound manifest."""

import numpy as np
import polars as pl
from dagster import AssetCheckResult, asset_check

from resources import StorageResource

from . import tables
from .corpus_assets import training_manifest


def losses_complete(name: str, df: pl.DataFrame, expected_rows: int) -> AssetCheckResult:
    """Passed when every loss is finite and there is one row per item and draw."""
    finite = bool(np.isfinite(df["loss"].to_numpy()).all())
    return AssetCheckResult(check_name=name, passed=finite and len(df) == expected_rows,
                            metadata={"rows": len(df), "expected_rows": expected_rows, "all_finite": finite})


@asset_check(asset=training_manifest, description="item ids unique, captions and audio URIs present")
def manifest_is_sound(storage: StorageResource) -> AssetCheckResult:
    df = storage.storage().read_parquet(tables.manifest())
    dupes = int(df["item_id"].is_duplicated().sum())
    empty_caption = int((df["caption"].fill_null("").str.strip_chars() == "").sum())
    no_audio = int(df["audio_uri"].is_null().sum())
    return AssetCheckResult(passed=dupes == 0 and empty_caption == 0 and no_audio == 0,
                            metadata={"duplicate_ids": dupes, "empty_captions": empty_caption, "missing_audio_uri": no_audio})
