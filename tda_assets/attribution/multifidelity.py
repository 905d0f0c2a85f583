"""Multi-fidelity exact scoring (DESIGN §1, `stage: two_stage`): rescore only the cheap signals' candidates, exactly,
with successive halving over the protocol's draws.

Stage 1 evaluates the first `first_draws` draws of every candidate; the top `keep` of them by that partial score get
the remaining draws (at least `min_keep`, the headline top-k), so survivors carry the full-K exact score and no draw
is evaluated twice. Ranks: survivors by
exact score, then candidates dropped after stage 1 by their partial score, then items never rescored (by their mean
rank over the cheap signals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from .adapter import DiTAdapter, ItemBatch, apply_delta
from .devices import Compute
from .losses import DrawLosses, batch_losses
from .protocol import LossProtocol
from .scores import score_columns
from .settings import count_of

# (item indices, first draw, stop draw) -> unlearned per-draw losses [len(indices), stop - first]
UnlearnedLosses = Callable[[np.ndarray, int, int], np.ndarray]


@dataclass
class TwoStageResult:
    """Per item: exact score (NaN if not rescored), draws it used (0 = not rescored), 1-based rank."""

    score: np.ndarray
    draws_used: np.ndarray
    rank: np.ndarray

    @property
    def rescored(self) -> np.ndarray:
        return self.draws_used > 0

    @property
    def item_draws(self) -> int:
        """Unlearned-model forward rows (item-draws) the result cost."""
        return int(self.draws_used.sum())


def signal_ranks(signals: Mapping[str, np.ndarray]) -> np.ndarray:
    """[len(signals), N] 0-based descending ranks of each cheap signal (NaN scores last)."""
    out = []
    for s in signals.values():
        s = np.asarray(s, dtype=np.float64)
        order = np.argsort(-np.nan_to_num(s, nan=-np.inf), kind="stable")
        r = np.empty(len(s), dtype=np.int64)
        r[order] = np.arange(len(s))
        out.append(r)
    return np.stack(out)


def candidates(signals: Mapping[str, np.ndarray], top: int | float) -> np.ndarray:
    """Sorted indices in the union of the top `top` (count, or fraction of N) items of every cheap signal."""
    ranks = signal_ranks(signals)
    return np.flatnonzero((ranks < count_of(top, ranks.shape[1])).any(axis=0))


def first_stage_draws(draws: int, first_draws: int | None) -> int:
    """The draws every candidate gets first (`first_draws` None: K/4; at most K)."""
    return max(1, draws // 4) if first_draws is None else max(1, min(int(first_draws), draws))


def survivor_count(n_candidates: int, keep: int | float, min_keep: int) -> int:
    """How many candidates get all K draws after the first stage: `keep` of them, at least `min_keep`, at most all."""
    return min(n_candidates, max(count_of(keep, n_candidates), min_keep))


def two_stage(
    baseline: np.ndarray,
    unlearned_losses: UnlearnedLosses,
    signals: Mapping[str, np.ndarray],
    top: int | float = 0.25,
    first_draws: int | None = None,
    keep: int | float = 0.5,
    min_keep: int = 10,
    score_type: str = "mean_delta",
    item_norms: np.ndarray | None = None,
) -> TwoStageResult:
    """Exact scores (of `score_type`) of the signals' candidates by successive halving (`first_draws` None: K/4;
    ≥ K: no halving); `item_norms` [N] for score_type `normalized`. Scores are `score_columns` of the draws evaluated,
    over all N items, so the normalized score's floor is the same fraction of the same median as the full rescore's."""
    n, k = baseline.shape
    if any(len(s) != n for s in signals.values()):
        raise ValueError("every cheap signal needs one score per item of the baseline")
    cand = candidates(signals, top)
    j = first_stage_draws(k, first_draws)
    after = np.full((n, k), np.nan)
    after[cand, :j] = unlearned_losses(cand, 0, j)
    if j < k:
        partial = score_columns(baseline[:, :j], score_type, item_norms, unlearned=after[:, :j])["score"]
        survivors = cand[np.argsort(-partial[cand], kind="stable")[: survivor_count(len(cand), keep, min_keep)]]
        survivors.sort()
        after[survivors, j:] = unlearned_losses(survivors, j, k)
    s = score_columns(baseline, score_type, item_norms, unlearned=after, fallback=signal_ranks(signals).mean(axis=0))
    return TwoStageResult(s["score"], s["draws_used"], s["rank"])


def staged_scores(
    baseline: np.ndarray,
    unlearned: np.ndarray,
    fallback: np.ndarray,
    score_type: str = "mean_delta",
    item_norms: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The `attribution_scores` columns of a two-stage rescore, from its recorded losses: `score_columns` with the
    NaN draws of `unlearned` [N, K] as not evaluated (a prefix 0…d−1 per item) and `fallback` ranking the items never
    rescored (lower first, e.g. the mean rank over the cheap signals). With every item at K draws this is
    `scores.attribution_scores` exactly."""
    return score_columns(baseline, score_type, item_norms, unlearned=unlearned, fallback=fallback)


def unlearned_losses_fn(
    adapter: DiTAdapter,
    items: ItemBatch,
    delta: dict[str, torch.Tensor],
    protocol: LossProtocol,
    compute: Compute,
    masked: bool = False,
    items_per_pass: int = 64,
    record: list[tuple[np.ndarray, int, DrawLosses]] | None = None,
) -> UnlearnedLosses:
    """The exact path for `two_stage`: per-draw losses of `items[indices]` at draws `[start, stop)` under θ0 + delta.

    With `record`, every evaluation is appended as `(indices, start, DrawLosses)` (both loss columns: what the
    `unlearned_losses` table stores).
    """

    def losses(indices: np.ndarray, start: int, stop: int) -> np.ndarray:
        window = protocol.window(start, stop)
        out = np.empty((len(indices), stop - start))
        with apply_delta(adapter.denoiser, delta):
            for lo in range(0, len(indices), items_per_pass):
                sub = items.select([int(i) for i in indices[lo : lo + items_per_pass]])
                part = batch_losses(adapter, sub, window, compute)
                out[lo : lo + len(sub)] = part.select(masked).numpy()
                if record is not None:
                    record.append((indices[lo : lo + items_per_pass], start, part))
        return out

    return losses
