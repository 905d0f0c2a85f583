"""Cross-query reports: consistency between configurations, seeds and methods (the paper's grid tables)."""

import itertools

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from resources import StorageResource

from . import plots, tables
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


UNLEARNING = "unlearning:"


def seed_groups(store) -> dict[str, str]:
    """config_id → a key shared by the configurations that differ only in `seed` (its seed reruns)."""
    if not store.glob("unlearning_configs/*/part-*.parquet"):
        return {}
    df = store.read_parquet("unlearning_configs/*/part-*.parquet", hive=True)
    cols = [c for c in df.columns if c not in ("config_id", "seed")]
    return {r["config_id"]: repr(tuple(r[c] for c in cols)) for r in df.to_dicts()}


def jaccard_matrix(df: pl.DataFrame, k: int = 10) -> tuple[list[str], np.ndarray]:
    """Mean Jaccard@k over queries between every two unlearning configurations (diagonal 1, missing pairs NaN)."""
    pairs = (df.filter((pl.col("metric") == "jaccard") & (pl.col("k") == k)
                       & pl.col("left").str.starts_with(UNLEARNING) & pl.col("right").str.starts_with(UNLEARNING))
             .group_by("left", "right").agg(pl.col("value").mean()))
    labels = sorted(set(pairs["left"].to_list()) | set(pairs["right"].to_list()))
    index = {label: i for i, label in enumerate(labels)}
    m = np.full((len(labels), len(labels)), np.nan)
    np.fill_diagonal(m, 1.0)
    for r in pairs.to_dicts():
        m[index[r["left"]], index[r["right"]]] = m[index[r["right"]], index[r["left"]]] = r["value"]
    return [label[len(UNLEARNING):] for label in labels], m


def config_consistency(df: pl.DataFrame, groups: dict[str, str], k: int = 10) -> list[dict]:
    """Per configuration: mean Jaccard@k (over queries) with its seed reruns, with the other configurations, and with all.

    Sorted best first: by the mean with its seed reruns (configurations without reruns last), then with all others.
    """
    configs, m = jaccard_matrix(df, k)
    out = []
    for i, c in enumerate(configs):
        others = [j for j in range(len(configs)) if j != i and np.isfinite(m[i, j])]
        seed = [j for j in others if c in groups and groups.get(configs[j]) == groups[c]]
        rest = [j for j in others if j not in seed]
        mean = lambda js: round(float(np.mean(m[i, js])), 4) if js else None  # noqa: E731
        out.append({"config_id": c, f"jaccard_{k}_seed_reruns": mean(seed), "seed_reruns": len(seed),
                    f"jaccard_{k}_other_configs": mean(rest), f"jaccard_{k}_all": mean(others)})
    key = lambda r: (r[f"jaccard_{k}_seed_reruns"] is None, -(r[f"jaccard_{k}_seed_reruns"] or 0.0), -(r[f"jaccard_{k}_all"] or 0.0))  # noqa: E731
    return sorted(out, key=key)


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
    per_config = config_consistency(df, seed_groups(store)) if len(df) else []
    meta: dict = {}
    if per_config:
        best = per_config[0]
        by_all = max(per_config, key=lambda r: r["jaccard_10_all"] if r["jaccard_10_all"] is not None else -1.0)
        meta.update({
            "most_consistent_config": best["config_id"],
            "most_consistent_config_jaccard_10": (best["jaccard_10_seed_reruns"] if best["jaccard_10_seed_reruns"] is not None
                                                  else best["jaccard_10_all"]),
            "most_consistent_config_basis": "seed reruns" if best["jaccard_10_seed_reruns"] is not None else "other configurations",
            "highest_agreement_with_other_configs": by_all["config_id"],
            "config_consistency": MetadataValue.json(per_config),
        })
        labels, matrix = jaccard_matrix(df)
        if len(labels) > 1:
            shared = df.filter(pl.col("left").str.starts_with(UNLEARNING) & pl.col("right").str.starts_with(UNLEARNING))
            title = (f"mean Jaccard@10 between unlearning configurations "
                     f"(over the queries both ran; {shared['query_id'].n_unique()} queries in all)")
            meta.update(plots.write_png(store, "consistency", "jaccard_10", plots.heatmap(matrix, labels, title), title))
        context.log.info(f"most consistent configuration: {best['config_id']} ({meta['most_consistent_config_basis']}, "
                         f"mean Jaccard@10 {meta['most_consistent_config_jaccard_10']})")
    context.log.info(f"consistency over {len(query_ids)} queries: {len(df)} rows")
    return MaterializeResult(metadata={
        "rows": len(df), "queries": len(query_ids), "uri": MetadataValue.path(uri), **meta,
        "mean_by_pair": MetadataValue.json([{**r, "value": round(r["value"], 4) if r["value"] is not None and np.isfinite(r["value"]) else None}
                                            for r in means.to_dicts()][:200]),
    })
