"""The counterfactual verdict (DESIGN §1, Evaluation): is a query's loss rise after retraining without its top-k attributed
items above the noise of retraining without k random items?

Retraining from scratch on a slightly different set moves the query loss by itself (other batches, another trajectory),
so one random removal is no baseline. Per query, `n` random removals of k items give the noise: the floor is their mean
rise plus `sds` sample standard deviations, and the query passes when its attributed rise is above that floor. A random
removal never takes an attributed item (the floor measures removal noise, not the attributed items' own effect), and the
`n` random sets are distinct (an identical set would retrain the identical model and shrink the spread to nothing).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

FLOOR_SDS = 2.0
MIN_RANDOM_REMOVALS = 2  # a standard deviation needs two; 3 is the default


@dataclass(frozen=True)
class Verdict:
    """One query's counterfactual verdict."""

    attributed_rise: float
    random_mean: float
    random_sd: float
    floor: float
    passed: bool


def noise_floor(random_rises: Sequence[float], sds: float = FLOOR_SDS) -> tuple[float, float, float]:
    """`(mean, sd, mean + sds · sd)` of the random removals' loss rises (sd: the sample standard deviation, ddof 1)."""
    rises = np.asarray(random_rises, dtype=np.float64)
    if len(rises) < MIN_RANDOM_REMOVALS:
        raise ValueError(f"the noise floor needs at least {MIN_RANDOM_REMOVALS} random removals, got {len(rises)}: "
                         "set random_removals to 3 or more")
    if not np.isfinite(rises).all():
        raise ValueError(f"a random removal's loss rise is not finite ({rises.tolist()}): the retrained model diverged; "
                         "retrain with fewer steps or check the training data")
    mean, sd = float(rises.mean()), float(rises.std(ddof=1))
    return mean, sd, mean + sds * sd


def verdict(attributed_rise: float, random_rises: Sequence[float], sds: float = FLOOR_SDS) -> Verdict:
    """The query passes when the attributed removal raises its loss strictly above the random removals' noise floor."""
    mean, sd, floor = noise_floor(random_rises, sds)
    passed = bool(np.isfinite(attributed_rise) and attributed_rise > floor)
    return Verdict(float(attributed_rise), mean, sd, floor, passed)


def share_passing(verdicts: Iterable[Verdict]) -> float:
    """The share of queries that pass (NaN for none)."""
    passed = [v.passed for v in verdicts]
    return float(np.mean(passed)) if passed else float("nan")


def majority_passes(verdicts: Iterable[Verdict]) -> bool:
    """The check over queries: more than half of them pass (one query: it must pass; two: both; three: two)."""
    share = share_passing(verdicts)
    return bool(share > 0.5)  # NaN (no query) fails


def _query_mix(query_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(query_id.encode(), digest_size=8).digest(), "little")


def random_items(item_ids: Sequence[str], k: int, seed: int, query_id: str, exclude: Iterable[str] = ()) -> list[str]:
    """k items of `item_ids` not in `exclude`, drawn without replacement, seeded by `(seed, query_id)` (the same on every
    machine); returned in corpus order."""
    excluded = set(exclude)
    pool = [i for i in item_ids if i not in excluded]
    rng = np.random.default_rng([seed, _query_mix(query_id)])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]


def random_removals(item_ids: Sequence[str], k: int, n: int, seed: int, query_id: str,
                    exclude: Iterable[str] = ()) -> list[tuple[int, list[str]]]:
    """`n` distinct random removals `(seed_used, items)`: seeds `seed, seed + 1, …`, a seed whose set repeats an earlier
    one skipped. ValueError when the items outside `exclude` cannot make `n` distinct sets of k."""
    excluded = set(exclude)
    pool = len([i for i in item_ids if i not in excluded])
    if pool < k or math.comb(pool, k) < n:
        raise ValueError(f"query {query_id!r}: {pool} items outside the {len(excluded)} attributed cannot make {n} distinct "
                         f"random removals of {k}: lower k or random_removals, or use a bigger corpus")
    out: list[tuple[int, list[str]]] = []
    seen: set[tuple[str, ...]] = set()
    s = seed
    while len(out) < n:
        if s - seed >= 100 * n:
            raise ValueError(f"query {query_id!r}: only {len(out)} distinct random removals of {k} in {100 * n} seeds "
                             f"from {pool} items: lower k or random_removals, or use a bigger corpus")
        items = random_items(item_ids, k, s, query_id, excluded)
        if tuple(items) not in seen:
            seen.add(tuple(items))
            out.append((s, items))
        s += 1
    return out
