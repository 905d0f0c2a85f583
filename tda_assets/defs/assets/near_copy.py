"""Near-copy calibration (issue 24): the near-copy rule (attribution/near_copy.py) on queries whose answer is known.

Copies: each source item's audio at its own rate after every transform of `NEAR_COPY_TRANSFORMS`, decoded and
resampled to the model's rate like a user's clip, conditioned on the prompt a clip without one gets. Non-copies:
held-out renders of the embedded corpus's artists (seeds no corpus uses; a render that is the same recording as a
training clip is dropped, by waveform correlation) and the clips the current model generated for the built-in
queries. Sources and held-out renders come in two disjoint sets: development (the self-influence development targets;
they chose the threshold) and reporting (the figures: view `near_copy_summary`). Only encoders and embeddings run: no
unlearning."""

from collections.abc import Iterator

import numpy as np
import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from resources import ComputeResource, LossProtocolResource, ModelSourceResource, StorageResource
from tda_assets.attribution.adapter import ItemBatch
from tda_assets.attribution.near_copy import NEAR_COPY_THRESHOLD, NearCopyVerdict, choose_threshold, near_copy_verdict
from tda_assets.attribution.replication import NEAR_COPY_TRANSFORMS, snr_db_aligned
from tda_assets.attribution.self_influence import TARGET_SETS, targets_of, wilson_lower
from tda_assets.attribution.similarity import embedding_scores, embeddings
from tda_assets.data.audio import Clip, as_query_clip, check_clip
from tda_assets.data.corpus import ARTISTS, SAMPLE_RATE, render_clip
from tda_assets.data.inbox import DEFAULT_AUDIO_PROMPT
from tda_assets.defs.model_step import ModelStep, model_step
from tda_assets.defs.tags import GPU
from tda_assets.io.artifacts import query_batch, read_training_embeddings
from tda_assets.io.registry import TABLES
from tda_assets.io.tables import read_table, read_tables, write_table
from tda_assets.io.uris import read_uri_bytes

# Ground truth, from the waveforms alone: two clips are one recording when their normalized cross-correlation at its
# best lag reaches this (the embedded corpus's slowest style repeats melodies, sometimes a fraction of a beat later)
SAME_RECORDING = 0.95


class NearCopyCalibrationConfig(Config):
    """How many reporting sources and held-out renders; the development sources are the self-influence ones."""

    n_sources: int = Field(default=24, description="reporting sources (k-means-chosen outside the development targets)")
    heldout_per_artist: int = Field(
        default=6, description="held-out renders per artist of the embedded corpus, in each target set"
    )
    seed: int = 0


def best_lag_correlation(a: np.ndarray, others: list[np.ndarray]) -> np.ndarray:
    """The normalized cross-correlation at its best lag [n] of clip `a` with each of `others` (one sample rate)."""
    if not others:
        return np.zeros(0)
    n = len(a) + max(len(o) for o in others)
    fa = np.fft.rfft(a, n)
    out = []
    for o in others:
        denom = float(np.linalg.norm(a) * np.linalg.norm(o))
        out.append(float(np.fft.irfft(fa * np.conj(np.fft.rfft(o, n)), n).max()) / denom if denom > 0 else 0.0)
    return np.array(out)


def same_recording(a: np.ndarray, others: list[np.ndarray]) -> bool:
    """Whether clip `a` is one recording with any of `others`: best-lag correlation ≥ SAME_RECORDING."""
    return bool((best_lag_correlation(a, others) >= SAME_RECORDING).any())


def heldout_seed(j: int) -> int:
    """The render seed of held-out clip `j`: negative, which `generate_corpus` (clip seeds seed·1000003 + i ≥ 0 for a
    corpus seed ≥ 0) never uses."""
    return -(j + 1)


class _Scorer:
    """The product's path from query clips to verdicts: encoders, `embeddings`, `embedding_scores`, the rule."""

    def __init__(self, step: ModelStep, items):
        self.step, self.items = step, items

    def clips(self, clips: list[np.ndarray], ids: list[str]) -> list[NearCopyVerdict]:
        adapter = self.step.adapter
        latents, mask = adapter.encode_audio(clips)
        seconds = [len(c) / adapter.sample_rate for c in clips]
        cond = adapter.encode_text([DEFAULT_AUDIO_PROMPT] * len(clips), ids, durations=seconds)
        return self.batch(ItemBatch(ids, latents, cond, mask))

    def batch(self, batch: ItemBatch) -> list[NearCopyVerdict]:
        emb = embeddings(self.step.adapter, batch, self.step.protocol, self.step.compute)
        out = []
        for i in range(len(batch)):
            scores = embedding_scores({n: m[i : i + 1] for n, m in emb.items()}, self.items.matrices)
            out.append(near_copy_verdict({n: s.numpy() for n, s in scores.items()}, self.items.item_ids))
        return out


def _row(target_set: str, kind: str, query_id: str, verdict: NearCopyVerdict, correct: bool, **extra) -> dict:
    return {
        "target_set": target_set,
        "kind": kind,
        "query_id": query_id,
        "near_copy": verdict.near_copy,
        "copy_of": verdict.copy_of,
        "copy_score": verdict.copy_score,
        "margin": verdict.margin,
        "signal": verdict.signal,
        "correct": correct,
        **extra,
    }


@asset(
    group_name="evaluation",
    **GPU,
    deps=[AssetKey("checkpoint"), AssetDep(AssetKey("training_embeddings"), partition_mapping=AllPartitionMapping())],
    description="The near-copy rule on known answers: training items after each transform (fade, shift, resampling, "
    "MP3, Ogg Vorbis, reverb, crop, speed change, white noise at 30 and 40 dB SNR) as copies; held-out renders of the "
    "same artists and the built-in queries' generated clips as non-copies; development sources chose the threshold, "
    "reporting sources give the figures (view near_copy_summary).",
)
def near_copy_calibration(
    context: AssetExecutionContext,
    config: NearCopyCalibrationConfig,
    storage: StorageResource,
    model_source: ModelSourceResource,
    compute: ComputeResource,
    protocol: LossProtocolResource,
) -> Iterator:
    step = model_step(storage, model_source, compute, protocol)
    root, identity, record, adapter = step.root, step.identity, step.record, step.adapter
    items = read_training_embeddings(root, identity, record.encoder_id)
    scorer = _Scorer(step, items)
    manifest = read_table(root, "training_manifest").filter(pl.col("item_id").is_in(items.item_ids))
    rows_of = {r["item_id"]: r for r in manifest.iter_rows(named=True)}
    audio: dict[str, Clip] = {}

    def source(item_id: str) -> Clip:  # at the file's own rate, read once
        if item_id not in audio:
            audio[item_id] = check_clip(read_uri_bytes(rows_of[item_id]["audio_uri"], root), item_id)
        return audio[item_id]

    def points_home(copy_of: str | None, item_id: str) -> bool:  # the source itself, or a duplicate of its recording
        if copy_of == item_id:
            return True
        return copy_of in rows_of and same_recording(source(copy_of).samples, [source(item_id).samples])

    band = (0.0, adapter.sample_rate / 2)
    audio_emb = items.matrices["audio"].numpy()  # the embedding self-influence and replication choose targets on
    sources = {s: targets_of(s, audio_emb, items.item_ids, config.n_sources, config.seed) for s in TARGET_SETS}
    rows, home = [], []  # home: whether each copy's closest item is its own recording (whatever the threshold)
    for target_set, ids in sources.items():
        for item_id in ids:
            src = source(item_id)
            names = list(NEAR_COPY_TRANSFORMS)
            transformed = [NEAR_COPY_TRANSFORMS[n](src.samples, src.sample_rate) for n in names]
            qids = [f"{item_id}~{n}" for n in names]
            clips = [as_query_clip(y, src.sample_rate, q, adapter.sample_rate) for y, q in zip(transformed, qids)]
            for name, qid, y, v in zip(names, qids, transformed, scorer.clips(clips, qids)):
                ok = points_home(v.copy_of, item_id)
                snr = snr_db_aligned(src.samples, y, src.sample_rate, band)
                extra = {"source_item_id": item_id, "artist": rows_of[item_id]["artist"], "transform": name}
                rows.append(_row(target_set, "copy", qid, v, bool(v.near_copy and ok), snr_db=snr, **extra))
                home.append((target_set, name, v.copy_score) if ok else None)
    rows += _heldout_rows(scorer, manifest, source, config.heldout_per_artist, adapter.sample_rate, context)
    rows += _generated_rows(scorer, root, record)
    df = pl.DataFrame(rows, schema=TABLES["near_copy_calibration"].polars_schema())
    uri = write_table(root, "near_copy_calibration", df, **identity.keys())
    chosen = _development_threshold(home, df)
    summary = _summary(df.filter(pl.col("target_set") == "reporting"))
    context.log.info(
        f"near-copy rule (threshold {NEAR_COPY_THRESHOLD}; the development rows would choose {chosen:.4f}), "
        "reporting recall: "
        + ", ".join(f"{r['transform']} {r['k']}/{r['n']}" for r in summary["recall"])
        + f"; false positives {summary['fp_k']}/{summary['fp_n']}"
    )
    yield MaterializeResult(
        metadata={
            "threshold": NEAR_COPY_THRESHOLD,
            "development_threshold": round(chosen, 4),
            "sources": MetadataValue.json(sources),
            "recall": MetadataValue.json(summary["recall"]),
            "false_positives": f"{summary['fp_k']}/{summary['fp_n']}",
            "rows": df.height,
            "uri": MetadataValue.path(uri),
            **identity.keys(),
        }
    )


def _development_threshold(home: list, df: pl.DataFrame) -> float:
    """What `choose_threshold` makes of the development rows: the copies whose closest item is their own recording
    (`home`: (target_set, transform, score) or None per copy), the non-copies' closest-item scores."""
    copies: dict[str, list[float]] = {name: [] for name in NEAR_COPY_TRANSFORMS}
    for target_set, name, score in (h for h in home if h is not None):
        if target_set == "development":
            copies[name].append(score)
    others = df.filter((pl.col("target_set") == "development") & (pl.col("kind") != "copy"))["copy_score"]
    if others.is_empty():
        return float("nan")
    return choose_threshold({k: np.array(v) for k, v in copies.items()}, others.to_numpy())


def _heldout_rows(scorer: _Scorer, manifest: pl.DataFrame, source, per_set: int, model_rate: int, context) -> list:
    """Non-copies: `per_set` renders per set and artist of the embedded corpus in the manifest, at unused seeds; a
    render that is the same recording as one of its artist's training clips is dropped (and logged)."""
    styles = {s.name: s for s in ARTISTS}
    rows, dropped = [], []
    for artist in sorted(set(manifest["artist"].to_list()) & set(styles)):
        own = [source(i).samples for i in manifest.filter(pl.col("artist") == artist)["item_id"].to_list()]
        for s, target_set in enumerate(TARGET_SETS):
            clips, ids = [], []
            for j in range(s * per_set, (s + 1) * per_set):
                render = render_clip(styles[artist], heldout_seed(j))
                qid = f"heldout:{artist}:{heldout_seed(j)}"
                if same_recording(render, own):
                    dropped.append(qid)
                    continue
                clips.append(as_query_clip(render, SAMPLE_RATE, qid, model_rate))
                ids.append(qid)
            if ids:
                for qid, v in zip(ids, scorer.clips(clips, ids)):
                    rows.append(_row(target_set, "heldout", qid, v, not v.near_copy, artist=artist))
    if dropped:
        context.log.info(f"near-copy calibration: held-out renders dropped as a training clip's recording: {dropped}")
    return rows


def _generated_rows(scorer: _Scorer, root, record) -> list:
    """Non-copies on the reporting side: the clips the current checkpoint generated for queries (the built-in ones)."""
    queries = read_tables(root, "queries")
    if queries.is_empty():
        return []
    mine = queries.filter(pl.col("generated_by") == record.checkpoint_id).sort("query_id")
    rows = []
    for row in mine.iter_rows(named=True):
        batch = query_batch(root, row["query_id"], record.encoder_id, record.checkpoint_id)
        (v,) = scorer.batch(batch.select(slice(0, 1)))
        rows.append(_row("reporting", "generated", row["query_id"], v, not v.near_copy, artist=row["target_artist"]))
    return rows


def _summary(reporting: pl.DataFrame) -> dict:
    """Per transform k/n with the Wilson lower end, and the false positives, of the reporting rows (as the view)."""
    copies = reporting.filter(pl.col("kind") == "copy")
    recall = []
    for (t,), g in sorted(copies.group_by("transform"), key=lambda x: x[0]):
        k = int(g["correct"].sum())
        recall.append({"transform": t, "k": k, "n": g.height, "recall_low": round(wilson_lower(k, g.height), 3)})
    others = reporting.filter(pl.col("kind") != "copy")
    return {"recall": recall, "fp_k": int(others["near_copy"].sum()), "fp_n": others.height}
