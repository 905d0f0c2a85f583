"""Cross-query reports: consistency between configurations, seeds and methods (the paper's grid tables)."""

import itertools
from collections.abc import Callable

import numpy as np
import polars as pl
from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from resources import LossProtocolResource, StorageResource
from tda_assets.attribution.metrics import compare, cross_query_overlap
from tda_assets.defs import plots
from tda_assets.io.artifacts import Identity
from tda_assets.io.checkpoints import read_checkpoint_record
from tda_assets.io.registry import TABLES, key
from tda_assets.io.tables import read_tables, write_table


def score_vectors(root, identity: Identity) -> dict[str, dict[str, pl.DataFrame]]:
    """query → every attribution of it under `identity` (item_id, score, rank), keyed `unlearning:<config_id>` or
    `similarity:<name>`."""
    unlearning = read_tables(root, "attribution_scores", **identity.keys()).with_columns(
        label="unlearning:" + pl.col("config_id")
    )
    similarity = read_tables(root, "similarity_scores").with_columns(label=pl.col("method"))
    cols = ["query_id", "label", "item_id", "score", "rank"]
    current = (pl.col("checkpoint_id") == identity.checkpoint_id) & (pl.col("protocol_id") == identity.protocol_id)
    both = pl.concat([unlearning.filter(current).select(cols), similarity.filter(current).select(cols)])
    out: dict[str, dict[str, pl.DataFrame]] = {}
    for (qid, label), df in both.group_by("query_id", "label", maintain_order=True):
        out.setdefault(qid, {})[label] = df.select("item_id", "score", "rank")
    return out


def cross_query_rows(
    vectors: dict[str, dict[str, pl.DataFrame]], target_artist: dict[str, str | None], k: int = 10
) -> list[dict]:
    """Per ranking (label): the mean Jaccard@k between the top-k of every two queries with different target artists
    (`sql/cross_query_overlap.sql` computes the same from the views); rankings without such a pair are left out."""
    labels = sorted({label for v in vectors.values() for label in v})
    out = []
    for label in labels:
        top = {q: v[label].filter(pl.col("rank") <= k)["item_id"].to_list() for q, v in vectors.items() if label in v}
        mean, pairs = cross_query_overlap(top, target_artist)
        if pairs:
            queries = sum(target_artist.get(q) is not None for q in top)
            out.append(
                {"ranking": label, f"cross_query_jaccard_{k}": round(mean, 4), "query_pairs": pairs, "queries": queries}
            )
    return out


def consistency_rows(query_id: str, vectors: dict[str, pl.DataFrame]) -> list[dict]:
    """Pairwise Jaccard@10/50/100, Spearman and Pearson between every two attributions of a query."""
    rows = []
    for left, right in itertools.combinations(sorted(vectors), 2):
        joined = (
            vectors[left]
            .select("item_id", "score")
            .join(vectors[right].select("item_id", "score"), on="item_id", suffix="_r")
        )
        a, b = joined["score"].to_numpy(), joined["score_r"].to_numpy()
        for metric, k, value in compare(a, b):
            rows.append(
                {"query_id": query_id, "left": left, "right": right, "metric": metric, "k": k, "value": float(value)}
            )
    return rows


UNLEARNING = "unlearning:"


def seed_groups(root) -> dict[str, tuple[str, object]]:
    """config_id → (every field but `seed`, `seed`): its seed reruns share the first and differ in the second."""
    df = read_tables(root, "unlearning_configs")
    cols = [c for c in df.columns if c not in ("config_id", "seed")]
    return {r["config_id"]: (repr(tuple(r[c] for c in cols)), r["seed"]) for r in df.to_dicts()}


def jaccard_matrix(df: pl.DataFrame, k: int = 10) -> tuple[list[str], np.ndarray]:
    """Mean Jaccard@k over queries between every two unlearning configurations (diagonal 1, missing pairs NaN)."""
    pairs = (
        df.filter(
            (pl.col("metric") == "jaccard")
            & (pl.col("k") == k)
            & pl.col("left").str.starts_with(UNLEARNING)
            & pl.col("right").str.starts_with(UNLEARNING)
        )
        .group_by("left", "right")
        .agg(pl.col("value").mean())
    )
    labels = sorted(set(pairs["left"].to_list()) | set(pairs["right"].to_list()))
    index = {label: i for i, label in enumerate(labels)}
    m = np.full((len(labels), len(labels)), np.nan)
    np.fill_diagonal(m, 1.0)
    for r in pairs.to_dicts():
        m[index[r["left"]], index[r["right"]]] = m[index[r["right"]], index[r["left"]]] = r["value"]
    return [label[len(UNLEARNING) :] for label in labels], m


def is_seed_rerun(groups: dict[str, tuple[str, object]], a: str, b: str) -> bool:
    """Two configurations equal in every field but the seed, with different seeds (an identical one is not a rerun)."""
    return a in groups and b in groups and groups[a][0] == groups[b][0] and groups[a][1] != groups[b][1]


def config_consistency(df: pl.DataFrame, groups: dict[str, tuple[str, object]], k: int = 10) -> list[dict]:
    """Per configuration: mean Jaccard@k (over queries) with its seed reruns, with the other configurations, and with
    all.

    Sorted best first: by the mean with its seed reruns (configurations without reruns last), then with all others.
    """
    configs, m = jaccard_matrix(df, k)
    out = []
    for i, c in enumerate(configs):
        others = [j for j in range(len(configs)) if j != i and np.isfinite(m[i, j])]
        seed = [j for j in others if is_seed_rerun(groups, c, configs[j])]
        rest = [j for j in others if j not in seed]
        mean = lambda js: round(float(np.mean(m[i, js])), 4) if js else None  # noqa: E731
        out.append(
            {
                "config_id": c,
                f"jaccard_{k}_seed_reruns": mean(seed),
                "seed_reruns": len(seed),
                f"jaccard_{k}_other_configs": mean(rest),
                f"jaccard_{k}_all": mean(others),
            }
        )

    def key(r: dict) -> tuple:
        return (
            r[f"jaccard_{k}_seed_reruns"] is None,
            -(r[f"jaccard_{k}_seed_reruns"] or 0.0),
            -(r[f"jaccard_{k}_all"] or 0.0),
        )

    return sorted(out, key=key)


@asset(
    group_name="reports",
    deps=[AssetKey("attribution_scores"), AssetKey("similarity_scores")],
    description="Consistency across configurations, seeds and methods (current checkpoint and protocol): "
    "Jaccard@k and rank correlations per query; and per ranking, the cross-query overlap (mean Jaccard@10 "
    "between the top-10s of queries with different target artists: high = the same items for every query).",
)
def consistency_report(
    context: AssetExecutionContext, storage: StorageResource, protocol: LossProtocolResource
) -> MaterializeResult:
    root = storage.root()
    identity = Identity(read_checkpoint_record(root).checkpoint_id, protocol.protocol().protocol_id)
    vectors = score_vectors(root, identity)
    query_ids = sorted(q for q, v in vectors.items() if any(label.startswith(UNLEARNING) for label in v))
    rows = [{**r, **identity.keys()} for q in query_ids for r in consistency_rows(q, vectors[q])]
    df = pl.DataFrame(rows, schema=TABLES["consistency"].polars_schema())
    uri = write_table(root, "consistency", df, **identity.keys())
    cross = cross_query_rows(vectors, query_target_artists(root))
    per_config = per_config_consistency(df, seed_groups(root), cross) if len(df) else []
    meta = {**cross_query_metadata(cross, context.log.info), **config_metadata(root, df, per_config, context.log.info)}
    context.log.info(f"consistency over {len(query_ids)} queries: {len(df)} rows")
    return MaterializeResult(
        metadata={
            "rows": len(df),
            "queries": len(query_ids),
            "uri": MetadataValue.path(uri),
            **identity.keys(),
            **meta,
            "mean_by_pair": mean_by_pair(df),
        }
    )


def query_target_artists(root) -> dict[str, str | None]:
    """query_id → target artist of every query in the root."""
    table = read_tables(root, "queries")
    return dict(zip(table["query_id"], table["target_artist"])) if len(table) else {}


def per_config_consistency(df: pl.DataFrame, groups: dict[str, tuple[str, object]], cross: list[dict]) -> list[dict]:
    """`config_consistency` of every configuration, each with its ranking's cross-query overlap."""
    per_config = config_consistency(df, groups)
    cross_of = {r["ranking"]: r["cross_query_jaccard_10"] for r in cross}
    for r in per_config:
        r["cross_query_jaccard_10"] = cross_of.get(UNLEARNING + r["config_id"])
    return per_config


def cross_query_metadata(cross: list[dict], log: Callable[[str], None]) -> dict:
    """The cross-query overlap of every ranking, logged (nothing when no ranking has two queries to compare)."""
    if not cross:
        return {}
    log(
        "cross-query overlap (mean Jaccard@10, different target artists): "
        + ", ".join(f"{r['ranking']} {r['cross_query_jaccard_10']:.3f}" for r in cross)
    )
    return {"cross_query_overlap": MetadataValue.json(cross)}


def config_metadata(root, df: pl.DataFrame, per_config: list[dict], log: Callable[[str], None]) -> dict:
    """The most consistent configuration (by its seed reruns, else by all others), the one agreeing most with the
    others, every configuration's consistency, and the heatmap between them; logged."""
    if not per_config:
        return {}
    best = per_config[0]
    by_all = max(per_config, key=lambda r: r["jaccard_10_all"] if r["jaccard_10_all"] is not None else -1.0)
    by_reruns = best["jaccard_10_seed_reruns"] is not None
    meta = {
        "most_consistent_config": best["config_id"],
        "most_consistent_config_jaccard_10": best["jaccard_10_seed_reruns"] if by_reruns else best["jaccard_10_all"],
        "most_consistent_config_basis": "seed reruns" if by_reruns else "other configurations",
        "highest_agreement_with_other_configs": by_all["config_id"],
        "config_consistency": MetadataValue.json(per_config),
        **jaccard_heatmap(root, df),
    }
    log(
        f"most consistent configuration: {best['config_id']} ({meta['most_consistent_config_basis']}, "
        f"mean Jaccard@10 {meta['most_consistent_config_jaccard_10']})"
    )
    return meta


def jaccard_heatmap(root, df: pl.DataFrame) -> dict:
    """The plot of the mean Jaccard@10 between every two unlearning configurations (none for fewer than two)."""
    labels, matrix = jaccard_matrix(df)
    if len(labels) < 2:
        return {}
    shared = df.filter(pl.col("left").str.starts_with(UNLEARNING) & pl.col("right").str.starts_with(UNLEARNING))
    title = (
        f"mean Jaccard@10 between unlearning configurations "
        f"(over the queries both ran; {shared['query_id'].n_unique()} queries in all)"
    )
    return plots.write_png(
        root, key("plot", kind="consistency", name="jaccard_10"), plots.heatmap(matrix, labels, title), title
    )


def mean_by_pair(df: pl.DataFrame) -> MetadataValue:
    """Each (left, right, metric, k)'s mean value over the queries, rounded (the first 200)."""
    means = (
        df.group_by("left", "right", "metric", "k").agg(pl.col("value").mean()).sort("left", "right", "metric", "k")
        if len(df)
        else df
    )
    return MetadataValue.json(
        [
            {**r, "value": round(r["value"], 4) if r["value"] is not None and np.isfinite(r["value"]) else None}
            for r in means.to_dicts()
        ][:200]
    )
