"""The counterfactual verdicts (DESIGN §1, Evaluation): does retraining without a query's top-k attributed items raise
its loss more than retraining without k random items, and more than without k other items of its target artist?

Retraining from scratch on a slightly different set moves the query loss by itself (other batches, another trajectory),
so one random removal is no baseline. `n` random removals of k items give the noise: the floor is their mean rise plus
`sds` sample standard deviations, and a query `passed` when its attributed rise is above that floor. Removing any k
clips of the query's target artist raises that artist's query loss too, so `passed` shows artist-level attribution only;
the item-level control removes k items of the target artist outside the top-k, and a query `passed_item_level` when it
also passed and its attributed rise is above the same-artist rise by the same noise margin (`sds` random sds), since
each removal is one retrain with its own noise. Random removals do not depend on the query: one set of retrained models
serves every query, drawn outside every checked query's top-k (the floor measures removal noise, not the attributed
items' own effect), and the `n` random sets are distinct (an identical set would retrain the identical model and shrink
the spread to nothing).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

FLOOR_SDS = 2.0
MIN_RANDOM_REMOVALS = 2  # a standard deviation needs two; 3 is the default
REMOVALS = ("attributed", "random", "same_artist")  # the `removal` column's values
SHARED = "(shared)"  # the seed salt of the random removals, which every query shares


@dataclass(frozen=True)
class Verdict:
    """One query's counterfactual verdict against both controls: `floor` = random mean + sds · sd (`passed`: above it);
    `item_floor` = the same-artist rise + sds · sd (`passed_item_level`: `passed` and above it too)."""

    attributed_rise: float
    random_mean: float
    random_sd: float
    floor: float
    passed: bool
    same_artist_rise: float
    item_floor: float
    passed_item_level: bool


def noise_floor(random_rises: Sequence[float], sds: float = FLOOR_SDS) -> tuple[float, float, float]:
    """`(mean, sd, mean + sds · sd)` of the random removals' loss rises (sd: the sample standard deviation, ddof 1)."""
    rises = np.asarray(random_rises, dtype=np.float64)
    if len(rises) < MIN_RANDOM_REMOVALS:
        raise ValueError(
            f"the noise floor needs at least {MIN_RANDOM_REMOVALS} random removals, got {len(rises)}: "
            "set random_removals to 3 or more"
        )
    if not np.isfinite(rises).all():
        raise ValueError(
            f"a random removal's loss rise is not finite ({rises.tolist()}): the retrained model diverged; "
            "retrain with fewer steps or check the training data"
        )
    mean, sd = float(rises.mean()), float(rises.std(ddof=1))
    return mean, sd, mean + sds * sd


def verdict(
    attributed_rise: float, random_rises: Sequence[float], same_artist_rise: float, sds: float = FLOOR_SDS
) -> Verdict:
    """`passed`: the attributed rise is strictly above the random removals' noise floor; `passed_item_level`: it passed
    and is strictly above the same-artist rise plus `sds` random sds (a NaN rise passes nothing)."""
    mean, sd, floor = noise_floor(random_rises, sds)
    item_floor = float(same_artist_rise) + sds * sd
    passed = bool(np.isfinite(attributed_rise) and attributed_rise > floor)
    item_level = bool(passed and np.isfinite(same_artist_rise) and attributed_rise > item_floor)
    return Verdict(float(attributed_rise), mean, sd, floor, passed, float(same_artist_rise), item_floor, item_level)


def share_passing(verdicts: Iterable[Verdict], item_level: bool = False) -> float:
    """The share of queries that pass (`item_level`: against both controls); NaN for none."""
    passed = [v.passed_item_level if item_level else v.passed for v in verdicts]
    return float(np.mean(passed)) if passed else float("nan")


def majority_passes(verdicts: Iterable[Verdict], item_level: bool = False) -> bool:
    """The check over queries: more than half of them pass (one query: it must pass; two: both; three: two)."""
    share = share_passing(verdicts, item_level)
    return bool(share > 0.5)  # NaN (no query) fails


def _salt(label: str) -> int:
    return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")


def random_items(item_ids: Sequence[str], k: int, seed: int, label: str, exclude: Iterable[str] = ()) -> list[str]:
    """k items of `item_ids` not in `exclude`, drawn without replacement, seeded by `(seed, label)` (the same on every
    machine); returned in corpus order."""
    excluded = set(exclude)
    pool = [i for i in item_ids if i not in excluded]
    rng = np.random.default_rng([seed, _salt(label)])
    return [pool[i] for i in sorted(rng.choice(len(pool), size=min(k, len(pool)), replace=False))]


def same_artist_items(
    item_ids: Sequence[str],
    artists: Sequence[str | None],
    target_artist: str,
    k: int,
    seed: int,
    query_id: str,
    exclude: Iterable[str] = (),
) -> list[str]:
    """The item-level control: k items of `target_artist` (`artists[i]` is item i's) outside `exclude` (the query's
    top-k), seeded by `(seed, query_id)`. ValueError when the artist has fewer than k such items."""
    if len(artists) != len(item_ids):
        raise ValueError(f"{len(artists)} artists for {len(item_ids)} items")
    excluded = set(exclude)
    pool = [i for i, a in zip(item_ids, artists) if a == target_artist and i not in excluded]
    if len(pool) < k:
        raise ValueError(
            f"query {query_id!r}: artist {target_artist!r} has {len(pool)} items outside the query's top-{k}, "
            f"the same-artist control needs {k}: lower k or check a query of an artist with more items"
        )
    return random_items(pool, k, seed, query_id)


def random_removals(
    item_ids: Sequence[str], k: int, n: int, seed: int, exclude: Iterable[str] = ()
) -> list[tuple[int, list[str]]]:
    """`n` distinct random removals `(seed_used, items)` shared by every query, outside `exclude` (every checked query's
    top-k): seeds `seed, seed + 1, …`, a seed whose set repeats an earlier one skipped. ValueError when the items
    outside `exclude` cannot make `n` distinct sets of k."""
    excluded = set(exclude)
    pool = len([i for i in item_ids if i not in excluded])
    if pool < k or math.comb(pool, k) < n:
        raise ValueError(
            f"{pool} items outside the {len(excluded)} attributed to the checked queries cannot make {n} "
            f"distinct random removals of {k}: lower k or random_removals, or use a bigger corpus"
        )
    out: list[tuple[int, list[str]]] = []
    seen: set[tuple[str, ...]] = set()
    s = seed
    while len(out) < n:
        if s - seed >= 100 * n:
            raise ValueError(
                f"only {len(out)} distinct random removals of {k} in {100 * n} seeds from {pool} items: "
                "lower k or random_removals, or use a bigger corpus"
            )
        items = random_items(item_ids, k, s, SHARED, excluded)
        if tuple(items) not in seen:
            seen.add(tuple(items))
            out.append((s, items))
        s += 1
    return out
