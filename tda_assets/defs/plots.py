"""Pictures of the evaluation (matplotlib, Agg): top-k bars per query, a consistency heatmap, the counterfactual bars.

Every function renders one PNG, writes it under the storage root (`plots/<kind>/<name>.png`) and returns
the asset metadata that shows it in the Dagster UI: a link to the file and an inline markdown preview.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import polars as pl
from dagster import MetadataValue

from tda_assets.io.registry import key
from tda_assets.io.storage import Storage
from tda_assets.io.tables import read_table, table_exists

DPI = 90
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def write_png(root: Storage, plot_key: str, png: bytes, title: str) -> dict:
    """Write the PNG atomically and return `{plot: path, plot_preview: markdown image}` metadata."""
    uri = root.write_bytes(plot_key, png)
    preview = f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"
    return {"plot": MetadataValue.path(uri), "plot_preview": MetadataValue.md(preview)}


def artist_colors(artists: list[str]) -> dict[str, tuple]:
    """One stable color per artist (by the artist's position among all artists of the manifest)."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(artists) <= 10 else "tab20")
    return {a: cmap(i % cmap.N) for i, a in enumerate(sorted(artists))}


def top_k_bars(
    scores: pl.DataFrame, manifest: pl.DataFrame, title: str, k: int = 10, target_artist: str | None = None
) -> bytes:
    """Horizontal bars of the top-k scores (rank 1 on top), colored by each item's artist."""
    plt = _pyplot()
    artists = manifest["artist"].fill_null("(unknown)").unique().to_list()
    colors = artist_colors(artists)
    top = (
        scores.sort("rank")
        .head(k)
        .join(manifest.select("item_id", "artist"), on="item_id", how="left")
        .with_columns(pl.col("artist").fill_null("(unknown)"))
    )
    colors.setdefault("(unknown)", (0.6, 0.6, 0.6, 1.0))
    fig, ax = plt.subplots(figsize=(6.4, 0.32 * len(top) + 1.4))
    y = np.arange(len(top))[::-1]
    ax.barh(y, top["score"].to_numpy(), color=[colors[a] for a in top["artist"]])
    ax.set_yticks(y, [f"{r}. {i}" for r, i in zip(top["rank"], top["item_id"])], fontsize=8)
    labels = {
        "mean_delta": "score (mean loss rise after unlearning)",
        "relative": "score (relative loss rise)",
        "skew": "score (normalized skew of the loss rise)",
        "normalized": "score (loss rise per unit gradient norm)",
    }
    ax.set_xlabel(labels.get(scores["score_type"][0], "score") if "score_type" in scores.columns else "score")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_title(title, fontsize=9)
    shown = list(dict.fromkeys(top["artist"].to_list()))
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[a]) for a in shown]
    labels = [f"{a} (target)" if a == target_artist else a for a in shown]
    ax.legend(handles, labels, fontsize=7, loc="lower right", frameon=False)
    return _png(fig)


def heatmap(matrix: np.ndarray, labels: list[str], title: str, value_label: str = "mean Jaccard@10") -> bytes:
    """An annotated square heatmap in [0, 1] (NaN cells left blank)."""
    plt = _pyplot()
    n = len(labels)
    size = max(3.5, 0.55 * n + 2.0)
    fig, ax = plt.subplots(figsize=(size + 1.0, size))
    im = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(n), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(n), labels, fontsize=7)
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(
                    j,
                    i,
                    f"{matrix[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if matrix[i, j] < 0.6 else "black",
                )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=value_label)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def counterfactual_bars(df: pl.DataFrame, title: str) -> bytes:
    """Per query, the query-loss rise after removing the top-k attributed items (bar, green when it passes both
    controls, orange when only the random one), each random removal's rise (gray dots, their mean a gray bar), the
    same-artist control's rise (blue bar), the noise floor (black tick) and the item floor (blue tick)."""
    plt = _pyplot()
    queries = sorted(df["query_id"].unique().to_list())
    x = np.arange(len(queries))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 * len(queries) + 2.0), 3.4))
    attributed = {r["query_id"]: r for r in df.filter(pl.col("removal") == "attributed").to_dicts()}
    same = {r["query_id"]: r["loss_rise"] for r in df.filter(pl.col("removal") == "same_artist").to_dicts()}
    randoms = {
        q: df.filter((pl.col("removal") == "random") & (pl.col("query_id") == q))["loss_rise"].to_list()
        for q in queries
    }

    def bar_color(q: str) -> str:
        row = attributed.get(q, {})
        return "tab:green" if row.get("passed_item_level") else "tab:orange" if row.get("passed") else "tab:red"

    ax.bar(
        x - 0.27,
        [attributed.get(q, {}).get("loss_rise", np.nan) for q in queries],
        width=0.27,
        color=[bar_color(q) for q in queries],
        label="attributed (green: both controls, orange: random only)",
    )
    ax.bar(
        x,
        [np.mean(randoms[q]) if randoms[q] else np.nan for q in queries],
        width=0.27,
        color="lightgray",
        label="random removals (mean, dots)",
    )
    ax.bar(
        x + 0.27,
        [same.get(q, np.nan) for q in queries],
        width=0.27,
        color="tab:blue",
        alpha=0.6,
        label="same artist, outside the top-k",
    )
    for i, q in enumerate(queries):
        ax.plot([x[i]] * len(randoms[q]), randoms[q], "o", color="dimgray", ms=3)
    sds = df["floor_sds"][0] if "floor_sds" in df.columns and len(df) else 2.0
    ax.hlines(
        [attributed.get(q, {}).get("noise_floor", np.nan) for q in queries],
        x - 0.45,
        x + 0.15,
        color="black",
        lw=1.2,
        label=f"noise floor (random mean + {sds:g} sd)",
    )
    ax.hlines(
        [attributed.get(q, {}).get("item_floor", np.nan) for q in queries],
        x + 0.1,
        x + 0.45,
        color="tab:blue",
        lw=1.2,
        label=f"item floor (same artist + {sds:g} sd)",
    )
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(x, queries, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("query loss rise vs full model")
    ax.legend(fontsize=6, frameon=False)
    ax.set_title(title, fontsize=9)
    return _png(fig)


def attribution_plot(root: Storage, query_id: str, config_id: str, scores: pl.DataFrame, k: int = 10) -> dict:
    """The top-k bar chart of one query and configuration, written to `plots/top_k/<query>/<config>.png`."""
    manifest = read_table(root, "training_manifest").select("item_id", "artist")
    target = None
    if table_exists(root, "queries", query_id=query_id):
        target = read_table(root, "queries", query_id=query_id)["target_artist"][0]
    method = scores["method"][0] if "method" in scores.columns and len(scores) else "unlearning"
    title = f"{query_id} · {method}:{config_id} · top-{k}" + (f" (target {target})" if target else "")
    png = top_k_bars(scores, manifest, title, k, target)
    return write_png(root, key("plot_top_k", query_id=query_id, config_id=config_id), png, title)
