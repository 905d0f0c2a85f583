"""Cross-query reports: consistency between configurations, seeds and methods (the paper's grid tables)."""

import itertools

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from resources import StorageResource

from . import tables
from .attribution.metrics import compare
from .query_assets import attribution_scores, similarity_scores


def _hive_value(key: str, column: str) -> str:
    return next(part.split("=", 1)[1] for part in key.split("/") if part.startswith(column + "="))


def score_vectors(store, query_id: str) -> dict[str, pl.DataFrame]:
    """Every attribution of one query, keyed `unlearning:<config_id>` or `similarity:<name>`, as (item_id, score)."""
    out = {}
    for key in store.glob(f"attribution_scores/query_id={query_id}/config_id=*/part-*.parquet"):
        out[f"unlearning:{_hive_value(key, 'config_id')}"] = store.read_parquet(key).select("item_id", "score")
    for key in store.glob(f"similarity_scores/query_id={query_id}/method=*/part-*.parquet"):
        out[_hive_value(key, "method")] = store.read_parquet(key).select("item_id", "score")
    return out


def consistency_rows(query_id: str, vectors: dict[str, pl.DataFrame]) -> list[dict]:
    """Pairwise Jaccard@10/50/100, Spearman and Pearson between every two attributions of a query."""
    rows = []
    for left, right in itertools.combinations(sorted(vectors), 2):
        joined = vectors[left].join(vectors[right], on="item_id", suffix="_r")
        a, b = joined["score"].to_numpy(), joined["score_r"].to_numpy()
        for metric, k, value in compare(a, b):
            rows.append({"query_id": query_id, "left": left, "right": right, "metric": metric, "k": k, "value": float(value)})
    return rows


@asset(group_name="reports", deps=[attribution_scores, similarity_scores],
       description="Consistency across configurations, seeds and methods: Jaccard@k and rank correlations per query.")
def consistency_report(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    store = storage.storage()
    query_ids = sorted({_hive_value(k, "query_id") for k in store.glob("attribution_scores/query_id=*/config_id=*/part-*.parquet")})
    rows = [r for q in query_ids for r in consistency_rows(q, score_vectors(store, q))]
    schema = {"query_id": pl.Utf8, "left": pl.Utf8, "right": pl.Utf8, "metric": pl.Utf8, "k": pl.Int64, "value": pl.Float64}
    df = pl.DataFrame(rows, schema=schema)
    uri = store.write_parquet(tables.consistency(), df)
    means = (df.group_by("left", "right", "metric", "k").agg(pl.col("value").mean()).sort("left", "right", "metric", "k")
             if len(df) else df)
    context.log.info(f"consistency over {len(query_ids)} queries: {len(df)} rows")
    return MaterializeResult(metadata={
        "rows": len(df), "queries": len(query_ids), "uri": MetadataValue.path(uri),
        "mean_by_pair": MetadataValue.json([{**r, "value": round(r["value"], 4) if r["value"] is not None and np.isfinite(r["value"]) else None}
                                            for r in means.to_dicts()][:200]),
    })
