"""The near-copy verdicts as `tda attribute` prints them (issue 24): the whole clip's above its top-k, each window's
of a long clip, and `--per-window`: a window of the clip attributed as its own query under the two-stage path."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import polars as pl
import soundfile as sf

from tda_assets.attribution.near_copy_segments import CLIP, WINDOW, verdict_line, verdict_of, window_query_id
from tda_assets.data.audio import check_clip
from tda_assets.data.inbox import QuerySpec, add_clip_query
from tda_assets.io.query_engine import QueryEngine
from tda_assets.io.storage import Storage
from tda_assets.io.uris import read_uri_bytes

from .display import print_frame

PER_WINDOW_CONFIG = "two-stage"  # the grid's configuration a window's own attribution runs under (multi-fidelity)


def near_copy_rows(engine: QueryEngine, query_id: str) -> pl.DataFrame:
    """The query's near_copies rows of the current identity: the whole clip first, then its windows in order."""
    return engine.sql(
        "SELECT * EXCLUDE (checkpoint_id, protocol_id) FROM near_copies "
        "SEMI JOIN current_identity USING (checkpoint_id, protocol_id) WHERE query_id = $q "
        f"ORDER BY segment <> '{CLIP}', segment_start_s",
        {"q": query_id},
    )


def print_near_copy(engine: QueryEngine, query_id: str) -> pl.DataFrame:
    """Print the whole clip's verdict line and, for a long clip, the verdict of each window; returns the rows."""
    rows = near_copy_rows(engine, query_id)
    clip = rows.filter(pl.col("segment") == CLIP)
    if clip.is_empty():
        print("near-copy: no verdict (materialize similarity_scores for this query again)")
        return rows
    print(verdict_line(verdict_of(clip.row(0, named=True))))
    windows = rows.filter(pl.col("segment") == WINDOW)
    if windows.height:
        print(f"near-copy per window ({windows['near_copy'].sum()} of {windows.height} flagged; table near_copies):")
        print_frame(
            windows.select(
                "segment_start_s", "segment_end_s", "near_copy", "copy_of", "copy_score", "margin", "signal"
            ).with_columns(pl.col("segment_start_s", "segment_end_s").round(2))
        )
    return rows


def window_query(root: Storage, parent: QuerySpec, start_s: float, end_s: float, roots: Sequence[str]) -> QuerySpec:
    """A window of `parent`'s clip as its own query (`window_query_id`), with the parent's prompt: cut at the clip's
    own rate (mono) and added through `add_clip_query` like any user's clip."""
    clip = check_clip(read_uri_bytes(parent.audio_uri, root), parent.query_id)
    part = clip.samples[round(start_s * clip.sample_rate) : round(end_s * clip.sample_rate)]
    query_id = window_query_id(parent.query_id, start_s)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"{query_id}.wav"
        sf.write(path, part, clip.sample_rate, subtype="FLOAT")
        return add_clip_query(root, str(path), parent.prompt, query_id, roots)


def attribute_windows(
    run,
    parent: QuerySpec,
    rows: pl.DataFrame,
    which: str,
    config,
    k: int,
    print_top: Callable[[str], None],
) -> int:
    """`tda attribute --per-window`: each chosen window (`which`: flagged or all) of the parent attributed as its own
    query under `config` (the two-stage path), with its verdict and top-k; returns the command's exit code."""
    windows = rows.filter(pl.col("segment") == WINDOW)
    if which == "flagged":
        windows = windows.filter(pl.col("near_copy"))
    if windows.is_empty():
        print(
            f"\nper window: no {'flagged ' if which == 'flagged' else ''}window to attribute "
            + ("(the clip fits one window: its attribution above is the answer)" if rows.height <= 1 else "")
        )
        return 0
    print(f"\nPer-window attribution: {windows.height} window(s), each its own query under {config.config_id!r}")
    roots = run.resources["inbox"].allowed_roots(run.root)
    failed = 0
    for start_s, end_s in windows.select("segment_start_s", "segment_end_s").rows():
        spec = window_query(run.root, parent, start_s, end_s, roots)
        began = time.perf_counter()
        try:
            run.attribute(spec.query_id, config)
        except Exception as exc:  # noqa: BLE001 - one window's failure is reported, the others still run
            print(f"  {start_s:.2f}–{end_s:.2f} s ({spec.query_id}): not attributed: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"\n==> {start_s:.2f}–{end_s:.2f} s: query {spec.query_id!r} in {time.perf_counter() - began:.0f}s")
        engine = QueryEngine(run.root, protocol_id=run.resources["protocol"].protocol().protocol_id)
        clip = near_copy_rows(engine, spec.query_id).filter(pl.col("segment") == CLIP)
        if clip.height:
            print(verdict_line(verdict_of(clip.row(0, named=True))))
        print(f"Top-{k} training items for this window ({config.config_id}):")
        print_top(spec.query_id)
    return 1 if failed else 0
