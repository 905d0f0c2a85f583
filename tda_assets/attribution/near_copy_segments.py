"""Near-copy verdicts per segment of a query (issue 24): the whole clip, as the similarity tables score it, and each
window of a clip longer than the model's window scored alone, so a medley says which seconds copy which item. The rule
itself is `near_copy.near_copy_verdict`; this module only applies it per window and words it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

from .near_copy import NearCopyVerdict, near_copy_verdict

if TYPE_CHECKING:  # torch only where windows are scored: `tda queries` and `tda export` read this module's names
    import torch

CLIP, WINDOW = "clip", "window"  # the `segment` of a near_copies row
VERDICT_FIELDS = tuple(f.name for f in fields(NearCopyVerdict))  # the verdict's columns of the near_copies table


@dataclass(frozen=True)
class SegmentVerdict:
    """The verdict of one segment: the whole clip (`CLIP`) or one window (`WINDOW`), from `start_s` to `end_s`."""

    segment: str
    start_s: float
    end_s: float
    verdict: NearCopyVerdict


def window_verdicts(
    windows: Mapping[str, torch.Tensor], items: Mapping[str, torch.Tensor], item_ids: Sequence[str]
) -> list[NearCopyVerdict]:
    """The verdict of each window scored on its own (`windows[name]` [w, D], one window at a time through
    `embedding_scores`, so no pooling over the clip) against the items' embeddings (`items[name]` [N, D])."""
    from .similarity import embedding_scores

    count = {len(w) for w in windows.values()}
    if len(count) != 1:
        raise ValueError(f"window_verdicts: the embeddings {sorted(windows)} have window counts {sorted(count)}")
    return [
        near_copy_verdict(
            {
                n: s.numpy().astype(np.float64)
                for n, s in embedding_scores({n: w[i : i + 1] for n, w in windows.items()}, items).items()
            },
            item_ids,
        )
        for i in range(count.pop())
    ]


def verdict_of(row: Mapping[str, object]) -> NearCopyVerdict:
    """The verdict of a near_copies row (a dict with the verdict's columns)."""
    return NearCopyVerdict(**{f: row[f] for f in VERDICT_FIELDS})


def verdict_line(verdict: NearCopyVerdict) -> str:
    """The verdict in words, as `tda attribute` and the UI print it above the top-k."""
    if verdict.copy_of is None:
        return f"near-copy: no (no {verdict.signal} similarity to any training item)"
    how = f"score {verdict.copy_score:.3f}, margin {verdict.margin:+.3f}, signal {verdict.signal}"
    if verdict.near_copy:
        return f"near-copy: yes — copy of {verdict.copy_of} ({how})"
    return f"near-copy: no (closest {verdict.copy_of}, {how})"


def window_query_id(parent: str, start_s: float) -> str:
    """The query id of one window of `parent` attributed on its own (`tda attribute --per-window`): `<parent>-at<s>s`
    (a safe slug: the parent cut to fit 64 characters)."""
    suffix = f"-at{math.floor(start_s + 1e-6)}s"
    return parent[: 64 - len(suffix)].rstrip("-_") + suffix
